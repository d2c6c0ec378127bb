"""Run every ropebert benchmark and print ONE combined table (`make bench`).

Runs, each as its own subprocess with a wall-clock cap (a benchmark that overruns is reported as "timed out"
and the others still run), with settings sized for the device this runs on:

    bench/loader.py        streaming loader pairs/s, tokens/s (docstring shards built into a temp dir)
    bench/batch_memory.py  peak memory / step time vs global batch, GradCache vs no cache
    bench/kernels.py       RoPE fwd+bwd GB/s, attention backends tokens/s, SelfExtend time / memory (--quick on CPU)
    bench/train_step.py    stage-1 training step, ropebert vs HF BertModel + sentence-transformers MNRL

then collects each one's headline numbers into one markdown table:
| benchmark | setting | metric | value | device | target | met? |. Targets are the issues' (#3, #4, #5, #7);
a GPU target measured on a CPU says "n/a (GPU target)". Every benchmark's full output (log, and JSON where
it writes one) goes to --out (default artifacts/bench/<UTC time>/), printed at the end with the commands.

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
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
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


def commands(gpu: bool, quick: bool, out: Path) -> dict[str, tuple[list[str], float]]:
    """name -> (argv after the python executable, time cap in seconds)."""
    py = []
    if gpu:
        return {
            "loader": (py + ["bench/loader.py", "--build-docstrings", "--workers", "1", "2", "4", "--batches", "100"],
                       900.0),
            "batch_memory": (py + ["bench/batch_memory.py", "--device", "cuda", "--shape", "base", "--batches",
                                   "1024", "4096", "16384", "--chunk", "256", "--dtype", "bf16", "--no-cache-max",
                                   "4096", "--json", str(out / "batch_memory.json")], 1800.0),
            "kernels": (py + ["bench/kernels.py"], 1800.0),
            "train_step": (py + ["bench/train_step.py", "--device", "cuda", "--shape", "bert-base", "--pairs", "256",
                                 "--dtype", "bf16", "--steps", "6", "--json", str(out / "train_step.json")], 1200.0),
        }
    if quick:
        return {
            "loader": (py + ["bench/loader.py", "--build-docstrings", "--packages", "json", "email", "argparse",
                             "logging", "asyncio", "--workers", "1", "--batches", "30", "--warmup", "3"], 180.0),
            "batch_memory": (py + ["bench/batch_memory.py", "--device", "cpu", "--shape", "tiny", "--batches", "64",
                                   "256", "--chunk", "32", "--q-len", "32", "--p-len", "128", "--repeats", "1",
                                   "--json", str(out / "batch_memory.json")], 240.0),
            "kernels": (py + ["bench/kernels.py", "--quick", "--lengths", "1024,2048", "--time-cap", "10"], 300.0),
            "train_step": (py + ["bench/train_step.py", "--device", "cpu", "--pairs", "8", "--p-len", "256",
                                 "--steps", "2", "--json", str(out / "train_step.json")], 300.0),
        }
    return {
        "loader": (py + ["bench/loader.py", "--build-docstrings", "--packages", "json", "email", "argparse",
                         "logging", "asyncio", "unittest", "collections", "--workers", "0", "1", "--batches", "50"],
                   240.0),
        "batch_memory": (py + ["bench/batch_memory.py", "--device", "cpu", "--shape", "tiny", "--batches", "64",
                               "128", "256", "--chunk", "32", "--q-len", "32", "--p-len", "128", "--repeats", "2",
                               "--json", str(out / "batch_memory.json")], 360.0),
        "kernels": (py + ["bench/kernels.py", "--quick", "--lengths", "1024,2048,4096", "--time-cap", "10"], 480.0),
        "train_step": (py + ["bench/train_step.py", "--device", "cpu", "--pairs", "16", "--p-len", "512",
                             "--steps", "2", "--json", str(out / "train_step.json")], 480.0),
    }


def run_one(name: str, argv: list[str], cap: float, out: Path) -> dict:
    log_path = out / f"{name}.log"
    cmd = [sys.executable] + argv
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    print(f"[run_all] {name}: {shlex.join([os.path.relpath(sys.executable, REPO)] + argv)} (cap {cap:.0f} s)",
          file=sys.stderr, flush=True)
    status = "ok"
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=cap)
            if rc != 0:
                status = f"failed (rc {rc})"
        except subprocess.TimeoutExpired:
            import signal

            os.killpg(proc.pid, signal.SIGKILL)  # the benchmark's own process group (it may have children)
            proc.wait()
            status = f"timed out ({cap:.0f} s)"
    dt = time.perf_counter() - t0
    print(f"[run_all]   {status} in {dt:.0f} s -> {log_path}", file=sys.stderr, flush=True)
    return {"name": name, "status": status, "seconds": dt, "log": str(log_path),
            "command": shlex.join([".venv/bin/python" if ".venv" in sys.executable else sys.executable] + argv)}


# ----------------------------------------------------------------------------------------------------------
# headline rows: (benchmark, setting, metric, value, device, target, met)


def _md_tables(text: str) -> dict[str, list[list[str]]]:
    """'## title' -> table rows (cells), for the markdown kernels.py prints."""
    tables, title = {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
            tables[title] = []
        elif title and line.startswith("|") and not set(line.replace("|", "").strip()) <= set("-: "):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            tables[title].append(cells)
    return {k: v[1:] for k, v in tables.items()}  # drop the header row


def _num(s: str) -> Optional[float]:
    try:
        return float(s.replace(",", ""))
    except (ValueError, AttributeError):
        return None


def rows_loader(text: str, device: str) -> list[tuple]:
    rows = []
    for line in text.splitlines():
        if line.startswith("{") and '"workers"' in line:
            r = json.loads(line)
            s = f"{r['workers']} worker(s), batch {r['batch_size']}, {r['batches']} batches"
            rows.append(("loader", s, "pairs/s", f"{r['pairs_per_s']:,.0f}", device, "", ""))
            rows.append(("loader", s, "tokens/s per worker", f"{r['tokens_per_s_per_worker']:,}", device,
                         "> training tokens/s", "@train_tokens@" + str(r["tokens_per_s_per_worker"])))
    return rows


def rows_batch_memory(path: Path, device: str, gpu: bool) -> list[tuple]:
    data = json.loads(path.read_text())
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


def rows_kernels(text: str, device: str, gpu: bool, gpu_name: str) -> list[tuple]:
    tables = _md_tables(text)
    out = []
    bw = next((v for k, v in GPU_BANDWIDTH_GBS if k in gpu_name), None) if gpu else None
    for title, rows in tables.items():
        if title.startswith("RoPE"):
            tokens = re.search(r"q and k, (\d+) tokens", title)
            for impl, ms, gbs in (r[:3] for r in rows if len(r) >= 3):
                if _num(gbs) is None:
                    continue
                target, met = "", ""
                if impl == "triton":
                    target = ">= 80% of HBM bandwidth"
                    met = (("yes" if _num(gbs) >= 0.8 * bw else "no") + f" ({100 * _num(gbs) / bw:.0f}%)") if bw else "?"
                out.append(("kernels", f"RoPE fwd+bwd {impl}, {tokens.group(1) if tokens else '?'} tokens",
                            "GB/s", gbs, device, target, met))
        elif title.startswith("Attention"):
            best = {}
            for r in rows:
                if len(r) >= 3 and _num(r[1]) is not None:
                    best[r[0]] = _num(r[1])
            for name, tps in best.items():
                out.append(("kernels", f"attention fwd+bwd {name}, variable-length batch", "tokens/s",
                            f"{tps:,.0f}", device, "", ""))
        elif title.startswith("SelfExtend"):
            by_len: dict[int, dict[str, tuple]] = {}
            for r in rows:
                if len(r) >= 4:
                    by_len.setdefault(int(r[0]), {})[r[1]] = (_num(r[2]), _num(r[3]))
            for L, m in sorted(by_len.items()):
                p, f = m.get("plain"), m.get("fused")
                if p and f and p[0] and f[0]:
                    ratio = f[0] / p[0]
                    target = "<= 2.5x plain (GPU, 4k-32k)"
                    met = ("yes" if ratio <= 2.5 else "no") if (gpu and L >= 4096) else (
                        "n/a (GPU target)" if not gpu else "n/a (< 4k)")
                    out.append(("kernels", f"SelfExtend fused vs plain sdpa forward, {L} tokens", "time ratio",
                                f"{ratio:.2f}x", device, target, met))
                    if f[1] is not None:
                        out.append(("kernels", f"SelfExtend fused forward, {L} tokens", "peak memory",
                                    f"{f[1]:,.0f} MiB", device, "linear in length", ""))
    return out or [("kernels", "", "status", "no table parsed", device, "", "")]


def rows_train_step(path: Path, device: str, gpu: bool) -> list[tuple]:
    data = json.loads(path.read_text())
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
    out = Path(args.out) if args.out else REPO / "artifacts" / "bench" / stamp
    out.mkdir(parents=True, exist_ok=True)
    if gpu:
        import torch

        gpu_name = torch.cuda.get_device_name()
        device = gpu_name
    else:
        gpu_name = ""
        model = "CPU"
        try:
            with open("/proc/cpuinfo") as f:
                model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "CPU")
        except OSError:
            pass
        device = f"CPU ({model}, {os.cpu_count()} cores)"
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    t_all = time.perf_counter()
    cmds = commands(gpu, args.quick, out)
    results = {name: run_one(name, *cmds[name], out) for name in BENCHES if name in args.only}

    table: list[tuple] = []
    failed = False
    for name, res in results.items():
        text = Path(res["log"]).read_text(encoding="utf-8", errors="replace")
        if res["status"] != "ok":
            failed = True
            table.append((name, "", "status", res["status"], device, "", ""))
            if name != "train_step" and name != "batch_memory":
                continue
        try:
            if name == "loader":
                table += rows_loader(text, device)
            elif name == "batch_memory" and (out / "batch_memory.json").is_file():
                table += rows_batch_memory(out / "batch_memory.json", device, gpu)
            elif name == "kernels":
                table += rows_kernels(text, device, gpu, gpu_name)
            elif name == "train_step" and (out / "train_step.json").is_file():
                table += rows_train_step(out / "train_step.json", device, gpu)
        except Exception as e:  # a parse problem must not hide the other benchmarks
            failed = True
            table.append((name, "", "status", f"could not parse output: {type(e).__name__}: {e}", device, "", ""))

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
        print(f"  {name}: {res['status']}, {res['seconds']:.0f} s — `{res['command']}` -> {res['log']}")
    (out / "summary.json").write_text(json.dumps({"device": device, "rows": final, "runs": results}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
