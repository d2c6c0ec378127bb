# Copyright ropebert contributors. Apache-2.0.
"""`ropebert shards build|inspect|verify`: sources -> webdataset tar shards + manifest.json, and checks."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

from ropebert.cli import dispatch
from ropebert.errors import InputError
from ropebert.io import OutputDir, check_not_inside

from .format import (
    MANIFEST,
    MAX_KEY_LEN,
    ShardWriter,
    iter_shard,
    load_manifest,
    manifest_hash,
    parse_size,
    shard_path,
    shards_owned,
    verify_shards,
    write_manifest,
)
from .sources import Bad, SourceOptions, open_source

MAX_SKIP_EXAMPLES = 20


class SkipCounter:
    """Counts skipped inputs by reason (+ the first few locations) for the report and the manifest."""

    def __init__(self):
        self.by_reason: Counter = Counter()
        self.examples: list[str] = []

    def add(self, message: str, reason: str) -> None:
        self.by_reason[reason] += 1
        if len(self.examples) < MAX_SKIP_EXAMPLES:
            self.examples.append(message)

    @property
    def count(self) -> int:
        return sum(self.by_reason.values())

    def as_dict(self) -> dict:
        return {"count": self.count, "by_reason": dict(sorted(self.by_reason.items())), "examples": self.examples}


def prepare_out_dir(out: Path, overwrite: bool, inputs: Sequence[str] = (), what: str = "shards build") -> OutputDir:
    """The OutputDir a shard-writing command writes through: checked now (before any input is read), written
    into a temporary sibling and swapped in when complete. `--overwrite` replaces only a previous shard
    output (manifest.json + the shard files it lists, nothing else); an input directory is never the output
    nor inside it, and an input file is never inside the output."""
    od = OutputDir(out, what=what, overwrite=overwrite, owned=shards_owned)
    for p in inputs:
        if Path(p).is_dir():
            check_not_inside(out, p, what)
        elif Path(p).exists() and (out.resolve() == Path(p).resolve() or out.resolve() in Path(p).resolve().parents):
            raise InputError(f"{what}: --input {p} is inside --out {out}; write the output elsewhere")
    od.check()
    return od


def build_shards(fmt: str, inputs: list[str], out_dir: str, opts: Optional[SourceOptions] = None, *,
                 maxcount: int = 10000, maxsize: Optional[int] = None, on_error: str = "fail",
                 limit: Optional[int] = None, overwrite: bool = False, progress: bool = False) -> dict:
    """Build shards + manifest from a source; returns the manifest. Raises ValueError naming file:line on bad
    input when on_error == "fail"; with "skip" bad inputs are counted (manifest["skipped"])."""
    if on_error not in ("fail", "skip"):
        raise InputError(f"--on-error must be fail or skip, got {on_error!r}")
    if maxcount < 1:
        raise InputError(f"--maxcount must be >= 1, got {maxcount}")
    if maxsize is not None and maxsize < 1:
        raise InputError(f"--maxsize must be >= 1 byte, got {maxsize}")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    opts = opts or SourceOptions()
    desc, items = open_source(fmt, inputs, opts)
    od = prepare_out_dir(Path(out_dir), overwrite, inputs if fmt != "docstrings" else ())
    with od as tmp:
        return _build_into(tmp, fmt, inputs, desc, items, opts, maxcount=maxcount, maxsize=maxsize,
                           on_error=on_error, limit=limit, progress=progress)


def _build_into(out: Path, fmt, inputs, desc, items, opts, *, maxcount, maxsize, on_error, limit, progress) -> dict:
    writer = ShardWriter(out, maxcount=maxcount, maxsize=maxsize)
    skips = SkipCounter()
    seen: dict[str, tuple[str, Optional[str]]] = {}
    kind = "hard_negatives" if opts.negatives_field else "pairs"
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"shards build ({fmt})", unit="sample", total=limit)
    n = 0
    try:
        for item in items:
            if isinstance(item, Bad):
                if on_error == "fail":
                    raise InputError(item.message() + " (pass --on-error skip to count and skip bad inputs)")
                skips.add(item.message(), item.reason)
                continue
            bad = None
            if item.key in seen:
                first, first_raw = seen[item.key]
                if item.raw_key is not None and first_raw is not None and item.raw_key != first_raw:
                    bad = Bad(item.where, "key collision",
                              f"id {item.raw_key!r} and id {first_raw!r} ({first}) both map to the sample key "
                              f"{item.key!r} (keys keep only [A-Za-z0-9_-:@+=,]); make the ids differ in those characters")
                else:
                    bad = Bad(item.where, "duplicate key", f"{item.key!r} first seen at {first}")
            elif len(item.key) > MAX_KEY_LEN:
                bad = Bad(item.where, "key too long", f"{len(item.key)} characters, a tar member name allows "
                          f"{MAX_KEY_LEN}; shorten the ids")
            else:
                try:
                    writer.write(item.key, item.sample)
                except UnicodeEncodeError as e:
                    bad = Bad(item.where, "invalid Unicode", f"lone surrogate {e.object[e.start:e.end]!r} in the "
                              "text (a \\ud800-style escape that is not half of a pair); fix or remove the record")
            if bad is not None:
                if on_error == "fail":
                    raise InputError(bad.message() + " (pass --on-error skip to count and skip bad inputs)")
                skips.add(bad.message(), bad.reason)
                continue
            seen[item.key] = (item.where, item.raw_key)
            n += 1
            if bar is not None:
                bar.update(1)
            if limit is not None and n >= limit:
                break
        shards = writer.close()
    except BaseException:
        writer.close()
        raise
    finally:
        if bar is not None:
            bar.close()
    if not shards:
        raise InputError(f"no samples were written from {fmt} input {inputs} ({skips.count} skipped)")
    desc = dict(desc, on_error=on_error, limit=limit, maxcount=maxcount, maxsize=maxsize)
    return write_manifest(out, kind=kind, shards=shards, source=desc, skipped=skips.as_dict())


def summarize(manifest: dict) -> str:
    sh = manifest["shards"]
    counts = [s["samples"] for s in sh]
    lines = [
        f"kind:     {manifest['kind']}",
        f"shards:   {len(sh)} ({sh[0]['url']} .. {sh[-1]['url']})",
        f"samples:  {manifest['total_samples']} (per shard min {min(counts)} / max {max(counts)})",
        f"bytes:    {manifest['total_bytes']} ({manifest['total_bytes'] / 2**20:.1f} MiB)",
        f"skipped:  {manifest['skipped']['count']} {dict(manifest['skipped']['by_reason']) or ''}".rstrip(),
        f"source:   {json.dumps(manifest['source'], ensure_ascii=False)}",
        f"hash:     {manifest_hash(manifest)[:16]}",
    ]
    return "\n".join(lines)


def build_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="ropebert shards build",
                                 description="Build webdataset tar shards + manifest.json from a source.")
    ap.add_argument("--input", nargs="*", default=[], metavar="PATH",
                    help="input files (jsonl/parquet), a BEIR directory, HF dataset names/dirs, or package names "
                         "for docstrings (default: stdlib, torch, transformers, ... whichever are installed)")
    ap.add_argument("--format", required=True, choices=["jsonl", "parquet", "beir", "hf", "docstrings", "prose"])
    ap.add_argument("--out", required=True, help="output directory (shard-*.tar + manifest.json)")
    ap.add_argument("--query-field", default="query")
    ap.add_argument("--passage-field", default="positive")
    ap.add_argument("--title-field", default=None, help="optional field prepended to the passage")
    ap.add_argument("--key-field", default=None, help="field holding the sample key (default: file + line number)")
    ap.add_argument("--negatives-field", default=None, help="list-of-strings field: build stage-2 (hard_negatives) shards")
    ap.add_argument("--scores-field", default=None, help="teacher scores field (positive first) for stage-2 shards")
    ap.add_argument("--num-negatives", type=int, default=None, help="negatives kept per sample (stage-2)")
    ap.add_argument("--beir-mode", default="qrels", choices=["qrels", "title"],
                    help="BEIR: query -> judged passage (qrels) or title -> text from corpus.jsonl")
    ap.add_argument("--beir-split", default="test", help="BEIR qrels split (qrels/<split>.tsv)")
    ap.add_argument("--min-grade", type=int, default=1, help="BEIR: minimum qrels grade of a positive")
    ap.add_argument("--hf-split", default="train")
    ap.add_argument("--split", default="all", choices=["all", "train", "heldout"],
                    help="docstrings / prose: keep all pairs, the train split, or the held-out split")
    ap.add_argument("--heldout-fraction", type=float, default=0.05,
                    help="docstrings / prose: share of queries held out")
    ap.add_argument("--maxcount", type=int, default=10000, help="max samples per shard")
    ap.add_argument("--maxsize", default=None, help="max bytes per shard (e.g. 256MB)")
    ap.add_argument("--limit", type=int, default=None, help="stop after N samples")
    ap.add_argument("--on-error", default="fail", choices=["fail", "skip"])
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    opts = SourceOptions(query_field=args.query_field, passage_field=args.passage_field, key_field=args.key_field,
                         title_field=args.title_field, negatives_field=args.negatives_field,
                         scores_field=args.scores_field, num_negatives=args.num_negatives,
                         beir_mode=args.beir_mode, beir_split=args.beir_split, min_grade=args.min_grade,
                         hf_split=args.hf_split, split=args.split, heldout_fraction=args.heldout_fraction)
    m = build_shards(args.format, args.input, args.out, opts, maxcount=args.maxcount,
                     maxsize=parse_size(args.maxsize), on_error=args.on_error, limit=args.limit,
                     overwrite=args.overwrite, progress=not args.no_progress)
    print(f"wrote {m['total_samples']} samples in {len(m['shards'])} shards to {args.out}")
    if m["skipped"]["count"]:
        print(f"skipped {m['skipped']['count']} bad inputs: {m['skipped']['by_reason']}", file=sys.stderr)
        for ex in m["skipped"]["examples"]:
            print(f"  {ex}", file=sys.stderr)
    return 0


def inspect_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="ropebert shards inspect", description="Summarise a shard manifest.")
    ap.add_argument("dir")
    ap.add_argument("--samples", type=int, default=0, help="also print the first N samples")
    args = ap.parse_args(argv)
    m = load_manifest(args.dir)
    print(summarize(m))
    if args.samples:

        shown = 0
        for entry in m["shards"]:
            for key, sample in iter_shard(shard_path(args.dir, entry)):
                print(json.dumps({"key": key, **sample}, ensure_ascii=False)[:600])
                shown += 1
                if shown >= args.samples:
                    return 0
    return 0


def verify_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="ropebert shards verify",
                                 description="Re-read every shard against manifest.json (size, sha256, samples).")
    ap.add_argument("dir")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    m = load_manifest(args.dir)
    problems = verify_shards(args.dir, m, progress=not args.no_progress)
    if problems:
        for p in problems:
            print(f"BAD {p}", file=sys.stderr)
        print(f"verify: {len(problems)} problem(s) found, {len(m['shards'])} shards listed", file=sys.stderr)
        return 1
    print(f"verify: OK — {len(m['shards'])} shards, {m['total_samples']} samples match {MANIFEST}")
    return 0


SUBCOMMANDS = {
    "build": (f"{__name__}:build_main", "sources -> webdataset tar shards + manifest.json"),
    "inspect": (f"{__name__}:inspect_main", "summarise a manifest"),
    "verify": (f"{__name__}:verify_main", "re-read every shard against the manifest"),
    "pack": ("ropebert.shards.pack:pack_main", "long-document pairs: each positive packed among filler passages"),
}


def main(argv: Optional[list[str]] = None) -> int:
    return dispatch("ropebert shards", SUBCOMMANDS, list(argv or []), what="subcommand")
