"""The NetVLAD pooling layer (docs/design.md §2), with optional GhostVLAD clusters.

Soft assignment of each local feature x_i to cluster k is ``softmax_k(w_kᵀx_i + b_k)`` computed by a
1×1 convolution; with ``w_k = 2αc_k`` and ``b_k = −α‖c_k‖²`` it equals ``exp(−α‖x_i − c_k‖²)``
normalised over k. Aggregation ``V_k = Σ_i a_k(x_i) x_i − (Σ_i a_k(x_i)) c_k`` is two batched matrix
products, never an N×K×D×HW residual tensor, never a loop over clusters.
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: α is chosen so the nearest centre gets ~100× the weight of the second nearest on average.
ASSIGNMENT_RATIO = 100.0


class NetVLAD(nn.Module):
    """NetVLAD pooling: (N, D, H, W) local features → (N, K·D) unit-norm descriptors.

    Args:
        num_clusters: K, the clusters kept in the output.
        dim: D, channels of the local features.
        ghost_clusters: G extra clusters that take part in the soft assignment (absorbing
            uninformative features) but are dropped from the output (GhostVLAD). 0 = plain NetVLAD.
        alpha: sharpness of the initial assignment, used by `set_centroids`.
    """

    def __init__(self, num_clusters: int = 64, dim: int = 512, ghost_clusters: int = 0, alpha: float = 100.0):
        super().__init__()
        if num_clusters < 1 or dim < 1 or ghost_clusters < 0:
            raise ValueError("num_clusters and dim must be positive, ghost_clusters non-negative")
        self.num_clusters = num_clusters
        self.ghost_clusters = ghost_clusters
        self.dim = dim
        self.alpha = alpha
        self.conv = nn.Conv2d(dim, num_clusters + ghost_clusters, kernel_size=1, bias=True)
        self.centroids = nn.Parameter(torch.rand(num_clusters, dim))

    @property
    def output_dim(self) -> int:
        return self.num_clusters * self.dim

    def soft_assignment(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D, H, W) → (N, K, H·W) assignment weights of the kept clusters (ghosts dropped)."""
        logits = self.conv(x).flatten(2)
        return logits.softmax(dim=1)[:, : self.num_clusters]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D, H, W) local features (L2-normalised per location) → (N, K·D) unit-norm."""
        assignment = self.soft_assignment(x)  # (N, K, HW)
        features = x.flatten(2).transpose(1, 2)  # (N, HW, D)
        vlad = torch.bmm(assignment, features)  # Σ_i a_k(x_i) x_i            (N, K, D)
        vlad = vlad - assignment.sum(dim=2, keepdim=True) * self.centroids  # − (Σ_i a_k) c_k
        vlad = F.normalize(vlad, p=2, dim=2)  # intra-normalisation
        return F.normalize(vlad.flatten(1), p=2, dim=1)

    @torch.no_grad()
    def set_centroids(self, centroids: torch.Tensor, alpha: float, ghost_centroids: torch.Tensor | None = None) -> None:
        """Set c_k = centroids (K, D), w_k = 2αc_k, b_k = −α‖c_k‖² (ghosts likewise from (G, D))."""
        assign = centroids if ghost_centroids is None else torch.cat([centroids, ghost_centroids])
        if assign.shape != (self.num_clusters + self.ghost_clusters, self.dim):
            raise ValueError(
                f"expected {self.num_clusters}+{self.ghost_clusters} centroids of dim {self.dim}, "
                f"got {tuple(centroids.shape)}" + ("" if ghost_centroids is None else f" + {tuple(ghost_centroids.shape)}")
            )
        assign = assign.to(self.conv.weight)
        self.alpha = float(alpha)
        self.centroids.copy_(centroids.to(self.centroids))
        self.conv.weight.copy_((2.0 * alpha * assign)[:, :, None, None])
        self.conv.bias.copy_(-alpha * assign.pow(2).sum(dim=1))

    @torch.no_grad()
    def init_from_features(
        self, features: np.ndarray | torch.Tensor, niter: int = 25, nredo: int = 1, seed: int = 1234,
        gpu: bool = False,
    ) -> float:
        """k-means (faiss; on the GPUs with `gpu`) on sampled local features (M, D), then α from the
        two nearest centres.

        α = −log(1/ASSIGNMENT_RATIO) / mean(d²_2nd − d²_1st), squared distances of each feature to
        its nearest and second-nearest centre. `nredo` k-means restarts keep the best. Returns α.
        """
        data = np.ascontiguousarray(torch.as_tensor(features).detach().cpu().numpy(), dtype=np.float32)
        total = self.num_clusters + self.ghost_clusters
        if data.ndim != 2 or data.shape[1] != self.dim:
            raise ValueError(f"features must be (M, {self.dim}), got {data.shape}")
        if data.shape[0] < total:
            raise ValueError(f"k-means needs at least {total} features, got {data.shape[0]}")
        kmeans = faiss.Kmeans(self.dim, total, niter=niter, nredo=nredo, seed=seed, verbose=False,
                              max_points_per_centroid=100_000, gpu=gpu)
        kmeans.train(data)
        squared, _ = kmeans.index.search(data, 2)  # (M, 2) squared L2, ascending
        gap = float(np.mean(squared[:, 1] - squared[:, 0]))
        alpha = -math.log(1.0 / ASSIGNMENT_RATIO) / max(gap, 1e-12)
        centres = torch.from_numpy(kmeans.centroids)
        # Ghosts: the centres owning the fewest features take the "noise" role.
        counts = np.bincount(kmeans.index.search(data, 1)[1][:, 0], minlength=total)
        order = torch.from_numpy(np.argsort(-counts, kind="stable"))
        kept, ghosts = centres[order[: self.num_clusters]], centres[order[self.num_clusters :]]
        self.set_centroids(kept, alpha, ghosts if self.ghost_clusters else None)
        return alpha
