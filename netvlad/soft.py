"""Soft order statistics: differentiable max/min/abs/sign/median/quantile/remedian (docs/design.md §3).

Every operator takes a sharpness ``alpha`` (α > 0) in **inverse units of x**: ``alpha * x`` is
dimensionless, so rescaling x by s and α by 1/s rescales the result by s. The soft operator is
exact as α → ∞; α·gap ≳ 10 (gap = spacing of the values that decide the statistic) is
practically hard, α·gap ≲ 1 mixes neighbours. Reductions act on ``dim`` of a batched tensor
of any floating dtype/device; nothing loops over elements in Python (the remedian loops over
its O(log n) levels only).

Conventions for an even count n (both median forms, ``softquantile`` at half-integer ranks):
the two middle values score equally, so the result tends to their **mean** — the limit is
``torch.quantile(x, 0.5)``, not ``torch.median`` (which returns the lower one).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "softabs",
    "softargmax",
    "softargmin",
    "softmax",
    "softmedian",
    "softmin",
    "softquantile",
    "softremedian",
    "softsign",
    "weighted_softmedian",
]

MEDIAN_METHODS = ("rank", "deviation")


def _check_alpha(alpha: float, name: str = "alpha") -> None:
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"{name} must be a finite positive sharpness, got {alpha!r}")


def _rank_alpha(alpha: float, rank_alpha: float | None) -> float:
    """The rank form's selection sharpness: ``rank_alpha`` if given, else α's value."""
    rank_alpha = alpha if rank_alpha is None else rank_alpha
    _check_alpha(rank_alpha, "rank_alpha")
    return rank_alpha


def _check_q(q: float) -> None:
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q must lie in [0, 1], got {q!r}")


def _last(x: Tensor, dim: int) -> Tensor:
    """Move ``dim`` to the end; refuse empty reductions."""
    if x.shape[dim] == 0:
        raise ValueError(f"cannot reduce over an empty dimension (dim={dim}, shape={tuple(x.shape)})")
    return x.movedim(dim, -1)


# --------------------------------------------------------------------------------- max / min


def softmax(x: Tensor, dim: int = -1, alpha: float = 1.0) -> Tensor:
    """(1/α) log Σ_k exp(α x_k) over ``dim`` (removed). In [max, max + log(n)/α]."""
    _check_alpha(alpha)
    return torch.logsumexp(alpha * x, dim=dim) / alpha


def softmin(x: Tensor, dim: int = -1, alpha: float = 1.0) -> Tensor:
    """−softmax(−x) over ``dim`` (removed). In [min − log(n)/α, min]."""
    return -softmax(-x, dim=dim, alpha=alpha)


def softargmax(x: Tensor, dim: int = -1, alpha: float = 1.0) -> Tensor:
    """Weights exp(α x_i) / Σ_k exp(α x_k), same shape as x, summing to 1 over ``dim``."""
    _check_alpha(alpha)
    return torch.softmax(alpha * x, dim=dim)


def softargmin(x: Tensor, dim: int = -1, alpha: float = 1.0) -> Tensor:
    """softargmax(−x): weights concentrating on the minimum, same shape as x."""
    return softargmax(-x, dim=dim, alpha=alpha)


# --------------------------------------------------------------------------------- abs / sign


def softabs(x: Tensor, alpha: float = 1.0) -> Tensor:
    """Elementwise softmax_α(x, −x) = (1/α) log(e^{αx} + e^{−αx}); |x| ≤ softabs ≤ |x| + log2/α."""
    _check_alpha(alpha)
    return torch.logaddexp(alpha * x, -alpha * x) / alpha


def softsign(x: Tensor, alpha: float = 1.0) -> Tensor:
    """Elementwise 2σ(αx) − 1, computed as the identical tanh(αx/2); in (−1, 1), 0 at 0."""
    _check_alpha(alpha)
    return torch.tanh(0.5 * alpha * x)


# --------------------------------------------------------------------------------- median core
# The helpers below work on the last dim and accept an optional boolean ``mask`` (same shape):
# masked-out entries neither count towards anybody's score nor can be selected. The remedian
# uses it to ignore the padding of its last, partial block.


def _select(points: Tensor, score: Tensor, alpha: float, mask: Tensor | None) -> Tensor:
    """Σ_j softargmin_α(score)_j points_j: points (..., n, d), score (..., n) → (..., d)."""
    if mask is not None:
        score = score.masked_fill(~mask, math.inf)
    return (softargmin(score, alpha=alpha).unsqueeze(-1) * points).sum(-2)


def _rank_stat(x: Tensor, q: float, alpha: float, rank_alpha: float, mask: Tensor | None) -> Tensor:
    """Rank form: r_j = Σ_i softsign(x_j − x_i), pick argmin_j (r_j − (2q−1)(n−1))²."""
    signs = softsign(x.unsqueeze(-1) - x.unsqueeze(-2), alpha)  # (..., n, n): [j, i]
    if mask is None:
        n = x.shape[-1]
    else:
        signs = signs * mask.unsqueeze(-2)
        n = mask.sum(-1, keepdim=True).to(x.dtype)
    target = (2.0 * q - 1.0) * (n - 1)
    score = (signs.sum(-1) - target).square()
    return _select(x.unsqueeze(-1), score, rank_alpha, mask).squeeze(-1)


def _deviation_median(x: Tensor, counts: Tensor | None, alpha: float, mask: Tensor | None) -> Tensor:
    """Deviation form on points x (..., n, d): argmin_j Σ_i c_i Σ_c softabs(x_ic − x_jc), c = counts."""
    dev = softabs(x.unsqueeze(-3) - x.unsqueeze(-2), alpha).sum(-1)  # (..., n, n): [j, i]
    if counts is not None:
        dev = dev * counts.unsqueeze(-2)
    return _select(x, dev.sum(-1), alpha, mask)


def _median_last(x: Tensor, alpha: float, method: str, rank_alpha: float, mask: Tensor | None) -> Tensor:
    if method == "rank":
        return _rank_stat(x, 0.5, alpha, rank_alpha, mask)
    counts = None if mask is None else mask.to(x.dtype)
    return _deviation_median(x.unsqueeze(-1), counts, alpha, mask).squeeze(-1)


def _check_method(method: str) -> None:
    if method not in MEDIAN_METHODS:
        raise ValueError(f"median method must be one of {MEDIAN_METHODS}, got {method!r}")


# --------------------------------------------------------------------------------- public medians


def softmedian(
    x: Tensor,
    dim: int = -1,
    alpha: float = 1.0,
    method: str = "rank",
    rank_alpha: float | None = None,
) -> Tensor:
    """Soft median of x over ``dim`` (removed); O(n²) time and memory per reduced row.

    ``method="rank"``: soft ranks r_j = Σ_i softsign_α(x_j − x_i) (0 at the median), weights
    softargmin_{rank_alpha}(r_j²). ``rank_alpha`` is the sharpness of that selection in
    1/count² (dimensionless); it defaults to α's value as in docs/design.md §3 — pass it explicitly
    when x is in large units (small α), or the selection spreads over many ranks.
    ``method="deviation"``: weights softargmin_α(Σ_i softabs_α(x_i − x_j)), all in x's units.
    Result ⟨x, w⟩. Limit α → ∞: torch.median for odd n, torch.quantile(x, 0.5) for even n.
    Ties: tied values share their mean rank, so the rank form blends a tied group at the median
    with its neighbour ([1, 1, 1, 2, 3] → 1.25); the deviation form handles ties (→ 1).
    """
    _check_alpha(alpha)
    _check_method(method)
    rank_alpha = _rank_alpha(alpha, rank_alpha)
    return _median_last(_last(x, dim), alpha, method, rank_alpha, None)


def softquantile(
    x: Tensor,
    q: float,
    dim: int = -1,
    alpha: float = 1.0,
    rank_alpha: float | None = None,
) -> Tensor:
    """Soft q-quantile over ``dim`` (removed), rank form: softargmin_j (r_j − (2q−1)(n−1))².

    Hard ranks give r_j − (2q−1)(n−1) = 2(k_j − q(n−1)), so as α → ∞ the value at the rank
    nearest to q(n−1) is picked: torch.quantile(..., interpolation="nearest"), except at
    half-integer q(n−1) where the two neighbours are averaged ("midpoint"). O(n²).
    ``alpha`` / ``rank_alpha`` and the caveat on ties as in :func:`softmedian`.
    """
    _check_alpha(alpha)
    _check_q(q)
    rank_alpha = _rank_alpha(alpha, rank_alpha)
    return _rank_stat(_last(x, dim), q, alpha, rank_alpha, None)


def weighted_softmedian(x: Tensor, weights: Tensor, dim: int = -1, alpha: float = 1.0) -> Tensor:
    """Weighted soft median (deviation form) of scalars or points — a soft weighted L1-medoid.

    weights: (..., n) non-negative, candidate axis ``dim`` (indexed in ``weights``' shape);
    they are rescaled to mean 1, so uniform weights reproduce ``softmedian(method="deviation")``.
    x: the same shape as weights (scalars, returns (...)) or that shape plus a trailing
    coordinate axis d (points, e.g. (..., n, 2) easting/northing in metres; returns (..., d)).
    Candidate j scores D_j = Σ_i w_i Σ_c softabs_α(x_ic − x_jc) — the L1 distance, i.e. the sum
    of per-coordinate deviations — and the result is Σ_j softargmin_α(D)_j x_j, a convex
    combination of whole candidates (never a mix of coordinates from different candidates).
    As α → ∞ (α in 1/units of x): the exact weighted median (scalars) or weighted L1-medoid.
    """
    _check_alpha(alpha)
    if (weights < 0).any():
        raise ValueError("weights must be non-negative")
    axis = dim % weights.dim()
    w = _last(weights, axis)
    if x.dim() == weights.dim():
        pts, squeeze = x.movedim(axis, -1).unsqueeze(-1), True
    elif x.dim() == weights.dim() + 1:
        pts, squeeze = x.movedim(axis, -2), False
    else:
        raise ValueError(
            f"x must have the shape of weights {tuple(weights.shape)} or one extra trailing "
            f"coordinate axis, got {tuple(x.shape)}"
        )
    if pts.shape[-2] != w.shape[-1]:
        raise ValueError(f"x has {pts.shape[-2]} candidates on dim {dim}, weights have {w.shape[-1]}")
    counts = w / w.mean(-1, keepdim=True)
    out = _deviation_median(pts, counts, alpha, None)
    return out.squeeze(-1) if squeeze else out


# --------------------------------------------------------------------------------- remedian


def _pad_for_quantile(x: Tensor, q: float, alpha: float) -> Tensor:
    """Insert round(|1−2q|(n−1)) copies of softmin (q < ½) or softmax (q > ½) of the last dim.

    The median of the padded row is the q-quantile of x (exactly for hard α; docs/design.md §3 pads
    |1−2q|·n, we use n−1 so the hard limit matches torch.quantile). The remedian assumes a
    random order, so the pads go to random positions (a fixed-seed, hence reproducible, random
    merge that keeps x's order): appended as a run they would make the remedian return a
    quantile of block medians, and evenly spaced they bias it by ~0.04 in probability at q=0.1.
    """
    n = x.shape[-1]
    p = round(abs(1.0 - 2.0 * q) * (n - 1))
    if p == 0:
        return x
    bound = softmin(x, alpha=alpha) if q < 0.5 else softmax(x, alpha=alpha)
    is_pad = torch.zeros(n + p, dtype=torch.bool)
    is_pad[torch.randperm(n + p, generator=torch.Generator().manual_seed(0))[:p]] = True
    source = torch.full((n + p,), n, dtype=torch.long)  # index n = the pad value
    source[~is_pad] = torch.arange(n)
    return torch.cat([x, bound.unsqueeze(-1)], dim=-1)[..., source.to(x.device)]


def softremedian(
    x: Tensor,
    dim: int = -1,
    alpha: float = 1.0,
    block: int = 5,
    q: float = 0.5,
    method: str = "deviation",
    rank_alpha: float | None = None,
) -> Tensor:
    """Soft remedian over ``dim`` (removed): O(n·block) work, O(log_block n) levels.

    Each level splits the row into consecutive blocks of ``block`` values and replaces every
    block by its soft median (``method``/``rank_alpha`` as in :func:`softmedian`); the last,
    partial block is padded but the padding is masked out (ignored), so it yields the median of
    its own values. Levels repeat until at most ``block`` values remain, whose soft median is
    returned. For q ≠ ½ the row is first padded per docs/design.md §3 (see ``_pad_for_quantile``)
    with copies of one value; those ties need the deviation form (the default), and
    ``method="rank"`` is refused for q ≠ ½.
    For hard α this is the median of medians (even-sized groups give the mean of their two
    middle values); it estimates the median well when the values are in random order.
    """
    _check_alpha(alpha)
    _check_method(method)
    _check_q(q)
    if block < 2:
        raise ValueError(f"block must be at least 2, got {block}")
    if method == "rank" and q != 0.5:
        raise ValueError("softremedian with q != 0.5 pads with tied values, which method='rank' mis-ranks")
    rank_alpha = _rank_alpha(alpha, rank_alpha)
    x = _last(x, dim)
    if q != 0.5:
        x = _pad_for_quantile(x, q, alpha)
    while x.shape[-1] > block:
        n = x.shape[-1]
        m = -(-n // block)
        x = torch.nn.functional.pad(x, (0, m * block - n)).unflatten(-1, (m, block))
        mask = (torch.arange(m * block, device=x.device) < n).view(m, block)
        x = _median_last(x, alpha, method, rank_alpha, mask)
    return _median_last(x, alpha, method, rank_alpha, None)
