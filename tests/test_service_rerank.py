"""Re-ranking through the REST API, on real uvicorn processes (one serving an index without local
features, one an index built with SIFT features and patch descriptors): the `rerank` and
`rerank_k` form fields, the methods `/v1/info` lists, the 409 for evidence an index lacks, α-QE on
any index, and the matched points of geometric verification and of patch matching in the pixels
the API promises."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from netvlad.index import Index
from server_process import ServiceProcess
from service_support import INDEXED, coordinates, small_index, small_model

MAX_RERANK_K = 100
#: The indexed photo the geometric tests query with a crop of (a textured one: a dragonfly on leaves).
CROPPED = 1
#: That crop, as fractions of the photo: left, top, right, bottom.
CROP = (0.15, 0.1, 0.85, 0.9)


def evidence_index(tmp_path_factory: pytest.TempPathFactory, photos: list[Path], name: str) -> Path:
    """An index of the first INDEXED photos (with `coordinates`) holding SIFT local features and
    patch descriptors, built like `small_index` with the run's small model (shared with the
    browser test)."""
    folder = tmp_path_factory.mktemp(name) / "index"
    with Index.create(folder, small_model(tmp_path_factory, photos), device="cpu", local_features="sift",
                      patch_features=True) as index:
        index.set_root(photos[0].parent)
        index.add(photos[:INDEXED], [coordinates(i) for i in range(INDEXED)])
        index.save()
    return folder


def cropped_photo(photo: Path, folder: Path, crop=CROP) -> tuple[Path, tuple[int, int, int, int]]:
    """A JPEG of the `crop` of `photo` (another view of the same place) and its box in the
    photo's pixels (left, top, right, bottom)."""
    with Image.open(photo) as image:
        image = image.convert("RGB")
        w, h = image.size
        box = (round(crop[0] * w), round(crop[1] * h), round(crop[2] * w), round(crop[3] * h))
        path = folder / f"crop-{photo.stem}.jpg"
        image.crop(box).save(path, quality=92)
    return path, box


def start(index_dir: Path, log_folder: Path) -> ServiceProcess:
    env = {"NETVLAD_INDEX_DIR": index_dir, "NETVLAD_DEVICE": "cpu", "NETVLAD_MAX_RERANK_K": MAX_RERANK_K}
    return ServiceProcess(env, log=log_folder / "server.log").start()


@pytest.fixture(scope="module")
def plain_index(tmp_path_factory, real_photos):
    return small_index(tmp_path_factory, real_photos, "rerank-plain")


@pytest.fixture(scope="module")
def plain(plain_index, tmp_path_factory):
    """A server of an index without local features."""
    process = start(plain_index, tmp_path_factory.mktemp("rerank-plain-log"))
    with httpx.Client(base_url=process.url, timeout=120) as client:
        yield client
    process.stop()


@pytest.fixture(scope="module")
def full(tmp_path_factory, real_photos):
    """A server of an index with SIFT local features and patch descriptors."""
    process = start(evidence_index(tmp_path_factory, real_photos, "rerank-evidence"),
                    tmp_path_factory.mktemp("rerank-evidence-log"))
    with httpx.Client(base_url=process.url, timeout=120) as client:
        yield client
    process.stop()


def search(client: httpx.Client, paths: list[Path], **data) -> httpx.Response:
    files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    return client.post("/v1/search", files=files, data=data)


# ------------------------------------------------------------------------------ what is served


def test_info_lists_the_methods_each_index_serves(plain, full):
    info = plain.get("/v1/info").json()
    assert info["rerank_methods"] == ["none", "aqe"]
    assert info["default_rerank_k"] == 50 and info["max_rerank_k"] == MAX_RERANK_K
    assert full.get("/v1/info").json()["rerank_methods"] == ["none", "geometric", "patch", "aqe"]
    schema = plain.get("/openapi.json").json()
    form = next(s for name, s in schema["components"]["schemas"].items() if name.startswith("Body_search"))
    assert set(form["properties"]["rerank"]["enum"]) == {"none", "geometric", "patch", "aqe"}


# ------------------------------------------------------------------------------ refusals


def test_an_unknown_method_is_422_before_any_photo_is_decoded(plain, real_photos, tmp_path):
    response = search(plain, [real_photos[1]], rerank="ransac")
    assert response.status_code == 422, response.text
    assert any("rerank" in error["loc"] for error in response.json()["detail"])
    # Not a photo at all: the field is refused first (a decode would answer 415).
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not a photo")
    assert search(plain, [junk], rerank="Geometric").status_code == 422


@pytest.mark.parametrize("rerank_k, status", [(0, 422), (MAX_RERANK_K + 1, 422), (MAX_RERANK_K, 200)])
def test_rerank_k_is_bounded(plain, real_photos, rerank_k, status):
    response = search(plain, [real_photos[1]], rerank="aqe", rerank_k=rerank_k, top_k=3)
    assert response.status_code == status, response.text
    if rerank_k > MAX_RERANK_K:
        assert response.json()["detail"] == f"rerank_k={rerank_k} is more than the limit of {MAX_RERANK_K}"


