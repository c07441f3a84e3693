"""Torch devices from what a user types: one rule for every command and API.

`resolve_device` accepts "auto" (or None): CUDA device 0 when CUDA is available, else the CPU;
"cpu"; "cuda" or "cuda:i". Asking for CUDA on a machine without it, for a CUDA index past the
device count, or for something that is not a device raises `DeviceError` naming what exists.
`amp_dtype` is the autocast type for a device; `slow_bf16_warning` says when bfloat16 autocast on
this CPU would be emulated (and far slower than float32).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from netvlad.errors import NetVLADError

AUTO = "auto"


class DeviceError(NetVLADError, ValueError):
    """A device that is not a torch device name, or one this machine does not have."""


def resolve_device(spec: str | torch.device | None = AUTO) -> torch.device:
    """"auto"/None → cuda when available, else cpu; "cpu", "cuda", "cuda:i" → that device, checked."""
    if spec is None or spec == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise DeviceError(f"'{spec}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"device '{spec}' is not supported; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DeviceError(f"device '{spec}' was asked for, but CUDA is not available on this machine")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(f"device '{spec}' does not exist: this machine has {count} CUDA device(s), cuda:0…cuda:{count - 1}")
    return device


def amp_dtype(device: torch.device) -> torch.dtype:
    """Autocast type on `device`: bfloat16 on the CPU and on GPUs with native bfloat16, else float16
    (training in float16 then needs a `torch.amp.GradScaler`)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.float16
    return torch.bfloat16


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX-BF16, from /proc/cpuinfo);
    False where that cannot be read."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def slow_bf16_warning(device: torch.device, amp: bool | None) -> str | None:
    """A warning when bfloat16 autocast is asked for on a CPU that only emulates it, else None."""
    if not amp or device.type != "cpu" or cpu_has_bf16():
        return None
    return ("--amp on a CPU without bfloat16 instructions (no AVX512-BF16 or AMX): bfloat16 is emulated there and "
            "was measured 8-11x slower than float32 for VGG16 training on an AVX2 CPU; leave out --amp on this machine")
