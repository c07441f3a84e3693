"""Shared by the service tests: one small model and a small index of real photos per pytest run.

The model (ResNet18 to layer3, K=16, grey input, long side 256 px) is built once per run and
cached under pytest's base temp folder; each test module copies the index it starts from.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import netvlad
from netvlad.index import Index

#: Photos used to initialise the model and fill the test index.
INDEXED = 8


def coordinates(i: int) -> dict:
    """Made-up but distinct coordinates for indexed photo i (about 1 km apart)."""
    return {"lat": 47.0 + 0.01 * i, "lon": 8.0 + 0.01 * i}


def small_model(tmp_path_factory: pytest.TempPathFactory, photos: list[Path]) -> Path:
    """Path of the run's small model file, built on first use."""
    path = tmp_path_factory.getbasetemp() / "service-model" / "model.pt"
    if not path.exists():
        torch.manual_seed(0)  # the same model, hence the same rankings, on every run
        model = netvlad.build_model("resnet18-layer3", 16, input_mode="grey", max_side=256)
        netvlad.init_model(model, photos[:INDEXED], per_image=100)
        netvlad.save_model(model, path)
    return path


def small_index(tmp_path_factory: pytest.TempPathFactory, photos: list[Path], name: str) -> Path:
    """A fresh copy of the run's small index (the first INDEXED photos, with `coordinates`)."""
    master = tmp_path_factory.getbasetemp() / "service-index"
    if not master.exists():
        with Index.create(master, small_model(tmp_path_factory, photos), device="cpu") as index:
            index.set_root(photos[0].parent)  # a collection: its files may be served
            index.add(photos[:INDEXED], [coordinates(i) for i in range(INDEXED)])
            index.save()
    copy = tmp_path_factory.mktemp(name) / "index"
    shutil.copytree(master, copy, ignore=shutil.ignore_patterns(".lock"))
    return copy
