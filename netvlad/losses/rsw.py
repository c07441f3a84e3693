"""Realigned Softmax Warping proxy loss (De Moor & Prevost), as the authors publish it: their
`WarpLoss` with its `margin` ("increased delta") and proxies drawn with
``kaiming_normal_(mode="fan_out")``; `RSW_PRESETS` holds their published image-retrieval
configurations beside this project's default."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from netvlad.losses.reduction import Reduction, check_reduction


#: Warp settings by name: this project's default (the authors' code defaults, margin 1) and the
#: authors' published image-retrieval configurations (CUB-200-2011 and Stanford Online Products).
RSW_PRESETS = {
    "default": {"alpha": 8.0, "k1": 0.25, "k2": 2.0, "temperature": 1.0, "margin": 1.0},
    "cub": {"alpha": 28.40, "k1": 0.93, "k2": 1.15, "temperature": 4.525, "margin": 1.30},
    "sop": {"alpha": 13.025, "k1": 0.8563, "k2": 1.1181, "temperature": 3.7442, "margin": 1.348},
}


class RealignedSoftmaxWarpingLoss(nn.Module):
    """Proxy softmax cross entropy on warped Euclidean distances.

    One learnable proxy p_j per class (``kaiming_normal_(mode="fan_out")``, as the authors);
    embeddings are not normalised; ``d_j = ‖e − p_j‖`` and the loss is cross entropy on logits
    ``−T·W_j`` where ``W_j = d_j`` for the other classes and, for the true class y,

    * ``d_y ≤ α``: ``W_y = k1·d_y + m·sg((1 − k1)·d_y)`` (gradient k1·∇d_y: weaker pull; value
      d_y when the margin m = 1, ``(k1 + m(1 − k1))·d_y`` above it: the authors' "increased delta"),
    * ``d_y > α``: ``W_y = α + k2·(d_y − α)`` (steeper pull back inside the radius).

    With k1 = k2 = m = 1 this is plain softmax cross entropy on ``−T·d``. Build one of the
    published configurations with `RealignedSoftmaxWarpingLoss.from_preset`.

    Args:
        num_classes: number of classes (places), C.
        embedding_dim: embedding size, E.
        alpha: warp radius α, in embedding units.
        k1: gradient scale inside the radius (k1 < 1 weakens the pull).
        k2: slope outside the radius (k2 > 1 steepens it).
        temperature: T, logits scale per embedding unit.
        margin: m, scale of the stop-gradient part inside the radius (1: the value is d_y).
        reduction: "mean" (over samples), "sum" or "none" ((N,) per-sample losses).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        alpha: float = 8.0,
        k1: float = 0.25,
        k2: float = 2.0,
        temperature: float = 1.0,
        margin: float = 1.0,
        reduction: Reduction = "mean",
    ):
        super().__init__()
        if num_classes < 1 or embedding_dim < 1:
            raise ValueError(
                f"num_classes and embedding_dim must be >= 1, got {num_classes}, {embedding_dim}"
            )
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")
        self.reduction = check_reduction(reduction)
        self.set_warp(alpha=alpha, k1=k1, k2=k2, temperature=temperature, margin=margin)

    @classmethod
    def from_preset(cls, name: str, num_classes: int, embedding_dim: int,
                    reduction: Reduction = "mean") -> "RealignedSoftmaxWarpingLoss":
        """The loss with the warp settings `RSW_PRESETS[name]` ("default", "cub", "sop")."""
        if name not in RSW_PRESETS:
            raise ValueError(f"unknown RSW preset {name!r}: one of {', '.join(RSW_PRESETS)}")
        return cls(num_classes, embedding_dim, **RSW_PRESETS[name], reduction=reduction)

    def set_warp(
        self,
        *,
        alpha: float | None = None,
        k1: float | None = None,
        k2: float | None = None,
        temperature: float | None = None,
        margin: float | None = None,
    ) -> None:
        """Change the warp (e.g. for a second training phase); arguments left None are kept."""
        values = {"alpha": alpha, "k1": k1, "k2": k2, "temperature": temperature, "margin": margin}
        for name, value in values.items():
            if value is None:
                continue
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
            setattr(self, name, float(value))

    def distances(self, embeddings: Tensor) -> Tensor:
        """(N, E) embeddings → (N, C) Euclidean distances to every proxy (embedding units)."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.proxies.shape[1]:
            raise ValueError(
                f"embeddings must have shape (N, {self.proxies.shape[1]}), got "
                f"{tuple(embeddings.shape)}"
            )
        return torch.cdist(embeddings, self.proxies.to(embeddings.dtype))

    def warped_distances(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """(N, C) warped distances W for (N, E) embeddings and (N,) integer class labels."""
        if labels.shape != embeddings.shape[:1] or labels.dtype.is_floating_point:
            raise ValueError(
                f"labels must be (N,) integers matching embeddings {tuple(embeddings.shape)}"
            )
        num_classes = self.proxies.shape[0]
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes})")
        dist = self.distances(embeddings)
        index = labels.long().unsqueeze(1)
        d_true = dist.gather(1, index)
        inside = self.k1 * d_true + self.margin * ((1.0 - self.k1) * d_true).detach()
        outside = self.alpha + self.k2 * (d_true - self.alpha)
        w_true = torch.where(d_true.detach() <= self.alpha, inside, outside)
        return dist.scatter(1, index, w_true)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Loss for (N, E) embeddings with (N,) class labels; scalar (nats) or (N,) per sample."""
        logits = -self.temperature * self.warped_distances(embeddings, labels)
        return F.cross_entropy(logits, labels.long(), reduction=self.reduction)

    def param_groups(
        self, model_parameters: Iterable[nn.Parameter], lr: float, proxy_lr_mult: float = 100.0
    ) -> list[dict]:
        """Optimizer parameter groups: the model's parameters at ``lr``, the proxies at
        ``lr * proxy_lr_mult`` (proxies move little per step and usually need a larger rate).

        Example: ``torch.optim.Adam(loss.param_groups(model.parameters(), lr=1e-5))``.
        """
        return [
            {"params": list(model_parameters), "lr": lr},
            {"params": [self.proxies], "lr": lr * proxy_lr_mult},
        ]

    def extra_repr(self) -> str:
        num_classes, dim = self.proxies.shape
        return (
            f"num_classes={num_classes}, embedding_dim={dim}, alpha={self.alpha}, k1={self.k1}, "
            f"k2={self.k2}, temperature={self.temperature}, margin={self.margin}, reduction={self.reduction!r}"
        )
