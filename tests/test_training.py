"""The training loop (training.loop), objectives, run log and `netvlad train` on place sets built
from real photos (`make_placeset`)."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from netvlad.cli import app
from netvlad.datasets import PlacesetConfig, load_place_dataset, make_placeset
from netvlad.datasets.placeset import PlaceDataset
from netvlad.errors import DatasetError
from netvlad.evaluation import evaluate
from netvlad.initialization import init_model
from netvlad.losses import RealignedSoftmaxWarpingLoss, geo_soft_labels
from netvlad.model import build_model
from netvlad.modelfile import load_model, save_model
from training.cli import register
from training.config import TrainConfig
from training.loop import Trainer
from training.mining import MinedTuple
from training.objectives import RSWObjective, SoftObjective

# Photos bundled with scikit-image / scikit-learn: present with or without network.
PHOTOS = ("sklearn-china.jpg", "skimage-coffee.jpg", "skimage-motorcycle_left.jpg", "skimage-rocket.jpg")
TIMING_COLUMNS = ("images_per_s", "train_s")


def _photos(real_photos: list[Path], count: int) -> list[Path]:
    by_name = {p.name: p for p in real_photos}
    missing = [n for n in PHOTOS[:count] if n not in by_name]
    if missing:
        pytest.fail(f"bundled photos missing from the photo collection: {missing}")
    return [by_name[n] for n in PHOTOS[:count]]


def _placeset_with_model(photos, folder: Path, out_size, queries: int, clusters: int) -> tuple[PlaceDataset, Path]:
    config = PlacesetConfig(crop_size=256, stride=64, queries_per_photo=queries, out_size=out_size, seed=0)
    make_placeset(photos, folder / "set", config, progress=False)
    dataset = load_place_dataset(folder / "set")
    torch.manual_seed(0)
    model = build_model("resnet18-layer3", clusters, input_mode="grey", max_side=max(out_size))
    init_model(model, dataset.db_paths()[::2], per_image=40, seed=0)
    return dataset, save_model(model, folder / "init.pt")


@pytest.fixture(scope="module")
def tiny(real_photos, tmp_path_factory) -> tuple[PlaceDataset, Path]:
    """Two photos at 64×48 (≈60 database images, 20 queries) and a K=4 model: fast mechanics tests."""
    return _placeset_with_model(_photos(real_photos, 2), tmp_path_factory.mktemp("tiny"), (64, 48), 10, 4)


@pytest.fixture(scope="module")
def small(real_photos, tmp_path_factory) -> tuple[PlaceDataset, Path]:
    """Four photos at 160×120 (120 database images, 60 queries) and a K=16 model."""
    return _placeset_with_model(_photos(real_photos, 4), tmp_path_factory.mktemp("small"), (160, 120), 15, 16)


@pytest.fixture
def tiny_copy(tiny, tmp_path) -> Path:
    """A writable copy of the tiny place set folder."""
    return Path(shutil.copytree(tiny[0].root, tmp_path / "copy"))


def _fast(**overrides) -> TrainConfig:
    settings = dict(epochs=2, lr=1e-4, batch_size=3, cache_refresh=100, random_negatives=30, max_negatives=2, amp=True)
    return TrainConfig(**{**settings, **overrides})


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ mining schedule


def test_cache_is_refreshed_every_n_queries(tiny, tmp_path):
    """Before every `cache_refresh` queries the cache is refreshed with exactly the descriptors
    of the queries about to be mined."""
    dataset, model_file = tiny
    config = _fast(cache_refresh=7)
    trainer = Trainer(load_model(model_file), dataset, tmp_path / "run", config, device="cpu", progress=False)
    calls = []
    refresh = trainer.miner.refresh

    def spy(db_desc, q_desc, queries=None):
        calls.append((trainer.miner.queries_mined, None if queries is None else np.asarray(queries).tolist()))
        refresh(db_desc, q_desc, queries)

    trainer.miner.refresh = spy
    trainer.fit()
    usable = len(trainer.queries)
    per_epoch = math.ceil(usable / 7)
    assert usable > 14
    assert [c[0] for c in calls] == [e * usable + 7 * k for e in range(2) for k in range(per_epoch)]
    for epoch in (1, 2):
        order = np.random.default_rng([config.seed, epoch]).permutation(trainer.queries)
        for k in range(per_epoch):
            assert calls[(epoch - 1) * per_epoch + k][1] == sorted(order[7 * k : 7 * k + 7].tolist())


# ------------------------------------------------------------------ resume and freezing


@pytest.mark.slow
@pytest.mark.parametrize("loss, amp, refresh", [("triplet", True, 8), ("rsw", False, 100)])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny, tmp_path, loss, amp, refresh):
    dataset, model_file = tiny
    config = _fast(loss=loss, amp=amp, lr=1e-3, cache_refresh=refresh)
    straight = Trainer(load_model(model_file), dataset, tmp_path / "straight", config, device="cpu", progress=False)
    straight.fit()

    first = Trainer(load_model(model_file), dataset, tmp_path / "resumed", config, device="cpu", progress=False)
    first.fit(epochs=1)
    assert first.epoch == 1
    resumed = Trainer.resume(tmp_path / "resumed", dataset, device="cpu", progress=False)
    assert resumed.epoch == 1 and resumed.step == first.step
    resumed.fit()

    assert straight.step > first.step > 0
    assert _state_equal(straight.model.state_dict(), resumed.model.state_dict())
    assert _state_equal(straight.objective.state_dict(), resumed.objective.state_dict())
    assert np.array_equal(straight.miner.hard_negatives, resumed.miner.hard_negatives)
    assert straight.scheduler.state_dict() == resumed.scheduler.state_dict()
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows]  # noqa: E731
    assert strip(straight.record.rows) == strip(resumed.record.rows)
    assert _state_equal(load_model(tmp_path / "straight" / "model.pt").state_dict(),
                        load_model(tmp_path / "resumed" / "model.pt").state_dict())
    # The run really trained: weights moved, the frozen blocks (all but layer3 on CPU) did not.
    start = load_model(model_file).state_dict()
    final = straight.model.state_dict()
    assert not torch.equal(start["backbone.6.0.conv1.weight"], final["backbone.6.0.conv1.weight"])
    assert not torch.equal(start["pool.centroids"], final["pool.centroids"])
    for name in ("backbone.0.weight", "backbone.1.running_mean", "backbone.5.1.bn2.running_var"):
        assert torch.equal(start[name], final[name]), name


def test_resume_refuses_another_dataset(tiny, tiny_copy, tmp_path):
    dataset, model_file = tiny
    Trainer(load_model(model_file), dataset, tmp_path / "run", _fast(epochs=1, cache_refresh=100),
            device="cpu", progress=False).fit()
    rows = list(csv.reader(open(tiny_copy / "queries.csv")))
    rows[1][1] = str(float(rows[1][1]) + 1.0)
    csv.writer(open(tiny_copy / "queries.csv", "w", newline="")).writerows(rows)
    with pytest.raises(DatasetError, match="another dataset"):
        Trainer.resume(tmp_path / "run", load_place_dataset(tiny_copy), device="cpu", progress=False)


# ------------------------------------------------------------------ learning on real photos


@pytest.mark.slow
def test_training_beats_the_untrained_model(small, tmp_path):
    dataset, model_file = small
    config = TrainConfig(epochs=2, lr=1e-4, batch_size=4, max_negatives=5, amp=True)
    trainer = Trainer(load_model(model_file), dataset, tmp_path / "run", config, device="cpu", progress=False)
    rows = trainer.fit().rows
    before, after = rows[0], rows[-1]
    print("recall@1/5/10 before", [before[f"recall@{n}"] for n in (1, 5, 10)],
          "after", [after[f"recall@{n}"] for n in (1, 5, 10)], "img/s", after["images_per_s"])
    assert after["recall@1"] >= before["recall@1"] + 0.10
    assert after["recall@5"] >= before["recall@5"]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert all(r["loss"] > 0 for r in rows[1:]) and rows[2]["loss"] < rows[1]["loss"]
    # model.pt is a plain model file reproducing the logged recall (fp32 here, bf16 in training).
    reloaded = evaluate(load_model(tmp_path / "run" / "model.pt"), dataset, ns=(1, 5, 10))
    assert reloaded["recall"][1] == pytest.approx(after["recall@1"], abs=2 / len(dataset.q_images))
    assert load_model(tmp_path / "run" / "best.pt").config.meta["training"]["epoch"] == trainer.best["epoch"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trains_on_cuda_with_bf16_and_the_whole_backbone(tiny, tmp_path):
    dataset, model_file = tiny
    config = _fast(amp=None, train_blocks=None, lr=1e-3)
    trainer = Trainer(load_model(model_file), dataset, tmp_path / "run", config, device="cuda", progress=False)
    assert trainer.amp and trainer.config.train_blocks == -1 and not trainer.frozen
    rows = trainer.fit().rows
    assert trainer.step > 0 and all(math.isfinite(r["loss"]) for r in rows[1:])
    saved = load_model(tmp_path / "run" / "model.pt").state_dict()
    assert _state_equal(saved, {k: v.cpu() for k, v in trainer.model.state_dict().items()})
    start = load_model(model_file).state_dict()
    assert not torch.equal(start["backbone.0.weight"], saved["backbone.0.weight"])


# ------------------------------------------------------------------ bad datasets


def test_undecodable_image_names_the_file_and_row(tiny, tiny_copy, tmp_path):
    dataset = load_place_dataset(tiny_copy)
    (tiny_copy / dataset.db_images[4]).write_bytes(b"not a jpeg")
    trainer = Trainer(load_model(tiny[1]), dataset, tmp_path / "run", _fast(), device="cpu", progress=False)
    with pytest.raises(DatasetError, match=rf"database\.csv, data row 5 \('{dataset.db_images[4]}'\)"):
        trainer.fit()


def test_query_without_positives_is_reported_and_skipped(tiny, tiny_copy, tmp_path):
    rows = list(csv.reader(open(tiny_copy / "queries.csv")))
    rows[3][1] = str(float(rows[3][1]) + 3000.0)  # data row 3 moves 3 km away from every database image
    csv.writer(open(tiny_copy / "queries.csv", "w", newline="")).writerows(rows)
    dataset = load_place_dataset(tiny_copy)
    trainer = Trainer(load_model(tiny[1]), dataset, tmp_path / "run", _fast(epochs=1), device="cpu", progress=False)
    assert trainer.skipped == [f"{tiny_copy / 'queries.csv'}, data row 3 ('{rows[3][0]}')"]
    assert 2 not in trainer.queries and len(trainer.queries) == len(dataset.q_images) - 1
    row = trainer.fit().rows[-1]
    assert row["queries"] + row["skipped"] == len(dataset.q_images) - 1


def test_rsw_needs_place_ids(tiny, tiny_copy, tmp_path):
    for name in ("database.csv", "queries.csv"):
        rows = list(csv.reader(open(tiny_copy / name)))
        csv.writer(open(tiny_copy / name, "w", newline="")).writerows([r[:3] for r in rows])
    with pytest.raises(DatasetError, match="place_id"):
        Trainer(load_model(tiny[1]), load_place_dataset(tiny_copy), tmp_path / "run", _fast(loss="rsw"),
                device="cpu", progress=False)


# ------------------------------------------------------------------ objectives


def _line_dataset() -> PlaceDataset:
    return PlaceDataset(
        root=Path("."), db_images=[f"d{i}.jpg" for i in range(6)], db_utm=np.column_stack([np.arange(6) * 10.0, np.zeros(6)]),
        q_images=["q0.jpg", "q1.jpg"], q_utm=np.array([[3.0, 4.0], [41.0, 0.0]]),
        db_place_ids=np.array([10, 10, 20, 20, 30, 30]), q_place_ids=np.array([10, 30]),
    )


def test_soft_objective_is_listwise_cross_entropy_with_geographic_labels():
    dataset = _line_dataset()
    objective = SoftObjective(dataset, sigma_m=10.0, temperature=0.2, max_positives=2)
    tuples = [MinedTuple(0, np.array([0, 1]), np.array([5, 3]), 2), MinedTuple(1, np.array([4]), np.array([0]), 1)]
    torch.manual_seed(0)
    query = torch.nn.functional.normalize(torch.randn(2, 5, dtype=torch.float64), dim=1)
    cands = [torch.nn.functional.normalize(torch.randn(len(t.positives) + len(t.negatives), 5, dtype=torch.float64), dim=1)
             for t in tuples]
    expected = []
    for q, c, t in zip(query, cands, tuples):
        ids = np.concatenate([t.positives, t.negatives])
        dist_m = torch.as_tensor(np.hypot(*(dataset.db_utm[ids] - dataset.q_utm[t.query]).T))
        p = geo_soft_labels(dist_m, 10.0)
        p = p / p.sum()
        log_q = torch.log_softmax(-((c - q) ** 2).sum(1) / 0.2, dim=0)
        expected.append(-(p * log_q).sum())
    assert objective(query, cands, tuples).item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-6)


def test_rsw_objective_labels_every_image_by_its_place():
    dataset = _line_dataset()
    objective = RSWObjective(dataset, dim=4, alpha=0.5, k1=0.25, k2=2.0, temperature=16.0).double()
    tuples = [MinedTuple(0, np.array([1]), np.array([4, 2]), 2), MinedTuple(1, np.array([5]), np.array([0]), 1)]
    query, cands = torch.randn(2, 4, dtype=torch.float64), [torch.randn(3, 4, dtype=torch.float64),
                                                             torch.randn(2, 4, dtype=torch.float64)]
    reference = RealignedSoftmaxWarpingLoss(3, 4, alpha=0.5, k1=0.25, k2=2.0, temperature=16.0).double()
    reference.load_state_dict(objective.loss.state_dict())
    labels = torch.tensor([0, 2, 0, 2, 1, 2, 0])  # places 10, 20, 30 → 0, 1, 2: q0, q1, d1, d4, d2, d5, d0
    expected = reference(torch.cat([query, *cands]), labels)
    assert objective(query, cands, tuples).item() == pytest.approx(expected.item(), rel=1e-12)


# ------------------------------------------------------------------ command line


@pytest.fixture(scope="module")
def cli() -> typer.Typer:
    if not any(c.name == "train" for c in app.registered_commands):
        register(app)
    return app


def test_cli_trains_resumes_and_writes_the_run_folder(cli, tiny, tmp_path):
    dataset, model_file = tiny
    out = tmp_path / "run"
    runner = CliRunner()
    base = ["train", str(dataset.root), "--out", str(out), "--no-progress", "--batch-size", "3",
            "--max-negatives", "2", "--negatives", "30", "--amp"]
    result = runner.invoke(cli, [*base, "--model", str(model_file), "--epochs", "1", "--lr", "1e-3"])
    assert result.exit_code == 0, result.output
    assert "trained 1 epochs" in result.output
    for name in ("run-state.pt", "model.pt", "best.pt", "log.csv", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    load_model(out / "model.pt")

    again = runner.invoke(cli, [*base, "--model", str(model_file)])
    assert again.exit_code != 0 and "--resume" in again.output
    changed = runner.invoke(cli, [*base, "--resume", "--lr", "0.5"])
    assert changed.exit_code != 0 and "differs from the run state" in changed.output

    resumed = runner.invoke(cli, [*base, "--resume", "--epochs", "2", "--workers", "1", "--json"])
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads(resumed.stdout)
    assert summary["epochs"] == 2 and summary["config"]["lr"] == 1e-3 and summary["config"]["workers"] == 1
    assert summary["mining"]["max_negatives"] == 2 and summary["mining"]["random_negatives"] == 30
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert all(0 <= float(r["recall@1"]) <= float(r["recall@5"]) <= float(r["recall@10"]) <= 1 for r in rows)
    assert float(rows[2]["lr"]) < 1e-3 and int(rows[2]["steps"]) > int(rows[1]["steps"]) > 0


def test_cli_reports_missing_image_with_file_and_line(cli, tiny, tiny_copy, tmp_path):
    dataset = load_place_dataset(tiny_copy)
    (tiny_copy / dataset.q_images[1]).unlink()
    result = CliRunner().invoke(cli, ["train", str(tiny_copy), "--model", str(tiny[1]), "--out", str(tmp_path / "r")])
    assert isinstance(result.exception, DatasetError)
    assert "queries.csv, line 3" in str(result.exception) and dataset.q_images[1] in str(result.exception)


# ------------------------------------------------------------------ more objectives and RSW presets


def _line_batch(seed: int) -> tuple[list[MinedTuple], torch.Tensor, list[torch.Tensor]]:
    """Two mined tuples on `_line_dataset` and random unit descriptors (float64) for them."""
    tuples = [MinedTuple(0, np.array([0, 1]), np.array([5, 3]), 2), MinedTuple(1, np.array([4]), np.array([0]), 1)]
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, dtype=torch.float64), dim=1)  # noqa: E731
    torch.manual_seed(seed)
    return tuples, unit(2, 5), [unit(len(t.positives) + len(t.negatives), 5) for t in tuples]


def test_soft_pair_objective_is_binary_cross_entropy_per_pair():
    from training.objectives import build_objective

    dataset = _line_dataset()
    objective = build_objective(TrainConfig(loss="soft-pair", soft_sigma_m=10.0), dataset, dim=5, max_negatives=2).double()
    tuples, query, cands = _line_batch(seed=0)
    terms = []
    for q, c, t in zip(query, cands, tuples):
        ids = np.concatenate([t.positives, t.negatives])
        s = geo_soft_labels(torch.as_tensor(np.hypot(*(dataset.db_utm[ids] - dataset.q_utm[t.query]).T)), 10.0)
        logit = 1.0 - 1.0 * ((c - q) ** 2).sum(1)  # a = b = 1 at the start
        terms.append(torch.nn.functional.binary_cross_entropy_with_logits(logit, s, reduction="none"))
    assert objective(query, cands, tuples).item() == pytest.approx(torch.cat(terms).mean().item(), rel=1e-6)
    assert objective.terms(tuples) == 6 and objective.max_positives == TrainConfig().soft_positives
    groups = objective.param_groups([torch.nn.Parameter(torch.zeros(1))], 1e-4)
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(1e-2) and len(groups[1]["params"]) == 2


def test_triplet_soft_objective_adds_the_two_losses():
    from netvlad.losses import SoftLabelCrossEntropy, TripletRankingLoss
    from training.objectives import build_objective

    dataset = _line_dataset()
    config = TrainConfig(loss="triplet-soft", margin=0.1, soft_sigma_m=10.0, soft_temperature=0.2)
    objective = build_objective(config, dataset, dim=5, max_negatives=2)
    tuples, query, cands = _line_batch(seed=1)
    triplet = TripletRankingLoss(margin=0.1, max_negatives=2)
    expected_triplet = torch.stack([
        triplet(q[None], c[None, : len(t.positives)], c[None, len(t.positives) :]) for q, c, t in zip(query, cands, tuples)
    ]).mean()
    expected_soft = SoftObjective(dataset, 10.0, 0.2, 4)(query, cands, tuples)
    assert isinstance(objective.soft.loss, SoftLabelCrossEntropy) and objective.soft.loss.form == "listwise"
    got = objective(query, cands, tuples).item()
    assert got == pytest.approx((expected_triplet + expected_soft).item(), rel=1e-6)


def test_rsw_presets_set_the_published_warp():
    from netvlad.configs import ConfigError
    from netvlad.losses.rsw import RSW_PRESETS
    from training.config import RSW_PRESET_NAMES, rsw_preset_fields

    assert set(RSW_PRESET_NAMES) == {"default", "cub", "sop"}
    assert rsw_preset_fields("cub") == {"rsw_alpha": 28.40, "rsw_k1": 0.93, "rsw_k2": 1.15, "rsw_temperature": 4.525,
                                        "rsw_margin": 1.30}
    assert rsw_preset_fields("sop")["rsw_margin"] == RSW_PRESETS["sop"]["margin"] == 1.348
    with pytest.raises(ConfigError, match="unknown RSW preset"):
        rsw_preset_fields("imagenet")


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["cub"])
def test_cli_rsw_preset_trains_with_the_published_configuration(cli, tiny, tmp_path, preset):
    from netvlad.losses.rsw import RSW_PRESETS

    dataset, model_file = tiny
    out = tmp_path / "run"
    base = ["train", str(dataset.root), "--out", str(out), "--no-progress", "--batch-size", "3", "--max-negatives", "2",
            "--negatives", "30", "--amp", "--loss", "rsw", "--rsw-preset", preset]
    result = CliRunner().invoke(cli, [*base, "--model", str(model_file), "--epochs", "1", "--json"])
    assert result.exit_code == 0, result.output
    config = json.loads(result.stdout)["config"]
    assert {key: config[f"rsw_{key}"] for key in RSW_PRESETS[preset]} == RSW_PRESETS[preset]
    other = "sop" if preset == "cub" else "cub"
    changed = CliRunner().invoke(cli, [*base[:-1], other, "--resume", "--epochs", "2"])
    assert changed.exit_code != 0 and "differs from the run state" in changed.output
    same = CliRunner().invoke(cli, [*base, "--resume", "--epochs", "2", "--json"])
    assert same.exit_code == 0, same.output


def test_cli_rsw_preset_needs_the_rsw_loss(cli, tiny, tmp_path):
    dataset, model_file = tiny
    result = CliRunner().invoke(cli, ["train", str(dataset.root), "--out", str(tmp_path / "run"), "--model", str(model_file),
                                      "--rsw-preset", "cub", "--no-progress"])
    assert result.exit_code != 0 and "applies to --loss rsw" in result.output
    bad = CliRunner().invoke(cli, ["train", str(dataset.root), "--out", str(tmp_path / "run"), "--model", str(model_file),
                                   "--loss", "rsw", "--rsw-preset", "imagenet", "--no-progress"])
    assert bad.exit_code == 2 and "imagenet" in bad.output


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["soft-pair", "triplet-soft"])
def test_new_objectives_train(tiny, tmp_path, loss):
    dataset, model_file = tiny
    trainer = Trainer(load_model(model_file), dataset, tmp_path / "run", _fast(loss=loss, epochs=1, lr=1e-3), device="cpu",
                      progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    assert trainer.step > 0 and not _state_equal(before, trainer.model.state_dict())
