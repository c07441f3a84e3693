"""Geometric verification (netvlad.rerank.localfeatures, .geometric) on real photos warped by known
homographies, the re-ranking rule, and the evidence store (netvlad.rerank.evidence)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from netvlad.errors import IndexStoreError
from netvlad.rerank.evidence import FILE_NAME, EvidenceStore
from netvlad.rerank.geometric import (MIN_INLIERS, Verification, geometric_rerank, mutual_nearest_neighbours, reorder,
                                      verify_pair)
from netvlad.rerank.localfeatures import DESCRIPTOR_BYTES, LocalFeatures, extract_local_features, rootsift

KINDS = ("sift", "orb")
PHOTO = "sklearn-china.jpg"  # 640×427: analysed at max_side=480, so points map back by 1/0.75
OTHERS = ("skimage-coffee.jpg", "skimage-astronaut.jpg", "skimage-rocket.jpg")
MAX_SIDE = 480
BITS_SET = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1, dtype=np.uint8)  # popcount of each byte


def load(real_photos: list[Path], name: str) -> np.ndarray:
    by_name = {p.name: p for p in real_photos}
    with Image.open(by_name[name]) as image:
        return np.asarray(image.convert("RGB"))


def known_warp(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`image` warped by a fixed perspective homography H (3×3, original pixels → warped pixels)."""
    h, w = image.shape[:2]
    corners = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    moved = (corners + np.float32([[0.06, 0.04], [-0.08, 0.07], [-0.05, -0.06], [0.07, -0.03]]) * [w, h])
    homography = cv2.getPerspectiveTransform(corners, moved.astype(np.float32))
    return cv2.warpPerspective(image, homography, (w, h)), homography


