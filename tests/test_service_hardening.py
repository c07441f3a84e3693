"""The service and the indexer tried as an attacker and as an unlucky operator would: links out of
the collection, poisoned metadata, large bodies without a key, odd file names, a read-only index
folder, a full disk, unusable API keys. Every case goes through a real uvicorn process or the real
`netvlad` command."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server_process import ServiceProcess, search_burst_memory
from tests.photo_support import large_png, shrunk_copies

KEY = "hardening-key"
NETVLAD = [sys.executable, "-c", "from netvlad.cli import main; main()"]


def netvlad(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `netvlad` command line; returns the finished process (text output)."""
    return subprocess.run([*NETVLAD, *map(str, args)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and all(word in lines[0] for word in words), result.stderr


@pytest.fixture(scope="module")
def outside(tmp_path_factory, real_photos) -> Path:
    """A folder outside the collection: a secret, and a photo identical to one inside."""
    folder = tmp_path_factory.mktemp("outside")
    (folder / "secret.txt").write_text("root:x:0:0:secret\n")
    (folder / "album").mkdir()
    shrunk_copies(real_photos, [real_photos[5].name], folder / "album", 240)
    return folder


@pytest.fixture(scope="module")
def collection(tmp_path_factory, real_photos, outside) -> Path:
    """Photos with links inside and outside the root, a non-UTF-8 name and two empty files."""
    root = tmp_path_factory.mktemp("collection") / "photos"
    (root / "sub").mkdir(parents=True)
    names = [p.name for p in real_photos[:5]]
    shrunk_copies(real_photos, names[:3], root, 240)
    shrunk_copies(real_photos, names[3:5], root / "sub", 240)
    (root / "inside-link.jpg").symlink_to(root / names[0])
    (root / "passwd.jpg").symlink_to("/etc/passwd")
    (root / "secret.jpg").symlink_to(outside / "secret.txt")
    (root / "away").symlink_to(outside / "album", target_is_directory=True)
    os.rename(shrunk_copies(real_photos, [real_photos[6].name], root, 240)[0], os.fsencode(root) + b"/caf\xe9.jpg")
    (root / "empty-1.jpg").write_bytes(b"")
    (root / "empty-2.jpg").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def indexed(collection, model_path, tmp_path_factory):
    """(index folder, first `netvlad index` run) over `collection`."""
    index_dir = tmp_path_factory.mktemp("hardening") / "index"
    run = netvlad("index", collection, "--index", index_dir, "--model", model_path, "--workers", "0", "--quiet")
    return index_dir, run


@pytest.fixture(scope="module")
def server(indexed, tmp_path_factory):
    env = {"NETVLAD_INDEX_DIR": indexed[0], "NETVLAD_API_KEY": KEY, "NETVLAD_DEVICE": "cpu",
           "NETVLAD_MAX_UPLOAD_BYTES": 2_000_000, "NETVLAD_MAX_REQUEST_BYTES": 4_000_000}
    with ServiceProcess(env, log=tmp_path_factory.mktemp("log") / "server.log") as process:
        yield process


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def catalog_rows(index_dir: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(f"file:{index_dir / 'catalog.sqlite'}?mode=ro", uri=True) as conn:
        return conn.execute(sql).fetchall()


# ------------------------------------------------------------------------------ 1. files outside the collection


def test_indexer_skips_links_that_leave_the_folder_and_reports_every_file(indexed, collection):
    index_dir, run = indexed
    assert run.returncode == 0, run.stderr
    out = run.stdout
    for name in ("passwd.jpg", "secret.jpg", "away"):
        assert f"{name}: a link to a " in out and "outside the photo folder: skipped" in out, out
    # Two empty files: each reported under its own name.
    assert "empty-1.jpg: empty file" in out and "empty-2.jpg: empty file" in out, out
    # The non-UTF-8 name is indexed, and shown escaped.
    paths = {os.fsdecode(p) if isinstance(p, bytes) else p
             for (p,) in catalog_rows(index_dir, "SELECT f.path FROM files f JOIN images i ON i.id = f.image_id "
                                                 "WHERE i.status = 'indexed'")}
    assert os.fsdecode(b"caf\xe9.jpg") in paths and "inside-link.jpg" in paths
    assert not any(p.startswith(("passwd", "secret", "away")) for p in paths)
    # A rerun changes nothing and does not fail on the odd name.
    again = netvlad("index", collection, "--index", index_dir, "--workers", "0", "--quiet", "--json")
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["described"] == 0 and report["new"] == 0 and report["changed"] == 0


def test_only_indexed_photos_inside_the_collection_are_served(client, indexed, collection):
    index_dir, _ = indexed
    ids = {status: [i for (i,) in catalog_rows(index_dir, f"SELECT id FROM images WHERE status = '{status}'")]
           for status in ("indexed", "failed")}
    assert ids["failed"], "the empty files are a failed image"
    for image_id in ids["indexed"]:
        response = client.get(f"/v1/images/{image_id}/file")
        assert response.status_code == 200 and response.headers["x-content-type-options"] == "nosniff"
        assert b"root:" not in response.content
    for image_id in ids["failed"]:
        response = client.get(f"/v1/images/{image_id}/file")
        assert response.status_code == 404 and "not indexed" in response.json()["detail"]


def test_a_photo_swapped_for_a_link_or_other_content_after_indexing_is_refused(client, indexed, collection, outside):
    index_dir, _ = indexed
    by_path = {p: i for p, i in catalog_rows(index_dir, "SELECT path, image_id FROM files WHERE image_id IS NOT NULL")
               if isinstance(p, str)}
    target = collection / "sub" / sorted(p.name for p in (collection / "sub").iterdir())[0]
    image_id = by_path[f"sub/{target.name}"]
    assert client.get(f"/v1/images/{image_id}/file").status_code == 200
    saved = target.read_bytes()
    try:
        # Replaced by a link to a file outside with the very same bytes: still refused.
        shutil.copy(target, outside / "same.jpg")
        target.unlink()
        target.symlink_to(outside / "same.jpg")
        response = client.get(f"/v1/images/{image_id}/file")
        assert response.status_code == 404 and "outside the collection" in response.json()["detail"]
        # A link to /etc/shadow.
        target.unlink()
        target.symlink_to("/etc/shadow")
        response = client.get(f"/v1/images/{image_id}/file")
        assert response.status_code == 404 and "root" not in response.text
        # The folder swapped for a link to an outside folder holding the same file.
        target.unlink()
        target.write_bytes(saved)
        moved = collection.parent / "sub-moved"
        os.rename(collection / "sub", moved)
        shutil.copytree(moved, outside / "sub-copy", dirs_exist_ok=True)
        (collection / "sub").symlink_to(outside / "sub-copy", target_is_directory=True)
        assert client.get(f"/v1/images/{image_id}/file").status_code == 404
        (collection / "sub").unlink()
        os.rename(moved, collection / "sub")
        # Other content under the same name.
        target.write_bytes(saved[:-10] + b"0123456789")
        response = client.get(f"/v1/images/{image_id}/file")
        assert response.status_code == 404 and "changed since it was indexed" in response.json()["detail"]
    finally:
        if target.is_symlink() or target.exists():
            target.unlink()
        target.write_bytes(saved)
    assert client.get(f"/v1/images/{image_id}/file").status_code == 200


def test_responses_never_carry_server_paths(client, collection, real_photos, indexed):
    found = client.post("/v1/search", files=[("images", ("q.jpg", (collection / real_photos[0].name).read_bytes()))])
    assert found.status_code == 200, found.text
    server_paths = (str(collection), str(indexed[0]), os.path.realpath(collection))
    assert not any(p in found.text for p in server_paths), found.text
    results = found.json()["results"]
    assert results[0]["path"] == real_photos[0].name
    assert "caf\\xe9.jpg" in {r["path"] for r in results} | {client.get(f"/v1/images/{r['id']}").json()["path"]
                                                               for r in results}
    for result in results:
        record = client.get(f"/v1/images/{result['id']}")
        assert record.status_code == 200 and not any(p in record.text for p in server_paths)
    odd = next(r for r in results if r["path"] == "caf\\xe9.jpg")
    served = client.get(odd["file_url"])
    assert served.status_code == 200 and hashlib.sha256(served.content).hexdigest() == \
        client.get(f"/v1/images/{odd['id']}").json()["sha256"]


# ------------------------------------------------------------------------------ 2. poisoned metadata


@pytest.mark.parametrize("form, reason", [
    ({"metadata": '{"lat": "abc", "lon": "x"}'}, "'lat' must be a number"),
    ({"metadata": '{"lat": {"a": 1}, "lon": [2]}'}, "'lat' must be a number"),
    ({"metadata": '{"lat": 91.5, "lon": 8}'}, "outside [-90, 90]"),
    ({"metadata": '{"lat": 47, "lon": -181}'}, "outside [-180, 180]"),
    ({"metadata": '{"lat": NaN, "lon": 8}'}, "outside"),
    ({"metadata": '{"lat": 47}'}, "both lat and lon"),
    ({"metadata": '{"taken_at": {"year": 2020}}'}, "'taken_at' must be an ISO 8601"),
    ({"metadata": '{"taken_at": "yesterday"}'}, "not an ISO 8601"),
    ({"metadata": '{"name": ["a"]}'}, "'name' must be"),
    ({"metadata": '"just a string"'}, "JSON object"),
    ({"lat": "abc", "lon": "8"}, "lat"),
    ({"lat": "95", "lon": "8"}, "lat"),
])
def test_invalid_metadata_is_refused_and_nothing_is_stored(client, indexed, real_photos, form, reason):
    index_dir, _ = indexed
    before = (catalog_rows(index_dir, "SELECT COUNT(*) FROM images"), sorted((index_dir / "uploads").rglob("*"))
              if (index_dir / "uploads").exists() else [])
    photo = real_photos[10].read_bytes()
    response = client.post("/v1/images", files=[("image", ("new.jpg", photo))], data=form, headers={"X-API-Key": KEY})
    assert response.status_code == 422 and reason in response.text, response.text
    after = (catalog_rows(index_dir, "SELECT COUNT(*) FROM images"), sorted((index_dir / "uploads").rglob("*"))
             if (index_dir / "uploads").exists() else [])
    assert after == before


def test_poisoned_catalog_rows_never_break_a_search_or_a_record(indexed, real_photos, collection, tmp_path):
    """Values an older version stored without checking read as absent; search, records, the CLI work."""
    index_dir = tmp_path / "poisoned"
    shutil.copytree(indexed[0], index_dir, ignore=shutil.ignore_patterns(".lock"))
    with sqlite3.connect(index_dir / "catalog.sqlite") as conn:
        conn.execute("UPDATE images SET lat = 'abc', lon = 'x', taken_at = '{\"y\": 1}', metadata = '[1, 2'"
                     " WHERE status = 'indexed'")
        conn.execute("UPDATE images SET lat = 95.0, lon = 8.0, metadata = '{\"name\": {\"a\": 1}}'"
                     " WHERE id = (SELECT MIN(id) FROM images WHERE status = 'indexed')")
    query = collection / real_photos[0].name
    with ServiceProcess({"NETVLAD_INDEX_DIR": index_dir, "NETVLAD_DEVICE": "cpu"}, log=tmp_path / "log") as server, \
            httpx.Client(base_url=server.url, timeout=120) as c:
        found = c.post("/v1/search", files=[("images", ("q.jpg", query.read_bytes()))], data={"top_k": 20})
        assert found.status_code == 200, found.text
        assert found.json()["location"] is None
        for result in found.json()["results"]:
            assert result["lat"] is None and result["taken_at"] is None
            record = c.get(f"/v1/images/{result['id']}")
            assert record.status_code == 200 and record.json()["metadata"] == {}
    cli = netvlad("search", query, "--index", index_dir, "--json")
    assert cli.returncode == 0 and "Traceback" not in cli.stderr, cli.stderr


# ------------------------------------------------------------------------------ 3. bounded memory


def test_concurrent_searches_with_large_pngs_keep_memory_bounded(server):
    """16 concurrent searches, each a 7000×7000 PNG of a few hundred kB (196 MB decoded): the
    decode budget and reduced decoding keep the peak under +500 MB, and the memory goes back."""
    burst = search_burst_memory(server, [large_png(7000)], clients=16)
    mib = 1 << 20
    assert burst["statuses"] == [200]
    assert burst["peak"] - burst["before"] < 500 * mib, burst
    assert burst["after"] - burst["before"] < 100 * mib, burst


# ------------------------------------------------------------------------------ 4. bodies refused before they are read


def raw_post(url: str, path: str, headers: dict, first: bytes) -> tuple[int, str]:
    """Send a request's headers and only the first bytes of its body; (status, body) of the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{head}\r\n".encode() + first)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < 10:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, answer.split(b"\r\n\r\n", 1)[1].decode(errors="replace")


def test_large_bodies_are_refused_from_their_headers(server, indexed):
    """A 300 MB add without a key gets its 401, and one with the key its 413, after the headers:
    the client sends 64 kB of the body and never more (a server that read the body would hang)."""
    multipart = {"Content-Type": "multipart/form-data; boundary=xyz", "Content-Length": str(300_000_000)}
    first = b"--xyz\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n\r\n" + b"\0" * 65536
    status, body = raw_post(server.url, "/v1/images", multipart, first)
    assert status == 401 and "API key" in body
    status, body = raw_post(server.url, "/v1/images", {**multipart, "X-API-Key": KEY}, first)
    assert status == 413 and "2,065,536 bytes" in body  # one photo (2 MB) and the form's room
    status, body = raw_post(server.url, "/v1/search", multipart, first)
    assert status == 413 and "4,000,000 bytes" in body
    # Streamed without a length: cut off at the limit.
    chunked = {"Content-Type": "multipart/form-data; boundary=xyz", "Transfer-Encoding": "chunked", "X-API-Key": KEY}
    pieces = [first] + [b"\0" * (1 << 20)] * 4
    stream = b"".join(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" for piece in pieces)
    status, body = raw_post(server.url, "/v1/images", chunked, stream)
    assert status == 413


# ------------------------------------------------------------------------------ 6. keys and status routes


@pytest.mark.parametrize("key", ["   ", "cl\u00e9-secr\u00e8te", "two words"])
def test_unusable_api_keys_stop_the_server_at_start_up(indexed, key):
    result = netvlad("serve", "--index", indexed[0], "--port", "1", env={"NETVLAD_API_KEY": key})
    one_line_error(result, "NETVLAD_API_KEY", "printable ASCII")
    assert key.strip() not in result.stderr or not key.strip()  # the key is never echoed


def test_status_routes_can_be_protected(indexed, tmp_path):
    env = {"NETVLAD_INDEX_DIR": indexed[0], "NETVLAD_API_KEY": KEY, "NETVLAD_DEVICE": "cpu",
           "NETVLAD_PROTECT_STATUS": "true", "NETVLAD_ALLOW_WRITES": "false"}
    with ServiceProcess(env, log=tmp_path / "log") as server, httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.get("/v1/info").status_code == 401 and c.get("/metrics").status_code == 401
        info = c.get("/v1/info", headers={"X-API-Key": KEY})
        assert info.status_code == 200 and info.json()["status_needs_key"]
        assert c.get("/metrics", headers={"X-API-Key": KEY}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
