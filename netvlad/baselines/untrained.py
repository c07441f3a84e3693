"""The untrained-NetVLAD baseline: what an architecture scores before any training."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from netvlad.imageio import ImageSource
from netvlad.initialization import init_model
from netvlad.model import ModelConfig, NetVLADModel, build_model


def untrained_netvlad(
    config: ModelConfig,
    images: Sequence[ImageSource],
    per_image: int = 200,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> NetVLADModel:
    """A model with `config`'s backbone, K, ghost clusters, input mode and input size, random
    backbone weights (seeded), BatchNorm recalibrated and NetVLAD k-means-initialised on
    `images` (docs/design.md §5) — no training, no ImageNet weights, no whitening."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(
            config.backbone,
            config.clusters,
            ghost_clusters=config.ghost_clusters,
            input_mode=config.input_mode,
            max_side=config.max_side,
            image_size=config.image_size,
            pretrained=False,
        )
    model.to(device)
    init_model(model, images, per_image=per_image, recalibrate=True, seed=seed, progress=progress)
    return model.eval()
