"""`netvlad export` as a new user runs it: the ONNX file in onnxruntime and the TorchScript file in
torch give the model's descriptors (cosine ≥ 0.9999) at batch sizes and image sizes other than
those it was exported with, and carry the model config."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime
import torch
from typer.testing import CliRunner

from netvlad.cli import app
from netvlad.export import CONFIG_KEY, export_model
from netvlad.modelfile import load_model


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def real_inputs(model, photos) -> list[torch.Tensor]:
    """Normalised tensors of real photos at two sizes the export never saw, batched by shape."""
    tensors = [model.preprocess.load(p) for p in photos]
    by_shape: dict = {}
    for t in tensors:
        by_shape.setdefault(tuple(t.shape), []).append(t)
    return [torch.stack(group) for group in by_shape.values()]


def test_onnx_export_runs_in_onnxruntime_with_the_model_descriptors(model_path, tmp_path, real_photos):
    out = tmp_path / "model.onnx"
    result = CliRunner().invoke(app, ["export", str(model_path), "--format", "onnx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "min cosine" in result.output and not list(tmp_path.glob(".*"))  # no temp files left
    model = load_model(model_path, device="cpu")
    graph = onnx.load(out)
    stored = json.loads({p.key: p.value for p in graph.metadata_props}[CONFIG_KEY])
    assert stored == json.loads(json.dumps(model.config.to_dict()))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    batches = real_inputs(model, real_photos[:6])
    assert len({tuple(b.shape[2:]) for b in batches}) >= 2
    for batch in batches:
        exported = session.run(None, {"images": batch.numpy()})[0]
        with torch.no_grad():
            expected = model(batch).numpy()
        assert exported.shape == expected.shape == (len(batch), model.dim)
        assert cosine(exported, expected).min() >= 0.9999


def test_torchscript_export_runs_in_torch_with_the_model_descriptors(model_path, tmp_path, real_photos):
    model = load_model(model_path, device="cpu")
    report = export_model(model, tmp_path / "model.pt", "torchscript")
    assert report.min_cosine >= 0.9999 and report.bytes > 1_000_000
    extra = {f"{CONFIG_KEY}.json": ""}
    loaded = torch.jit.load(report.path, _extra_files=extra)
    assert json.loads(extra[f"{CONFIG_KEY}.json"]) == json.loads(json.dumps(model.config.to_dict()))
    for batch in real_inputs(model, real_photos[6:10]):
        with torch.no_grad():
            assert cosine(loaded(batch).numpy(), model(batch).numpy()).min() >= 0.9999


def test_export_refuses_an_unknown_format(model_path, tmp_path):
    result = CliRunner().invoke(app, ["export", str(model_path), "--format", "tflite", "--out", str(tmp_path / "m")])
    assert result.exit_code != 0 and not (tmp_path / "m").exists()
