"""Patch-NetVLAD-style re-ranking: integral-sum patch vectors against per-patch pooling, PCA and
byte round trips, and patch matching on real photos and synthetic layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import netvlad
from netvlad.imageio import load_image
from netvlad.rerank.patch import (
    DEFAULT_MAX_PATCHES, DEFAULT_SIDE, DEFAULT_SIZES, QUERY_STRIDE, SIZE_WEIGHTS, PatchFeatures, PatchLevel, PatchPCA,
    _weights, extract_patch_features, fit_patch_pca, patch_inliers, patch_positions, patch_rerank, patch_score,
    patch_vlad_from_features, training_patches,
)


@pytest.fixture(scope="module")
def model():
    return netvlad.load_model("default")


DIM = 96


@pytest.fixture(scope="module")
def photos(real_photos, tmp_path_factory):
    """Six real photos, shrunk to a 480-px long side (fast to decode)."""
    folder = tmp_path_factory.mktemp("patch-photos")
    for path in real_photos[:6]:
        image = load_image(path, reduce_to=480)
        image.thumbnail((480, 480))
        image.save(folder / path.name, quality=95)
    return [folder / path.name for path in real_photos[:6]]


@pytest.fixture(scope="module")
def pca(model, photos):
    return fit_patch_pca(training_patches(model, photos, per_image=64), dim=DIM)


@pytest.fixture(scope="module")
def database(model, pca, photos):
    """The photos' stored patch features (at most `DEFAULT_MAX_PATCHES` of each size)."""
    return extract_patch_features(model, photos, pca)


def test_integral_patches_equal_pooling_each_crop(model):
    pool = model.pool.double()
    try:
        torch.manual_seed(0)
        features = torch.nn.functional.normalize(torch.randn(2, pool.dim, 7, 9, dtype=torch.float64), dim=1)
        sizes, stride = (2, 3, 5), 2
        fast = patch_vlad_from_features(pool, features, sizes, stride)
        for s, grid in zip(sizes, fast):
            gh, gw = (7 - s) // stride + 1, (9 - s) // stride + 1
            assert grid.shape == (2, gh, gw, pool.output_dim)
            slow = torch.stack([torch.stack([
                pool(features[:, :, i * stride : i * stride + s, j * stride : j * stride + s])
                for j in range(gw)], dim=1) for i in range(gh)], dim=1)
            torch.testing.assert_close(grid, slow, atol=1e-9, rtol=1e-7)
        assert patch_vlad_from_features(pool, features, (8,))[0].shape == (2, 0, 0, pool.output_dim)
        # a thinned sub-grid (what a stored photo keeps): only its patches are computed, the same
        # vectors, whether its rows and columns are evenly spaced (s = 3) or not (s = 2)
        for s, even in ((2, False), (3, True)):
            rows, cols = patch_positions(7, 9, s, 1, max_patches=12)
            assert len(rows) * len(cols) <= 12 and rows[0] == cols[0] == 0 and rows[-1] == 7 - s and cols[-1] == 9 - s
            assert even == (len(set(np.diff(rows))) == len(set(np.diff(cols))) == 1)
            thin = patch_vlad_from_features(pool, features, (s,), max_patches=12)[0]
            slow = torch.stack([torch.stack([pool(features[:, :, y : y + s, x : x + s]) for x in cols], dim=1)
                                for y in rows], dim=1)
            torch.testing.assert_close(thin, slow, atol=1e-9, rtol=1e-7)
    finally:
        model.pool.float()


