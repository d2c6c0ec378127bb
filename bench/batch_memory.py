"""Peak memory and step time of one contrastive training step vs the global batch, with and without GradCache.

Memory benchmark: peak memory should stay ~flat as the batch grows with GradCache (only the
loss' B x B logits and the cached B x D embeddings grow with it), and a GradCache step should cost at most
~1.35x the plain one-forward-with-graph step where both fit. GPU target: 16,384 pairs, q 64 / p 512
tokens, BERT-base, one H100, peak <= 30 GB.

What ONE measured step is (the real training code path, nothing re-implemented):

    pipelines.train.gradcache.contrastive_step(model.embed, {"query", "passage"[, "negatives"]}, loss_fn,
                                         chunk_size=--chunk (GradCache) or None (no cache: one forward of
                                         each group with its graph, loss, one backward))
    loss_fn = pipelines.train.loss.contrastive_loss(q, p, n, temperature=0.01, return_stats=True), as in
              pipelines/train/module.py (InfoNCE over in-batch passages [+ hard negatives]; single process, so
              gather is a no-op)
    pipelines.train.gradcache.allreduce_gradients (no-op without a process group), clip_grad_norm_(1.0),
    AdamW.step(), zero_grad(set_to_none=True)

on a freshly initialised RopeBertModel (--shape: tiny 2x128, minilm 6x384, base = BERT-base 12x768;
hidden dropout 0.1, attention dropout --attn-dropout, attention backend --backend), on CUDA under
torch.autocast(bf16) when --dtype bf16 (the loss runs in fp32 regardless).

The batch: B (query, passage) pairs of random token ids ([CLS] ... [SEP], right-padded), seeded from
(--seed, B) so both modes of one batch size see the same batch. Real lengths are drawn uniformly:
queries in [--q-min, --q-len] (default q-len/8 .. q-len: 8..64), passages in [--p-min, --p-len] (default
64..512); `--negatives K` adds B*K passage-shaped hard negatives (stage-2 batches). "real tokens" is the
non-padding token count of all groups; tokens/s = real tokens / step time.

Timing: one warm-up step (untimed: allocator, AdamW state, lazy init), then up to --repeats timed steps
(stopping early once --time-cap seconds are spent, at least one), CUDA synchronised; the median is
reported.

Peak memory:
  * CUDA: torch.cuda.max_memory_allocated over the timed steps (peak stats reset before each one), absolute:
    weights + AdamW state + gradients + activations + the loss' B x B matrices. max_memory_reserved (what
    the caching allocator held) is reported next to it.
  * CPU: peak RSS during the timed steps minus the process' RSS just before the warm-up step (model and
    batch already built), sampled every ~2 ms by a background thread (psutil if installed, else
    /proc/self/statm). It therefore includes gradients and AdamW state (created in the warm-up), activations,
    and a roughly constant ~100-150 MiB of library code and allocator pages first touched by the warm-up;
    malloc may keep freed pages, so it is an upper bound on what the step needed. (The row's JSON also has
    the kernel's VmHWM increase, warm-up included, as a cross-check of the sampler.)

Every configuration (batch size x mode) runs in a fresh subprocess (common.run_isolated), so peaks (and a CUDA
OOM) never leak from one row into the next; this parent process only orchestrates and prints the table. No-cache
runs are tried only up to --no-cache-max pairs; a CUDA out-of-memory is reported as "OOM". Once a mode's step
takes longer than --time-cap, its larger batches are skipped ("skipped (time cap)").

Usage:
    .venv/bin/python bench/batch_memory.py --device cpu --shape tiny --batches 64 128 256 512 --chunk 32 \\
        --q-len 32 --p-len 128 --repeats 2                     # CPU smoke run, a few minutes on 2 cores
    python bench/batch_memory.py --device cuda --shape base --batches 1024 2048 4096 8192 16384 --chunk 256 \\
        --dtype bf16 --no-cache-max 4096 --markdown            # the issue's GPU target

Importable: `run(args) -> list[dict]` (args: an argparse.Namespace from `build_parser()` or an argv list).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import time
from typing import Optional, Sequence, Union

import torch
from common import (PeakMemory, add_result_args, command_line, device_name, emit, fmt_mem, parse_or_run_child,
                    run_isolated, sync)

SHAPES = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
VOCAB = 30522
CLS, SEP, PAD, FIRST_WORD = 101, 102, 0, 1000
TEMPERATURE = 0.01


# ----------------------------------------------------------------------------------------------------------
# arguments


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="base")
    ap.add_argument("--batches", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384],
                    help="global batch sizes (pairs per step)")
    ap.add_argument("--chunk", type=int, default=256, help="GradCache rows per chunk")
    ap.add_argument("--q-len", type=int, default=64, help="longest query (tokens, special tokens included)")
    ap.add_argument("--p-len", type=int, default=512, help="longest passage / negative")
    ap.add_argument("--q-min", type=int, default=None, help="shortest query (default q-len // 8)")
    ap.add_argument("--p-min", type=int, default=None, help="shortest passage (default p-len // 8)")
    ap.add_argument("--negatives", type=int, default=0, help="hard negatives per query (stage-2 batches)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                    help="bf16 = autocast on CUDA (default there); fp32 default on CPU")
    ap.add_argument("--backend", default="auto", help="attention backend (config attn_backend)")
    ap.add_argument("--attn-dropout", type=float, default=0.0,
                    help="attention dropout (0: lets auto pick the packed varlen kernel on CUDA)")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per configuration (median reported)")
    ap.add_argument("--no-cache-max", type=int, default=None,
                    help="largest batch to try without GradCache (default: every batch)")
    ap.add_argument("--time-cap", type=float, default=None,
                    help="seconds per measurement (default 120 on CPU, none on CUDA): timed steps stop after "
                         "it, and a mode whose step exceeds it skips its larger batches")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads per measurement (default 1 on CPU: on a shared box, OpenMP "
                         "threads spinning on busy cores made a step ~4x slower than one thread; CUDA: torch default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--markdown", action="store_true", help="print only the markdown table (with its header)")
    add_result_args(ap, "header + rows", child_flag="--_worker")
    return ap


def _finish_args(args: argparse.Namespace) -> argparse.Namespace:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else torch.get_num_threads()
    if args.time_cap is None and args.device == "cpu":
        args.time_cap = 120.0
    if args.q_min is None:
        args.q_min = max(3, args.q_len // 8)
    if args.p_min is None:
        args.p_min = max(3, args.p_len // 8)
    for name, lo, hi in (("q", args.q_min, args.q_len), ("p", args.p_min, args.p_len)):
        if not 3 <= lo <= hi:
            raise SystemExit(f"--{name}-min/--{name}-len: need 3 <= min <= len, got {lo}, {hi}")
    if args.chunk < 1 or args.repeats < 1 or args.negatives < 0 or any(b < 1 for b in args.batches):
        raise SystemExit("--chunk, --repeats and every --batches value must be >= 1, --negatives >= 0")
    return args


# ----------------------------------------------------------------------------------------------------------
# one configuration (runs in a subprocess)


def make_group(n: int, lo: int, hi: int, gen: torch.Generator) -> dict:
    """n right-padded sequences of random word ids, real lengths uniform in [lo, hi] ([CLS] ... [SEP])."""
    lens = torch.randint(lo, hi + 1, (n,), generator=gen)
    L = int(lens.max())
    ids = torch.randint(FIRST_WORD, VOCAB, (n, L), generator=gen)
    pos = torch.arange(L)[None, :]
    mask = pos < lens[:, None]
    ids[:, 0] = CLS
    ids[torch.arange(n), lens - 1] = SEP
    ids[~mask] = PAD
    return {"input_ids": ids, "attention_mask": mask.long()}


def make_batch(B: int, cfg: dict) -> dict:
    gen = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + B)
    groups = {"query": make_group(B, cfg["q_min"], cfg["q_len"], gen),
              "passage": make_group(B, cfg["p_min"], cfg["p_len"], gen)}
    if cfg["negatives"]:
        groups["negatives"] = make_group(B * cfg["negatives"], cfg["p_min"], cfg["p_len"], gen)
    return groups


def _vm_hwm() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def measure(cfg: dict) -> dict:
    """Build the model and the batch, warm up, time cfg["repeats"] steps; returns one result row."""
    from ropebert.model import RopeBertConfig, RopeBertModel
    from ropebert.model.modeling_ropebert import resolve_attention_backend
    from ropebert.pipelines.train.gradcache import allreduce_gradients, contrastive_step
    from ropebert.pipelines.train.loss import contrastive_loss

    device = torch.device(cfg["device"])
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if cfg["dtype"] == "bf16" else torch.float32
    autocast = gpu and dtype != torch.float32
    B, chunk = cfg["batch"], cfg["chunk"]
    row = {"batch": B, "mode": f"gradcache chunk {chunk}" if chunk else "no cache", "chunk": chunk}
    torch.manual_seed(cfg["seed"])
    mem = PeakMemory(device)

    mcfg = RopeBertConfig(vocab_size=VOCAB, max_position_embeddings=max(512, cfg["p_len"], cfg["q_len"]),
                          attention_probs_dropout_prob=cfg["attn_dropout"], attn_backend=cfg["backend"],
                          **SHAPES[cfg["shape"]])
    model = RopeBertModel(mcfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = {k: {n: t.to(device) for n, t in g.items()} for k, g in make_batch(B, cfg).items()}
    if chunk and all(g["input_ids"].shape[0] <= chunk for g in groups.values()):
        row["mode"] += " (= no cache: every group fits one chunk)"  # contrastive_step takes the plain path
    row["real_tokens"] = int(sum(int(g["attention_mask"].sum()) for g in groups.values()))
    row["padded_tokens"] = int(sum(g["input_ids"].numel() for g in groups.values()))
    p_mask = groups["passage"]["attention_mask"]
    row["backend"] = resolve_attention_backend(
        cfg["backend"], device, dtype if autocast else torch.float32, cfg["attn_dropout"] > 0,
        1.0 - float(p_mask.sum()) / p_mask.numel()).name

    def loss_fn(embs: dict):
        q, p = embs["query"], embs["passage"]
        n = None
        if "negatives" in embs:
            n = embs["negatives"].view(q.shape[0], embs["negatives"].shape[0] // q.shape[0], -1)  # (B, K, D)
        return contrastive_loss(q, p, n, temperature=TEMPERATURE, return_stats=True)

    def step() -> float:
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            res = contrastive_step(model.embed, groups, loss_fn, chunk_size=chunk)
        if res.finite:
            allreduce_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        opt.zero_grad(set_to_none=True)
        if res.tokens != row["real_tokens"]:
            raise RuntimeError(f"contrastive_step counted {res.tokens} tokens, the batch has {row['real_tokens']}")
        return float(res.loss)

    try:
        base = mem.current()  # CPU: the pre-warm-up RSS (model and batch built)
        t0 = time.perf_counter()
        row["loss"] = step()  # warm-up
        sync(device)
        row["warmup_s"] = time.perf_counter() - t0
        mem.start()  # peak over the timed steps only (CUDA: peak stats reset here)
        times = []
        t_start = time.perf_counter()
        for _ in range(cfg["repeats"]):
            sync(device)
            t0 = time.perf_counter()
            row["loss"] = step()
            sync(device)
            times.append(time.perf_counter() - t0)
            if cfg["time_cap"] and time.perf_counter() - t_start > cfg["time_cap"]:
                break
    except torch.OutOfMemoryError:
        row.update(status="OOM")
        return row
    finally:
        mem.stop()
    row["status"] = "ok"
    row["steps_timed"] = len(times)
    row["step_s"] = statistics.median(times)
    row["tokens_per_s"] = row["real_tokens"] / row["step_s"]
    if gpu:
        row["peak_bytes"] = mem.peak
        row["reserved_bytes"] = mem.reserved
        row["memory"] = "max_memory_allocated"
    else:
        row["peak_bytes"] = max(0, mem.peak - base)
        row["memory"] = f"peak RSS increase ({mem.source})"
        hwm = _vm_hwm()  # kernel high-water mark incl. the warm-up (fresh process: a cross-check of the sample)
        if hwm is not None:
            row["hwm_increase_bytes"] = max(0, hwm - base)
    return row


def _worker(payload: str, json_path: str) -> None:
    cfg = json.loads(payload)
    torch.set_num_threads(cfg["threads"])
    emit(measure(cfg), json_path)


# ----------------------------------------------------------------------------------------------------------
# orchestration


def _run_config(cfg: dict, timeout: Optional[float]) -> dict:
    """One configuration in a fresh interpreter (common.run_isolated); the row it emits, or a failure row."""
    res = run_isolated(__file__, ["--_worker", json.dumps(cfg)], timeout)
    if res["status"] == "ok":
        return res["result"]
    base = {"batch": cfg["batch"], "chunk": cfg["chunk"],
            "mode": f"gradcache chunk {cfg['chunk']}" if cfg["chunk"] else "no cache"}
    err = res["error"].splitlines()
    if not res["status"].startswith("timed out") and any(
            "OutOfMemoryError" in l or "out of memory" in l.lower() for l in err):
        return {**base, "status": "OOM"}
    return {**base, "status": res["status"], **({"error": res["error"]} if res["error"] else {})}


def run(args: Union[argparse.Namespace, Sequence[str], None] = None, *, log=None) -> list[dict]:
    """Measure every (batch, mode) configuration; returns one dict per row (see the module docstring).

    args: a Namespace from build_parser().parse_args(...) or an argv list (None: sys.argv[1:]).
    log: callable(str) for progress lines (default: stderr).
    """
    if args is None or not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(args)
    args = _finish_args(args)
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    common = dict(device=args.device, shape=args.shape, dtype=args.dtype, backend=args.backend,
                  attn_dropout=args.attn_dropout, q_len=args.q_len, p_len=args.p_len, q_min=args.q_min,
                  p_min=args.p_min, negatives=args.negatives, repeats=args.repeats, time_cap=args.time_cap,
                  seed=args.seed, threads=args.threads)
    timeout = None if not args.time_cap else max(300.0, 6 * args.time_cap)
    rows: list[dict] = []
    capped: dict = {}
    for B in sorted(args.batches):
        modes = [args.chunk]
        if args.no_cache_max is None or B <= args.no_cache_max:
            modes.append(None)
        for chunk in modes:
            mode = f"gradcache chunk {chunk}" if chunk else "no cache"
            if chunk in capped:
                rows.append({"batch": B, "chunk": chunk, "mode": mode, "status": capped[chunk]})
                continue
            log(f"[batch_memory] batch {B}, {mode} ...")
            row = _run_config({**common, "batch": B, "chunk": chunk}, timeout)
            if row.get("status") == "ok":
                log(f"[batch_memory]   {row['step_s']:.3f} s/step, peak {fmt_mem(row['peak_bytes'])}")
            else:
                log(f"[batch_memory]   {row['status']}" + (f"\n{row['error']}" if row.get("error") else ""))
            if row.get("status") == "OOM":  # larger batches of this mode would OOM too
                capped[chunk] = "skipped (OOM at a smaller batch)"
            elif row.get("status") != "ok":
                capped[chunk] = f"skipped ({row['status']} at a smaller batch)"
            elif args.time_cap and max(row["step_s"], row["warmup_s"]) > args.time_cap:
                capped[chunk] = "skipped (time cap)"
            rows.append(row)
    # ratio gradcache / no-cache step time where both ran
    by = {(r["batch"], r["chunk"] is None): r for r in rows}
    for r in rows:
        other = by.get((r["batch"], True))
        if r["chunk"] and r.get("status") == "ok" and other is not None and other.get("status") == "ok":
            r["ratio_vs_no_cache"] = r["step_s"] / other["step_s"]
    return rows


def header_lines(args: argparse.Namespace, command: str) -> list[str]:
    return [
        f"device: {device_name(args.device, args.threads)}",
        f"torch {torch.__version__}, date (UTC) {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M')}",
        f"command: `{command}`",
        f"shape {args.shape} ({SHAPES[args.shape]['num_hidden_layers']}x{SHAPES[args.shape]['hidden_size']}), "
        f"dtype {args.dtype}, queries {args.q_min}..{args.q_len} / passages {args.p_min}..{args.p_len} tokens"
        + (f", {args.negatives} hard negatives per query" if args.negatives else "")
        + f", median of <= {args.repeats} steps after 1 warm-up"
        + (f", time cap {args.time_cap:.0f} s" if args.time_cap else ""),
    ]


def markdown_table(rows: list[dict], device: str) -> str:
    mem_col = "peak allocated (reserved)" if device == "cuda" else "peak RSS increase"
    out = [f"| batch | mode | real tokens / step | step (s) | tokens/s | {mem_col} | gradcache / no-cache time |",
           "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.get("status") != "ok":
            tok = f"{r['real_tokens']:,}" if r.get("real_tokens") else ""
            out.append(f"| {r['batch']:,} | {r['mode']} | {tok} | {r['status']} | | | |")
            continue
        mem = fmt_mem(r["peak_bytes"])
        if r.get("reserved_bytes"):
            mem += f" ({fmt_mem(r['reserved_bytes'])})"
        ratio = f"{r['ratio_vs_no_cache']:.2f}×" if "ratio_vs_no_cache" in r else ""
        out.append(f"| {r['batch']:,} | {r['mode']} | {r['real_tokens']:,} | {r['step_s']:.3f} | "
                   f"{r['tokens_per_s']:,.0f} | {mem} | {ratio} |")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_or_run_child(build_parser(), argv, "--_worker", _worker)
    if args is None:  # a measurement child of _run_config
        return []
    args = _finish_args(args)
    command = command_line(__file__, argv)
    rows = run(args)
    lines = header_lines(args, command)
    if args.markdown:
        print("\n".join(f"{l}  " for l in lines))
        print()
    else:
        print("\n".join(lines))
        print()
    print(markdown_table(rows, args.device))
    if not args.markdown:
        backends = sorted({r["backend"] for r in rows if r.get("backend")})
        print(f"\nattention backend (passages): {', '.join(backends) or 'n/a'}; memory: "
              + ("torch.cuda.max_memory_allocated (absolute), reserved in brackets" if args.device == "cuda"
                 else "peak RSS increase over the pre-warm-up RSS, fresh process per row"))
    emit({"header": lines, "rows": rows}, args.json)
    return rows


if __name__ == "__main__":
    main()
