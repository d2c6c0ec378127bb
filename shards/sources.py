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
import math
import os
import re
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from ropebert.errors import InputError, UserError

from .beir import judged_pairs, read_beir, scan_objects
from .format import sanitize_key
from .records import Bad, BadField, Item, Record, scan_jsonl, text_field


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


def make_sample(obj: dict, opts: SourceOptions) -> dict:
    """Validate one input object and build the shard sample (pairs or hard_negatives)."""
    if not isinstance(obj, dict):
        raise BadField("not a JSON object", type(obj).__name__)
    sample = {"query": text_field(obj, opts.query_field), "positive": text_field(obj, opts.passage_field)}
    if opts.title_field and isinstance(obj.get(opts.title_field), str) and obj[opts.title_field].strip():
        sample["positive"] = obj[opts.title_field].strip() + " " + sample["positive"]
    if opts.negatives_field:
        negs = obj.get(opts.negatives_field)
        if not isinstance(negs, list):
            raise BadField("missing field" if negs is None else "field is not a list", repr(opts.negatives_field))
        for i, n in enumerate(negs):
            if not isinstance(n, str) or not n.strip():
                raise BadField("empty or non-string negative", f"{opts.negatives_field}[{i}]")
        if opts.num_negatives is not None and len(negs) < opts.num_negatives:
            raise BadField("too few negatives", f"{len(negs)} < {opts.num_negatives}")
        k = opts.num_negatives if opts.num_negatives is not None else len(negs)
        sample["negatives"] = negs[:k]
        if opts.scores_field:
            sc = obj.get(opts.scores_field)
            if not isinstance(sc, list) or len(sc) < 1 + k:
                raise BadField("bad teacher scores", f"{opts.scores_field!r} must be a list of >= {1 + k} numbers")
            for i, x in enumerate(sc[: 1 + k]):
                if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                    raise BadField("bad teacher scores", f"{opts.scores_field}[{i}] is {x!r}: teacher scores must be "
                                   "finite numbers (no NaN, Infinity, strings or booleans)")
            sample["scores"] = [float(x) for x in sc[: 1 + k]]
    return sample


def _key_from(obj: dict, opts: SourceOptions, fallback: str) -> tuple[str, Optional[str]]:
    """(sample key, the id it was derived from): --key-field's value sanitised, or the file+line fallback."""
    if opts.key_field:
        if opts.key_field not in obj:
            raise BadField("missing field", repr(opts.key_field))
        raw = obj[opts.key_field]
        if raw is None:
            raise BadField("null key", f"{opts.key_field!r} is null")
        if isinstance(raw, (dict, list)):
            raise BadField("bad key", f"{opts.key_field!r} is a {type(raw).__name__}, not a string or number")
        if not str(raw).strip():
            raise BadField("empty key", f"{opts.key_field!r} is empty")
        return sanitize_key(str(raw)), str(raw)
    return fallback, None


# -- JSONL ------------------------------------------------------------------------------------------------


def _jsonl(inputs: list[str], opts: SourceOptions):
    def it() -> Iterator[Item]:
        for fi, path in enumerate(inputs):
            stem = sanitize_key(Path(path).name.split(".")[0])
            for item in scan_jsonl(path):
                if isinstance(item, Bad):
                    yield item
                    continue
                ln, where, obj = item
                try:
                    key, raw = _key_from(obj if isinstance(obj, dict) else {}, opts, f"{fi:03d}_{stem}_{ln:09d}")
                    yield Record(key, make_sample(obj, opts), where, raw)
                except BadField as e:
                    yield Bad(where, e.reason, e.detail)

    desc = {"format": "jsonl", "inputs": [str(p) for p in inputs], "query_field": opts.query_field,
            "passage_field": opts.passage_field, "key_field": opts.key_field}
    return desc, it()


# -- Parquet ----------------------------------------------------------------------------------------------


def _parquet(inputs: list[str], opts: SourceOptions):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("--format parquet needs pyarrow (pip install 'ropebert[data]')") from None

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
                        key, raw = _key_from(obj, opts, f"{fi:03d}_{stem}_{row:09d}")
                        yield Record(key, make_sample(obj, opts), where, raw)
                    except BadField as e:
                        yield Bad(where, e.reason, e.detail)

    desc = {"format": "parquet", "inputs": [str(p) for p in inputs], "query_field": opts.query_field,
            "passage_field": opts.passage_field}
    return desc, it()


# -- BEIR -------------------------------------------------------------------------------------------------


def _beir(inputs: list[str], opts: SourceOptions):
    if len(inputs) != 1:
        raise InputError("--format beir takes exactly one --input directory")
    root = Path(inputs[0])
    corpus_path = root / "corpus.jsonl"
    if not corpus_path.is_file():
        raise FileNotFoundError(f"{root}: no corpus.jsonl (not a BEIR directory)")
    if opts.beir_mode not in ("qrels", "title"):
        raise InputError(f"--beir-mode must be qrels or title, got {opts.beir_mode!r}")

    def title_it() -> Iterator[Item]:
        # duplicate _ids surface as duplicate keys in the build loop (with both locations)
        for x in scan_objects(corpus_path):
            if isinstance(x, Bad):
                yield x
                continue
            obj, where = x
            try:
                yield Record(sanitize_key(obj["_id"]), {"query": text_field(obj, "title"), "positive": text_field(obj, "text")},
                             where, str(obj["_id"]))
            except BadField as e:
                yield Bad(where, e.reason, e.detail)

    def qrels_it() -> Iterator[Item]:
        # bad lines of every file are reported (or counted) before any pair is formed
        yield from judged_pairs(read_beir(root, opts.beir_split), opts.min_grade)

    desc = {"format": "beir", "inputs": [str(root)], "mode": opts.beir_mode}
    if opts.beir_mode == "qrels":
        desc.update(split=opts.beir_split, min_grade=opts.min_grade)
    return desc, (qrels_it() if opts.beir_mode == "qrels" else title_it())


