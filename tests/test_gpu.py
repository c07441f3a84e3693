"""The CUDA paths (issue 13): AMP descriptors, a training epoch with AMP and channels_last, faiss
k-means and search on the GPU. Every test is marked `gpu` and skips without CUDA (or faiss-gpu);
benchmarks/gpu_check.sh runs them with `pytest -m gpu`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from netvlad.model import build_model
from netvlad.vectorindex import IndexSpec, VectorIndex, faiss_has_gpu

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_amp_descriptors_match_float32(real_photos):
    torch.manual_seed(0)
    model = build_model("resnet18-layer3", 8, max_side=320).to("cuda").eval()
    full = model.describe(real_photos[:8], amp=False)
    mixed = model.describe(real_photos[:8], amp=True)
    assert np.sum(full * mixed, axis=1).min() >= 0.999


def test_a_training_epoch_on_cuda_with_amp(real_photos, tmp_path):
    from tests.test_training import _photos, _placeset_with_model
    from training.config import TrainConfig
    from training.loop import Trainer
    from netvlad.modelfile import load_model

    dataset, model_file = _placeset_with_model(_photos(real_photos, 2), tmp_path, (64, 48), 10, 4)
    config = TrainConfig(epochs=1, batch_size=3, random_negatives=30, max_negatives=2)
    trainer = Trainer(load_model(model_file), dataset, tmp_path / "run", config, device="cuda", progress=False)
    record = trainer.fit()
    assert trainer.amp and trainer.model.device.type == "cuda" and record.rows[-1]["images"] > 0


@pytest.mark.skipif(not faiss_has_gpu(), reason="needs faiss-gpu")
def test_faiss_gpu_search_and_kmeans_match_the_cpu():
    rng = np.random.default_rng(0)
    data = rng.standard_normal((5000, 64)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    index = VectorIndex.create(64, IndexSpec("Flat", "ip"))
    index.add(np.arange(len(data)), data)
    _, ids = index.search(data[:100], 5)
    assert (ids[:, 0] == np.arange(100)).all()
    model = build_model("resnet18-layer3", 8, max_side=160)
    features = rng.standard_normal((2000, model.pool.dim)).astype(np.float32)
    assert model.pool.init_from_features(features, gpu=True) > 0
