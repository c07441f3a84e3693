"""A training run's state: the file `run-state.pt` in the run folder, rewritten after every epoch.

It holds everything that evolves during a run, so `Trainer.resume` continues exactly where the run
stopped (same weights as an uninterrupted run): one `torch.save` dict, loadable with
`weights_only=True`:

    {"format": "netvlad-run-state", "version": 1, "epoch", "step", "best": {"epoch", "recall@1"},
     "train_config": {...TrainConfig...}, "dataset": sha256 of the training set,
     "model": {"config", "state_dict"}, "objective", "optimizer", "scheduler", "scaler" (float16 AMP's
     GradScaler; {} when off), "miner", "record", "rng": {"torch", "cuda", "numpy", "python"}}

Tensors are stored on the CPU; the numpy RNG keys as an int64 tensor.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from netvlad.datasets.placeset import PlaceDataset
from netvlad.errors import DatasetError, ModelFileError
from netvlad.storage import atomic_path
from netvlad.torchfiles import load_weights_only

if TYPE_CHECKING:  # the trainer imports this module
    from training.loop import Trainer

RUN_STATE = "run-state.pt"
FORMAT = "netvlad-run-state"
VERSION = 1


def dataset_fingerprint(dataset: PlaceDataset) -> str:
    """sha256 of a dataset's image lists, positions and place ids (resume refuses another dataset)."""
    digest = hashlib.sha256()
    for part in (dataset.db_images, dataset.q_images):
        digest.update("\n".join(part).encode())
    for array in (dataset.db_utm, dataset.q_utm, dataset.db_place_ids, dataset.q_place_ids):
        digest.update(b"-" if array is None else np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu() for k, v in state.items()}


def _rng_state() -> dict:
    """The global torch, CUDA, numpy and Python RNG states."""
    name, keys, *rest = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), *rest),
        "python": random.getstate(),
    }


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(rng["python"])


def save_run_state(trainer: Trainer) -> Path:
    """Write `trainer.out/run-state.pt` atomically (temp file + rename); returns its path."""
    payload = {
        "format": FORMAT, "version": VERSION,
        "epoch": trainer.epoch, "step": trainer.step, "best": dict(trainer.best),
        "train_config": asdict(trainer.config),
        "dataset": dataset_fingerprint(trainer.train_set),
        "model": {"config": trainer.model.config.to_dict(), "state_dict": _cpu(trainer.model.state_dict())},
        "objective": _cpu(trainer.objective.state_dict()),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "miner": trainer.miner.state_dict(),
        "record": trainer.record.state_dict(),
        "rng": _rng_state(),
    }
    path = trainer.out / RUN_STATE
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def read_run_state(folder: str | os.PathLike) -> dict:
    """Load and check `folder/run-state.pt` (ModelFileError when missing or not one)."""
    path = Path(folder) / RUN_STATE
    if not path.is_file():
        raise ModelFileError(f"{path}: no run state to resume from")
    payload = load_weights_only(path, "run state")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a netvlad training run state")
    if payload.get("version") != VERSION:
        raise ModelFileError(f"{path}: run state version {payload.get('version')} is not {VERSION}")
    return payload


def check_dataset(payload: dict, folder: str | os.PathLike, train_set: PlaceDataset) -> None:
    """Refuse to resume a run on another training set than the one it started on."""
    if payload["dataset"] != dataset_fingerprint(train_set):
        raise DatasetError(f"{Path(folder) / RUN_STATE}: was trained on another dataset than {train_set.root}")


def restore_run_state(trainer: Trainer, payload: dict) -> None:
    """Load a run state's evolving parts (objective, optimiser, scheduler, scaler, miner, record,
    counters, RNGs) into a trainer built from its config and model."""
    trainer.objective.load_state_dict(payload["objective"])
    trainer.optimizer.load_state_dict(payload["optimizer"])
    trainer.scheduler.load_state_dict(payload["scheduler"])
    if payload.get("scaler"):
        trainer.scaler.load_state_dict(payload["scaler"])
    trainer.miner.load_state_dict(payload["miner"])
    trainer.record.load_state_dict(payload["record"])
    trainer.epoch, trainer.step, trainer.best = payload["epoch"], payload["step"], dict(payload["best"])
    _set_rng_state(payload["rng"])