def shuffled_blocks(image: np.ndarray, block: int = 32, seed: int = 0) -> np.ndarray:
    """A texture twin of `image`: its 32-pixel blocks in a random order (same local features,
    no consistent geometry)."""
    h, w = image.shape[0] // block * block, image.shape[1] // block * block
    tiles = image[:h, :w].reshape(h // block, block, w // block, block, 3).swapaxes(1, 2).reshape(-1, block, block, 3)
    tiles = tiles[np.random.default_rng(seed).permutation(len(tiles))]
    return np.ascontiguousarray(tiles.reshape(h // block, w // block, block, block, 3).swapaxes(1, 2).reshape(h, w, 3))


def distances(a: np.ndarray, b: np.ndarray, kind: str) -> np.ndarray:
    """Brute-force distances (len(a), len(b)): squared L2 for RootSIFT, Hamming for ORB."""
    if kind == "sift":
        return (a ** 2).sum(1)[:, None] - 2 * a.astype(np.float64) @ b.T + (b ** 2).sum(1)[None]
    return BITS_SET[a[:, None] ^ b[None]].sum(-1, dtype=np.int32)


def transfer_error(points: np.ndarray, homography: np.ndarray) -> np.ndarray:
    """Pixel distance between H·(x_q, y_q) and (x_c, y_c) for each row of `points` (m, 4)."""
    projected = cv2.perspectiveTransform(points[:, None, :2].astype(np.float64), homography)[:, 0]
    return np.linalg.norm(projected - points[:, 2:], axis=1)


@pytest.fixture(scope="module")
def scene(real_photos):
    """The photo, its known warp and H, and unrelated photos."""
    photo = load(real_photos, PHOTO)
    warped, homography = known_warp(photo)
    return {"photo": photo, "warped": warped, "H": homography, "others": [load(real_photos, n) for n in OTHERS]}


@pytest.fixture(scope="module", params=KINDS)
def features(request, scene):
    kind = request.param
    extract = lambda image: extract_local_features(image, kind, max_side=MAX_SIDE)  # noqa: E731
    return {"kind": kind, "photo": extract(scene["photo"]), "warped": extract(scene["warped"]),
            "others": [extract(o) for o in scene["others"]]}


def test_mutual_nearest_neighbours_are_mutual_and_mostly_right(features, scene):
    photo, warped = features["photo"], features["warped"]
    pairs = mutual_nearest_neighbours(photo.matchable, warped.matchable, features["kind"])
    assert pairs.dtype == np.int64 and pairs.shape[1] == 2 and len(pairs) >= 200
    a, b, some = photo.matchable, warped.matchable, pairs[::4]
    assert (distances(a[some[:, 0]], b, features["kind"]).argmin(1) == some[:, 1]).all()
    assert (distances(a, b[some[:, 1]], features["kind"]).argmin(0) == some[:, 0]).all()
    points = np.concatenate([photo.to_original(photo.keypoints[pairs[:, 0]]),
                             warped.to_original(warped.keypoints[pairs[:, 1]])], axis=1)
    assert (transfer_error(points, scene["H"]) < 4).mean() > 0.7
    ratio_pairs = mutual_nearest_neighbours(photo.matchable, warped.matchable, features["kind"], ratio=0.8)
    assert 0 < len(ratio_pairs) < len(pairs) and set(map(tuple, ratio_pairs)) <= set(map(tuple, pairs))


def test_ransac_recovers_the_known_homography(features, scene):
    photo, warped = features["photo"], features["warped"]
    assert photo.scale == pytest.approx(0.75)
    result = verify_pair(photo, warped)
    assert result.model == "homography" and result.inliers >= 200 and result.matches >= result.inliers
    assert result.points.shape == (result.inliers, 4) and result.points.dtype == np.float32
    errors = transfer_error(result.points, scene["H"])  # in original pixels
    assert np.median(errors) < 1.5 and np.percentile(errors, 95) < 4.0


def test_ransac_rejects_wrong_matches(features, scene):
    photo, warped = features["photo"], features["warped"]
    clean = verify_pair(photo, warped).inliers
    moved = np.random.default_rng(0).permutation(len(warped))[: len(warped) * 2 // 5]
    keypoints = warped.keypoints.copy()
    keypoints[moved] = keypoints[np.random.default_rng(1).permutation(moved)]  # 40 % of matches now wrong
    corrupted = verify_pair(photo, LocalFeatures(warped.kind, keypoints, warped.descriptors, warped.size,
                                                 warped.scale))
    assert 0.4 * clean < corrupted.inliers < 0.75 * clean
    assert np.percentile(transfer_error(corrupted.points, scene["H"]), 99) < 4.0


def test_unrelated_photos_give_few_inliers(features):
    for other in features["others"]:
        result = verify_pair(features["warped"], other)
        assert not result.passes(), (features["kind"], result.inliers, result.matches, result.model)


def test_fundamental_matrix_wins_on_a_3d_scene(real_photos):
    left, right = (extract_local_features(load(real_photos, f"skimage-motorcycle_{side}.jpg"), "sift")
                   for side in ("left", "right"))
    both, plane_only = verify_pair(left, right), verify_pair(left, right, fundamental=False)
    assert plane_only.model == "homography" and both.model == "fundamental"
    assert both.inliers >= 1.5 * plane_only.inliers >= 1.5 * MIN_INLIERS


def test_rerank_lifts_the_true_match_above_a_texture_twin(features, scene):
    kind = features["kind"]
    h, w = scene["warped"].shape[:2]
    query = extract_local_features(scene["warped"][h // 10: -h // 10, w // 10: -w // 10], kind, max_side=MAX_SIDE)
    twin = extract_local_features(shuffled_blocks(scene["photo"]), kind, max_side=MAX_SIDE)
    assert len(mutual_nearest_neighbours(query.matchable, twin.matchable, kind)) >= 150  # shares the texture
    shortlist = [(7, twin), (3, features["photo"]), (9, None), (5, features["others"][0])]
    hits = geometric_rerank(query, shortlist)
    assert [h.id for h in hits] == [3, 7, 9, 5]
    assert [h.global_rank for h in hits] == [1, 0, 2, 3]
    assert hits[0].verification.inliers >= 100 and hits[1].verified_inliers < MIN_INLIERS
    assert hits[2].verification is None


def _verification(inliers: int, matches: int) -> Verification:
    return Verification(inliers, "homography", matches, np.zeros((inliers, 4), np.float32))


def test_reorder_rule():
    counts = [None, (20, 80), (3, 30), (20, 40), (50, 60), None, (15, 100), (14, 100), (9, 18), (8, 10), (12, 25)]
    verifications = [None if c is None else _verification(*c) for c in counts]
    # ≥ 15 inliers, or ≥ 9 that are ≥ half the matches (9/18 yes; 8/10 too few; 12/25 under half)
    assert reorder(verifications, min_inliers=15) == [4, 1, 3, 6, 8, 0, 2, 5, 7, 9, 10]
    assert reorder([None, _verification(3, 3), _verification(0, 0)], min_inliers=15) == [0, 1, 2]
    assert reorder([], min_inliers=15) == []


def test_a_query_photo_that_verifies_beats_one_with_more_unverified_inliers():
    consistent, scattered = _verification(10, 12), _verification(12, 60)
    assert consistent.passes() and not scattered.passes()
    assert consistent.strength() > scattered.strength()


def test_time_budget_spent_keeps_the_global_order(features):
    shortlist = [(i, features["others"][i % 3]) for i in range(6)] + [(6, features["warped"])]
    hits = geometric_rerank(features["photo"], shortlist, time_budget_s=0.0, threads=2)
    assert [h.id for h in hits] == list(range(7)) and all(h.verification is None for h in hits)


def test_bytes_round_trip_and_size(features):
    kind = features["kind"]
    for original in (features["photo"], features["photo"].top(10)):
        data = original.to_bytes()
        assert len(data) == 32 + len(original) * (8 + DESCRIPTOR_BYTES[kind])
        restored = LocalFeatures.from_bytes(data)
        assert (restored.kind, restored.size, restored.scale) == (kind, original.size, original.scale)
        np.testing.assert_array_equal(restored.keypoints, original.keypoints)
        np.testing.assert_array_equal(restored.descriptors, original.descriptors)
    assert len(features["photo"].to_bytes()) <= 32 + 1000 * (8 + DESCRIPTOR_BYTES[kind])
    data = features["photo"].to_bytes()
    for broken in (data[:20], data[:-1], b"XXXX" + data[4:], data[:4] + b"\x09" + data[5:]):
        with pytest.raises(IndexStoreError):
            LocalFeatures.from_bytes(broken)


def test_extraction_limits_and_rootsift(scene):
    few = extract_local_features(Image.fromarray(scene["photo"]), "sift", max_keypoints=50)
    assert len(few) == 50 and few.size == (640, 427) and few.scale == 1.0
    np.testing.assert_allclose(np.linalg.norm(rootsift(few.descriptors), axis=1), 1.0, rtol=1e-5)
    flat = extract_local_features(np.full((100, 120), 128, np.uint8), "orb")
    assert len(flat) == 0 and LocalFeatures.from_bytes(flat.to_bytes()).size == (120, 100)
    assert verify_pair(flat, flat).model == "none"
    with pytest.raises(ValueError, match="unknown local feature kind"):
        extract_local_features(scene["photo"], "surf")
    with pytest.raises(ValueError, match="uint8"):
        extract_local_features(scene["photo"].astype(np.float32), "sift")


def test_evidence_store_put_get_delete_prune(tmp_path):
    store = EvidenceStore(tmp_path)
    store.put("sift", {1: b"a1", 2: b"a2", 3: b"a3"})
    store.put("orb", {2: b"o2", 4: b"o4"})
    store.put("sift", {2: b"new"})  # upsert: replaces, never duplicates
    assert store.get("sift", [1, 2, 5]) == {1: b"a1", 2: b"new"}
    assert (store.kinds(), store.count("sift"), store.count("orb")) == (["orb", "sift"], 3, 2)
    assert store.bytes_per_photo("sift") == pytest.approx((2 + 3 + 2) / 3) and store.bytes_per_photo("patch") == 0.0
    assert store.delete([2]) == 2 and store.get("orb", [2, 4]) == {4: b"o4"}
    assert store.prune_orphans([1, 2]) == 2  # 3 (sift) and 4 (orb) were never indexed
    assert store.ids().tolist() == [1] and store.ids("orb").tolist() == []
    store.set_settings("sift", {"max_keypoints": 1000, "max_side": 640})
    assert store.settings("sift") == {"max_keypoints": 1000, "max_side": 640} and store.settings("orb") is None
    many = {i: i.to_bytes(4, "little") for i in range(2500)}  # more ids than one IN (…) query takes
    store.put("patch", many)
    assert store.get("patch", range(2500)) == many
    assert store.prune_orphans(range(0, 2500, 2)) == 1251  # the odd ids of "patch", and 1 of "sift"
    assert store.count("patch") == 1250 and store.kinds() == ["patch"]
    store.close()
    assert EvidenceStore(tmp_path).get("patch", [2, 3]) == {2: many[2]}


def test_evidence_store_failed_put_writes_nothing(tmp_path):
    store = EvidenceStore(tmp_path)
    with pytest.raises(sqlite3.Error):
        store.put("sift", {1: b"ok", 2: None})  # NOT NULL fails on the second row
    assert store.count("sift") == 0


def test_evidence_store_concurrent_reads_and_readonly(tmp_path):
    with pytest.raises(IndexStoreError, match="no local evidence"):
        EvidenceStore(tmp_path, readonly=True)
    assert not EvidenceStore.exists(tmp_path)
    writer = EvidenceStore(tmp_path)
    blobs = {i: bytes([i % 256]) * 1000 for i in range(300)}
    writer.put("sift", blobs)
    reader = EvidenceStore(tmp_path, readonly=True)
    assert EvidenceStore.exists(tmp_path) and (tmp_path / FILE_NAME).is_file()
    errors: list[BaseException] = []

    def read(offset: int) -> None:
        try:
            for start in range(offset, 300, 50):
                ids = range(start, min(start + 50, 300))
                assert reader.get("sift", ids) == {i: blobs[i] for i in ids}
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    writer.put("orb", {1: b"x"})  # a write while they read
    for thread in threads:
        thread.join()
    assert errors == [] and reader.count("orb") == 1
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.put("sift", {1: b"y"})
    reader.close()
    writer.close()