@pytest.mark.parametrize("method", ["geometric", "patch"])
def test_evidence_the_index_lacks_is_a_clear_409(plain, plain_index, real_photos, tmp_path, method):
    response = search(plain, [real_photos[1]], rerank=method)
    assert response.status_code == 409, response.text
    detail = response.json()["detail"]
    assert method in detail and "--" in detail  # names the method and the option that adds it
    if method == "geometric":
        assert "--local-features" in detail
    assert str(plain_index) not in detail and str(plain_index.resolve()) not in detail and "/tmp" not in detail
    # Refused before the photos are decoded: a file that is no photo gets the same answer.
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not a photo")
    assert search(plain, [junk], rerank=method).status_code == 409


# ------------------------------------------------------------------------------ re-ranked searches


def test_without_rerank_results_carry_no_evidence(plain, real_photos):
    body = search(plain, [real_photos[2]], top_k=3).json()
    assert body["rerank"] == "none" and body["rerank_ms"] == 0
    assert all(r["rerank"] is None for r in body["results"])
    first = body["results"][0]
    assert first["id"] == 3 and (first["width"], first["height"]) == Image.open(real_photos[2]).size


@pytest.mark.parametrize("server", ["plain", "full"])
def test_query_expansion_works_on_any_index(request, server, real_photos):
    client = request.getfixturevalue(server)
    response = search(client, [real_photos[4]], rerank="aqe", top_k=5)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["rerank"] == "aqe" and body["rerank_ms"] >= 0 and body["took_ms"] >= body["rerank_ms"]
    results = body["results"]
    assert len(results) == 5 and results[0]["id"] == 5  # the photo itself stays first
    assert [r["rank"] for r in results] == [1, 2, 3, 4, 5]
    evidence = [r["rerank"] for r in results if r["rerank"] is not None]
    assert evidence and all(e["method"] == "aqe" and e["points"] == [] for e in evidence)


def reranked_crop(client: httpx.Client, method: str, photo: Path, folder: Path) -> tuple[dict, tuple]:
    """Search with a crop of `photo`, every indexed photo re-ranked by `method` → (the response
    body, the crop's box in the photo)."""
    query, box = cropped_photo(photo, folder)
    response = search(client, [query], rerank=method, top_k=5, rerank_k=INDEXED)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["rerank"] == method and body["rerank_ms"] > 0
    return body, box


def mapping_error(evidence: dict, box: tuple) -> np.ndarray:
    """Pixel distances between the result-side matched points and where the crop `box` maps their
    query-side points (x_c = left + x_q · crop width / query width), after checking that the
    points are in the query as searched: the crop shrunk to the evidence's long side of 640 px
    (the network's input is smaller, 256 px)."""
    left, top, right, bottom = box
    qw, qh = evidence["query_size"]
    assert max(qw, qh) == 640 and abs(qw / qh - (right - left) / (bottom - top)) < 0.02
    points = np.array(evidence["points"], dtype=float)
    assert points.ndim == 2 and points.shape[1] == 4 and len(points) >= 10
    assert (points[:, 0] >= 0).all() and (points[:, 0] <= qw).all() and (points[:, 1] <= qh).all()
    expected = np.stack([left + points[:, 0] * (right - left) / qw, top + points[:, 1] * (bottom - top) / qh], axis=1)
    return np.linalg.norm(points[:, 2:] - expected, axis=1)


def test_geometric_verification_returns_matched_points_in_the_promised_pixels(full, real_photos, tmp_path):
    photo = real_photos[CROPPED]
    body, box = reranked_crop(full, "geometric", photo, tmp_path)
    first = body["results"][0]
    assert first["id"] == CROPPED + 1 and first["path"] == photo.name
    evidence = first["rerank"]
    assert evidence["method"] == "geometric" and evidence["verified"] and evidence["query"] == 0
    assert evidence["score"] >= 10 and evidence["model"]
    error = mapping_error(evidence, box)
    width, height = first["width"], first["height"]
    assert (width, height) == Image.open(photo).size
    assert np.median(error) < 0.01 * max(width, height), f"median error {np.median(error):.1f} px"
    # Results the verification could not support keep the global order after the verified ones.
    verified = [r["rerank"]["verified"] for r in body["results"]]
    assert verified == sorted(verified, reverse=True)


def test_patch_matching_returns_patch_centres_in_the_promised_pixels(full, real_photos, tmp_path):
    body, box = reranked_crop(full, "patch", real_photos[CROPPED], tmp_path)
    first = body["results"][0]
    assert first["id"] == CROPPED + 1
    evidence = first["rerank"]
    assert evidence["method"] == "patch" and evidence["query"] == 0 and evidence["model"] is None
    scores = [r["rerank"]["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0  # shortlist-relative: above its mean
    # Patch centres map onto the full-size photo through the crop to within a few feature-map
    # cells (a cell is 1/40 of the long side; RANSAC keeps matches within 1.5 cells).
    error = mapping_error(evidence, box)
    width, height = first["width"], first["height"]
    assert np.median(error) < 0.05 * max(width, height), f"median error {np.median(error):.1f} px"
