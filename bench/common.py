"""Helpers shared by the benchmarks: peak-RSS sampling on CPU, a readable device name."""

from __future__ import annotations

import os
import platform
import threading
import time
from typing import Optional, Union


class RssSampler:
    """Peak RSS of this process, sampled every `interval` seconds (default 2 ms) in a daemon thread."""

    def __init__(self, interval: float = 0.002):
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
        self.peak = 0
        self.interval = interval
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def rss(self) -> int:
        return self.read()

    def start(self) -> None:
        self.peak = self.read()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.read())
        return self.peak


def device_name(device: Union[str, "torch.device"], threads: int) -> str:  # noqa: F821
    """GPU name, or the CPU model with its core count and the torch thread count."""
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
    return f"CPU ({model}, {os.cpu_count()} logical cores, {threads} torch thread{'s' if threads != 1 else ''})"
