# Copyright ropebert contributors. Apache-2.0.
"""`ropebert shards pack`: long-document training pairs from short ones.

Each packed sample keeps a pair's query; its positive becomes a long document: the pair's positive inserted at a
uniformly random boundary among filler passages, until the document reaches a target length drawn uniformly
from [--min-length, --max-length] (whitespace words, or tokens of --tokenizer); a filler that would take it past
--max-length is passed over. The query still has exactly one relevant text in the
document, so in-batch InfoNCE on these pairs trains what a long-document embedder needs and a model trained on
short texts lacks: a pooled embedding of a long text that still reflects a short relevant part of it (the skill
LongEmbed's needle and passkey tasks measure), and, with a teacher of the student's position range, the
positions a short-text recipe never trains.

Which texts fill: the input's passages that are not the positive of any packed sample (the packed samples are
the first --limit of the input in a seeded shuffle, half of it by default). So no packed document contains another packed sample's
positive, and in-batch negatives stay negatives. Everything is drawn from --seed: the same input and
arguments give the same shards.
"""

from __future__ import annotations

import argparse
import functools
import random
from pathlib import Path
from typing import Callable, Optional

from ropebert.errors import InputError
from ropebert.io import check_not_inside

from .format import ShardWriter, write_manifest
from .mixture import read_pair_sources

SEPARATOR = "\n\n"
KEY_SUFFIX = "+pack"  # a packed sample's key: its pair's key + this, so a mixture of both has unique keys


def read_pairs(path: str) -> tuple[list[tuple[str, dict]], dict[str, str], list[str]]:
    """(key, sample) of a pair-shard directory or of every source of a mixture file (in the file's order), the
    manifest hash of each shard directory read, and the directories (for the output-inside-input check). A key
    that two sources share is an error naming both: packed keys are the input keys + KEY_SUFFIX."""
    sources = read_pair_sources(path, "shards pack", "packed keys are the input keys + a suffix")
    return ([r for s in sources for r in s.rows], {s.path: s.manifest_hash for s in sources},
            [s.path for s in sources])


def pack_document(positive: str, fillers: list[str], target: int, limit: int, rng: random.Random,
                  length: Callable[[str], int]) -> tuple[str, int, int, int]:
    """The positive among filler passages drawn without replacement, at a uniformly random boundary. Fillers are
    added while the document is shorter than `target`; one that would take it past `limit` is passed over, so a
    document never exceeds `limit` unless its positive alone does. Lengths add per text (`length`: words or
    tokens; the separators add none). Returns (document, its length, fillers used, insert position)."""
    n = length(positive)
    chosen = []
    if n < target:
        for i in rng.sample(range(len(fillers)), len(fillers)):
            f = length(fillers[i])
            if n + f <= limit:
                chosen.append(fillers[i])
                n += f
                if n >= target:
                    break
    pos = rng.randint(0, len(chosen))
    return SEPARATOR.join(chosen[:pos] + [positive] + chosen[pos:]), n, len(chosen), pos


