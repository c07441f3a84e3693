"""Shared building blocks of the losses: the reduction helper and query-to-candidate distances."""

from __future__ import annotations

from typing import Literal, get_args

import torch
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


def squared_distances(query: Tensor, candidates: Tensor) -> Tensor:
    """Squared Euclidean distances from each query to its own candidates.

    Args:
        query: (B, D) descriptors.
        candidates: (B, C, D) descriptors, C candidates per query.

    Returns:
        (B, C) squared distances, in squared descriptor units. Computed from the differences
        (not the ``‖a‖² − 2ab + ‖b‖²`` expansion) so near-duplicates keep full precision.
    """
    if query.dim() != 2 or candidates.dim() != 3:
        raise ValueError(
            f"expected query (B, D) and candidates (B, C, D), got {tuple(query.shape)} "
            f"and {tuple(candidates.shape)}"
        )
    if candidates.shape[0] != query.shape[0] or candidates.shape[2] != query.shape[1]:
        raise ValueError(
            f"candidates {tuple(candidates.shape)} do not match query {tuple(query.shape)}: "
            "need (B, C, D) with the query's B and D"
        )
    return (candidates - query.unsqueeze(1)).pow(2).sum(dim=-1)


def check_mask(mask: Tensor | None, shape: torch.Size, name: str) -> Tensor | None:
    """Validate an optional bool validity mask of the given shape (True = valid)."""
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.shape != shape:
        raise ValueError(
            f"{name} must be a bool tensor of shape {tuple(shape)}, got {mask.dtype} "
            f"{tuple(mask.shape)}"
        )
    return mask
