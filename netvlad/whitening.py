"""PCA-whitening as a layer: (N, D_in) descriptors → (N, D_out) whitened, unit-norm descriptors."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class PCAWhitening(nn.Module):
    """y = normalize(W (x − μ)), W = Λ^(−½) Uᵀ of the top `out_dim` principal directions.

    Stored as a linear layer (weight = W, bias = −Wμ) so it trains and exports like any layer.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        if out_dim > in_dim:
            raise ValueError(f"whitening cannot raise the dimension ({in_dim} → {out_dim})")
        self.linear = nn.Linear(in_dim, out_dim)

    @property
    def out_dim(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x), p=2, dim=-1)

    @torch.no_grad()
    def fit(self, descriptors: np.ndarray | torch.Tensor, eps: float = 1e-9) -> np.ndarray:
        """Learn from (N, D_in) descriptors by SVD in float64; returns the kept variances (D_out,).

        Needs N > D_out (there are at most N − 1 non-trivial components).
        """
        x = torch.as_tensor(descriptors).detach().to("cpu", torch.float64)
        n, d = x.shape
        if d != self.linear.in_features:
            raise ValueError(f"descriptors have dim {d}, whitening expects {self.linear.in_features}")
        if n <= self.out_dim:
            raise ValueError(f"PCA to {self.out_dim} dims needs more than {self.out_dim} descriptors, got {n}")
        mean = x.mean(dim=0)
        _, s, vt = torch.linalg.svd(x - mean, full_matrices=False)
        variances = s[: self.out_dim] ** 2 / (n - 1)
        weight = vt[: self.out_dim] / torch.sqrt(variances + eps)[:, None]
        self.linear.weight.copy_(weight.to(self.linear.weight))
        self.linear.bias.copy_((-weight @ mean).to(self.linear.bias))
        return variances.numpy()
