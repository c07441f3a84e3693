"""Baselines: RootSIFT and VLAD against slow references, RootSIFT-VLAD recall on a real-photo
place set, the untrained-NetVLAD baseline, and `netvlad eval` end to end."""

import csv
import json
import subprocess
import sys
from math import comb
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from netvlad.baselines import RootSIFTVLAD, fit_baseline, rootsift, untrained_netvlad, vlad
from netvlad.datasets import PlacesetConfig, load_place_dataset, make_placeset
from netvlad.errors import DatasetError
from netvlad.evaluation import evaluate
from netvlad.initialization import init_model
from netvlad.model import build_model
from netvlad.modelfile import save_model

# Photos bundled with scikit-image / scikit-learn: always in the collection, network or not.
PLACE_PHOTOS = ("skimage-astronaut", "skimage-chelsea", "skimage-coffee", "skimage-rocket", "sklearn-china")
MAX_SIDE = 160  # the place set's images are 160×120: describe them at their own size


def vlad_loop(features, centres, power_norm=False):
    """Reference VLAD: loops over features and words."""
    k, d = centres.shape
    v = np.zeros((k, d))
    for x in features:
        nearest = min(range(k), key=lambda q: float(((x - centres[q]) ** 2).sum()))
        v[nearest] += x - centres[nearest]
    for q in range(k):
        if power_norm:
            v[q] = np.sign(v[q]) * np.sqrt(np.abs(v[q]))
        norm = np.linalg.norm(v[q])
        if norm > 0:
            v[q] /= norm
    flat = v.ravel()
    return flat / np.linalg.norm(flat)


@pytest.mark.parametrize("power_norm", [False, True])
def test_vlad_matches_loop_reference(power_norm):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 8)).astype(np.float32)
    centres[5] += 100.0  # a word no feature is assigned to: its block stays zero
    features = rng.normal(size=(60, 8)).astype(np.float32)
    got = vlad(features, centres, power_norm=power_norm)
    expected = vlad_loop(features.astype(np.float64), centres.astype(np.float64), power_norm)
    assert got.dtype == np.float32 and got.shape == (6 * 8,)
    np.testing.assert_allclose(got, expected, atol=2e-6)
    assert np.all(got[5 * 8 :] == 0)
    np.testing.assert_allclose(np.linalg.norm(got.reshape(6, 8)[:5], axis=1), 1 / np.sqrt(5), rtol=1e-5)
    assert np.all(vlad(np.zeros((0, 8)), centres) == 0)


def test_rootsift_of_real_sift(real_photos):
    grey = np.asarray(Image.open(next(p for p in real_photos if p.stem == "skimage-camera")).convert("L"))
    _, sift = cv2.SIFT_create().detectAndCompute(grey, None)
    assert len(sift) > 100
    root = rootsift(sift)
    assert root.shape == sift.shape and root.dtype == np.float32 and (root >= 0).all()
    np.testing.assert_allclose(root**2, sift / sift.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(root, axis=1), 1.0, rtol=1e-5)
    # Euclidean geometry of RootSIFT = Hellinger kernel of L1-normalised SIFT.
    a, b = sift[0] / sift[0].sum(), sift[1] / sift[1].sum()
    assert float(root[0] @ root[1]) == pytest.approx(float(np.sqrt(a * b).sum()), rel=1e-5)
    assert np.all(rootsift(np.zeros((2, 128))) == 0)


def test_rootsift_vlad_descriptors(real_photos, tmp_path):
    photos = [p for p in real_photos if p.stem in ("skimage-camera", "skimage-coffee", "skimage-chelsea")]
    model = RootSIFTVLAD(clusters=16, max_side=200, per_image=100)
    with pytest.raises(RuntimeError, match="fit"):
        model.describe(photos)
    features = model.local_features(photos[0])
    assert features.shape[1] == 128 and len(features) > 20 and (features >= 0).all()
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)

    blank = tmp_path / "blank.png"
    Image.new("RGB", (300, 200), (128, 128, 128)).save(blank)
    descriptors = model.fit(photos).describe(photos + [blank])
    assert model.centres.shape == (16, 128) and descriptors.shape == (4, 16 * 128)
    np.testing.assert_allclose(np.linalg.norm(descriptors[:3], axis=1), 1.0, rtol=1e-5)
    assert np.all(descriptors[3] == 0)  # no keypoints: zero, which recall ranks neutrally
    with pytest.raises(DatasetError, match="too few"):
        RootSIFTVLAD(clusters=16).fit([blank])


@pytest.fixture(scope="module")
def place_set(real_photos, tmp_path_factory):
    photos = [p for p in real_photos if p.stem in PLACE_PHOTOS]
    assert len(photos) == len(PLACE_PHOTOS)
    config = PlacesetConfig(crop_size=128, stride=64, queries_per_photo=10, out_size=(160, 120))
    out = tmp_path_factory.mktemp("placeset") / "set"
    make_placeset(photos, out, config, progress=False)
    return load_place_dataset(out)


