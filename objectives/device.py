"""Device and precision: which device a run uses, its compute dtype, and its memory.

The command line checks `--device` with `is_device_name` before torch is imported (so `--help`
stays fast), hence torch is imported inside the functions that need it, never at module level.
"""

from __future__ import annotations

import platform
import re
import resource
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from objectives.errors import UserError

if TYPE_CHECKING:
    import torch


class DeviceError(UserError):
    """The device asked for does not exist here: the message is meant for the user."""


# ----------------------------------------------------------------------------- device choice

DEVICE_NAMES = ("auto", "cpu", "cuda", "mps")  # and cuda:N, one GPU by its index
_CUDA_INDEX = re.compile(r"cuda:(\d+)")


def is_device_name(name: str) -> bool:
    """A name `--device` accepts: auto, cpu, cuda, cuda:N or mps (whether it exists is checked
    later, by `resolve_device`, on the machine that trains)."""
    return name in DEVICE_NAMES or _CUDA_INDEX.fullmatch(name) is not None


def resolve_device(requested: str, cuda_count: int, mps_available: bool) -> str:
    """`auto` picks cuda, then mps, then cpu; an explicit device must exist.

    A CUDA device comes back with its index (`cuda` is `cuda:0`, as PyTorch means it), so a trial
    records which GPU it ran on. `cuda_count` is the number of visible GPUs.
    """
    if requested == "auto":
        requested = "cuda" if cuda_count else "mps" if mps_available else "cpu"
    if requested == "mps" and not mps_available:
        raise DeviceError("--device mps was asked for, but PyTorch sees no Apple GPU (MPS)")
    if requested in ("mps", "cpu"):
        return requested
    m = _CUDA_INDEX.fullmatch(requested)
    index = 0 if requested == "cuda" else int(m.group(1)) if m else None
    if index is None:
        raise DeviceError(f"unknown device {requested!r}; use auto, cpu, cuda, cuda:N or mps")
    if not cuda_count:
        raise DeviceError(f"--device {requested} was asked for, but PyTorch sees no CUDA GPU")
    if index >= cuda_count:
        raise DeviceError(
            f"--device {requested} was asked for, but PyTorch sees {cuda_count} CUDA GPU(s): "
            f"cuda:0 to cuda:{cuda_count - 1} (CUDA_VISIBLE_DEVICES renumbers them from 0)"
        )
    return f"cuda:{index}"


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def detect_device(requested: str) -> torch.device:
    import torch

    return torch.device(
        resolve_device(requested, cuda_device_count(), torch.backends.mps.is_available())
    )


def worker_device(requested: str, worker: int, cuda_count: int) -> str:
    """The device of worker `worker` (0, 1, ...) of `optimize --workers N`.

    `auto` and `cuda` spread the workers over the visible GPUs, worker k on GPU k mod count
    (`--workers 8` on 2 GPUs: 4 on each); an explicit `cuda:N`, `mps` or `cpu` keeps every
    worker there. Several workers per GPU are allowed: a trial of a small model leaves most of
    a large GPU idle.
    """
    if requested in ("auto", "cuda") and cuda_count > 0:
        return f"cuda:{worker % cuda_count}"
    return requested


# ----------------------------------------------------------------------------- precision


def autocast_dtype(device_type: str, mixed_precision: bool, bf16_supported: bool) -> torch.dtype:
    """The compute dtype: bf16 where the device has it, fp16 on older CUDA GPUs, else fp32
    (why: docs/methodology.md, "Precision per device")."""
    import torch

    if not mixed_precision or device_type == "cpu":
        return torch.float32
    if device_type == "cuda":
        return torch.bfloat16 if bf16_supported else torch.float16
    return torch.bfloat16 if bf16_supported else torch.float32  # mps


def bf16_capable(
    device_type: str,
    cuda_capability: tuple[int, int] | None = None,
    macos: tuple[int, ...] | None = None,
) -> bool:
    """Whether the device computes in bf16 natively: CUDA capability 8.0 or newer (not
    `torch.cuda.is_bf16_supported()`, which counts emulation), MPS on macOS 14 or newer."""
    if device_type == "cuda":
        return cuda_capability is not None and tuple(cuda_capability) >= (8, 0)
    if device_type == "mps":
        return macos is not None and macos >= (14, 0)
    return False


def macos_version(release: str) -> tuple[int, ...] | None:
    """`platform.mac_ver()[0]` ("14.2.1") as (14, 2, 1); None off macOS (an empty string)."""
    parts = release.split(".") if release else []
    try:
        return tuple(int(p) for p in parts) or None
    except ValueError:
        return None


def device_bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        import torch

        return bf16_capable("cuda", torch.cuda.get_device_capability(device))
    if device.type == "mps":
        return bf16_capable("mps", macos=macos_version(platform.mac_ver()[0]))
    return False


def compute_dtype(device: torch.device, mixed_precision: bool) -> torch.dtype:
    """The autocast dtype a run uses on `device`: training, the bench, evaluation, prediction."""
    return autocast_dtype(device.type, mixed_precision, device_bf16_supported(device))


# ----------------------------------------------------------------------------- memory


def maxrss_mb(ru_maxrss: int, system: str) -> float:
    """`getrusage().ru_maxrss` in MiB: macOS reports bytes, Linux (and the BSDs) KiB."""
    return ru_maxrss / (2**20 if system == "darwin" else 2**10)


class StepPeakMemory:
    """The peak memory of one run on its device, in MiB (what each device counts:
    docs/methodology.md, "Peak memory"). MPS has no peak counter, so the loop calls `sample()`
    at a step's high points. `read_mps` replaces `torch.mps.current_allocated_memory` (tests).
    """

    def __init__(self, device: torch.device, read_mps: Callable[[], int] | None = None) -> None:
        import torch

        self.device = device
        self.peak_bytes = 0
        if read_mps is None and device.type == "mps":
            read_mps = torch.mps.current_allocated_memory
        self._read = read_mps
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if self._read is None:
            self.sample = _nothing  # nothing to sample: the counters above keep the peak
        else:
            self.sample()

    def sample(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self._read())

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            import torch

            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self._read is not None:
            self.sample()
            return self.peak_bytes / 2**20
        return maxrss_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, sys.platform)


def _nothing() -> None:
    pass


def release_memory(device: torch.device) -> None:
    """Give a finished run's device memory back, before the next run starts.

    Garbage collection first: CUDA graphs live in reference cycles (each graphed callable is an
    autograd Function class made for it, and make_graphed_callables points a module's `forward`
    back at the module), so only the collector frees them and their memory pools. cuBLAS keeps a
    workspace per stream it has seen, in the caching allocator and never freed by `empty_cache`;
    graph capture brings new streams, so the workspaces are cleared too (as torch's own
    cudagraph trees do), while no graph is alive.
    """
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        clear_cublas_workspaces(device)
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def clear_cublas_workspaces(device: torch.device | None = None) -> None:
    """Free cuBLAS's per-stream workspaces (torch's private call, which its cudagraph trees use)
    once the work queued on `device` (the current one by default) is done."""
    import torch

    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        torch.cuda.synchronize(device)
        clear()


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work (timings and asynchronous errors need it)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
