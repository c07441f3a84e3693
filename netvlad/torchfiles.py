"""Reading `torch.save` files (model files, run states, backbone weights, published checkpoints)
with one kind of error: `ModelFileError`, one line, naming the file and what it should have been.

torch's own load errors run over many lines (advice about `weights_only`, links); only their first
line is kept.
"""

from __future__ import annotations

import os

import torch

from netvlad.errors import ModelFileError


def unreadable(path: str | os.PathLike, what: str, exc: Exception) -> ModelFileError:
    """The error for a file torch could not load as `what` ("model file", "run state", …)."""
    lines = str(exc).strip().splitlines()
    return ModelFileError(f"{path}: not a readable {what} ({type(exc).__name__}: {lines[0] if lines else ''})")


def load_weights_only(path: str | os.PathLike, what: str):
    """`torch.load(path, weights_only=True)` onto the CPU; any failure raises `unreadable(...)`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors all mean "not readable as `what`"
        raise unreadable(path, what, exc) from None
