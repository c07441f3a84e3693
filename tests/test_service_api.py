"""The REST API through a real uvicorn process on a free loopback port (one server per module):
every endpoint, auth, limits, micro-batching, and persistence across a crash and a restart."""

from __future__ import annotations

import hashlib
import io
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from netvlad.index import Index
from server_process import ServiceProcess
from service_support import INDEXED, coordinates, small_index

KEY = "test-key-123"
MAX_UPLOAD = 1_500_000
MAX_PIXELS = 4_000_000
MAX_IMAGES = 4
MAX_TOP_K = 20


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, real_photos):
    return small_index(tmp_path_factory, real_photos, "api")


@pytest.fixture(scope="module")
def server_env(index_dir):
    return {
        "NETVLAD_INDEX_DIR": index_dir, "NETVLAD_API_KEY": KEY, "NETVLAD_DEVICE": "cpu",
        "NETVLAD_MAX_UPLOAD_BYTES": MAX_UPLOAD, "NETVLAD_MAX_PIXELS": MAX_PIXELS,
        "NETVLAD_MAX_QUERY_IMAGES": MAX_IMAGES, "NETVLAD_MAX_TOP_K": MAX_TOP_K,
        "NETVLAD_MAX_REQUEST_BYTES": MAX_UPLOAD * MAX_IMAGES,
        "NETVLAD_MICRO_BATCHING": "true",  # off by default on CPU
    }


@pytest.fixture(scope="module")
def server(server_env, tmp_path_factory):
    process = ServiceProcess(server_env, log=tmp_path_factory.mktemp("api-log") / "server.log").start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def spare_photos(real_photos):
    """Photos not in the index (for adding)."""
    spare = real_photos[INDEXED:]
    assert len(spare) >= 2, "need at least two photos beyond the indexed ones"
    return spare


def photo_part(path, field="images"):
    return (field, (path.name, path.read_bytes(), "image/jpeg"))


def search(client, paths, **data):
    return client.post("/v1/search", files=[photo_part(p) for p in paths], data=data)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------ status endpoints


def test_health_ready_info_docs_and_page(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] is True and ready["images"] >= INDEXED
    info = client.get("/v1/info").json()
    assert info["dim"] == 16 * 256 and info["writes_need_key"] and not info["reads_need_key"]
    assert info["max_upload_bytes"] == MAX_UPLOAD and info["fusion_modes"][0] == "softmedian"
    assert info["device"] == "cpu" and info["micro_batching"] is True
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/search", "/v1/images", "/v1/images/{image_id}", "/v1/images/{image_id}/file"} <= set(paths)
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    # Works offline: every asset is served by the app itself.
    for text in (page.text, client.get("/static/app.js").text, client.get("/static/style.css").text):
        assert not re.search(r"""(src|href|url)\s*[=(]\s*["']?(https?:)?//""", text)


# ------------------------------------------------------------------------------ search


def test_search_ranks_the_photo_itself_first_and_matches_in_process(client, real_photos, index_dir):
    query = real_photos[3]
    response = search(client, [query], top_k=5)
    assert response.status_code == 200, response.text
    body = response.json()
    results = body["results"]
    assert [r["rank"] for r in results] == [1, 2, 3, 4, 5]
    assert results[0]["id"] == 4 and results[0]["score"] > 0.999
    assert results[0]["path"].endswith(query.name)
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    # The same search in this process (same model, same index) gives the same ids and scores.
    with Index.open(index_dir, device="cpu") as index:
        expected = index.search([query.read_bytes()], k=5)
    assert [r["id"] for r in results] == [h.id for h in expected.hits]
    np.testing.assert_allclose(scores, [h.score for h in expected.hits], atol=1e-4)
    # The location estimate is the top hit's position: it outweighs the others by far.
    assert body["location"]["lat"] == pytest.approx(coordinates(3)["lat"], abs=1e-4)
    assert body["location"]["lon"] == pytest.approx(coordinates(3)["lon"], abs=1e-4)
    # And its file is served byte for byte.
    file = client.get(results[0]["file_url"])
    assert file.status_code == 200 and file.headers["content-type"] == "image/jpeg"
    assert hashlib.sha256(file.content).hexdigest() == hashlib.sha256(query.read_bytes()).hexdigest()


def test_several_query_photos_are_fused(client, real_photos):
    body = search(client, [real_photos[2], real_photos[2], real_photos[5]], top_k=3).json()
    assert body["queries"] == 3 and body["fusion"] == "softmedian"
    top = body["results"][0]
    # Two of three photos show image 3: the soft median of its similarities (1, 1, s) is ≈ 1.
    assert top["id"] == 3 and top["score"] > 0.99
    assert top["query_scores"][0] == pytest.approx(1.0, abs=1e-3)
    mean = search(client, [real_photos[2], real_photos[2], real_photos[5]], top_k=3, fusion="mean").json()
    expected_mean = np.mean(mean["results"][0]["query_scores"])
    assert mean["results"][0]["score"] == pytest.approx(expected_mean, abs=1e-6)


