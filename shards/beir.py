# Copyright ropebert contributors. Apache-2.0.
"""The one BEIR reader and writer (shards build, mining, retrieval evaluation, the needle task, the demo).

A BEIR directory holds
    corpus.jsonl        {"_id", "title"?, "text"} per line
    queries.jsonl       {"_id", "text"} per line
    qrels/<split>.tsv   query-id, corpus-id, grade per line: 3 tab-separated columns, or the 4-column TREC layout
                        (query-id iteration corpus-id grade, tabs or spaces); an optional header line whose first
                        column is `query-id` / `qid` / `query_id`. Grades are integers (`2` or `2.0`); any other
                        value is a bad line, never mistaken for a header.
Every bad line and every repeated `_id` is a `Bad` naming file:line; callers fail on the first one or count them
(`--on-error skip`). Passage text is `title + " " + text` (BEIR's convention), or `text` without a title.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

from ropebert.errors import InputError

from .format import sanitize_key
from .records import Bad, BadField, Record, scan_jsonl, text_field

QRELS_HEADER = ("query-id", "qid", "query_id")


@dataclass
class Judgement:
    qid: str
    did: str
    grade: int
    where: str


@dataclass
class BeirDir:
    """A BEIR directory read line by line: every object with its location, every judgement, every Bad."""

    root: Path
    split: str
    corpus: dict[str, tuple[dict, str]]  # _id -> (object, "file:line")
    queries: dict[str, tuple[dict, str]]
    judgements: list[Judgement]  # sorted by (query-id, corpus-id); a repeated judgement follows its first
    bads: list[Bad] = field(default_factory=list)

    def raise_first_bad(self) -> None:
        if self.bads:
            more = f" (+{len(self.bads) - 1} more)" if len(self.bads) > 1 else ""
            raise InputError(self.bads[0].message() + more)

    def qrels(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for j in self.judgements:
            out.setdefault(j.qid, {})[j.did] = j.grade
        return out

    def query_text(self, qid: str) -> str:
        return text_field(self.queries[qid][0], "text")

    def passage(self, did: str) -> str:
        """Passage text of a corpus document (BadField when its text is missing, not a string or empty)."""
        doc, where = self.corpus[did]
        if not isinstance(doc.get("text"), str):
            raise BadField("missing field" if "text" not in doc else "field is not a string",
                           f"'text' of corpus _id {did!r} ({where})")
        p = passage_text(doc)
        if not p.strip():
            raise BadField("empty or whitespace-only text", f"corpus _id {did!r} ({where})")
        return p


def passage_text(doc: dict) -> str:
    title, text = str(doc.get("title") or "").strip(), str(doc.get("text") or "")
    return f"{title} {text}" if title else text


def scan_objects(path: Path) -> Iterator[Union[tuple[dict, str], Bad]]:
    """(object, "file:line") per non-blank line of a corpus/queries file, or a Bad naming file:line."""
    for item in scan_jsonl(path):
        if isinstance(item, Bad):
            yield item
            continue
        _, where, obj = item
        if not isinstance(obj, dict):
            yield Bad(where, "not a JSON object", type(obj).__name__)
        elif "_id" not in obj:
            yield Bad(where, "missing field", "'_id'")
        else:
            yield obj, where


def load_objects(path: Path, what: str) -> tuple[dict[str, tuple[dict, str]], list[Bad]]:
    """{_id: (object, where)} of a corpus/queries file plus the Bads met (bad lines, repeated _ids)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: missing (BEIR {what} file)")
    objs: dict[str, tuple[dict, str]] = {}
    bads: list[Bad] = []
    for x in scan_objects(path):
        if isinstance(x, Bad):
            bads.append(x)
            continue
        obj, where = x
        i = str(obj["_id"])
        if i in objs:
            bads.append(Bad(where, "duplicate key", f"{what} _id {i!r} first seen at {objs[i][1]}"))
            continue
        objs[i] = (obj, where)
    return objs, bads


def _grade(text: str) -> Optional[int]:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        f = float(text)
    except ValueError:
        return None
    return int(f) if f.is_integer() else None


