"""Query-to-candidate squared distances and the validity masks of padded candidate lists,
shared by the triplet and soft-label losses."""

from __future__ import annotations

import torch
from torch import Tensor


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
