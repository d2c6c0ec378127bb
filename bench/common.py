"""Helpers shared by the benchmarks.

The benchmarks are scripts, run from the repository root as `python bench/<name>.py` (that puts bench/ first on
sys.path, so `from common import ...` finds this file; nothing inserts into sys.path).

- `run_isolated` / `emit`: the ONE subprocess-isolation protocol. The parent runs `python SCRIPT ARGS --json PATH`
  in a fresh interpreter (own process group, killed whole on timeout); the child writes exactly one JSON object
  to PATH with `emit(result, args.json)`. Every benchmark script takes `--json PATH` the same way, so
  `bench/run_all.py` runs each benchmark through `run_isolated` and builds its table from those JSON files.
- `PeakMemory`: the ONE memory sampler (CUDA: torch.cuda.max_memory_allocated / _reserved; CPU: peak RSS sampled
  by a background thread).
- `device_name`: the ONE readable device name.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------
# subprocess isolation


def emit(result: dict, path: str | Path | None) -> None:
    """Child side of `run_isolated`: write `result` (one JSON object) to `path` (the script's --json), atomically.

    No path (a script run by hand without --json): nothing is written."""
    if path is None:
        return
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def _tail(text: str, n: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def run_isolated(script: str | Path, args: Sequence, timeout: float | None = None, *,
                 json_path: str | Path | None = None, log_path: str | Path | None = None,
                 env: dict | None = None) -> dict:
    """Run `python SCRIPT *ARGS --json PATH` in a fresh interpreter and return what it emitted.

    The child runs in the repository root, in its own process group (on timeout the whole group is killed, so
    its own children go too), with os.environ plus `env`. It must write exactly one JSON object to PATH
    (`emit(result, args.json)`); PATH is `json_path`, or a temporary file removed afterwards. stdout and stderr
    go to `log_path` when given, else are captured.

    Returns {"status": "ok" | "timed out (N s)" | "killed (out of memory?)" | "failed (rc N)" |
    "failed (no result)", "result": the emitted object (None when there is none; read even when the status is
    not ok), "error": the last lines of the child's stderr (or log) when not ok, "returncode", "seconds",
    "command": the argv run}.
    """
    tmpdir = None
    if json_path is None:
        tmpdir = tempfile.mkdtemp(prefix="ropebert-bench-")
        json_path = Path(tmpdir) / "result.json"
    json_path = Path(json_path).resolve()  # the child runs in the repository root
    json_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(script).resolve()), *map(str, args), "--json", str(json_path)]
    t0 = time.perf_counter()
    status, stderr = None, ""
    with open(log_path, "w", encoding="utf-8") if log_path is not None else contextlib.nullcontext() as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, text=True,
                                stdout=log if log else subprocess.PIPE,
                                stderr=subprocess.STDOUT if log else subprocess.PIPE, start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, stderr = proc.communicate()
            status = f"timed out ({timeout:.0f} s)"
    seconds = time.perf_counter() - t0
    if log_path is not None:
        stderr = Path(log_path).read_text(encoding="utf-8", errors="replace")
    result = None
    if json_path.is_file():
        try:
            result = json.loads(json_path.read_text(encoding="utf-8"))
        except ValueError:
            result = None
    if tmpdir is not None:
        json_path.unlink(missing_ok=True)
        os.rmdir(tmpdir)
    rc = proc.returncode
    if status is None:
        if rc in (-9, 137):
            status = "killed (out of memory?)"
        elif rc != 0:
            status = f"failed (rc {rc})"
        elif result is None:
            status = "failed (no result)"
        else:
            status = "ok"
    return {"status": status, "result": result, "error": "" if status == "ok" else _tail(stderr or ""),
            "returncode": rc, "seconds": seconds, "command": cmd}


def add_result_args(parser: argparse.ArgumentParser, what: str, child_flag: str | None = None) -> None:
    """Add `--json PATH` (where `emit` writes the script's result: what run_isolated and run_all.py read) and, for a
    script that runs its own measurements in run_isolated children, the hidden flag carrying a child's payload."""
    parser.add_argument("--json", default=None, metavar="PATH",
                        help=f"also write {what} here as JSON (what run_all.py reads)")
    if child_flag is not None:  # scripts that parse through parse_or_run_child
        parser.add_argument("--check-args", action="store_true",
                            help="only parse the command line, print the parsed arguments as JSON and exit 0 (what "
                                 "bench/gpu_check.py --dry-run runs)")
    if child_flag is not None:
        parser.add_argument(child_flag, default=None, help=argparse.SUPPRESS)


def parse_or_run_child(parser: argparse.ArgumentParser, argv: Sequence[str], child_flag: str,
                       child) -> argparse.Namespace | None:
    """Parse `argv`; when `child_flag` (see add_result_args) is set, this process is a `run_isolated` child: run
    `child(payload, args.json)` (which emits its one result) and return None; else return the arguments.
    With --check-args (see add_result_args): print the parsed arguments as JSON and exit 0."""
    args = parser.parse_args(list(argv))
    if getattr(args, "check_args", False):
        print(json.dumps({k: v for k, v in vars(args).items() if k != "check_args"}, default=str))
        raise SystemExit(0)
    payload = getattr(args, child_flag.lstrip("-").replace("-", "_"))
    if payload is None:
        return args
    child(payload, args.json)
    return None


def command_line(script_file: str, argv: Sequence[str]) -> str:
    """The command that ran this script, relative to the current directory where that is shorter."""
    exe = os.path.relpath(sys.executable)
    exe = sys.executable if exe.startswith("..") else exe
    script = os.path.relpath(os.path.abspath(script_file))
    return shlex.join([exe, script if not script.startswith("..") else os.path.abspath(script_file)] + list(argv))


# ----------------------------------------------------------------------------------------------------------
# memory


class PeakMemory:
    """Peak memory between start() and stop().

    CUDA: torch.cuda.max_memory_allocated since start() (peak stats reset there; absolute), and
    max_memory_reserved in `.reserved`. CPU: peak RSS of this process, sampled every `interval` seconds
    (default 2 ms) by a daemon thread (psutil if installed, else /proc/self/statm), plus a reading at start and
    stop. `current()` is the allocated CUDA memory / the RSS now; `stop()` returns the peak."""

    def __init__(self, device="cpu", interval: float = 0.002):
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.peak = 0
        self.reserved: int | None = None
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.cuda:
            self.read = lambda: torch.cuda.memory_allocated(self.device)
            self.source = "torch.cuda.max_memory_allocated"
            return
        try:
            import psutil

            proc = psutil.Process()
            self.read = lambda: proc.memory_info().rss
            self.source = "psutil"
        except ImportError:
            page = os.sysconf("SC_PAGE_SIZE")

            def read():
                with open("/proc/self/statm") as f:
                    return int(f.read().split()[1]) * page

            self.read = read
            self.source = "/proc/self/statm"

    def current(self) -> int:
        return self.read()

    def start(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.peak = self.read()
            return
        self.peak = self.read()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())
            time.sleep(self.interval)

    def stop(self) -> int:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.reserved = torch.cuda.max_memory_reserved(self.device)
            return self.peak
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.peak = max(self.peak, self.read())
        return self.peak


def fmt_mem(b: float | None, digits: int = 1, missing: str = "") -> str:
    """Bytes as GiB (>= 1 GiB, 2 decimals) or MiB (`digits` decimals); `missing` for None."""
    if b is None:
        return missing
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.{digits}f} MiB"


# ----------------------------------------------------------------------------------------------------------
# device


def sync(device) -> None:
    """torch.cuda.synchronize on a CUDA device; nothing on CPU."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device="cpu", threads: int | None = None) -> str:
    """GPU name, or the CPU model with its core count (and the torch thread count when given)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    extra = "" if threads is None else f", {threads} torch thread{'s' if threads != 1 else ''}"
    return f"CPU ({model}, {os.cpu_count()} logical cores{extra})"
