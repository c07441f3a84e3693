"""Data-parallel training (training.distributed) with 2 gloo processes on the CPU, launched by
`netvlad train --devices 2` as a user would: the same weights as one process with the same global
batch, and a killed rank ends the run with one line that `--resume` takes up (one test: each
launch costs seconds of imports)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from netvlad.modelfile import load_model
from tests.test_training import _photos, _placeset_with_model
from training.config import TrainConfig
from training.distributed import Cluster
from training.loop import Trainer
from training.run_state import RUN_STATE, read_run_state

# train_blocks 0: the backbone's BatchNorm stays in eval mode, so an image's descriptor does not
# depend on which images share its batch (per-rank batches would otherwise change BN statistics).
SETTINGS = dict(epochs=1, lr=1e-3, batch_size=5, cache_refresh=9, random_negatives=30, max_negatives=2,
                amp=False, train_blocks=0, seed=3)
OPTIONS = ["--epochs", "1", "--lr", "1e-3", "--batch-size", "5", "--cache-refresh", "9", "--negatives", "30",
           "--max-negatives", "2", "--no-amp", "--train-blocks", "0", "--seed", "3", "--device", "cpu",
           "--no-progress", "--workers", "0"]


@pytest.fixture(scope="module")
def tiny(real_photos, tmp_path_factory):
    """Two photos at 64×48 (≈60 database images, 20 queries) and a K=4 model."""
    return _placeset_with_model(_photos(real_photos, 2), tmp_path_factory.mktemp("ddp"), (64, 48), 10, 4)


def _train(*args: str, wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    command = [sys.executable, "-m", "netvlad", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if wait:
        return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _ranks(parent: int) -> list[int]:
    """Pids of the training processes `parent` spawned (not its resource tracker)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return sorted(int(pid) for pid in children
                  if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes())


def test_a_killed_rank_ends_the_run_in_one_line_and_resume_gives_the_weights_of_one_process(tiny, tmp_path):
    """Kill rank 1 of a 2-process run once the starting model is validated; the run ends with one
    line; `--resume` on 2 processes trains the epoch to the weights of one process with the same
    global batch (within float tolerance: DDP averages gradients of per-rank weighted losses)."""
    dataset, model_file = tiny
    single = Trainer(load_model(model_file), dataset, tmp_path / "one", TrainConfig(**SETTINGS), device="cpu",
                     progress=False)
    single.fit()
    assert single.step > 2 and single.record.rows[-1]["queries"] > 4

    out = tmp_path / "two"
    run = _train(str(dataset.root), "--model", str(model_file), "--out", str(out), "--devices", "2", *OPTIONS,
                 wait=False)
    deadline = time.monotonic() + 90
    while not (out / RUN_STATE).exists():  # epoch 0 (the starting model's recall) is written
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()
        time.sleep(0.05)
    ranks = _ranks(run.pid)
    assert len(ranks) == 2
    os.kill(ranks[-1], signal.SIGKILL)
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == 1, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: training process 1 was killed (SIGKILL); the other processes were stopped; "
                      "continue the run with --resume"], stderr
    assert "Traceback" not in stderr
    assert read_run_state(out)["epoch"] == 0, "the run ended before the kill"

    resumed = _train(str(dataset.root), "--out", str(out), "--resume", "--devices", "2", "--device", "cpu",
                     "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert "2 processes on cpu" in resumed.stdout and "epoch 0 → 1" in resumed.stdout
    two = load_model(out / "model.pt").state_dict()
    one, start = single.model.state_dict(), load_model(model_file).state_dict()
    assert not torch.equal(one["pool.centroids"], start["pool.centroids"])  # it trained
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=1e-4, atol=1e-5, msg=name)
    state = read_run_state(out)
    assert state["epoch"] == 1 and state["step"] == single.step
    assert state["record"]["rows"][-1]["images"] == single.record.rows[-1]["images"]  # all ranks' images


def test_ranks_share_contiguous_parts():
    shares = [Cluster(rank, 3).share(list(range(7))) for rank in range(3)]
    assert shares == [[0, 1], [2, 3], [4, 5, 6]]
    assert Cluster(1, 3).share([]) == []