# -- Hugging Face datasets (optional) ---------------------------------------------------------------------


def _hf(inputs: list[str], opts: SourceOptions):
    try:
        import datasets
    except ImportError:
        raise UserError("--format hf needs the `datasets` package (pip install 'ropebert[data]')") from None

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
                    key, raw = _key_from(obj, opts, f"{fi:03d}_{stem}_{row:09d}")
                    yield Record(key, make_sample(obj, opts), where, raw)
                except BadField as e:
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


def _check_split(opts: SourceOptions) -> None:
    if opts.split not in ("all", "train", "heldout"):
        raise InputError(f"--split must be all, train or heldout, got {opts.split!r}")
    if not 0.0 < opts.heldout_fraction < 1.0:
        raise InputError(f"--heldout-fraction must be in (0, 1), got {opts.heldout_fraction}")


def _split_desc(opts: SourceOptions) -> dict:
    """The manifest's record of the interpreter and the hash split (docstrings and prose share both)."""
    return {
        "python": sys.version.split()[0],
        "split": opts.split,
        "heldout_fraction": opts.heldout_fraction,
        "split_rule": "blake2b-64(normalised query) mod 1e6 < heldout_fraction * 1e6 -> heldout",
    }


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
    _check_split(opts)
    packages = list(inputs) if inputs else list(opts.packages)
    roots = _package_roots(packages)
    if not roots:
        raise InputError(f"docstrings: none of the packages {packages} is installed")

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
        "pair": "summary line -> signature + rest of docstring",
        **_split_desc(opts),
    }
    return desc, it()


# -- prose: inverse-cloze pairs from the Python language reference --------------------------------------

MIN_PROSE_CHARS = 200
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(*])")


def prose_paragraphs(topics: dict[str, str]) -> Iterator[tuple[str, int, str]]:
    """(topic, paragraph index, text) of the running-text paragraphs of pydoc's help topics: blocks that are
    not indented (code, grammar, tables), hold no prompt or grammar rule, and are at least MIN_PROSE_CHARS long.
    Several topics repeat sections of others: a paragraph seen before (in sorted topic order) is not yielded again."""
    seen = set()
    for topic in sorted(topics):
        for i, block in enumerate(topics[topic].split("\n\n")):
            lines = block.strip("\n").split("\n")
            if any(line.startswith(" ") for line in lines):
                continue
            text = " ".join(block.split())
            if len(text) < MIN_PROSE_CHARS or ">>>" in text or "::=" in text or set(text) <= set("=-*+| "):
                continue
            if text in seen:
                continue
            seen.add(text)
            yield topic, i, text


def prose_pair(text: str) -> Optional[tuple[str, str]]:
    """(first sentence, the rest of the paragraph), or None for a paragraph of one sentence or a rest under
    MIN_REST_CHARS: the query never appears in its positive, as with the docstring pairs."""
    parts = _SENTENCE_END.split(text, maxsplit=1)
    if len(parts) < 2 or len(parts[0]) < MIN_SUMMARY_CHARS or len(parts[1]) < MIN_REST_CHARS:
        return None
    return parts[0], parts[1]


def _prose(inputs: list[str], opts: SourceOptions):
    if inputs:
        raise InputError("--format prose reads the Python reference shipped with this interpreter "
                         f"(pydoc_data.topics) and takes no --input, got {inputs}")
    _check_split(opts)
    try:
        from pydoc_data import topics as topics_module
    except ImportError as e:  # some distributions split the stdlib's documentation into another package
        raise InputError(f"--format prose needs the stdlib's pydoc_data.topics, which this Python lacks: {e}")
    src = Path(topics_module.__file__)

    def it() -> Iterator[Item]:
        for topic, i, text in prose_paragraphs(topics_module.topics):
            pair = prose_pair(text)
            if pair is None:
                continue
            if opts.split != "all" and split_of(pair[0], opts.heldout_fraction) != opts.split:
                continue
            origin = f"pydoc_data.topics:{topic}:{i}"
            key = "prose_" + hashlib.blake2b(origin.encode(), digest_size=10).hexdigest()
            yield Record(key, {"query": pair[0], "positive": pair[1], "meta": {"origin": origin}},
                         f"{src}:{topic}[{i}]")

    desc = {
        "format": "prose",
        "source": "pydoc_data.topics (the Python language reference's help topics)",
        "pair": "first sentence -> rest of the paragraph (running-text paragraphs only)",
        **_split_desc(opts),
    }
    return desc, it()


SOURCES: dict[str, Callable[[list[str], SourceOptions], tuple[dict, Iterator[Item]]]] = {
    "jsonl": _jsonl,
    "parquet": _parquet,
    "beir": _beir,
    "hf": _hf,
    "docstrings": _docstrings,
    "prose": _prose,
}


def open_source(fmt: str, inputs: list[str], opts: SourceOptions):
    if fmt not in SOURCES:
        raise InputError(f"unknown --format {fmt!r} (known: {', '.join(SOURCES)})")
    if fmt in ("jsonl", "parquet"):
        if not inputs:
            raise InputError(f"--format {fmt} needs --input FILE...")
        for p in inputs:
            if not Path(p).is_file():
                raise FileNotFoundError(f"--input {p}: no such file")
    return SOURCES[fmt](inputs, opts)
