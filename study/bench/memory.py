"""Peak memory over a block of code (`BlockPeakMemory`), for the bench's runs, and the readings it
samples: the process's resident set (`rss_mb`) and the allocated MPS memory (`mps_allocated_mb`).

The training loop has its own probe (`objectives.device.StepPeakMemory`), and the two are kept apart
on purpose: that one is called by the loop at a step's high points and, on CPUs, reports the
process's high-water mark since it started (`ru_maxrss`, which never comes down), the figure a
trial records. The bench compares two loops run one after the other in one process, so it needs
the peak within each run: a high-water mark since start-up would give the second loop the first
one's peak. On CUDA both read the allocator's own peak counter.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable

import torch


class BlockPeakMemory:
    """Peak memory while a block runs, in MiB.

    CUDA: allocated device memory, from the allocator's own peak counter. Elsewhere a thread
    samples every few milliseconds while the block runs: on MPS the allocated device memory
    (torch has no peak counter there), on CPUs the process's resident set (its high-water mark,
    `ru_maxrss`, never comes down). `read` replaces the sampled quantity (tests).
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
