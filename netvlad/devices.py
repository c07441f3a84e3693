"""Torch devices from what a user types: one rule for every command and API.

`resolve_device` accepts "auto" (or None): CUDA device 0 when CUDA is available, else the CPU;
"cpu"; "cuda" or "cuda:i". Asking for CUDA on a machine without it, for a CUDA index past the
device count, or for something that is not a device raises `DeviceError` naming what exists.
`amp_dtype` is the autocast type for a device.
"""

from __future__ import annotations

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
