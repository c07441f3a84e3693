"""Every `netvlad` command, run through the installed console script with bad arguments, ends
with one line `error: …` and a non-zero exit code, never a traceback.

The commands run once each, two at a time (each start costs seconds of imports), in a
module-scoped fixture; every case is then its own test.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

NETVLAD = Path(sys.executable).with_name("netvlad")
#: A CUDA device this machine lacks: plain `cuda` without CUDA, else an index past the devices.
MISSING_CUDA = "cuda:99" if torch.cuda.is_available() else "cuda"

# (id, arguments with {placeholders} for the fixture's files, fragment the error line must hold)
CASES = [
    ("make-placeset-bad-size", ["make-placeset", "{photo}", "--out", "{new}", "--out-size", "0x5"], "0x5"),
    ("eval-missing-cuda", ["eval", "{dataset}", "--device", MISSING_CUDA], MISSING_CUDA),
    ("index-missing-cuda", ["index", "{empty}", "--index", "{new}", "--device", MISSING_CUDA], MISSING_CUDA),
    ("search-missing-index", ["search", "{photo}", "--index", "{missing}"], "no such index folder"),
    ("init-bad-input-mode", ["init", "{photo}", "--out", "{new}.pt", "--input-mode", "purple"], "purple"),
    ("describe-junk-model", ["describe", "{photo}", "--model", "{file}"], "not a readable model file"),
    ("import-checkpoint-junk-mat", ["import-checkpoint", "{junk_mat}", "--out", "{new}.pt"], "not a readable MATLAB"),
    ("export-junk-model", ["export", "{file}", "--out", "{new}.onnx"], "not a readable model file"),
    ("export-bad-format", ["export", "default", "--format", "tflite", "--out", "{new}"], "tflite"),
    ("serve-missing-index", ["serve", "--index", "{missing}"], "no such index folder"),
    ("demo-photos-into-a-file", ["demo", "--photos", "{file}", "--dir", "{new}", "--no-serve"], "file"),
    ("demo-without-photos", ["demo", "--photos", "{empty}", "--dir", "{new}", "--no-serve"], "make photos"),
    ("train-missing-cuda", ["train", "{dataset}", "--out", "{new}", "--model", "default", "--device", MISSING_CUDA],
     MISSING_CUDA),
    ("train-bad-loss", ["train", "{dataset}", "--out", "{new}", "--model", "default", "--loss", "hinge"], "hinge"),
    ("train-zero-lr", ["train", "{dataset}", "--out", "{new}", "--model", "default", "--lr", "0"], "lr must be > 0"),
    ("train-resume-without-run", ["train", "{dataset}", "--out", "{empty}", "--resume"], "no run state"),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory, real_photos) -> dict[str, subprocess.CompletedProcess]:
    """Each case's finished `netvlad` process by case id, and `netvlad --help`'s under "help"."""
    root = tmp_path_factory.mktemp("cli-errors")
    dataset = root / "dataset"
    dataset.mkdir()
    shutil.copyfile(real_photos[0], dataset / "db.jpg")
    shutil.copyfile(real_photos[0], dataset / "query.jpg")
    (dataset / "database.csv").write_text("image,easting,northing\ndb.jpg,0,0\n")
    (dataset / "queries.csv").write_text("image,easting,northing\nquery.jpg,1,0\n")
    (root / "empty").mkdir()
    (root / "junk.txt").write_text("not a model, not a photo")
    (root / "junk.mat").write_bytes(b"not a MATLAB file")
    places = {"file": root / "junk.txt", "junk_mat": root / "junk.mat", "photo": real_photos[0],
              "dataset": dataset, "empty": root / "empty", "missing": root / "missing"}

    def run(case):
        name, args, _ = case
        argv = [arg.format(**places, new=root / f"new-{name}") for arg in args]
        return name, subprocess.run([str(NETVLAD), *argv], capture_output=True, text=True, timeout=300, cwd=root)

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(run, [*CASES, ("help", ["--help"], "")]))


@pytest.mark.parametrize("name, fragment", [pytest.param(name, fragment, id=name) for name, _, fragment in CASES])
def test_bad_arguments_end_in_one_error_line(results, name, fragment):
    result = results[name]
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], output
    assert all(line.startswith("warning: ") for line in lines[:-1]), output
    assert fragment in errors[0], output


def test_every_command_is_covered(results):
    """A new command gets its bad-arguments case here."""
    top = results["help"].stdout
    listed = {line.split()[1] for line in top.splitlines() if line.startswith("│ ") and not line[2].isspace()}
    covered = {args[0] for _, args, _ in CASES}
    assert listed - {"--help"} <= covered, sorted(listed - covered)