def test_concurrent_searches_share_forward_passes_and_agree(client, server, real_photos):
    def passes() -> float:
        text = client.get("/metrics").text
        return float(re.search(r"^netvlad_batch_photos_count (\S+)$", text, re.M).group(1))

    queries = [real_photos[i % INDEXED] for i in range(12)]
    alone = {p.name: search(client, [p], top_k=3).json()["results"] for p in queries[:INDEXED]}
    before = passes()
    with ThreadPoolExecutor(len(queries)) as pool:
        together = list(pool.map(lambda p: search(client, [p], top_k=3), queries))
    assert all(r.status_code == 200 for r in together)
    assert passes() - before < len(queries), "no two concurrent searches shared a forward pass"
    for path, response in zip(queries, together):
        got, want = response.json()["results"], alone[path.name]
        assert [r["id"] for r in got] == [r["id"] for r in want]
        np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in want], atol=1e-4)


@pytest.mark.parametrize(
    ("data", "count", "status", "message"),
    [
        ({"top_k": 0}, 1, 422, "top_k"),
        ({"top_k": MAX_TOP_K + 1}, 1, 422, f"limit of {MAX_TOP_K}"),
        ({"fusion": "vote"}, 1, 422, "fusion"),
        ({}, MAX_IMAGES + 1, 422, f"at most {MAX_IMAGES}"),
        ({}, 0, 422, "images"),
    ],
)
def test_search_parameters_are_checked(client, real_photos, data, count, status, message):
    response = search(client, [real_photos[0]] * count, **data)
    assert response.status_code == status
    assert message in str(response.json()["detail"])


# ------------------------------------------------------------------------------ bad uploads


