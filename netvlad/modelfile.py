"""Model files (docs/design.md §6.1): one `torch.save` dict with format name, version, config and state dict.

    {"format": "netvlad-model", "version": 1, "config": {...ModelConfig...}, "state_dict": {...}}

`load_model` checks each part and explains any mismatch; `load_model("default")` loads the small
place model shipped inside the package (`netvlad/weights/default.pt`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from netvlad.devices import resolve_device
from netvlad.errors import ModelFileError
from netvlad.model import ModelConfig, NetVLADModel
from netvlad.storage import atomic_path
from netvlad.torchfiles import load_weights_only

FORMAT = "netvlad-model"
VERSION = 1
WEIGHTS_DIR = Path(__file__).parent / "weights"
BUILTIN_MODELS = {"default": WEIGHTS_DIR / "default.pt"}


def save_model(model: NetVLADModel, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write `model` to `path` atomically (temp file + rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A built-in model name (`default`) or a file path → an existing file path."""
    key = str(name_or_path)
    if key in BUILTIN_MODELS:
        path = BUILTIN_MODELS[key]
        if not path.is_file():
            raise ModelFileError(
                f"the built-in model '{key}' is not in this install ({path}); "
                "train one with `netvlad train` or pass --model FILE"
            )
        return path
    path = Path(name_or_path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    return path


def read_model_file(path: Path) -> dict:
    """Load and validate the dict stored in a model file."""
    payload = load_weights_only(path, "model file")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        hint = " (a published checkpoint? use `netvlad import-checkpoint`)" if isinstance(payload, dict) else ""
        raise ModelFileError(f"{path}: not a netvlad model file{hint}")
    version = payload.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise ModelFileError(f"{path}: model file version {version} is newer than this netvlad reads ({VERSION})")
    for key in ("config", "state_dict"):
        if not isinstance(payload.get(key), dict):
            raise ModelFileError(f"{path}: model file has no '{key}'")
    return payload


def load_model(name_or_path: str | os.PathLike | NetVLADModel = "default",
               device: str | torch.device | None = "cpu") -> NetVLADModel:
    """Rebuild the model described by a model file (or built-in name) and load its weights; eval mode,
    on `device` ("auto" or None: CUDA when available; see `netvlad.devices`). A model object is
    moved there as it is."""
    if isinstance(name_or_path, NetVLADModel):
        return name_or_path.to(resolve_device(device)).eval()
    path = resolve_model_path(name_or_path)
    payload = read_model_file(path)
    try:
        config = ModelConfig.from_dict(payload["config"])
        model = NetVLADModel(config)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: bad model config: {exc}") from None
    state = payload["state_dict"]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs config {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        details = []
        if missing:
            details.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            details.append("shape mismatch " + "; ".join(sorted(shapes)[:3]))
        raise ModelFileError(f"{path}: weights do not match the config ({config.backbone}, K={config.clusters}): "
                             + "; ".join(details))
    model.load_state_dict(state)
    return model.to(resolve_device(device)).eval()


def model_fingerprint(model: NetVLADModel) -> str:
    """sha256 (hex) of the model's config and weights: identifies the model that built an index."""
    digest = hashlib.sha256()
    config = dict(model.config.to_dict())
    config.pop("meta", None)
    digest.update(repr(sorted(config.items())).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
