"""Reducing per-element losses: the `reduction` argument every loss takes ("mean", "sum", "none"),
with an optional validity mask."""

from __future__ import annotations

from typing import Literal, get_args

from torch import Tensor

Reduction = Literal["mean", "sum", "none"]
REDUCTIONS: tuple[str, ...] = get_args(Reduction)


def check_reduction(reduction: str) -> str:
    """Return ``reduction`` if it is one of "mean" | "sum" | "none", else raise ``ValueError``."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def reduce_loss(loss: Tensor, reduction: str, mask: Tensor | None = None) -> Tensor:
    """Reduce per-element losses.

    Args:
        loss: per-element losses, any shape (unitless).
        reduction: "mean" (average over the kept elements), "sum" or "none" (returned as is,
            with dropped elements set to 0).
        mask: optional bool tensor of ``loss``'s shape; False drops an element.

    Returns:
        A scalar for "mean"/"sum", ``loss``'s shape for "none". "mean" of nothing is 0.
    """
    check_reduction(reduction)
    if mask is not None:
        loss = loss.masked_fill(~mask, 0.0)
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    count = loss.new_tensor(loss.numel()) if mask is None else mask.sum().to(loss.dtype)
    return total / count.clamp_min(1)
