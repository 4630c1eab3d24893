"""Peak memory over a block of code (`BlockPeakMemory`), for the bench's runs.

The training loop's own probe (`objectives.device.StepPeakMemory`) reports on CPUs the process's
high-water mark since it started (`ru_maxrss`, which never comes down). The bench runs two loops
one after the other in one process and needs the peak within each run, so it samples instead.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable

import torch


class BlockPeakMemory:
    """Peak memory while a block runs, in MiB: on CUDA the allocator's peak counter; elsewhere a
    thread samples every few milliseconds the allocated MPS memory (torch has no peak counter
    there) or the process's resident set. `read` replaces the sampled quantity (tests).
    """

    def __init__(
        self,
        device: torch.device,
        interval_s: float = 0.005,
        read: Callable[[], float] | None = None,
    ) -> None:
        self.device = device
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._read = read
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> BlockPeakMemory:
        if self.device.type == "cuda" and self._read is None:
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        if self._read is None:
            self._read = mps_allocated_mb if self.device.type == "mps" else rss_mb
        self.peak_mb = self._read()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, self._read())

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._read())


def mps_allocated_mb() -> float:
    return torch.mps.current_allocated_memory() / 2**20


def rss_mb() -> float:
    """The resident set of this process (Linux /proc; the high-water mark elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        from objectives.device import maxrss_mb

        return maxrss_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, sys.platform)
