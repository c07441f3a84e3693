"""Weakly supervised triplet ranking loss of NetVLAD (Arandjelović et al., CVPR 2016)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from netvlad.losses.distances import check_mask, squared_distances
from netvlad.losses.reduction import Reduction, check_reduction, reduce_loss


def select_violating_negatives(
    positive_dist2: Tensor,
    negative_dist2: Tensor,
    margin: float = 0.1,
    max_negatives: int = 10,
    negatives_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Pick each query's negatives that violate the margin, hardest first.

    Negative j of query b violates when ``positive_dist2[b] + margin − negative_dist2[b, j] > 0``.
    Used by the loss and by the training loop to mine negatives from cached descriptors.

    Args:
        positive_dist2: (B,) squared distance from each query to its best positive.
        negative_dist2: (B, M) squared distances from each query to its candidate negatives.
        margin: margin m, in squared descriptor units.
        max_negatives: keep at most this many violators per query.
        negatives_mask: optional (B, M) bool, False marks padding (never selected).

    Returns:
        ``(indices, valid)``, both (B, k) with k = min(max_negatives, M): column indices into
        ``negative_dist2`` sorted by decreasing violation, and whether each pick truly violates
        (False once a query runs out of violators). No gradient flows through the selection.
    """
    if max_negatives < 1:
        raise ValueError(f"max_negatives must be >= 1, got {max_negatives}")
    if positive_dist2.dim() != 1 or negative_dist2.dim() != 2 or (
        negative_dist2.shape[0] != positive_dist2.shape[0]
    ):
        raise ValueError(
            f"expected positive_dist2 (B,) and negative_dist2 (B, M), got "
            f"{tuple(positive_dist2.shape)} and {tuple(negative_dist2.shape)}"
        )
    check_mask(negatives_mask, negative_dist2.shape, "negatives_mask")
    with torch.no_grad():
        violation = positive_dist2.unsqueeze(1) + margin - negative_dist2
        if negatives_mask is not None:
            violation = violation.masked_fill(~negatives_mask, float("-inf"))
        k = min(max_negatives, violation.shape[1])
        values, indices = violation.topk(k, dim=1, largest=True, sorted=True)
    return indices, values > 0


class TripletRankingLoss(nn.Module):
    """``L = Σ_j max(min_i d²(q, p_i) + m − d²(q, n_j), 0)`` over the hardest violating negatives.

    Distances are squared Euclidean. The best potential positive is the nearest of the query's
    positives (weak supervision: GPS-near images that may not show the same scene); the sum runs
    over at most ``max_negatives`` violating negatives, hardest first.

    Args:
        margin: m, in squared descriptor units (0.1 for L2-normalised descriptors).
        max_negatives: most violating negatives per query.
        reduction: "mean" (over queries), "sum" or "none" (per-query (B,) losses).

    After each forward, ``num_active_triplets`` holds the number of (q, p*, n_j) triplets with a
    non-zero hinge in that batch, for logging.
    """

    def __init__(self, margin: float = 0.1, max_negatives: int = 10, reduction: Reduction = "mean"):
        super().__init__()
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        if max_negatives < 1:
            raise ValueError(f"max_negatives must be >= 1, got {max_negatives}")
        self.margin = float(margin)
        self.max_negatives = int(max_negatives)
        self.reduction = check_reduction(reduction)
        self.num_active_triplets = 0

    def forward(
        self,
        query: Tensor,
        positives: Tensor,
        negatives: Tensor,
        positives_mask: Tensor | None = None,
        negatives_mask: Tensor | None = None,
    ) -> Tensor:
        """Loss for a batch of queries.

        Args:
            query: (B, D) query descriptors.
            positives: (B, P, D) potential positives per query.
            negatives: (B, M, D) negatives per query.
            positives_mask: optional (B, P) bool, False marks padding; every query needs at
                least one valid positive.
            negatives_mask: optional (B, M) bool, False marks padding.

        Returns:
            Scalar loss, or (B,) per-query losses with ``reduction="none"``.
        """
        pos_d2 = squared_distances(query, positives)
        neg_d2 = squared_distances(query, negatives)
        positives_mask = check_mask(positives_mask, pos_d2.shape, "positives_mask")
        if positives_mask is not None:
            pos_d2 = pos_d2.masked_fill(~positives_mask, float("inf"))
        if pos_d2.shape[1] == 0 or not torch.isfinite(pos_d2.detach().amin(dim=1)).all():
            raise ValueError("every query needs at least one valid positive")
        best_pos_d2 = pos_d2.amin(dim=1)
        indices, valid = select_violating_negatives(
            best_pos_d2, neg_d2, self.margin, self.max_negatives, negatives_mask
        )
        hinge = best_pos_d2.unsqueeze(1) + self.margin - neg_d2.gather(1, indices)
        per_query = hinge.masked_fill(~valid, 0.0).sum(dim=1)
        self.num_active_triplets = int(valid.sum())
        return reduce_loss(per_query, self.reduction)

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, max_negatives={self.max_negatives}, "
            f"reduction={self.reduction!r}"
        )
