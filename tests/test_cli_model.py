"""`netvlad init`, `describe`, `import-checkpoint` as a user runs them (subprocesses)."""

import json
import subprocess
import sys

import numpy as np
import pytest

import netvlad


def run(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "netvlad", *map(str, args)], capture_output=True, text=True,
                            timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"netvlad {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, real_photos):
    out = tmp_path_factory.mktemp("cli") / "model.pt"
    result = run("init", *real_photos[:8], "--out", out, "--backbone", "resnet18-layer3", "--clusters", "8",
                 "--input-mode", "grey", "--max-side", "128", "--per-image", "40", "--no-pretrained")
    assert "wrote" in result.stdout and "K=8" in result.stdout
    return out


def test_init_writes_a_loadable_model(model_file):
    model = netvlad.load_model(model_file)
    assert model.config.clusters == 8 and model.config.input_mode == "grey"
    assert model.config.meta["init"]["images"] == 8 and model.pool.alpha > 0


def test_describe_json_matches_the_library(model_file, real_photos, tmp_path):
    photos = real_photos[8:10]
    result = run("describe", *photos, "--model", model_file, "--json", "--out", tmp_path / "d.npy")
    payload = json.loads(result.stdout)
    got = np.array([d["descriptor"] for d in payload["descriptors"]], dtype=np.float32)
    expected = netvlad.load_model(model_file).describe(photos)
    assert payload["dim"] == 8 * 256 and [d["image"] for d in payload["descriptors"]] == [str(p) for p in photos]
    assert np.allclose(got, expected, atol=1e-5)
    assert np.allclose(np.load(tmp_path / "d.npy"), expected, atol=1e-6)


def test_errors_are_one_line_and_non_zero(model_file, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a photo")
    for args, cause in [
        (("describe", bad, "--model", model_file), "not an image"),
        (("describe", tmp_path / "missing.jpg", "--model", model_file), "no such file"),
        (("describe", bad, "--model", tmp_path / "none.pt"), "no such model file"),
        (("init", bad, "--out", tmp_path / "m.pt", "--backbone", "resnet99"), "resnet99"),
    ]:
        result = run(*args, check=False)
        assert result.returncode != 0
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        assert cause in result.stderr and "Traceback" not in result.stderr, result.stderr
        if args[0] == "describe":
            assert len(lines) == 1 and lines[0].startswith("error: ")


def test_every_command_has_help():
    top = run("--help").stdout
    for command in ("init", "describe", "import-checkpoint"):
        assert command in top
        assert "Usage" in run(command, "--help").stdout