def test_patch_counts_per_size_and_centres(model, pca, photos, database):
    dense, capped = extract_patch_features(model, photos[:1], pca, max_patches=None)[0], database[0]
    with Image.open(photos[0]) as image:
        width, height = image.size
    assert dense.image_size == (width, height)
    # the patch pass runs at a 640-px long side → a 40×h feature map: (40 − s + 1) columns of s×s patches
    assert DEFAULT_SIDE == 640 and DEFAULT_SIZES == (2, 5, 8)
    assert [level.grid[1] for level in dense.levels] == [39, 36, 33]
    assert dense.cell == pytest.approx(width / 40)
    # side=None: the model's own input size (a 320-px long side for the shipped model, 20 columns)
    own = extract_patch_features(model, photos[:1], pca, max_patches=None, side=None)[0]
    assert model.preprocess.max_side == 320 and [level.grid[1] for level in own.levels] == [19, 16, 13]
    assert own.cell == pytest.approx(width / 20)
    # a query's stride of 2 cells: every other patch of the dense grid, same vectors
    strided = extract_patch_features(model, photos[:1], pca, max_patches=None, stride=QUERY_STRIDE)[0]
    assert QUERY_STRIDE == 2 and strided.cell == dense.cell
    for full, every_other in zip(dense.levels, strided.levels):
        rows, cols = full.grid
        assert every_other.grid == ((rows + 1) // 2, (cols + 1) // 2)
        keep = (np.arange(0, rows, 2)[:, None] * cols + np.arange(0, cols, 2)[None, :]).ravel()
        np.testing.assert_allclose(every_other.centres, full.centres[keep], rtol=1e-5)
        np.testing.assert_allclose(every_other.descriptors.astype(np.float32),
                                   full.descriptors[keep].astype(np.float32), atol=2e-3)
    for full, kept in zip(dense.levels, capped.levels):
        assert len(full.descriptors) == full.grid[0] * full.grid[1]
        assert len(kept.descriptors) == kept.grid[0] * kept.grid[1] <= DEFAULT_MAX_PATCHES < len(full.descriptors)
        assert kept.descriptors.dtype == np.float16 and kept.descriptors.shape[1] == DIM
        np.testing.assert_allclose(np.linalg.norm(kept.descriptors.astype(np.float32), axis=1), 1, atol=2e-3)
        # centres span the photo in original pixels, patch centres half a patch in from the edges
        cell = width / (full.grid[1] + full.size - 1)
        assert full.centres[:, 0].min() == pytest.approx(full.size / 2 * cell, rel=1e-4)
        assert full.centres[:, 0].max() == pytest.approx(width - full.size / 2 * cell, rel=1e-4)
        assert set(map(tuple, kept.centres)) <= set(map(tuple, full.centres))


def test_pca_round_trip(tmp_path, pca):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, pca.input_dim)).astype(np.float32)
    path = tmp_path / "patch-pca.npz"
    pca.save(path)
    loaded = PatchPCA.load(path)
    np.testing.assert_array_equal(loaded.transform(x), pca.transform(x))
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(DIM), atol=1e-4)
    (tmp_path / "bad.npz").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a patch PCA file"):
        PatchPCA.load(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="another model"):
        pca.transform(x[:, :100])


def test_pca_whitening_gives_unit_variance_components():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 40)) * np.r_[np.geomspace(40, 5, 8), np.ones(32)]
    pca = fit_patch_pca(x, dim=8)
    projected = (x - pca.mean) @ pca.components.T * pca.scale
    np.testing.assert_allclose(projected.var(axis=0, ddof=1), 1, rtol=1e-3)
    np.testing.assert_allclose(np.abs(pca.components[:, :8]), np.eye(8), atol=0.05)


def test_bytes_round_trip(database):
    feats = database[0]
    data = feats.to_bytes()
    patches = sum(len(level.descriptors) for level in feats.levels)
    assert len(data) == 20 + 10 * len(feats.levels) + patches * (2 * DIM + 8)
    back = PatchFeatures.from_bytes(data)
    assert back.image_size == feats.image_size and back.cell == pytest.approx(feats.cell)
    for a, b in zip(feats.levels, back.levels):
        assert (a.size, a.grid) == (b.size, b.grid)
        np.testing.assert_array_equal(a.descriptors, b.descriptors)
        np.testing.assert_array_equal(a.centres, b.centres)
    for bad in (data[:-1], b"XXXX" + data[4:], data + b"\0", data[:4] + b"\x09" + data[5:]):
        with pytest.raises(ValueError, match="not patch features"):
            PatchFeatures.from_bytes(bad)
    # version 1 (written before the cell was stored): the cell comes from the first patch's centre,
    # half a patch in from the left edge
    first = feats.levels[0]
    old = bytearray(data[:4]) + b"\x01" + data[5:16] + data[20:]
    assert first.centres[0, 0] == pytest.approx(first.size / 2 * feats.cell, rel=1e-4)
    assert PatchFeatures.from_bytes(bytes(old)).cell == pytest.approx(feats.cell, rel=1e-4)


def test_warped_view_scores_above_other_photos(model, pca, photos, database):
    views = []
    for path in photos[:3]:
        with Image.open(path) as image:
            w, h = image.convert("RGB").size
            views.append(image.convert("RGB").crop((int(0.1 * w), int(0.05 * h), int(0.95 * w), int(0.9 * h))).rotate(3))
    queries = extract_patch_features(model, views, pca, max_patches=None)
    for i, query in enumerate(queries):
        scores = np.array([patch_score(query, candidate).score for candidate in database])
        others = np.delete(scores, i)
        assert scores[i] > others.max() + 0.02, scores
        match = patch_score(query, database[i])
        assert match.points.shape[1] == 4 and len(match.points) > 20
        # the crop starts at 10 % / 5 %: a matched query point lies about that much left/up of its partner
        shift = np.median(match.points[:, 2:] - match.points[:, :2] * [0.85, 0.85], axis=0)
        assert 0 < shift[0] < 0.25 * database[i].image_size[0]