def pack_shards(inp: str, out: str, *, min_length: int, max_length: int, limit: Optional[int] = None, seed: int = 0,
                tokenizer: Optional[str] = None, maxcount: int = 10000, overwrite: bool = False) -> dict:
    """Write packed pair shards (see the module docstring); returns the manifest. Lengths are whitespace words,
    or tokens of `tokenizer` (a model or tokenizer directory; special tokens not counted) when given."""
    from .build import prepare_out_dir  # build imports the CLI dispatcher; pack is imported by it

    if min_length < 1 or max_length < min_length:
        raise InputError(f"--min-length / --max-length: need 1 <= min <= max, got {min_length} / {max_length}")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    if maxcount < 1:
        raise InputError(f"--maxcount must be >= 1, got {maxcount}")
    if not Path(inp).exists():
        raise InputError(f"shards pack: --input {inp} does not exist")
    od = prepare_out_dir(Path(out), overwrite, [inp], what="shards pack")
    unit, length = "words", (lambda t: len(t.split()))
    if tokenizer is not None:
        from .datamodule import load_fast_tokenizer

        try:
            tok = load_fast_tokenizer(tokenizer)
        except (OSError, ValueError) as e:
            raise InputError(f"shards pack: --tokenizer {tokenizer}: not a tokenizer or model directory ({e})") from None
        rust = tok.backend_tokenizer  # the Rust tokenizer: no truncation, no max-length warning on long texts
        unit, length = "tokens", (lambda t: len(rust.encode(t, add_special_tokens=False).ids))
    length = functools.lru_cache(maxsize=None)(length)  # a filler is measured once, not once per document it could fill
    rows, hashes, dirs = read_pairs(inp)
    for d in dirs:  # a mixture's sources may live outside its directory
        check_not_inside(Path(out), d, "shards pack")
    rng = random.Random(f"pack:{seed}")
    order = rng.sample(range(len(rows)), len(rows))
    n = len(rows) // 2 if limit is None else min(limit, len(rows))
    packed = [rows[i] for i in order[:n]]
    taken = {s["positive"] for _, s in packed}
    fillers = sorted({rows[i][1]["positive"] for i in order[n:]} - taken)
    if not fillers:
        raise InputError(f"shards pack: {inp} has {len(rows)} pairs and --limit {limit} packs all of their positives, "
                         "so no passage is left to fill the documents with: lower --limit")
    with od as tmp:
        writer = ShardWriter(tmp, maxcount=maxcount)
        total, short, over = 0, 0, 0
        try:
            for key, s in packed:
                target = rng.randint(min_length, max_length)
                doc, n_len, used, pos = pack_document(s["positive"], fillers, target, max_length, rng, length)
                total += n_len
                short += n_len < min_length
                over += n_len > max_length
                meta = dict(s.get("meta") or {}, pack={"fillers": used, "position": pos, unit: n_len})
                writer.write(key + KEY_SUFFIX, {"query": s["query"], "positive": doc, "meta": meta})
            shards = writer.close()
        except BaseException:
            writer.close()
            raise
        source = {"format": "pack", "input": str(inp), "input_manifests": hashes, "unit": unit,
                  "tokenizer": tokenizer, "min_length": min_length, "max_length": max_length, "limit": limit,
                  "seed": seed, "filler_passages": len(fillers), "mean_length": round(total / n, 1),
                  "below_min_length": short, "positive_over_max_length": over}
        return write_manifest(tmp, kind="pairs", shards=shards, source=source)


def pack_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="ropebert shards pack", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="a pair-shard directory or a mixture file of them")
    ap.add_argument("--out", required=True, help="output directory (shard-*.tar + manifest.json)")
    ap.add_argument("--min-length", type=int, required=True,
                    help="shortest target document (whitespace words, or tokens with --tokenizer)")
    ap.add_argument("--max-length", type=int, required=True,
                    help="longest document: fillers never take one past it (words, or tokens with --tokenizer)")
    ap.add_argument("--tokenizer", default=None,
                    help="measure lengths in this tokenizer's tokens (a model or tokenizer directory; special tokens "
                         "not counted), e.g. to fit the training max length")
    ap.add_argument("--limit", type=int, default=None,
                    help="pack this many pairs (default: half of the input; the rest fill the documents)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--maxcount", type=int, default=10000, help="max samples per shard")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    m = pack_shards(args.input, args.out, min_length=args.min_length, max_length=args.max_length, limit=args.limit,
                    seed=args.seed, tokenizer=args.tokenizer, maxcount=args.maxcount, overwrite=args.overwrite)
    src = m["source"]
    print(f"wrote {m['total_samples']} packed pairs in {len(m['shards'])} shards to {args.out}: mean "
          f"{src['mean_length']} {src['unit']}, {src['filler_passages']} filler passages; {src['below_min_length']} "
          f"documents short of --min-length (no filler fitted), {src['positive_over_max_length']} whose positive "
          "alone exceeds --max-length")
    return 0
