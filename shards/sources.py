# Copyright ropebert contributors. Apache-2.0.
"""Input sources for `ropebert shards build`, keyed by `--format` in SOURCES.

A source is a function `(inputs, opts) -> (description, iterator)`; the iterator yields `Record`s (a valid
sample with its key and where it came from) or `Bad`s (what is wrong and where: "file:line"). The build loop
applies the error policy (fail on the first Bad, or count and skip) and checks duplicate keys globally.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from .format import sanitize_key


@dataclass
class Record:
    key: str
    sample: dict
    where: str  # "file:line" (or "package/module.py:line" for docstrings)


@dataclass
class Bad:
    where: str
    reason: str  # short category, e.g. "malformed JSON"
    detail: str = ""

    def message(self) -> str:
        return f"{self.where}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class SourceOptions:
    query_field: str = "query"
    passage_field: str = "positive"
    key_field: Optional[str] = None
    title_field: Optional[str] = None
    negatives_field: Optional[str] = None
    scores_field: Optional[str] = None
    num_negatives: Optional[int] = None
    beir_mode: str = "qrels"  # qrels (query -> judged passage) | title (title -> text)
    beir_split: str = "test"
    min_grade: int = 1
    hf_split: str = "train"
    packages: list = field(default_factory=lambda: list(DEFAULT_PACKAGES))
    split: str = "all"  # docstrings: all | train | heldout
    heldout_fraction: float = 0.05


Item = Union[Record, Bad]


class _BadField(Exception):
    def __init__(self, reason, detail=""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def _text(obj: dict, name: str) -> str:
    if name not in obj:
        raise _BadField("missing field", repr(name))
    v = obj[name]
    if not isinstance(v, str):
        raise _BadField("field is not a string", f"{name!r} is {type(v).__name__}")
    if not v.strip():
        raise _BadField("empty or whitespace-only text", repr(name))
    return v


def make_sample(obj: dict, opts: SourceOptions) -> dict:
    """Validate one input object and build the shard sample (pairs or hard_negatives)."""
    if not isinstance(obj, dict):
        raise _BadField("not a JSON object", type(obj).__name__)
    sample = {"query": _text(obj, opts.query_field), "positive": _text(obj, opts.passage_field)}
    if opts.title_field and isinstance(obj.get(opts.title_field), str) and obj[opts.title_field].strip():
        sample["positive"] = obj[opts.title_field].strip() + " " + sample["positive"]
    if opts.negatives_field:
        negs = obj.get(opts.negatives_field)
        if not isinstance(negs, list):
            raise _BadField("missing field" if negs is None else "field is not a list", repr(opts.negatives_field))
        for i, n in enumerate(negs):
            if not isinstance(n, str) or not n.strip():
                raise _BadField("empty or non-string negative", f"{opts.negatives_field}[{i}]")
        if opts.num_negatives is not None and len(negs) < opts.num_negatives:
            raise _BadField("too few negatives", f"{len(negs)} < {opts.num_negatives}")
        k = opts.num_negatives if opts.num_negatives is not None else len(negs)
        sample["negatives"] = negs[:k]
        if opts.scores_field:
            sc = obj.get(opts.scores_field)
            if not isinstance(sc, list) or len(sc) < 1 + k or not all(isinstance(x, (int, float)) for x in sc[: 1 + k]):
                raise _BadField("bad teacher scores", f"{opts.scores_field!r} must be a list of >= {1 + k} numbers")
            sample["scores"] = [float(x) for x in sc[: 1 + k]]
    return sample


def _key_from(obj: dict, opts: SourceOptions, fallback: str) -> str:
    if opts.key_field:
        if opts.key_field not in obj:
            raise _BadField("missing field", repr(opts.key_field))
        return sanitize_key(str(obj[opts.key_field]))
    return fallback


# -- JSONL ------------------------------------------------------------------------------------------------


def _scan_jsonl(path) -> Iterator[Union[tuple[int, str, object], Bad]]:
    """(line number, "file:line", parsed value) per non-blank line of a JSONL file, or a Bad naming file:line
    (non-UTF-8 bytes, malformed JSON). Blank lines are not records."""
    with open(path, "rb") as f:
        for ln, raw in enumerate(f, 1):
            where = f"{path}:{ln}"
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Bad(where, "non-UTF-8 bytes", f"byte {e.start}")
                continue
            try:
                yield ln, where, json.loads(line)
            except json.JSONDecodeError as e:
                yield Bad(where, "malformed JSON", e.msg + f" at column {e.colno}")


def _jsonl(inputs: list[str], opts: SourceOptions):
    def it() -> Iterator[Item]:
        for fi, path in enumerate(inputs):
            stem = sanitize_key(Path(path).name.split(".")[0])
            for item in _scan_jsonl(path):
                if isinstance(item, Bad):
                    yield item
                    continue
                ln, where, obj = item
                try:
                    key = _key_from(obj if isinstance(obj, dict) else {}, opts, f"{fi:03d}_{stem}_{ln:09d}")
                    yield Record(key, make_sample(obj, opts), where)
                except _BadField as e:
                    yield Bad(where, e.reason, e.detail)

    desc = {"format": "jsonl", "inputs": [str(p) for p in inputs], "query_field": opts.query_field,
            "passage_field": opts.passage_field, "key_field": opts.key_field}
    return desc, it()


# -- Parquet ----------------------------------------------------------------------------------------------


def _parquet(inputs: list[str], opts: SourceOptions):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise RuntimeError("--format parquet needs pyarrow (pip install 'ropebert[data]')") from None

    def it() -> Iterator[Item]:
        for fi, path in enumerate(inputs):
            stem = sanitize_key(Path(path).name.split(".")[0])
            pf = pq.ParquetFile(path)
            row = 0
            for batch in pf.iter_batches(batch_size=4096):
                for obj in batch.to_pylist():
                    row += 1
                    where = f"{path}:row {row}"
                    try:
                        key = _key_from(obj, opts, f"{fi:03d}_{stem}_{row:09d}")
                        yield Record(key, make_sample(obj, opts), where)
                    except _BadField as e:
                        yield Bad(where, e.reason, e.detail)

    desc = {"format": "parquet", "inputs": [str(p) for p in inputs], "query_field": opts.query_field,
            "passage_field": opts.passage_field}
    return desc, it()


# -- BEIR -------------------------------------------------------------------------------------------------


def read_beir_jsonl(path: Path, what: str) -> dict[str, dict]:
    """{_id: object} from a BEIR corpus/queries file; clear errors with file:line."""
    out: dict[str, dict] = {}
    with open(path, "rb") as f:
        for ln, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}:{ln}: malformed {what} line ({e})") from None
            if not isinstance(obj, dict) or "_id" not in obj:
                raise ValueError(f"{path}:{ln}: {what} line has no '_id'")
            out[str(obj["_id"])] = obj
    return out


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """{query_id: {doc_id: grade}} from a BEIR qrels TSV (with or without the header line)."""
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if not line.strip():
                continue
            if ln == 1 and parts[0] in ("query-id", "qid", "query_id"):
                continue
            if len(parts) != 3:
                raise ValueError(f"{path}:{ln}: qrels line must be 'query-id<TAB>corpus-id<TAB>score'")
            try:
                grade = int(float(parts[2]))
            except ValueError:
                raise ValueError(f"{path}:{ln}: qrels score {parts[2]!r} is not a number") from None
            qrels.setdefault(parts[0], {})[parts[1]] = grade
    return qrels


def passage_text(doc: dict) -> str:
    title, text = str(doc.get("title") or "").strip(), str(doc.get("text") or "")
    return f"{title} {text}" if title else text


def _scan_beir_jsonl(path: Path) -> Iterator[Union[tuple[dict, str], Bad]]:
    """(object, "file:line") per non-blank line of a BEIR corpus/queries file, or a Bad naming file:line."""
    for item in _scan_jsonl(path):
        if isinstance(item, Bad):
            yield item
        else:
            _, where, obj = item
            if not isinstance(obj, dict):
                yield Bad(where, "not a JSON object", type(obj).__name__)
            elif "_id" not in obj:
                yield Bad(where, "missing field", "'_id'")
            else:
                yield obj, where


def _load_beir_objects(path: Path, what: str) -> tuple[dict[str, tuple[dict, str]], list[Bad]]:
    """{_id: (object, where)} of a BEIR jsonl file plus the Bads met (bad lines, duplicate _ids after the first)."""
    objs: dict[str, tuple[dict, str]] = {}
    bads: list[Bad] = []
    for x in _scan_beir_jsonl(path):
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


def _scan_qrels(path: Path) -> Iterator[Union[tuple[str, str, int, str], Bad]]:
    """(query-id, corpus-id, grade, "file:line") per qrels line (header optional), or a Bad naming file:line."""
    first = True
    with open(path, "rb") as f:
        for ln, raw in enumerate(f, 1):
            where = f"{path}:{ln}"
            if not raw.strip():
                continue
            is_first, first = first, False
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Bad(where, "non-UTF-8 bytes", f"byte {e.start}")
                continue
            parts = [c.strip() for c in line.rstrip("\r\n").split("\t")]
            if is_first and parts[0] in ("query-id", "qid", "query_id"):
                continue
            if len(parts) != 3:
                yield Bad(where, "malformed qrels line", f"{len(parts)} columns, expected query-id<TAB>corpus-id<TAB>score")
                continue
            try:
                grade = int(float(parts[2]))
            except ValueError:
                yield Bad(where, "malformed qrels line", f"score {parts[2]!r} is not a number")
                continue
            yield parts[0], parts[1], grade, where


def _beir(inputs: list[str], opts: SourceOptions):
    if len(inputs) != 1:
        raise ValueError("--format beir takes exactly one --input directory")
    root = Path(inputs[0])
    corpus_path = root / "corpus.jsonl"
    if not corpus_path.is_file():
        raise FileNotFoundError(f"{root}: no corpus.jsonl (not a BEIR directory)")
    if opts.beir_mode not in ("qrels", "title"):
        raise ValueError(f"--beir-mode must be qrels or title, got {opts.beir_mode!r}")

    def title_it() -> Iterator[Item]:
        # duplicate _ids surface as duplicate keys in the build loop (with both locations)
        for x in _scan_beir_jsonl(corpus_path):
            if isinstance(x, Bad):
                yield x
                continue
            obj, where = x
            try:
                yield Record(sanitize_key(obj["_id"]), {"query": _text(obj, "title"), "positive": _text(obj, "text")}, where)
            except _BadField as e:
                yield Bad(where, e.reason, e.detail)

    def qrels_it() -> Iterator[Item]:
        qrels_path = root / "qrels" / f"{opts.beir_split}.tsv"
        queries_path = root / "queries.jsonl"
        for p, what in ((qrels_path, f"BEIR qrels for split {opts.beir_split!r}"), (queries_path, "BEIR queries")):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: missing ({what})")
        # bad lines of every file are reported (or counted) before any pair is formed
        corpus, bads = _load_beir_objects(corpus_path, "corpus")
        queries, qbads = _load_beir_objects(queries_path, "query")
        yield from bads
        yield from qbads
        judgements = []
        for x in _scan_qrels(qrels_path):
            if isinstance(x, Bad):
                yield x
            else:
                judgements.append(x)
        judgements.sort(key=lambda j: (j[0], j[1]))  # stable: a repeated judgement follows its first occurrence
        for qid, did, grade, where in judgements:
            if grade < opts.min_grade:
                continue
            if qid not in queries:
                yield Bad(where, "unknown query id", qid)
                continue
            if did not in corpus:
                yield Bad(where, "unknown corpus id", did)
                continue
            try:
                q = _text(queries[qid][0], "text")
                doc = corpus[did][0]
                if not isinstance(doc.get("text"), str):
                    raise _BadField("missing field" if "text" not in doc else "field is not a string",
                                    f"'text' of corpus _id {did!r} ({corpus[did][1]})")
                p = passage_text(doc)
                if not p.strip():
                    raise _BadField("empty or whitespace-only text", f"corpus _id {did!r} ({corpus[did][1]})")
                yield Record(sanitize_key(f"{qid}-{did}"), {"query": q, "positive": p,
                                                            "meta": {"qid": qid, "doc_id": did, "grade": grade}}, where)
            except _BadField as e:
                yield Bad(where, e.reason, e.detail)

    desc = {"format": "beir", "inputs": [str(root)], "mode": opts.beir_mode}
    if opts.beir_mode == "qrels":
        desc.update(split=opts.beir_split, min_grade=opts.min_grade)
    return desc, (qrels_it() if opts.beir_mode == "qrels" else title_it())


# -- Hugging Face datasets (optional) ---------------------------------------------------------------------


def _hf(inputs: list[str], opts: SourceOptions):
    try:
        import datasets
    except ImportError:
        raise RuntimeError("--format hf needs the `datasets` package (pip install 'ropebert[data]')") from None

    def it() -> Iterator[Item]:
        for fi, name in enumerate(inputs):
            ds = datasets.load_from_disk(name) if Path(name, "dataset_info.json").is_file() or Path(name, "state.json").is_file() \
                else datasets.load_dataset(name, split=opts.hf_split)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[opts.hf_split]
            stem = sanitize_key(Path(name).name)
            for row, obj in enumerate(ds, 1):
                where = f"{name}[{opts.hf_split}]:row {row}"
                try:
                    key = _key_from(obj, opts, f"{fi:03d}_{stem}_{row:09d}")
                    yield Record(key, make_sample(obj, opts), where)
                except _BadField as e:
                    yield Bad(where, e.reason, e.detail)

    desc = {"format": "hf", "inputs": list(inputs), "split": opts.hf_split, "query_field": opts.query_field,
            "passage_field": opts.passage_field, "datasets_version": datasets.__version__}
    return desc, it()


# -- docstrings: the embedded default ---------------------------------------------------------------------

DEFAULT_PACKAGES = ("stdlib", "torch", "transformers", "numpy", "lightning", "tokenizers", "webdataset")
MIN_SUMMARY_CHARS = 12
MIN_REST_CHARS = 40
MAX_POSITIVE_CHARS = 4000


def split_of(query: str, heldout_fraction: float) -> str:
    """'heldout' or 'train' from a stable hash of the normalised query text (so every pair sharing a query
    lands in the same split, and train / held-out never overlap)."""
    h = int.from_bytes(hashlib.blake2b(" ".join(query.lower().split()).encode(), digest_size=8).digest(), "big")
    return "heldout" if h % 1_000_000 < heldout_fraction * 1_000_000 else "train"


def _package_roots(packages: list[str]) -> list[tuple[str, Path, str]]:
    """[(name, root dir, version)] of the packages to scan; stdlib = the pure-python standard library."""
    roots = []
    for name in packages:
        if name == "stdlib":
            std = Path(sysconfig.get_paths()["stdlib"])
            roots.append(("stdlib", std, sys.version.split()[0]))
            continue
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue  # not installed here: the source is "whatever of these packages is present"
        if spec.submodule_search_locations:
            root = Path(list(spec.submodule_search_locations)[0])
        elif spec.origin and spec.origin.endswith(".py"):
            root = Path(spec.origin)
        else:
            continue
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        roots.append((name, root, version))
    return roots


def _py_files(name: str, root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    skip_dirs = {"site-packages", "dist-packages", "test", "tests", "testing", "idlelib", "lib2to3", "__pycache__",
                 "turtledemo", "ensurepip", "venv", "_vendor", "vendored", "_vendored"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py") and not f.startswith("test_")]
    return files


def _signature(node) -> str:
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(ast.unparse(b) for b in node.bases)
        return f"class {node.name}({bases})" if bases else f"class {node.name}"
    ret = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    return f"{prefix} {node.name}({ast.unparse(node.args)}){ret}"


def docstring_pair(node) -> Optional[tuple[str, str]]:
    """(summary line, signature + rest of the docstring) for a documented def/class, or None when the
    docstring has no usable summary or no body beyond it."""
    doc = ast.get_docstring(node, clean=True)
    if not doc:
        return None
    paragraphs = doc.strip().split("\n\n", 1)
    summary = " ".join(paragraphs[0].split())
    rest = paragraphs[1].strip() if len(paragraphs) > 1 else ""
    if len(summary) < MIN_SUMMARY_CHARS or len(rest) < MIN_REST_CHARS:
        return None
    positive = (_signature(node) + "\n" + rest)[:MAX_POSITIVE_CHARS]
    return summary, positive


def _docstrings(inputs: list[str], opts: SourceOptions):
    if opts.split not in ("all", "train", "heldout"):
        raise ValueError(f"--split must be all, train or heldout, got {opts.split!r}")
    if not 0.0 < opts.heldout_fraction < 1.0:
        raise ValueError(f"--heldout-fraction must be in (0, 1), got {opts.heldout_fraction}")
    packages = list(inputs) if inputs else list(opts.packages)
    roots = _package_roots(packages)
    if not roots:
        raise ValueError(f"docstrings: none of the packages {packages} is installed")

    def it() -> Iterator[Item]:
        seen = set()
        for name, root, _ in roots:
            base = root.parent if root.is_dir() and name != "stdlib" else root if root.is_dir() else root.parent
            for path in _py_files(name, root):
                rel = path.relative_to(base).as_posix()
                try:
                    tree = ast.parse(path.read_bytes(), filename=str(path))
                except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
                    continue  # files that do not parse with this Python (templates, py2 leftovers) hold no pairs
                stack = [(tree, "")]
                while stack:
                    parent, qual = stack.pop()
                    for node in ast.iter_child_nodes(parent):
                        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                            continue
                        q = f"{qual}.{node.name}" if qual else node.name
                        if isinstance(node, ast.ClassDef):
                            stack.append((node, q))
                        pair = docstring_pair(node)
                        if pair is None:
                            continue
                        origin = f"{name}:{rel}:{q}"
                        if origin in seen:  # conditional re-definitions: the first one is the record
                            continue
                        seen.add(origin)
                        if opts.split != "all" and split_of(pair[0], opts.heldout_fraction) != opts.split:
                            continue
                        key = "doc_" + hashlib.blake2b(origin.encode(), digest_size=10).hexdigest()
                        yield Record(key, {"query": pair[0], "positive": pair[1], "meta": {"origin": origin}},
                                     f"{path}:{node.lineno}")

    desc = {
        "format": "docstrings",
        "packages": {n: v for n, _, v in roots},
        "python": sys.version.split()[0],
        "pair": "summary line -> signature + rest of docstring",
        "split": opts.split,
        "heldout_fraction": opts.heldout_fraction,
        "split_rule": "blake2b-64(normalised query) mod 1e6 < heldout_fraction * 1e6 -> heldout",
    }
    return desc, it()


SOURCES: dict[str, Callable[[list[str], SourceOptions], tuple[dict, Iterator[Item]]]] = {
    "jsonl": _jsonl,
    "parquet": _parquet,
    "beir": _beir,
    "hf": _hf,
    "docstrings": _docstrings,
}


def open_source(fmt: str, inputs: list[str], opts: SourceOptions):
    if fmt not in SOURCES:
        raise ValueError(f"unknown --format {fmt!r} (known: {', '.join(SOURCES)})")
    if fmt in ("jsonl", "parquet"):
        if not inputs:
            raise ValueError(f"--format {fmt} needs --input FILE...")
        for p in inputs:
            if not Path(p).is_file():
                raise FileNotFoundError(f"--input {p}: no such file")
    return SOURCES[fmt](inputs, opts)
