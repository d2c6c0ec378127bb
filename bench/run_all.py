"""Run every ropebert benchmark and print ONE combined table (`make bench`).

Runs, each as its own subprocess with a wall-clock cap (common.run_isolated; a benchmark that overruns is reported
as "timed out" and the others still run), with settings sized for the device this runs on:

    bench/loader.py        streaming loader pairs/s, tokens/s (docstring shards built into a temp dir)
    bench/batch_memory.py  peak memory / step time vs global batch, GradCache vs no cache
    bench/kernels.py       RoPE fwd+bwd GB/s, attention backends tokens/s, SelfExtend time / memory (--quick on CPU)
    bench/train_step.py    stage-1 training step, ropebert vs HF BertModel + sentence-transformers MNRL

then reads each one's JSON result (`--json <out>/<name>.json`, which every benchmark takes) and collects the
headline numbers into one markdown table: | benchmark | setting | metric | value | device | target | met? |.
Targets are the issues' (#3, #4, #5, #7); a GPU target measured on a CPU says "n/a (GPU target)". Every
benchmark's log and JSON go to --out (default artifacts/bench/<UTC time>/), printed at the end with the commands.

    .venv/bin/python bench/run_all.py            # CPU: ~10 min on 2 busy cores; GPU: the issues' GPU shapes
    .venv/bin/python bench/run_all.py --quick    # smaller CPU settings, a few minutes (smoke run)
    .venv/bin/python bench/run_all.py --only train_step kernels

Exit status 0 even when a target is missed (it is a measurement, not a test); 1 when a benchmark failed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import sys
import time
from pathlib import Path

from common import REPO, device_name, run_isolated

BENCHES = ("loader", "batch_memory", "kernels", "train_step")
# dense bf16 peak is in train_step.py; HBM bandwidth (GB/s) for the RoPE target (>= 80% of it)
GPU_BANDWIDTH_GBS = [("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0), ("H100", 3350.0),
                     ("A100-SXM4-80GB", 2039.0), ("A100", 1555.0)]


def _gpu_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def commands(gpu: bool, quick: bool) -> dict[str, tuple[list[str], float]]:
    """name -> (arguments of bench/<name>.py, time cap in seconds); run_isolated adds `--json <out>/<name>.json`."""
    if gpu:
        return {
            "loader": (["--build-docstrings", "--workers", "1", "2", "4", "--batches", "100"], 900.0),
            "batch_memory": (["--device", "cuda", "--shape", "base", "--batches", "1024", "4096", "16384", "--chunk",
                              "256", "--dtype", "bf16", "--no-cache-max", "4096"], 1800.0),
            "kernels": ([], 1800.0),
            "train_step": (["--device", "cuda", "--shape", "bert-base", "--pairs", "256", "--dtype", "bf16",
                            "--steps", "6"], 1200.0),
        }
    if quick:
        return {
            "loader": (["--build-docstrings", "--packages", "json", "email", "argparse", "logging", "asyncio",
                        "--workers", "1", "--batches", "30", "--warmup", "3"], 180.0),
            "batch_memory": (["--device", "cpu", "--shape", "tiny", "--batches", "64", "256", "--chunk", "32",
                              "--q-len", "32", "--p-len", "128", "--repeats", "1"], 240.0),
            "kernels": (["--quick", "--lengths", "1024,2048", "--time-cap", "10"], 300.0),
            "train_step": (["--device", "cpu", "--pairs", "8", "--p-len", "256", "--steps", "2"], 300.0),
        }
    return {
        "loader": (["--build-docstrings", "--packages", "json", "email", "argparse", "logging", "asyncio", "unittest",
                    "collections", "--workers", "0", "1", "--batches", "50"], 240.0),
        "batch_memory": (["--device", "cpu", "--shape", "tiny", "--batches", "64", "128", "256", "--chunk", "32",
                          "--q-len", "32", "--p-len", "128", "--repeats", "2"], 360.0),
        "kernels": (["--quick", "--lengths", "1024,2048,4096", "--time-cap", "10"], 480.0),
        "train_step": (["--device", "cpu", "--pairs", "16", "--p-len", "512", "--steps", "2"], 480.0),
    }


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def run_one(name: str, args: list[str], cap: float, out: Path) -> dict:
    """bench/<name>.py in a capped subprocess; log -> <out>/<name>.log, JSON result -> <out>/<name>.json."""
    script = REPO / "bench" / f"{name}.py"
    json_path, log_path = out / f"{name}.json", out / f"{name}.log"
    exe = ".venv/bin/python" if ".venv" in sys.executable else sys.executable
    command = shlex.join([exe, _rel(script)] + args + ["--json", _rel(json_path)])
    print(f"[run_all] {name}: {command} (cap {cap:.0f} s)", file=sys.stderr, flush=True)
    res = run_isolated(script, args, cap, json_path=json_path, log_path=log_path,
                       env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    print(f"[run_all]   {res['status']} in {res['seconds']:.0f} s -> {log_path}", file=sys.stderr, flush=True)
    return {"name": name, "status": res["status"], "seconds": res["seconds"], "log": str(log_path),
            "json": str(json_path) if res["result"] is not None else None, "command": command,
            "result": res["result"]}


# ----------------------------------------------------------------------------------------------------------
# headline rows: (benchmark, setting, metric, value, device, target, met)


def rows_loader(data: dict, device: str) -> list[tuple]:
    rows = []
    for r in data["rows"]:
        s = f"{r['workers']} worker(s), batch {r['batch_size']}, {r['batches']} batches"
        rows.append(("loader", s, "pairs/s", f"{r['pairs_per_s']:,.0f}", device, "", ""))
        rows.append(("loader", s, "tokens/s per worker", f"{r['tokens_per_s_per_worker']:,}", device,
                     "> training tokens/s", "@train_tokens@" + str(r["tokens_per_s_per_worker"])))
    return rows or [("loader", "", "status", "no row measured", device, "", "")]


def rows_batch_memory(data: dict, device: str, gpu: bool) -> list[tuple]:
    rows_in = [r for r in data["rows"] if r.get("status") == "ok"]
    if not rows_in:
        return [("batch_memory", "", "status", "no row measured", device, "", "")]
    hdr = data["header"]
    shape = next((h for h in hdr if h.startswith("shape")), "").split(",")[0]
    out = []
    gc = sorted((r for r in rows_in if r["chunk"]), key=lambda r: r["batch"])
    if gc:
        lo, hi = gc[0], gc[-1]
        growth = hi["peak_bytes"] / max(1, lo["peak_bytes"])
        out.append(("batch_memory", f"{shape}, GradCache chunk {hi['chunk']}, batch {lo['batch']} -> {hi['batch']}",
                    "peak memory growth", f"{growth:.2f}x ({lo['peak_bytes'] / 2**20:,.0f} -> "
                    f"{hi['peak_bytes'] / 2**20:,.0f} MiB)", device, "~flat", ""))
        if gpu and hi["batch"] >= 16384:
            gb = hi["peak_bytes"] / 1e9
            out.append(("batch_memory", f"{shape}, batch {hi['batch']}", "peak memory", f"{gb:.1f} GB", device,
                        "<= 30 GB", "yes" if gb <= 30 else "no"))
    for r in gc:
        if "ratio_vs_no_cache" in r:
            out.append(("batch_memory", f"{shape}, batch {r['batch']}", "GradCache / no-cache step time",
                        f"{r['ratio_vs_no_cache']:.2f}x", device, "<= 1.35x (GPU)",
                        ("yes" if r["ratio_vs_no_cache"] <= 1.35 else "no") if gpu else "n/a (GPU target)"))
    return out


def rows_kernels(data: dict, device: str, gpu: bool, gpu_name: str) -> list[tuple]:
    out = []
    bw = next((v for k, v in GPU_BANDWIDTH_GBS if k in gpu_name), None) if gpu else None
    tokens = data["rope"]["tokens"]
    for r in data["rope"]["rows"]:
        gbs = r["gb_per_s"]
        if gbs is None:
            continue
        target, met = "", ""
        if r["impl"] == "triton":
            target = ">= 80% of HBM bandwidth"
            met = (("yes" if gbs >= 0.8 * bw else "no") + f" ({100 * gbs / bw:.0f}%)") if bw else "?"
        out.append(("kernels", f"RoPE fwd+bwd {r['impl']}, {tokens} tokens", "GB/s", f"{gbs:.1f}", device, target,
                    met))
    for r in data["attention"]["rows"]:
        if r["tokens_per_s"] is not None:
            out.append(("kernels", f"attention fwd+bwd {r['backend']}, variable-length batch", "tokens/s",
                        f"{r['tokens_per_s']:,.0f}", device, "", ""))
    by_len: dict[int, dict[str, dict]] = {}
    for r in data["self_extend"]["rows"]:
        by_len.setdefault(r["length"], {})[r["method"]] = r
    for L, m in sorted(by_len.items()):
        p, f = m.get("plain", {}).get("ms"), m.get("fused", {}).get("ms")
        if p and f:
            ratio = f / p
            target = "<= 2.5x plain (GPU, 4k-32k)"
            met = ("yes" if ratio <= 2.5 else "no") if (gpu and L >= 4096) else (
                "n/a (GPU target)" if not gpu else "n/a (< 4k)")
            out.append(("kernels", f"SelfExtend fused vs plain sdpa forward, {L} tokens", "time ratio",
                        f"{ratio:.2f}x", device, target, met))
            if m["fused"]["peak_mib"] is not None:
                out.append(("kernels", f"SelfExtend fused forward, {L} tokens", "peak memory",
                            f"{m['fused']['peak_mib']:,.0f} MiB", device, "linear in length", ""))
    return out or [("kernels", "", "status", "no row measured", device, "", "")]


def rows_train_step(data: dict, device: str, gpu: bool) -> list[tuple]:
    rows = data["rows"]
    s = rows[-1]["setting"]
    setting = (f"{s['shape']} {s['dtype']}, {s['pairs']} pairs, {s['real_tokens']:,} real / "
               f"{s['padded_tokens']:,} padded tokens")
    out = []
    for r in rows[:-1]:
        out.append(("train_step", f"{r['model']}: {setting}", "real tokens/s", f"{r['real_tokens_per_s']:,.0f}",
                    device, "", ""))
        if r.get("mfu") is not None:
            out.append(("train_step", f"{r['model']}: {setting}", "MFU (real tokens)", f"{100 * r['mfu']:.1f}%",
                        device, ">= 45% (GPU)" if r["model"] == "ropebert" else "",
                        ("yes" if r["mfu"] >= 0.45 else "no") if (gpu and r["model"] == "ropebert") else ""))
        if r.get("peak_bytes") is not None:
            what = "peak memory" if gpu else "peak RSS increase over built model"
            out.append(("train_step", f"{r['model']}: {setting}", what, f"{r['peak_bytes'] / 2**20:,.0f} MiB",
                        device, "", ""))
    rr = rows[-1]
    out.append(("train_step", setting, "ropebert / HF+MNRL speed", f"{rr['ratio']:.2f}x", device,
                f">= {rr['targets']['ratio']}x ({'GPU' if gpu else 'CPU'})", "yes" if rr["met"]["ratio"] else "no"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller CPU settings (a few minutes)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--only", nargs="+", choices=BENCHES, default=list(BENCHES))
    ap.add_argument("--out", default=None, help="output directory (default artifacts/bench/<UTC time>)")
    args = ap.parse_args(argv)
    gpu = _gpu_available() if args.device == "auto" else args.device == "cuda"
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out).resolve() if args.out else REPO / "artifacts" / "bench" / stamp
    out.mkdir(parents=True, exist_ok=True)
    device = device_name("cuda" if gpu else "cpu")
    gpu_name = device if gpu else ""
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    t_all = time.perf_counter()
    cmds = commands(gpu, args.quick)
    results = {name: run_one(name, *cmds[name], out) for name in BENCHES if name in args.only}

    table: list[tuple] = []
    failed = False
    for name, res in results.items():
        data = res.pop("result")  # the benchmark's JSON (<out>/<name>.json), None if it wrote none
        if res["status"] != "ok":
            failed = True
            table.append((name, "", "status", res["status"], device, "", ""))
        if data is None:
            continue
        try:
            if name == "loader":
                table += rows_loader(data, device)
            elif name == "batch_memory":
                table += rows_batch_memory(data, device, gpu)
            elif name == "kernels":
                table += rows_kernels(data, device, gpu, gpu_name)
            elif name == "train_step":
                table += rows_train_step(data, device, gpu)
        except Exception as e:  # a malformed result must not hide the other benchmarks
            failed = True
            table.append((name, "", "status", f"could not read its JSON: {type(e).__name__}: {e}", device, "", ""))

    # the loader must not be the bottleneck: one worker's tokens/s vs the training step's
    train_tps = next((float(r[3].replace(",", "")) for r in table
                      if r[0] == "train_step" and r[1].startswith("ropebert:") and r[2] == "real tokens/s"), None)
    final = []
    for r in table:
        if isinstance(r[6], str) and r[6].startswith("@train_tokens@"):
            tps = float(r[6][len("@train_tokens@"):])
            met = "?" if train_tps is None else ("yes" if tps > train_tps else "no") + f" (train {train_tps:,.0f})"
            r = r[:6] + (met,)
        final.append(r)

    load1 = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"\n## ropebert benchmarks — {device}, {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC"
          + (" (--quick)" if args.quick else "") + f", {time.perf_counter() - t_all:.0f} s in all"
          + (f", load average {load0[0]:.1f} -> {load1[0]:.1f}" if load0 and load1 else "") + "\n")
    print("| benchmark | setting | metric | value | device | target | met? |")
    print("|---|---|---|---|---|---|---|")
    for r in final:
        print("| " + " | ".join(str(c).replace("|", "/") for c in r) + " |")
    print(f"\ndetailed outputs: {out}/")
    for name, res in results.items():
        print(f"  {name}: {res['status']}, {res['seconds']:.0f} s — `{res['command']}` -> {res['log']}"
              + (f", {res['json']}" if res["json"] else ""))
    (out / "summary.json").write_text(json.dumps({"device": device, "rows": final, "runs": results}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
