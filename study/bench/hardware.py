"""A short description of the machine a bench ran on (GPU name, or CPU model and count), for
the README's figures and device-check's JSON."""

from __future__ import annotations

import os
import platform

import torch


def hardware(device: torch.device) -> str:
    """A short description of the machine, for the README's figures."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    label = f"{cpu}, {os.cpu_count()} logical CPUs"
    return label if device.type == "cpu" else f"{label}, {device.type}"
