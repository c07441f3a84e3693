"""`netvlad index --ray`: the same catalog ids and descriptors as the single-machine path, no photo
lost or duplicated when a describe actor is SIGKILLed, a killed driver resumed by a rerun, and
one-line errors. One local Ray (2 CPUs) serves the whole module and is shut down at its end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")

from netvlad.index import Index  # noqa: E402
from netvlad.indexing import index_folder  # noqa: E402
from netvlad.indexing_ray import RayOptions  # noqa: E402
from tests.test_indexing_resume import indexed_count  # noqa: E402

CLI = [sys.executable, "-m", "netvlad"]
#: Good photos in the test folder: shrunk copies of real photos, landscape and portrait.
GOOD = 16


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(real_photos, tmp_path_factory) -> Path:
    """GOOD small real photos in two shapes (160×120 and 120×160), one duplicate, two bad files."""
    root = tmp_path_factory.mktemp("ray") / "photos"
    (root / "sub").mkdir(parents=True)
    for i in range(GOOD):
        with Image.open(real_photos[i % len(real_photos)]) as image:
            image = image.convert("RGB").resize((160, 120) if i % 3 else (120, 160))
        if i >= len(real_photos):
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image.save(root / ("sub" if i % 2 else ".") / f"{i:02d}.jpg", quality=90)
    (root / "dup.jpg").write_bytes((root / "00.jpg").read_bytes())
    (root / "empty.jpg").write_bytes(b"")
    (root / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return root


def run_index(index_dir: Path, model_path: Path, root: Path, ray_options: RayOptions | None):
    """Index `root` in-process; returns (report, {path: id}, {id: descriptor committed}, ids committed)."""
    stored: dict[int, np.ndarray] = {}
    commits: list[int] = []
    original = Index.store_descriptors

    def spy(self, ids, descriptors):
        commits.extend(int(i) for i in ids)
        stored.update(zip((int(i) for i in ids), np.asarray(descriptors, np.float32)))
        return original(self, ids, descriptors)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Index, "store_descriptors", spy)
        with Index.open_or_create(index_dir, str(model_path), device="cpu") as index:
            report = index_folder(index, root, batch_size=4, workers=0, progress=False, ray=ray_options)
            ids = dict(index.catalog.connection.execute("SELECT path, image_id FROM files"))
    return report, ids, stored, commits


@pytest.fixture(scope="module")
def single(folder, model_path, tmp_path_factory):
    """The single-machine path's (report, {path: id}, {id: descriptor}) on `folder`."""
    report, ids, stored, _ = run_index(tmp_path_factory.mktemp("single") / "index", model_path, folder, None)
    return report, ids, stored


@pytest.mark.parametrize("uri", [False, True], ids=["shared-path", "file-uri"])
def test_ray_path_equals_single_machine_path(ray_session, single, folder, model_path, tmp_path, uri):
    """Same catalog ids, descriptors (1e-5) and failures; with `uri`, workers read the photos
    through pyarrow from a file:// URI (an s3:// one works the same way)."""
    single_report, single_ids, single_desc = single
    options = RayOptions(batch_size=3, concurrency=1, read_from=folder.resolve().as_uri() if uri else None)
    ray_report, ray_ids, ray_desc, commits = run_index(tmp_path / "ray", model_path, folder, options)
    assert single_ids == ray_ids
    assert (single_report.described, single_report.failed) == (ray_report.described, ray_report.failed) == (GOOD, 2)
    assert sorted(commits) == sorted(single_desc) == sorted(ray_desc)
    for image_id, descriptor in single_desc.items():
        np.testing.assert_allclose(ray_desc[image_id], descriptor, atol=1e-5)
    if uri:  # the same files fail; read as bytes, their reasons are worded for bytes
        assert [path for path, _ in ray_report.failures] == [path for path, _ in single_report.failures]
    else:
        assert ray_report.failures == single_report.failures and len(single_report.failures) == 2


