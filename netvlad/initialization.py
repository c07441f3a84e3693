"""Initialising a model from real photos: BatchNorm recalibration, k-means centres and α,
optional PCA-whitening (docs/design.md §2, §5)."""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from netvlad.errors import ImageError
from netvlad.imageio import ImageSource
from netvlad.model import NetVLADModel
from netvlad.vectorindex import faiss_has_gpu

log = logging.getLogger(__name__)


def _tensors(model: NetVLADModel, images: Sequence[ImageSource], progress: bool, desc: str):
    """Yield preprocessed (1, 3, H, W) tensors, reporting and skipping photos that fail to decode."""
    for image in tqdm(images, desc=desc, unit="img", disable=not progress):
        try:
            yield model.preprocess.load(image).unsqueeze(0).to(model.device)
        except ImageError as exc:
            log.warning("skipped: %s", exc)


@torch.no_grad()
def recalibrate_batchnorm(model: NetVLADModel, images: Sequence[ImageSource], progress: bool = False) -> int:
    """Re-estimate BatchNorm running statistics of the backbone on `images` (cumulative mean).

    A randomly initialised backbone's BN statistics (0/1) do not match real activations; this makes
    its features usable before any training. Returns the number of images used.
    """
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    was_training = model.training
    model.eval()
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average over all batches
        bn.train()
    used = 0
    for batch in _tensors(model, images, progress, "recalibrate BN"):
        model.backbone(batch)
        used += 1
    for bn in norms:
        bn.momentum = 0.1
    model.train(was_training)
    return used


@torch.no_grad()
def sample_local_features(
    model: NetVLADModel, images: Sequence[ImageSource], per_image: int = 200, seed: int = 0, progress: bool = False
) -> np.ndarray:
    """(M, D) float32 local features: up to `per_image` random locations from each photo."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for batch in _tensors(model, images, progress, "sample features"):
        features = model.local_features(batch)[0].flatten(1).T.float().cpu()  # (h·w, D)
        take = torch.randperm(features.shape[0], generator=generator)[:per_image]
        samples.append(features[take])
    if not samples:
        raise ValueError("no decodable images to sample local features from")
    return torch.cat(samples).numpy()


def kmeans_init(model: NetVLADModel, features: np.ndarray, seed: int) -> float:
    """NetVLAD centres and α by k-means on local features (M, D): on the GPUs when faiss has them,
    on the CPU (with a log line) when faiss-gpu is missing or fails. Returns α."""
    if faiss_has_gpu():
        try:
            return model.pool.init_from_features(features, seed=seed, gpu=True)
        except RuntimeError as exc:
            log.warning("faiss GPU k-means failed, clustering on the CPU: %s", exc)
    elif model.device.type == "cuda":
        log.info("faiss has no GPU (install the `gpu` extra for faiss-gpu): k-means on the CPU")
    return model.pool.init_from_features(features, seed=seed)


def init_model(
    model: NetVLADModel,
    images: Sequence[ImageSource],
    per_image: int = 200,
    recalibrate: bool | None = None,
    whitening_dim: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Make `model` usable: BN recalibration (default: when not pretrained), k-means centres and α
    for NetVLAD, and PCA-whitening to `whitening_dim` learned on the same photos. Returns a summary."""
    if recalibrate is None:
        recalibrate = not model.config.meta.get("pretrained", False)
    summary: dict = {"images": len(images)}
    if recalibrate:
        summary["bn_images"] = recalibrate_batchnorm(model, images, progress)
    features = sample_local_features(model, images, per_image, seed, progress)
    summary["features"] = int(features.shape[0])
    summary["alpha"] = kmeans_init(model, features, seed)
    if whitening_dim:
        model.whitening = None
        descriptors = model.describe(images, progress=progress)
        model.add_whitening(descriptors, whitening_dim)
        summary["whitening_dim"] = whitening_dim
    model.config.meta["init"] = summary
    return summary
