"""Peak resident-set-size sampling for the CPU benchmarks (shared by batch_memory.py and train_step.py)."""

from __future__ import annotations

import os
import threading
import time
from typing import Optional


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
