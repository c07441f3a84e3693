"""`NetVLADModel`: backbone → per-location L2 → NetVLAD → optional PCA-whitening → descriptor."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from netvlad.backbones import BACKBONES, build_backbone
from netvlad.batching import Source, describe_tensors, evaluating, load_tensors
from netvlad.configs import config_from_dict
from netvlad.pooling import NetVLAD
from netvlad.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from netvlad.whitening import PCAWhitening


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model before loading its weights (stored in model files)."""

    backbone: str = "resnet18-layer3"
    clusters: int = 64
    ghost_clusters: int = 0
    whitening_dim: int | None = None
    input_mode: str = "rgb"
    max_side: int = 640
    image_size: tuple[int, int] | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """The config stored by `to_dict` (lists back to tuples); unknown keys raise `ConfigError`."""
        config = config_from_dict(cls, data, "model config")
        for key in ("image_size", "mean", "std"):
            if getattr(config, key) is not None:
                setattr(config, key, tuple(getattr(config, key)))
        return config

    def to_dict(self) -> dict:
        return asdict(self)


class L2Norm(nn.Module):
    """L2-normalise along `dim` (channels of a feature map by default)."""

    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, p=2, dim=self.dim)


class NetVLADModel(nn.Module):
    """Images (N, 3, H, W) → descriptors (N, dim), unit L2 norm.

    `dim` is K·D without whitening, else `config.whitening_dim`. `describe()` takes photos (paths,
    bytes or PIL images) and handles decoding, resizing and batching.
    """

    def __init__(self, config: ModelConfig, backbone: nn.Module | None = None):
        super().__init__()
        if config.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {config.backbone!r}; choose one of: {', '.join(BACKBONES)}")
        self.config = config
        self.backbone = backbone if backbone is not None else build_backbone(config.backbone)[0]
        self.local_norm = L2Norm(dim=1)
        self.pool = NetVLAD(config.clusters, BACKBONES[config.backbone].dim, config.ghost_clusters)
        self.whitening = (
            PCAWhitening(self.pool.output_dim, config.whitening_dim) if config.whitening_dim else None
        )
        self.preprocess = Preprocess(config.input_mode, config.max_side, config.image_size, config.mean, config.std)

    @property
    def dim(self) -> int:
        return self.whitening.out_dim if self.whitening is not None else self.pool.output_dim

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def local_features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) → (N, D, h, w) local features, unit norm at each location."""
        return self.local_norm(self.backbone(images))

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) → (N, K·D) NetVLAD descriptors before whitening. The backbone may run under
        autocast; normalisation and pooling always run in float32 (soft assignment and residual
        sums over thousands of locations lose too much in bfloat16)."""
        features = self.backbone(images)
        with torch.autocast(features.device.type, enabled=False):
            return self.pool(self.local_norm(features.float()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        descriptors = self.pooled(images)
        if self.whitening is None:
            return descriptors
        with torch.autocast(descriptors.device.type, enabled=False):
            return self.whitening(descriptors)

    def add_whitening(self, descriptors: np.ndarray | torch.Tensor, out_dim: int) -> np.ndarray:
        """Learn PCA-whitening to `out_dim` from (N, K·D) pooled descriptors and attach it."""
        whitening = PCAWhitening(self.pool.output_dim, out_dim)
        variances = whitening.fit(descriptors)
        self.whitening = whitening.to(self.device)
        self.config.whitening_dim = out_dim
        return variances

    def describe(
        self,
        images: Sequence[Source] | torch.Tensor,
        batch_size: int = 16,
        progress: bool = False,
        amp: bool | None = None,
    ) -> np.ndarray:
        """Descriptors (N, dim) float32, unit norm, of photos (paths, bytes or PIL images), of a
        preprocessed (N, 3, H, W) tensor or of preprocessed (3, H, W) tensors; raises `ImageError`.

        Photos of different sizes are grouped by shape into batches of `batch_size`; the order of
        the output rows matches the input. `amp` (default: on CUDA) runs the network in bfloat16
        autocast.
        """
        tensors = load_tensors(list(images), self.preprocess, progress)
        with evaluating(self), torch.no_grad():
            return describe_tensors(self, tensors, amp, batch_size=batch_size, progress=progress).cpu().numpy()


def build_model(
    backbone: str = "resnet18-layer3",
    clusters: int = 64,
    *,
    ghost_clusters: int = 0,
    whitening_dim: int | None = None,
    input_mode: str = "rgb",
    max_side: int = 640,
    image_size: tuple[int, int] | None = None,
    pretrained: bool = False,
    weights_file: str | os.PathLike | None = None,
) -> NetVLADModel:
    """A new NetVLADModel; the NetVLAD layer still needs `init_model` (k-means) before use.

    Backbone weights: `weights_file` (torchvision state dict), else ImageNet when `pretrained`
    and loadable (a warning otherwise), else random.
    """
    config = ModelConfig(
        backbone=backbone, clusters=clusters, ghost_clusters=ghost_clusters, whitening_dim=whitening_dim,
        input_mode=input_mode, max_side=max_side, image_size=image_size,
    )
    backbone_net, loaded = build_backbone(backbone, pretrained=pretrained, weights_file=weights_file)
    config.meta["pretrained"] = loaded
    return NetVLADModel(config, backbone_net)