def scan_qrels(path: Path) -> Iterator[Union[Judgement, Bad]]:
    """One Judgement per qrels line (see the module docstring for the accepted layouts), or a Bad."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: missing (BEIR qrels file)")
    first = True
    with open(path, "rb") as f:
        for ln, raw in enumerate(f, 1):
            where = f"{path}:{ln}"
            if not raw.strip():
                continue
            is_first, first = first, False
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                yield Bad(where, "non-UTF-8 bytes", f"byte {e.start}")
                continue
            cols = [c.strip() for c in line.split("\t")] if "\t" in line else line.split()
            if is_first and cols and cols[0] in QRELS_HEADER:
                continue
            if len(cols) == 4:  # TREC: query-id iteration corpus-id grade
                cols = [cols[0], cols[2], cols[3]]
            if len(cols) != 3 or not cols[0] or not cols[1]:
                yield Bad(where, "malformed qrels line",
                          f"expected 3 columns query-id<TAB>corpus-id<TAB>grade (or TREC's 4), got {len(cols)}")
                continue
            g = _grade(cols[2])
            if g is None:
                yield Bad(where, "malformed qrels line", f"grade {cols[2]!r} is not an integer")
                continue
            yield Judgement(cols[0], cols[1], g, where)


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """{query-id: {corpus-id: grade}}; the first bad line is an InputError naming file:line."""
    qrels: dict[str, dict[str, int]] = {}
    for j in scan_qrels(path):
        if isinstance(j, Bad):
            raise InputError(j.message())
        qrels.setdefault(j.qid, {})[j.did] = j.grade
    if not qrels:
        raise InputError(f"{path}: no judgements")
    return qrels


def read_beir(root: str | Path, split: str = "test") -> BeirDir:
    """Read a whole BEIR directory; bad lines and repeated ids are collected in `.bads`, not raised."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: BEIR directory does not exist")
    corpus, bads = load_objects(root / "corpus.jsonl", "corpus")
    queries, qbads = load_objects(root / "queries.jsonl", "query")
    judgements, jbads = [], []
    for x in scan_qrels(root / "qrels" / f"{split}.tsv"):
        (jbads if isinstance(x, Bad) else judgements).append(x)
    judgements.sort(key=lambda j: (j.qid, j.did))  # stable
    return BeirDir(root, split, corpus, queries, judgements, bads + qbads + jbads)


def judged_pairs(beir: BeirDir, min_grade: int = 1) -> Iterator[Union[Record, Bad]]:
    """(query -> judged passage) Records, one per judgement with grade >= min_grade, in (query-id, corpus-id)
    order, keyed `<query-id>-<corpus-id>`; a judgement naming an unknown query or document, or an empty text, is a
    Bad at the qrels line. The directory's own bad lines come first."""
    yield from beir.bads
    for j in beir.judgements:
        if j.grade < min_grade:
            continue
        if j.qid not in beir.queries:
            yield Bad(j.where, "unknown query id", j.qid)
            continue
        if j.did not in beir.corpus:
            yield Bad(j.where, "unknown corpus id", j.did)
            continue
        try:
            q, p = beir.query_text(j.qid), beir.passage(j.did)
        except BadField as e:
            yield Bad(j.where, e.reason, e.detail)
            continue
        yield Record(sanitize_key(f"{j.qid}-{j.did}"), {"query": q, "positive": p,
                                                        "meta": {"qid": j.qid, "doc_id": j.did, "grade": j.grade}},
                     j.where, f"{j.qid}-{j.did}")


def write_beir(out: str | Path, corpus: Iterable[dict], queries: Iterable[dict],
               qrels: Iterable[tuple[str, str, int]], split: str = "test") -> Path:
    """Write a BEIR directory (corpus.jsonl, queries.jsonl, qrels/<split>.tsv with a header) readable by
    read_beir. Written into a temporary sibling and renamed into place when complete."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; write_beir never replaces a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "qrels").mkdir()
        with open(tmp / "corpus.jsonl", "w", encoding="utf-8") as f:
            for d in corpus:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
        with open(tmp / "queries.jsonl", "w", encoding="utf-8") as f:
            for q in queries:
                f.write(json.dumps(q, ensure_ascii=False) + "\n")
        with open(tmp / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for qid, did, grade in qrels:
                f.write(f"{qid}\t{did}\t{int(grade)}\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
