"""Exporting a model for other runtimes: ONNX (checked with onnxruntime) and TorchScript.

The exported graph computes what `NetVLADModel.forward` computes: a normalised image tensor
(N, 3, H, W) float32 → unit-norm descriptors (N, dim), with the batch size and the image size
dynamic. Decoding, resizing (long side `max_side`) and normalising (`input_mode`: ImageNet
mean/std for "rgb", per-image standardised luminance for "grey") stay with the caller: the model
config is stored in the file (ONNX metadata `netvlad_config`, TorchScript extra file
`netvlad_config.json`) so that a consumer can reproduce them.

Every export is checked before it is reported: the file is loaded back (onnxruntime,
`torch.jit.load`) and its descriptors compared with the model's on two image sizes
(cosine ≥ `MIN_COSINE`); a file that fails the check is removed.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from netvlad.errors import NetVLADError
from netvlad.model import NetVLADModel
from netvlad.storage import atomic_path

FORMATS = ("onnx", "torchscript")
MIN_COSINE = 0.9999
#: (H, W) of the example images used to trace and check, both dynamic in the exported graph.
CHECK_SIZES = ((240, 320), (320, 208))
CONFIG_KEY = "netvlad_config"


@dataclass
class ExportReport:
    """What `export_model` wrote: the file, its format, size in bytes and the worst cosine
    similarity between its descriptors and the model's over the checked inputs."""

    path: Path
    format: str
    bytes: int
    min_cosine: float


def export_model(model: NetVLADModel, out: str | os.PathLike, format: str = "onnx") -> ExportReport:
    """Export `model` (moved to the CPU) to `out` in `format` (one of FORMATS), then check it."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {format!r}")
    model = model.cpu().eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    examples = [torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(i)) for i, (h, w) in enumerate(CHECK_SIZES)]
    config = json.dumps(model.config.to_dict())
    with atomic_path(out) as tmp:
        run = _export_onnx(model, tmp, examples[0], config) if format == "onnx" else _export_torchscript(model, tmp, examples[0], config)
        cosine = min(_min_cosine(run(x), model(x).detach().numpy()) for x in examples)
        if cosine < MIN_COSINE:
            raise NetVLADError(f"the exported {format} model does not reproduce the model's descriptors "
                               f"(cosine {cosine:.6f} < {MIN_COSINE}); nothing written")
    return ExportReport(out, format, out.stat().st_size, cosine)


def _export_onnx(model: NetVLADModel, path: Path, example: torch.Tensor, config: str):
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise NetVLADError(f"ONNX export needs onnx, onnxscript and onnxruntime ({exc.name} is missing): "
                           "pip install 'netvlad[export]'") from None
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height", min=32, max=8192),
            3: torch.export.Dim("width", min=32, max=8192)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=(dims,), verbose=False,
                                    input_names=["images"], output_names=["descriptors"])
    graph = program.model_proto  # weights inline: one self-contained file
    onnx.helper.set_model_props(graph, {CONFIG_KEY: config})
    onnx.save(graph, path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"images": x.numpy()})[0]


def _export_torchscript(model: NetVLADModel, path: Path, example: torch.Tensor, config: str):
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracing and torch.jit's deprecation notices
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, path, _extra_files={f"{CONFIG_KEY}.json": config})
        loaded = torch.jit.load(path)
    return lambda x: loaded(x).detach().numpy()


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest cosine similarity between matching rows of two (N, dim) arrays."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.min(np.sum(a * b, axis=1) / np.maximum(norms, 1e-12)))
