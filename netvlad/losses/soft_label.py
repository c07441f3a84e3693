"""Cross entropy with soft (probability) targets, per pair or listwise over a query's candidates."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from netvlad.losses.distances import check_mask, squared_distances
from netvlad.losses.reduction import Reduction, check_reduction, reduce_loss

FORMS = ("pair", "listwise")


def soft_cross_entropy(logits: Tensor, target_probs: Tensor, dim: int = -1) -> Tensor:
    """``H(p, q) = −Σ_y p(y) log q(y)`` with ``q = softmax(logits)`` along ``dim``.

    Args:
        logits: (..., C, ...) unnormalised log-probabilities; ``-inf`` marks an impossible class.
        target_probs: same shape, target distribution p along ``dim`` (non-negative, usually
            summing to 1). Terms with p(y) = 0 count as 0 (0·log 0 = 0), also where q(y) = 0.
        dim: the class dimension.

    Returns:
        Per-sample cross entropy in nats, ``logits``' shape without ``dim`` (no reduction).
    """
    if logits.shape != target_probs.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target_probs {tuple(target_probs.shape)} must "
            "have the same shape"
        )
    log_q = F.log_softmax(logits, dim=dim).masked_fill(target_probs == 0, 0.0)
    return -(target_probs * log_q).sum(dim=dim)


def geo_soft_labels(dist_m: Tensor, sigma_m: float = 10.0) -> Tensor:
    """Soft labels from geographic distance: ``s = exp(−(dist_m / sigma_m)²)``.

    Args:
        dist_m: distances between query and candidate camera positions, metres, any shape.
        sigma_m: length scale in metres (s = e⁻¹ ≈ 0.37 at ``sigma_m``, ≈ 0.02 at 2·sigma_m).

    Returns:
        Labels in (0, 1], ``dist_m``'s shape.
    """
    if sigma_m <= 0:
        raise ValueError(f"sigma_m must be > 0, got {sigma_m}")
    return torch.exp(-(torch.as_tensor(dist_m) / sigma_m) ** 2)


class SoftLabelCrossEntropy(nn.Module):
    """Soft-label cross entropy between a query and its candidates.

    ``form="pair"``: each (query, candidate) pair is a binary problem with a learned match
    probability ``c = σ(a − b·d²)`` (a, b learnable, b = softplus(·) > 0) and loss
    ``−s log c − (1 − s) log(1 − c)``.

    ``form="listwise"``: ``q = softmax(−d²/τ)`` over the query's candidates, ``p ∝ s``, loss
    ``H(p, q)``; τ fixed or learnable (kept positive through its logarithm).

    Args:
        form: "pair" or "listwise".
        init_a, init_b: initial a and b (pair form); c = ½ at d² = a/b.
        temperature: initial τ in squared descriptor units (listwise form).
        learn_temperature: make τ a parameter (listwise form).
        reduction: "mean" (over valid pairs, or over queries for listwise), "sum" or "none".
    """

    def __init__(
        self,
        form: str = "pair",
        init_a: float = 1.0,
        init_b: float = 1.0,
        temperature: float = 0.1,
        learn_temperature: bool = False,
        reduction: Reduction = "mean",
    ):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        self.form = form
        self.reduction = check_reduction(reduction)
        if form == "pair":
            if init_b <= 0:
                raise ValueError(f"init_b must be > 0, got {init_b}")
            self.a = nn.Parameter(torch.tensor(float(init_a)))
            # softplus⁻¹(b) = log(eᵇ − 1), written stably for large b.
            self.raw_b = nn.Parameter(torch.tensor(init_b + math.log(-math.expm1(-init_b))))
        else:
            if temperature <= 0:
                raise ValueError(f"temperature must be > 0, got {temperature}")
            log_t = torch.tensor(math.log(temperature))
            if learn_temperature:
                self.log_temperature = nn.Parameter(log_t)
            else:
                self.register_buffer("log_temperature", log_t)

    @property
    def b(self) -> Tensor:
        """Positive slope b of the pair form (per squared descriptor unit)."""
        return F.softplus(self.raw_b)

    @property
    def temperature(self) -> Tensor:
        """Temperature τ of the listwise form (squared descriptor units)."""
        return self.log_temperature.exp()

    def logits(self, dist2: Tensor) -> Tensor:
        """Logits from squared distances, any shape: ``a − b·d²`` (pair) or ``−d²/τ`` (listwise)."""
        if self.form == "pair":
            return self.a - self.b * dist2
        return -dist2 / self.temperature

    def forward(
        self,
        query: Tensor,
        candidates: Tensor,
        soft_labels: Tensor,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Loss for a batch of queries.

        Args:
            query: (B, D) query descriptors.
            candidates: (B, C, D) candidate descriptors per query.
            soft_labels: (B, C) labels s in [0, 1], e.g. ``geo_soft_labels`` of the distances
                in metres. Listwise: each query needs positive label mass over valid candidates.
            mask: optional (B, C) bool, False marks padding candidates.

        Returns:
            Scalar (nats), or with ``reduction="none"`` (B, C) per-pair losses (pair form, 0 at
            padding) or (B,) per-query losses (listwise form).
        """
        dist2 = squared_distances(query, candidates)
        if soft_labels.shape != dist2.shape:
            raise ValueError(
                f"soft_labels must have shape {tuple(dist2.shape)}, got {tuple(soft_labels.shape)}"
            )
        mask = check_mask(mask, dist2.shape, "mask")
        if ((soft_labels < 0) | (soft_labels > 1)).any():
            raise ValueError("soft_labels must lie in [0, 1]")
        logits = self.logits(dist2)
        if self.form == "pair":
            loss = F.binary_cross_entropy_with_logits(logits, soft_labels, reduction="none")
            return reduce_loss(loss, self.reduction, mask)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
            soft_labels = soft_labels.masked_fill(~mask, 0.0)
        mass = soft_labels.sum(dim=1, keepdim=True)
        if (mass <= 0).any():
            raise ValueError(
                "listwise form: every query needs a candidate with a positive soft label"
            )
        return reduce_loss(soft_cross_entropy(logits, soft_labels / mass), self.reduction)

    def extra_repr(self) -> str:
        return f"form={self.form!r}, reduction={self.reduction!r}"