def describe_actor_pids(ray_module) -> set[int]:
    """Pids of this module's Ray describe actors (children of its raylet)."""
    import psutil  # vendored by Ray

    node = ray_module._private.worker._global_node
    raylet = node.all_processes[ray_module._private.ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    pids = set()
    for child in psutil.Process(raylet).children(recursive=True):
        try:
            if "Describer" in " ".join(child.cmdline()):
                pids.add(child.pid)
        except psutil.Error:
            pass
    return pids


def test_killed_describe_actor_loses_and_duplicates_nothing(ray_session, folder, model_path, tmp_path, monkeypatch):
    stored: list[int] = []
    killed: dict[str, object] = {}
    original = Index.store_descriptors

    def kill_on_first_commit(self, ids, descriptors):
        stored.extend(int(i) for i in ids)
        if not killed:
            pids = describe_actor_pids(ray_session)
            assert len(pids) == 1, pids
            killed["pid"] = pids.pop()
            killed["committed"] = len(stored)
            os.kill(killed["pid"], signal.SIGKILL)
        else:  # the batches the killed actor held come back from its restarted self
            killed.setdefault("restarted", set()).update(describe_actor_pids(ray_session) - {killed["pid"]})
        return original(self, ids, descriptors)

    monkeypatch.setattr(Index, "store_descriptors", kill_on_first_commit)
    with Index.create(tmp_path / "index", str(model_path), device="cpu") as index:
        report = index_folder(index, folder, progress=False, ray=RayOptions(batch_size=1, concurrency=1))
        counts = index.catalog.counts()
        ids = index.catalog.indexed_ids()
        assert np.array_equal(np.sort(index.vectors.ids()), np.sort(ids))
    assert killed["committed"] < GOOD, "the kill landed after every photo was described"
    assert killed.get("restarted"), "no describe actor came back after the kill"
    assert sorted(stored) == sorted(set(stored)) and len(stored) == GOOD
    assert report.described == GOOD and counts["indexed"] == GOOD and counts["pending"] == 0


@pytest.mark.slow
def test_killed_driver_resumes_with_only_the_rest(ray_session, folder, model_path, tmp_path):
    index_dir = tmp_path / "index"
    address = ray_session.get_runtime_context().gcs_address
    args = [*CLI, "index", str(folder), "--index", str(index_dir), "--model", str(model_path), "--ray", address,
            "--ray-batch-size", "1", "--save-every", "1", "-q", "--json"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while indexed_count(index_dir) == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = indexed_count(index_dir)
    assert 0 < before < GOOD, f"the kill did not land mid-run ({before} of {GOOD} indexed)"

    rerun = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout)
    assert report["described"] == GOOD - before and report["images"] == GOOD
    with Index.open(index_dir) as index:
        assert index.catalog.counts() == {"pending": 0, "indexed": GOOD, "failed": 2, "removed": 0}
        assert np.array_equal(np.sort(index.vectors.ids()), np.sort(index.catalog.indexed_ids()))


@pytest.mark.parametrize("address, fragment", [("127.0.0.1:1", "no Ray cluster reachable"),
                                               ("nowhere", "not an address")])
def test_unreachable_address_is_one_line(folder, tmp_path, address, fragment):
    result = subprocess.run([*CLI, "index", str(folder), "--index", str(tmp_path / "i"), "--ray", address],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error:") and fragment in result.stderr
    assert not (tmp_path / "i").exists()


def test_without_ray_the_option_names_the_extra(folder, tmp_path):
    code = ("import sys; sys.modules['ray'] = None; from netvlad.cli import main; "
            f"sys.argv = ['netvlad', 'index', {str(folder)!r}, '--index', {str(tmp_path / 'i')!r}, '--ray', 'auto']; main()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and result.stderr.count("\n") == 1
    assert "pip install netvlad[distributed]" in result.stderr