@pytest.fixture(scope="module")
def rootsift_result(place_set):
    """RootSIFT-VLAD as `netvlad eval --baseline rootsift-vlad` builds it for a 160-px model."""
    baseline = RootSIFTVLAD(max_side=MAX_SIDE, seed=0).fit(place_set.db_paths())
    return evaluate(baseline, place_set, per_query=True)


def chance_recall(place_set, n):
    """Expected Recall@n of a random ranking."""
    nd, counts = len(place_set.db_images), [len(p) for p in place_set.positives() if len(p)]
    return float(np.mean([1 - comb(nd - c, n) / comb(nd, n) for c in counts]))


def test_rootsift_vlad_recall_on_real_place_set(place_set, rootsift_result):
    assert (len(place_set.db_images), len(place_set.q_images)) == (206, 50)
    recall = rootsift_result["recall"]
    # Measured: R@1 0.74, R@5 0.94, R@10 0.96, R@20 0.96; chance R@5 is 0.06.
    assert chance_recall(place_set, 5) < 0.1
    assert recall[5] >= 0.84
    assert recall[1] >= 0.62
    assert recall[1] <= recall[5] <= recall[10] <= recall[20]


def test_untrained_netvlad_baseline(real_photos):
    photos = [p for p in real_photos if p.stem in PLACE_PHOTOS][:3]
    like = build_model("resnet18-layer3", 8, input_mode="grey", max_side=64).config
    model = untrained_netvlad(like, photos, per_image=50, seed=3)
    assert model.config.backbone == "resnet18-layer3" and model.config.clusters == 8
    assert (model.config.input_mode, model.config.max_side, model.dim) == ("grey", 64, 8 * 256)
    assert model.config.meta["pretrained"] is False and model.config.meta["init"]["bn_images"] == 3
    bn = model.backbone[1]
    assert bn.running_mean.abs().max() > 1e-3  # recalibrated on the photos, not the 0/1 defaults
    descriptors = model.describe(photos)
    np.testing.assert_allclose(np.linalg.norm(descriptors, axis=1), 1.0, rtol=1e-5)
    # The registry builds the same model: the seed fixes the random weights and the k-means.
    registered = fit_baseline("untrained", photos, like, seed=3)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, registered.state_dict()[name]), name
    with pytest.raises(ValueError, match="unknown baseline"):
        fit_baseline("sift", photos, like)


def netvlad_command() -> list[str]:
    """The installed console script, or the same entry point through the interpreter."""
    script = Path(sys.executable).with_name("netvlad")
    return [str(script)] if script.is_file() else [sys.executable, "-c", "from netvlad.cli import main; main()"]


def test_eval_cli_end_to_end(place_set, rootsift_result, tmp_path):
    model = build_model("resnet18-layer3", 8, input_mode="grey", max_side=MAX_SIDE)
    init_model(model, place_set.db_paths()[::10], per_image=50)
    model_path = save_model(model, tmp_path / "grey8.pt")
    per_query, plot = tmp_path / "per_query.csv", tmp_path / "recall.png"
    run = subprocess.run(
        netvlad_command() + [
            "eval", str(place_set.root), "--model", str(model_path), "--json", "--no-progress",
            "--baseline", "rootsift-vlad", "--ns", "1,5,10,20", "--per-query", str(per_query), "--plot", str(plot),
        ],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert (report["database"], report["queries"], report["evaluated_queries"]) == (206, 50, 50)
    assert [m["name"] for m in report["methods"]] == ["grey8.pt", "rootsift-vlad"]
    ours, sift = report["methods"]
    assert ours["dim"] == 8 * 256 and sift["dim"] == 64 * 128
    # The CLI's baseline is the library's RootSIFT-VLAD: same vocabulary seed, same numbers.
    assert sift["recall"] == {str(n): v for n, v in rootsift_result["recall"].items()}
    assert all(0 <= v <= 1 for v in ours["recall"].values())
    rows = list(csv.DictReader(open(per_query, newline="")))
    assert len(rows) == 2 * 50
    sift_ranks = [int(r["first_positive_rank"]) for r in rows if r["method"] == "rootsift-vlad"]
    assert sift_ranks == rootsift_result["first_positive_rank"].tolist()
    assert plot.stat().st_size > 10_000



def test_eval_cli_errors(place_set, tmp_path, monkeypatch, capsys):
    from netvlad.cli import main

    def netvlad(*args):
        monkeypatch.setattr(sys, "argv", ["netvlad", *args])
        with pytest.raises(SystemExit) as exit_info:
            main()
        return exit_info.value.code, capsys.readouterr().err

    code, err = netvlad("eval", str(tmp_path / "nowhere"))
    assert code == 1 and err.strip().splitlines() == [f"error: {tmp_path / 'nowhere'}: no such place dataset"]
    code, err = netvlad("eval", str(place_set.root), "--model", str(tmp_path / "missing.pt"))
    assert code == 1 and err.strip() == f"error: {tmp_path / 'missing.pt'}: no such model file"
    code, err = netvlad("eval", str(place_set.root), "--baseline", "surf")
    assert code == 2 and "'surf' is not one of 'rootsift-vlad', 'untrained'" in err
    code, err = netvlad("eval", str(place_set.root), "--ns", "0,5")
    assert code == 2 and "N values must be positive" in err
