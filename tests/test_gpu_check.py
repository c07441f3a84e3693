"""benchmarks/gpu_check.sh in its quick CPU form (CUDA parts skipped with a message), so the GPU
check cannot rot unseen on machines without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_end_to_end_in_quick_form(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "TRAIN_S": "100"}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--quick"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["meta"]["quick"] and results["tests"]["status"] == "passed"
    assert results["extraction"]["ratio"] > 0 and results["training"]["epochs"] >= 1
    assert results["training"]["images_per_s"] > 0
    table = (tmp_path / "results.md").read_text()
    assert "| training images/s |" in table
    if not torch.cuda.is_available():
        assert "skipping the CUDA parts" in done.stderr
        assert all(results[part] == {"skipped": "no CUDA device"} for part in ("layer", "faiss", "amp"))
