"""Kernel benchmarks for the device this runs on (not a test; prints a markdown table).

    python bench/kernels.py            # GPU: full sizes, SelfExtend up to 32k tokens
    python bench/kernels.py --quick    # CPU-sized: small RoPE/attention batches, SelfExtend at 1k/2k/4k
    python bench/kernels.py --quick --json kernels.json    # also every number as JSON (what run_all.py reads)

1. RoPE fwd+bwd (q and k together): time and achieved GB/s (bytes of q, k read + written, forward and
   backward) for triton (CUDA only: the CPU interpreter is no benchmark), torch eager, torch.compile.
2. Attention fwd+bwd tokens/s for every registered backend that can run here, on a variable-length batch
   (lengths uniform in 32..512), rotary included.
3. SelfExtend fused (GPU: compiled FlexAttention partials merged by log-sum-exp; CPU, where FlexAttention cannot
   compile with its lse output: self_extend_split, the same three partials as dense band / causal / reversed-causal
   calls of aten's CPU flash kernel) vs plain attention (sdpa) vs the
   eager three-map reference, forward (inference), time and peak memory per length. Each measurement runs in a fresh
   subprocess (common.run_isolated); peak memory is torch.cuda.max_memory_allocated on GPU and the sampled (1 ms) peak-RSS increase on CPU. The
   reference is skipped where its three fp32 L x L score maps would not fit in --mem-limit-gb. A per-row time
   cap (--time-cap) stops a method at the first length exceeding it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import warnings

import torch
from common import PeakMemory, add_result_args, device_name, emit, parse_or_run_child, run_isolated, sync

warnings.filterwarnings("ignore")


def timeit(fn, device, warmup=2, iters=5, cap_s=20.0):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
        if sum(times) > cap_s:
            break
    times.sort()
    return times[len(times) // 2]


# ---- 1. RoPE --------------------------------------------------------------------------------------------


def bench_rope(device, dtype, tokens, H, D):
    from ropebert.kernels import rotary_reference, rotary_triton, triton_available

    qkv = torch.randn(tokens, 3, H, D, device=device, dtype=dtype)
    q0, k0 = qkv[:, 0].contiguous(), qkv[:, 1].contiguous()
    pos = torch.randint(0, 512, (tokens,), device=device)
    inv = (1.0 / 10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64, device=device) / D)).float()
    impls = {"torch eager": rotary_reference}
    try:
        impls["torch.compile"] = torch.compile(rotary_reference)
    except Exception as e:  # pragma: no cover
        print(f"torch.compile unavailable: {e}")
    if device.type == "cuda" and triton_available():
        impls["triton"] = rotary_triton
    # forward reads q, k and writes q', k'; backward reads dq', dk' and writes dq, dk
    nbytes = 8 * tokens * H * D * torch.finfo(dtype).bits // 8
    rows = []
    for name, fn in impls.items():
        q, k = q0.clone().requires_grad_(True), k0.clone().requires_grad_(True)
        gq, gk = torch.randn_like(q), torch.randn_like(k)

        def step():
            a, b = fn(q, k, pos, inv)
            torch.autograd.backward((a, b), (gq, gk))

        try:
            t = timeit(step, device)
        except Exception as e:
            rows.append({"impl": name, "status": f"failed: {type(e).__name__}", "ms": None, "gb_per_s": None})
            continue
        rows.append({"impl": name, "status": "ok", "ms": t * 1e3, "gb_per_s": nbytes / t / 1e9})
    return rows, nbytes


# ---- 2. attention backends ----------------------------------------------------------------------------------


def bench_attention(device, dtype, n_seqs, H, D, seed=0):
    from ropebert.model.modeling_ropebert import ATTENTION_BACKENDS, AttentionContext, attend, rope_inv_freq, rope_torch

    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(32, 513, (n_seqs,), generator=g)
    T, L = int(lens.sum()), int(lens.max())
    mask = torch.arange(L)[None] < lens[:, None]
    seqlens = lens.to(torch.int32).to(device)
    mask = mask.to(device)
    pos_pad = (mask.long().cumsum(-1) - 1).clamp(min=0)
    rows = []
    for name, be in sorted(ATTENTION_BACKENDS.items()):
        if not be.is_available(device, dtype):
            rows.append({"backend": name, "status": "n/a here", "tokens_per_s": None, "ms": None})
            continue
        common = dict(inv_freq=rope_inv_freq(D, 10000.0, device), seqlens=seqlens, scale=D**-0.5, dropout_p=0.0,
                      rope_fn=rope_torch)
        if be.packed:
            shape = (T, H, D)
            ctx = AttentionContext(packed=True, positions=pos_pad[mask], max_seqlen=L,
                                   cu_seqlens=torch.nn.functional.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0)), **common)
        else:
            shape = (n_seqs, L, H, D)
            ctx = AttentionContext(packed=False, positions=pos_pad, attention_mask=mask, has_padding=True, **common)
        q, k, v = (torch.randn(*shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        go = torch.randn(*shape, device=device, dtype=dtype)

        def step():
            ctx._cos_sin = None
            out = attend(q, k, v, ctx, be)
            torch.autograd.backward(out, go)

        try:
            t = timeit(step, device)
        except Exception as e:
            rows.append({"backend": name, "status": f"failed: {type(e).__name__}: {str(e)[:60]}", "tokens_per_s": None,
                         "ms": None})
            continue
        rows.append({"backend": name, "status": "ok", "tokens_per_s": T / t, "ms": t * 1e3})
    return rows, T, [int(lens.min()), int(lens.max())]


# ---- 3. SelfExtend -------------------------------------------------------------------------------------------


def _se_worker(payload, json_path):
    """Runs in a fresh subprocess (run_isolated): one (method, length) forward; emits time and peak memory."""
    method, L, H, D, dev, dtype_name = json.loads(payload)
    from ropebert.model import modeling_ropebert as mr

    device, dtype = torch.device(dev), getattr(torch, dtype_name)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, L, H, D, device=device, dtype=dtype) for _ in range(3))
    ctx = mr.AttentionContext(
        packed=False, positions=torch.arange(L, device=device)[None], inv_freq=mr.rope_inv_freq(D, 10000.0, device),
        seqlens=torch.tensor([L], dtype=torch.int32, device=device), scale=D**-0.5, dropout_p=0.0,
        attention_mask=torch.ones(1, L, dtype=torch.bool, device=device), has_padding=False,
        self_extend=None if method == "plain" else (9, 64), original_length=512,
    )
    backend = mr.ATTENTION_BACKENDS["eager" if method == "eager three-map" else "sdpa"]

    def step():
        with torch.no_grad():
            ctx._cos_sin = None
            return mr.attend(q, k, v, ctx, backend)

    step()  # warm-up (compilation, block masks)
    sync(device)

    mem = PeakMemory(device, interval=0.001)  # CPU: peak RSS sampled every ms while the timed forwards run
    base = mem.current()
    mem.start()
    t = time.perf_counter()
    n = 0
    while True:
        step()
        sync(device)
        n += 1
        if n >= 3 or time.perf_counter() - t > 10:
            break
    dt = (time.perf_counter() - t) / n
    peak = mem.stop() - base
    emit({"time_s": dt, "peak_bytes": max(peak, 0)}, json_path)


def bench_self_extend(device, dtype, lengths, H, D, time_cap, mem_limit):
    rows = []
    stopped = set()
    for L in lengths:
        for method in ("plain", "fused", "eager three-map"):
            row = {"length": L, "method": method, "ms": None, "peak_mib": None}
            if method in stopped:
                rows.append({**row, "status": "skipped (time cap)"})
                continue
            if method == "eager three-map" and 3 * H * L * L * 4 > mem_limit:
                rows.append({**row, "status": "skipped (3 L x L fp32 maps exceed --mem-limit-gb)"})
                continue
            arg = json.dumps([method, L, H, D, str(device), str(dtype).split(".")[-1]])
            r = run_isolated(__file__, ["--se-worker", arg], timeout=max(120, 6 * time_cap))
            if r["status"].startswith("timed out"):
                rows.append({**row, "status": "timed out"})
                stopped.add(method)
                continue
            if r["status"] != "ok":
                rows.append({**row, "status": "failed: " + (r["error"].splitlines() or ["?"])[-1][:80]})
                stopped.add(method)
                continue
            res = r["result"]
            rows.append({**row, "status": "ok", "ms": res["time_s"] * 1e3, "peak_mib": res["peak_bytes"] / 2**20})
            if res["time_s"] > time_cap:
                stopped.add(method)
    return rows


def _table(head: str, rows: list, keys, first: tuple, second: tuple) -> None:
    """Print a markdown table: the `keys` cells, then two numbers (key, format); a row that is not ok shows its
    status in the first number's cell and leaves the second empty."""
    print(head + "\n" + "|---" * head.count(" | ") + "|---|")
    for r in rows:
        ok = r["status"] == "ok"
        cells = [str(r[k]) for k in ((keys,) if isinstance(keys, str) else keys)]
        cells += [format(r[first[0]], first[1]) if ok else r["status"], format(r[second[0]], second[1]) if ok else ""]
        print("| " + " | ".join(cells) + " |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU-sized problems (SelfExtend at 1k/2k/4k)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lengths", type=str, default=None, help="comma-separated SelfExtend lengths")
    ap.add_argument("--time-cap", type=float, default=5.0, help="seconds per forward after which a method stops")
    ap.add_argument("--mem-limit-gb", type=float, default=None, help="memory budget for the eager reference")
    add_result_args(ap, "every table's numbers", child_flag="--se-worker")
    args = parse_or_run_child(ap, sys.argv[1:] if argv is None else argv, "--se-worker", _se_worker)
    if args is None:  # a SelfExtend child of bench_self_extend
        return 0

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    H, D = 12, 64
    if args.lengths:
        lengths = [int(x) for x in args.lengths.split(",")]
    else:
        lengths = [1024, 4096, 8192, 16384, 32768] if (on_gpu and not args.quick) else [1024, 2048, 4096]
    if args.mem_limit_gb is not None:
        mem_limit = args.mem_limit_gb * 2**30
    elif on_gpu:
        mem_limit = 0.8 * torch.cuda.get_device_properties(device).total_memory
    else:
        mem_limit = 4 * 2**30
    rope_tokens = 65536 if (on_gpu and not args.quick) else 4096
    n_seqs = 64 if (on_gpu and not args.quick) else 8

    header = {"device": device_name(device, torch.get_num_threads()),
              "date_utc": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}",
              "torch": torch.__version__, "dtype": str(dtype).split(".")[-1], "heads": H, "head_dim": D,
              "command": f"python bench/kernels.py {' '.join(sys.argv[1:] if argv is None else argv)}"}
    print("# ropebert kernel benchmarks\n")
    print(f"- device: {header['device']}")
    print(f"- date (UTC): {header['date_utc']}")
    print(f"- torch {header['torch']}, dtype {header['dtype']}, heads {H}, head_dim {D}")
    print(f"- command: {header['command']}\n")

    rows, nbytes = bench_rope(device, dtype, rope_tokens, H, D)
    rope = {"tokens": rope_tokens, "bytes": nbytes, "rows": rows}
    print(f"## RoPE fwd+bwd, q and k, {rope_tokens} tokens ({nbytes / 2**20:.1f} MiB moved per fwd+bwd)\n")
    if not on_gpu:
        print("triton: not timed on CPU (only the Triton interpreter runs here; it is a correctness tool).\n")
    _table("| impl | ms | GB/s |", rows, "impl", ("ms", ".3f"), ("gb_per_s", ".1f"))

    rows, T, (lo, hi) = bench_attention(device, dtype, n_seqs, H, D)
    attention = {"sequences": n_seqs, "tokens": T, "lengths": [lo, hi], "rows": rows}
    print(f"\n## Attention fwd+bwd (rotary included), {n_seqs} sequences, lengths {lo}..{hi}, {T} tokens\n")
    _table("| backend | tokens/s | ms |", rows, "backend", ("tokens_per_s", ",.0f"), ("ms", ".1f"))

    fused = ("compiled FlexAttention partials, LSE-merged" if on_gpu else
             "band + causal + reversed-causal CPU flash partials, LSE-merged")
    print(f"\n## SelfExtend (g=9, w=64, original 512) forward, 1 sequence; fused = {fused}; plain = sdpa\n")
    rows = bench_self_extend(device, dtype, lengths, H, D, args.time_cap, mem_limit)
    _table("| length | method | ms | peak MiB |", rows, ("length", "method"), ("ms", ".1f"), ("peak_mib", ".1f"))
    emit({"header": header, "rope": rope, "attention": attention,
          "self_extend": {"fused": fused, "rows": rows}}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