def test_bad_uploads_get_4xx_with_the_reason(client, real_photos):
    def post(name, data):
        return client.post("/v1/search", files=[("images", (name, data, "image/jpeg"))])

    jpeg = real_photos[0].read_bytes()
    cases = {
        "text": (post("notes.jpg", b"this is not an image at all"), 415, "not an image"),
        "empty": (post("empty.jpg", b""), 422, "empty"),
        "truncated": (post("cut.jpg", jpeg[: len(jpeg) // 3]), 422, "truncated"),
        "oversized": (post("big.jpg", jpeg + b"\0" * MAX_UPLOAD), 413, f"{MAX_UPLOAD:,} bytes"),
        "too many pixels": (post("wide.png", png_bytes(Image.new("L", (4000, 1001)))), 413, f"{MAX_PIXELS:,} pixels"),
        # 20 000 × 20 000 one-bit pixels: a 50 kB PNG that would decode to 400 megapixels.
        "bomb": (post("bomb.png", png_bytes(Image.new("1", (20_000, 20_000)))), 413, "pixels"),
    }
    for case, (response, status, reason) in cases.items():
        assert response.status_code == status, (case, response.text)
        assert reason in response.json()["detail"], (case, response.text)
    body = b"x" * (MAX_UPLOAD * MAX_IMAGES + 100_000)
    response = client.post("/v1/search", content=body, headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413 and "limit" in response.json()["detail"]


def test_unknown_and_invalid_ids(client):
    for path in ("/v1/images/999999", "/v1/images/999999/file"):
        response = client.get(path)
        assert response.status_code == 404 and "999999" in response.json()["detail"]
    assert client.delete("/v1/images/999999", headers={"X-API-Key": KEY}).status_code == 404
    for bad in ("0", "-3", "abc", str(2**70)):
        assert client.get(f"/v1/images/{bad}").status_code == 422


# ------------------------------------------------------------------------------ writes and auth


def test_writes_need_the_key_reads_do_not(client, spare_photos):
    photo = photo_part(spare_photos[0], "image")
    assert client.post("/v1/images", files=[photo]).status_code == 401
    wrong = client.post("/v1/images", files=[photo], headers={"X-API-Key": "nope"})
    assert wrong.status_code == 401 and wrong.json()["detail"] == "wrong API key"
    assert client.delete("/v1/images/1").status_code == 401
    assert client.get("/v1/images/1").status_code == 200  # reads stay open


def test_add_get_search_delete(client, spare_photos):
    photo = spare_photos[0]
    response = client.post(
        "/v1/images", files=[photo_part(photo, "image")], headers={"X-API-Key": KEY},
        data={"name": "new place", "lat": "46.5", "lon": "7.25", "metadata": '{"source": "test"}'},
    )
    assert response.status_code == 201, response.text
    record = response.json()
    assert response.headers["location"] == f"/v1/images/{record['id']}"
    assert record["status"] == "indexed" and record["name"] == "new place"
    assert (record["lat"], record["lon"]) == (46.5, 7.25) and record["metadata"]["source"] == "test"
    assert record["sha256"] == hashlib.sha256(photo.read_bytes()).hexdigest()
    assert client.get(f"/v1/images/{record['id']}").json() == record
    top = search(client, [photo], top_k=1).json()["results"][0]
    assert top["id"] == record["id"] and top["name"] == "new place"
    assert client.get(record["file_url"]).content == photo.read_bytes()

    assert client.delete(f"/v1/images/{record['id']}", headers={"X-API-Key": KEY}).status_code == 204
    assert client.get(f"/v1/images/{record['id']}").status_code == 404
    assert client.get(record["file_url"]).status_code == 404
    assert record["id"] not in [r["id"] for r in search(client, [photo], top_k=5).json()["results"]]
    assert client.delete(f"/v1/images/{record['id']}", headers={"X-API-Key": KEY}).status_code == 404


def test_add_checks_metadata_and_image(client, spare_photos):
    headers = {"X-API-Key": KEY}
    photo = photo_part(spare_photos[1], "image")
    for data, reason in (({"lat": "91", "lon": "0"}, "lat"), ({"lat": "45"}, "both lat and lon"),
                         ({"metadata": "[1, 2]"}, "JSON object"), ({"metadata": "{oops"}, "not valid JSON")):
        response = client.post("/v1/images", files=[photo], data=data, headers=headers)
        assert response.status_code == 422 and reason in str(response.json()["detail"]), response.text
    bad = client.post("/v1/images", files=[("image", ("x.jpg", b"GIF89a-broken", "image/gif"))], headers=headers)
    assert bad.status_code in (415, 422)
    assert client.get("/readyz").json()["images"] == INDEXED  # nothing half-added


def test_metrics_count_requests_and_no_server_errors(client):
    text = client.get("/metrics").text
    searches = re.search(r'netvlad_http_requests_total\{method="POST",route="/v1/search",status="200"\} (\S+)', text)
    assert searches and float(searches.group(1)) >= 5
    assert re.search(r'netvlad_http_request_seconds_bucket\{le="0.5",method="POST",route="/v1/search"\}', text)
    assert float(re.search(r"^netvlad_index_images (\S+)$", text, re.M).group(1)) == INDEXED
    assert not re.search(r'status="5\d\d"', text), "a request got a 5xx"


# ------------------------------------------------------------------------------ persistence


def test_an_added_photo_survives_a_crash_and_a_restart(server, server_env, spare_photos, tmp_path):
    photo = spare_photos[1]
    with httpx.Client(base_url=server.url, timeout=60) as c:
        response = c.post("/v1/images", files=[photo_part(photo, "image")], data={"name": "durable"},
                          headers={"X-API-Key": KEY})
        assert response.status_code == 201
        image_id = response.json()["id"]
    server.kill()  # SIGKILL right after the 201: no shutdown code runs
    for restart in ("after the crash", "after a clean stop"):
        with ServiceProcess(server_env, log=tmp_path / "restart.log") as again, \
                httpx.Client(base_url=again.url, timeout=60) as c:
            assert c.get(f"/v1/images/{image_id}").json()["name"] == "durable", restart
            assert c.get("/readyz").json()["images"] == INDEXED + 1, restart
            top = search(c, [photo], top_k=1).json()["results"][0]
            assert top["id"] == image_id and top["score"] > 0.999, restart


def test_protected_reads_and_read_only_mode(server_env, real_photos, tmp_path):
    env = {**server_env, "NETVLAD_PROTECT_READS": "true", "NETVLAD_ALLOW_WRITES": "false"}
    with ServiceProcess(env, log=tmp_path / "protected.log") as protected, \
            httpx.Client(base_url=protected.url, timeout=60) as c:
        info = c.get("/v1/info").json()
        assert info["reads_need_key"] and not info["writes_allowed"]
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert search(c, [real_photos[0]]).status_code == 401
        assert c.get("/v1/images/1").status_code == 401
        assert c.get("/v1/images/1", headers={"X-API-Key": KEY}).status_code == 200
        found = c.post("/v1/search", files=[photo_part(real_photos[0])], headers={"X-API-Key": KEY})
        assert found.status_code == 200 and found.json()["results"][0]["id"] == 1
        refused = c.post("/v1/images", files=[photo_part(real_photos[0], "image")], headers={"X-API-Key": KEY})
        assert refused.status_code == 403 and "read-only" in refused.json()["detail"]
