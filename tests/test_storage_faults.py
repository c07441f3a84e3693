"""An index folder on a read-only file system and on a full disk, through the real `netvlad`
command and a real server: reads go on, writes fail with one clear line (CLI) or a 507 (service),
nothing half-written is left behind, and a rerun after freeing space loses and duplicates nothing.

The file systems are small tmpfs mounts; where this machine does not allow mounting (not root, no
CAP_SYS_ADMIN) those tests are skipped with the reason.
"""

from __future__ import annotations

import errno
import shutil
import sqlite3
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest

from netvlad.index import Index
from server_process import ServiceProcess, free_port
from service_support import small_model
from test_service_hardening import NETVLAD, netvlad, one_line_error
from tests.photo_support import shrunk_copies


def mount_tmpfs(where: Path, megabytes: int) -> None:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'}): needs root")


def remount(where: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True, capture_output=True)


@pytest.fixture
def tmpfs(tmp_path):
    """A factory of small tmpfs mounts under tmp_path, unmounted afterwards."""
    mounts = []

    def make(megabytes: int) -> Path:
        where = tmp_path / f"mnt-{uuid.uuid4().hex[:6]}"
        mount_tmpfs(where, megabytes)
        mounts.append(where)
        return where

    yield make
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(folder: Path, leave: int = 0) -> Path:
    """Fill the file system of `folder` to the last byte, then free `leave` bytes of it; returns
    the filler file."""
    filler = folder / "filler"
    with open(filler, "ab", buffering=0) as handle:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    handle.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        handle.truncate(max(0, handle.tell() - leave))
    return filler


def temp_leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


@pytest.fixture(scope="module")
def photos(real_photos, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fault-photos") / "photos"
    folder.mkdir()
    shrunk_copies(real_photos, [p.name for p in real_photos[:10]], folder, 240)
    return folder


@pytest.fixture(scope="module")
def master_index(tmp_path_factory, real_photos, photos) -> Path:
    """An index of the first four photos of `photos`, as a folder collection."""
    directory = tmp_path_factory.mktemp("fault-index") / "index"
    with Index.create(directory, small_model(tmp_path_factory, real_photos), device="cpu") as index:
        index.set_root(photos)
        index.add(sorted(photos.iterdir())[:4])
        index.save()
    return directory


def copy_index(master: Path, target: Path) -> Path:
    shutil.copytree(master, target, ignore=shutil.ignore_patterns(".lock"))
    return target


def test_temp_files_left_by_a_killed_writer_are_swept_when_the_index_opens(master_index, tmp_path):
    directory = copy_index(master_index, tmp_path / "index")
    leftovers = [directory / ".manifest.json.tmp", directory / ".vectors-0123.faiss.tmp",
                 directory / "uploads" / "ab" / ".abcdef.jpg.tmp", tmp_path / ".index.tmp-1a2b3c4d" / "catalog.sqlite"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    unrelated = tmp_path / ".other.tmp"
    unrelated.write_bytes(b"not ours")
    with Index.open(directory, writable=False):
        assert all(p.exists() for p in leftovers)  # a reader never deletes
    with Index.open(directory, writable=True):
        pass
    assert not any(p.exists() for p in leftovers) and not (tmp_path / ".index.tmp-1a2b3c4d").exists()
    assert unrelated.exists()


def test_a_read_only_index_folder_is_served_and_searched_read_only(master_index, photos, tmpfs, tmp_path):
    mount = tmpfs(64)
    directory = copy_index(master_index, mount / "index")
    remount(mount, "ro")
    port = free_port()
    server = ServiceProcess({"NETVLAD_DEVICE": "cpu"}, port=port, log=tmp_path / "serve.log",
                            command=[*NETVLAD, "serve", "--index", str(directory), "--port", str(port)])
    with server, httpx.Client(base_url=server.url, timeout=60) as client:
        info = client.get("/v1/info").json()
        assert info["count"] == 4 and not info["writes_allowed"]
        query = sorted(photos.iterdir())[1]
        found = client.post("/v1/search", files=[("images", ("q.jpg", query.read_bytes()))])
        assert found.status_code == 200 and found.json()["results"][0]["path"] == query.name
        refused = client.post("/v1/images", files=[("image", ("q.jpg", query.read_bytes()))])
        assert refused.status_code == 403 and "read-only" in refused.json()["detail"]
    assert "read-only" in server.log()
    searched = netvlad("search", query, "--index", directory)
    assert searched.returncode == 0 and query.name in searched.stdout, searched.stderr
    one_line_error(netvlad("index", photos, "--index", directory, "--quiet"), "cannot be written")


@pytest.mark.parametrize("room", [0, 160_000], ids=["full-at-open", "full-mid-run"])
def test_a_full_disk_while_indexing_is_one_line_and_a_rerun_completes(master_index, photos, tmpfs, room):
    mount = tmpfs(48)
    directory = copy_index(master_index, mount / "index")
    filler = fill(mount, leave=room)
    result = netvlad("index", photos, "--index", directory, "--workers", "0", "--quiet")
    one_line_error(result, "disk full:")
    assert ("catalog cannot be opened" in result.stderr) == (room == 0), result.stderr
    assert not temp_leftovers(mount)
    filler.unlink()
    rerun = netvlad("index", photos, "--index", directory, "--workers", "0", "--quiet", "--json")
    assert rerun.returncode == 0, rerun.stderr
    with Index.open(directory) as index:
        ids = index.catalog.indexed_ids()
        assert len(index) == len(ids) == 10  # every photo once: nothing lost, nothing twice
        rows = index.catalog.connection.execute("SELECT COUNT(*), COUNT(DISTINCT path) FROM files").fetchone()
        assert rows[0] == rows[1] == 10


def test_a_full_disk_answers_507_and_a_stale_index_is_served_read_only(master_index, photos, tmpfs, tmp_path):
    mount = tmpfs(48)
    directory = copy_index(master_index, mount / "index")
    new_photo = sorted(photos.iterdir())[6].read_bytes()
    env = {"NETVLAD_INDEX_DIR": directory, "NETVLAD_DEVICE": "cpu"}
    with ServiceProcess(env, log=tmp_path / "full.log") as server, httpx.Client(base_url=server.url, timeout=60) as c:
        filler = fill(mount)
        response = c.post("/v1/images", files=[("image", ("new.jpg", new_photo))])
        assert response.status_code == 507 and "disk is full" in response.json()["detail"], response.text
        assert c.get("/v1/info").json()["count"] == 4
        assert not temp_leftovers(mount) and not list((directory / "uploads").rglob("*.jpg"))
        filler.unlink()
        added = c.post("/v1/images", files=[("image", ("new.jpg", new_photo))])
        assert added.status_code == 201, added.text
    # A manifest older than the catalog on a full disk: served read-only instead of exiting.
    with sqlite3.connect(directory / "catalog.sqlite") as conn:
        conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'revision'")
    filler = fill(mount)
    with ServiceProcess(env, log=tmp_path / "stale.log") as server, httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.get("/v1/info").json()["writes_allowed"] is False
        assert c.get("/v1/info").json()["count"] == 5
    assert "read-only" in server.log() and "disk full" in server.log()
    filler.unlink()
