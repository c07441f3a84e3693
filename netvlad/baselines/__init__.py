"""Baselines the trained model is measured against (docs/design.md §7): RootSIFT-VLAD and an untrained
NetVLAD of the same architecture, both fitted on the evaluated dataset's database photos."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from netvlad.baselines.untrained import untrained_netvlad
from netvlad.baselines.vlad import RootSIFTVLAD, assign, rootsift, vlad
from netvlad.evaluation import Describer
from netvlad.imageio import ImageSource
from netvlad.model import ModelConfig

#: "rootsift-vlad": RootSIFT-VLAD, 64 words learned on the database photos; "untrained": the
#: evaluated architecture with random weights, BatchNorm and k-means initialised on them.
BASELINES = ("rootsift-vlad", "untrained")

__all__ = ["BASELINES", "RootSIFTVLAD", "assign", "fit_baseline", "rootsift", "untrained_netvlad", "vlad"]


def fit_baseline(
    name: str,
    database: Sequence[ImageSource],
    like: ModelConfig,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Describer:
    """Baseline `name` (a key of BASELINES) fitted on the `database` photos; `like` is the
    evaluated model's config (input size, and architecture for "untrained"); `device` runs the
    untrained network."""
    if name == "rootsift-vlad":
        max_side = max(like.image_size) if like.image_size else like.max_side
        return RootSIFTVLAD(max_side=max_side, seed=seed).fit(database, progress=progress)
    if name == "untrained":
        return untrained_netvlad(like, database, seed=seed, device=device, progress=progress)
    raise ValueError(f"unknown baseline {name!r}; choose from: {', '.join(BASELINES)}")