def _layout(rng, n, shift, scramble):
    """Query and candidate levels of n patches whose descriptors match one to one; the candidate's
    centres are the query's moved by `shift` (or scrambled)."""
    desc = rng.standard_normal((n, 32)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    xy = rng.uniform(0, 100, (n, 2)).astype(np.float32)
    moved = rng.uniform(0, 100, (n, 2)).astype(np.float32) if scramble else xy + shift
    cell = 100 / (n + 3 - 1)  # one row of n 3-cell patches across 100 px
    query = PatchFeatures((100, 100), [PatchLevel(3, (1, n), desc.astype(np.float16), xy)], cell)
    candidate = PatchFeatures((100, 100), [PatchLevel(3, (1, n), desc[::-1].astype(np.float16), moved[::-1].copy())],
                              cell)
    return query, candidate


def test_ransac_keeps_consistently_shifted_patches():
    rng = np.random.default_rng(0)
    query, shifted = _layout(rng, 50, np.float32([12, -7]), scramble=False)
    _, scrambled = _layout(np.random.default_rng(0), 50, 0, scramble=True)
    consistent, random = patch_score(query, shifted), patch_score(query, scrambled)
    assert consistent.score == pytest.approx(1.0) and consistent.fractions == {3: 1.0}
    assert len(consistent.points) == 50
    np.testing.assert_allclose(consistent.points[:, 2:] - consistent.points[:, :2], [[12, -7]] * 50, atol=1e-4)
    assert random.score < 0.2 and len(random.points) < 10  # 50 mutual matches, scattered
    # a threshold of 1.5 cells: the query's one 3-cell level spans a 100-px image in 50 + 3 − 1 cells
    xy = rng.uniform(0, 100, (20, 2)).astype(np.float32)
    moved = xy + [3, 0]
    moved[:5] += [0, 3.5]  # 3.5 px off the common shift: beyond 1.5 · 100/52 ≈ 2.9 px
    assert patch_inliers(xy, moved, 1.5 * 100 / 52).tolist() == [False] * 5 + [True] * 15
    assert not patch_inliers(xy[:2], moved[:2], 3.0).any()  # two matches always fit: no evidence
    # scale and rotation are part of the model: a view zoomed by 1.2 and turned by 5° keeps all
    turn = np.deg2rad(5)
    zoomed = 1.2 * xy @ np.float32([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]]).T + [10, 4]
    assert patch_inliers(xy, zoomed.astype(np.float32), 1.0).all()


def test_rerank_standardises_each_size_over_the_shortlist():
    rng = np.random.default_rng(3)
    query, good = _layout(rng, 40, np.float32([5, 5]), scramble=False)
    _, bad = _layout(np.random.default_rng(3), 40, 0, scramble=True)
    ranking = patch_rerank(query, [(7, None), (1, bad), (2, good), (9, None)])
    assert ranking.ids == [2, 1, 7, 9] and ranking.matches[2:] == [None, None]
    # two candidates on one size: standardised to +1 and −1
    assert [m.score for m in ranking.matches[:2]] == pytest.approx([1.0, -1.0])
    assert ranking.matches[0].fractions == patch_score(query, good).fractions == {3: 1.0}
    # the default weights are Patch-NetVLAD's for three sizes, smallest first; equal for other counts; sum 1
    assert _weights(query, None) == {3: 1.0}
    three = PatchFeatures((100, 100), [PatchLevel(s, (1, 1), query.levels[0].descriptors[:1], query.levels[0].centres[:1])
                                       for s in (8, 2, 5)], 1.0)
    assert _weights(three, None) == dict(zip((2, 5, 8), SIZE_WEIGHTS)) == {2: 0.45, 5: 0.15, 8: 0.4}
    assert _weights(three, {2: 2, 5: 2}) == {2: 0.5, 5: 0.5, 8: 0.0}
    # equal scores on a size (all candidates alike) contribute nothing, not a division by zero
    same = patch_rerank(query, [(1, good), (2, good)])
    assert same.ids == [1, 2] and [m.score for m in same.matches] == [0.0, 0.0]


def test_rerank_adds_the_standardised_global_similarity():
    rng = np.random.default_rng(4)
    query, good = _layout(rng, 40, np.float32([5, 5]), scramble=False)
    _, bad = _layout(np.random.default_rng(4), 40, 0, scramble=True)
    candidates = [(1, bad), (7, None), (2, good)]
    # patches: good +1, bad −1; global similarities standardise to bad +1, good −1 (the photo
    # without features is left out of both); the scale of the similarities does not matter
    for sims in ([0.9, 0.0, 0.5], [0.31, 0.99, 0.30]):
        alone = patch_rerank(query, candidates, global_scores=sims, global_weight=0.0)
        assert alone.ids == [2, 1, 7] and [m.score for m in alone.matches[:2]] == pytest.approx([1, -1])
        even = patch_rerank(query, candidates, global_scores=sims)  # weight 1: a tie
        assert [m.score for m in even.matches[:2]] == pytest.approx([0, 0], abs=1e-12) and even.ids[2] == 7
        heavier = patch_rerank(query, candidates, global_scores=sims, global_weight=2.0)
        assert heavier.ids == [1, 2, 7] and [m.score for m in heavier.matches[:2]] == pytest.approx([1, -1])
