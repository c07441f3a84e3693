"""NetVLAD layer: hard-VLAD limit, gradients, normalisation, invariances, k-means init."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from netvlad.pooling import ASSIGNMENT_RATIO, NetVLAD


def hard_vlad_loop(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Reference: plain loops over images, locations and clusters (Jégou et al. VLAD + intra/L2 norms)."""
    n, d, h, w = x.shape
    k = centroids.shape[0]
    out = torch.zeros(n, k * d, dtype=x.dtype)
    for b in range(n):
        v = torch.zeros(k, d, dtype=x.dtype)
        for i in range(h):
            for j in range(w):
                feature = x[b, :, i, j]
                nearest = min(range(k), key=lambda q: float(((feature - centroids[q]) ** 2).sum()))
                v[nearest] += feature - centroids[nearest]
        for q in range(k):
            norm = v[q].norm()
            if norm > 0:
                v[q] /= norm
        flat = v.flatten()
        out[b] = flat / flat.norm()
    return out


def random_features(n=2, d=8, h=3, w=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, h, w, generator=g, dtype=dtype), dim=1)


@pytest.mark.parametrize("alpha, tol", [(10.0, 0.5), (300.0, 5e-2), (1e5, 1e-9)])
def test_converges_to_hard_vlad_as_alpha_grows(alpha, tol):
    x = random_features(seed=1)
    centroids = F.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64), dim=1)
    layer = NetVLAD(num_clusters=5, dim=8).double()
    layer.set_centroids(centroids, alpha)
    error = (layer(x) - hard_vlad_loop(x, centroids)).abs().max().item()
    assert error < tol


def test_hard_limit_error_shrinks_monotonically():
    x = random_features(seed=3)
    centroids = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64), dim=1)
    reference = hard_vlad_loop(x, centroids)
    errors = []
    for alpha in (1.0, 10.0, 100.0, 1000.0):
        layer = NetVLAD(4, 8).double()
        layer.set_centroids(centroids, alpha)
        errors.append((layer(x) - reference).abs().max().item())
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-6


def test_assignment_parameters_follow_the_design_formula():
    centroids = torch.randn(3, 6, dtype=torch.float64)
    layer = NetVLAD(3, 6).double()
    layer.set_centroids(centroids, alpha=7.0)
    assert torch.allclose(layer.conv.weight[:, :, 0, 0], 14.0 * centroids)
    assert torch.allclose(layer.conv.bias, -7.0 * (centroids**2).sum(1))  # squared norm, not ‖c‖
    x = random_features(1, 6, 2, 2, seed=5)
    feats = x.flatten(2)[0].T  # (4, 6)
    expected = torch.softmax(-7.0 * torch.cdist(feats, centroids) ** 2, dim=1).T  # (3, 4)
    assert torch.allclose(layer.soft_assignment(x)[0], expected, atol=1e-10)


def test_gradcheck_float64():
    layer = NetVLAD(num_clusters=3, dim=4, ghost_clusters=1).double()
    torch.nn.init.normal_(layer.conv.weight)
    x = random_features(2, 4, 2, 3, seed=6).requires_grad_()
    assert torch.autograd.gradcheck(lambda inp: layer(inp), (x,), eps=1e-6, atol=1e-5)
    params = (layer.conv.weight, layer.conv.bias, layer.centroids)
    assert torch.autograd.gradcheck(
        lambda w, b, c: torch.func.functional_call(layer, {"conv.weight": w, "conv.bias": b, "centroids": c}, (x.detach(),)),
        params, eps=1e-6, atol=1e-5)


def test_output_unit_norm_and_shape():
    layer = NetVLAD(num_clusters=16, dim=32)
    out = layer(F.normalize(torch.randn(5, 32, 7, 9), dim=1))
    assert out.shape == (5, 16 * 32)
    assert torch.allclose(out.norm(dim=1), torch.ones(5), atol=1e-5)
    per_cluster = out.view(5, 16, 32).norm(dim=2)
    assert torch.allclose(per_cluster, torch.full_like(per_cluster, 1 / 4), atol=1e-4)  # intra-norm then global


def test_location_permutation_leaves_output_unchanged():
    layer = NetVLAD(num_clusters=6, dim=8).double()
    torch.nn.init.normal_(layer.conv.weight)
    x = random_features(2, 8, 4, 5, seed=7)
    flat = x.flatten(2)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(8))
    shuffled = flat[:, :, perm].view(2, 8, 4, 5)
    assert torch.allclose(layer(x), layer(shuffled), atol=1e-12)
    assert torch.allclose(layer(x), layer(flat.view(2, 8, 20, 1)), atol=1e-12)  # shape of the map is irrelevant


def test_ghost_clusters_absorb_weight_and_are_dropped():
    x = random_features(1, 8, 3, 3, seed=9)
    centroids = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(10), dtype=torch.float64), dim=1)
    plain = NetVLAD(3, 8).double()
    plain.set_centroids(centroids[:3], 1e5)
    ghost = NetVLAD(3, 8, ghost_clusters=1).double()
    ghost.set_centroids(centroids[:3], 1e5, ghost_centroids=centroids[3:])
    assert ghost(x).shape == plain(x).shape == (1, 24)
    # hard limit: features nearest to the ghost centre contribute nothing to the output
    feats = x.flatten(2)[0].T
    owner = torch.cdist(feats, centroids).argmin(1)
    kept = owner < 3
    assert 0 < kept.sum() < 9
    expected = hard_vlad_loop(feats[kept].T.reshape(1, 8, -1, 1), centroids[:3])
    assert torch.allclose(ghost(x), expected, atol=1e-9)


def test_init_from_features_kmeans_and_alpha():
    import faiss

    rng = np.random.default_rng(0)
    features = rng.normal(size=(3000, 16)).astype(np.float32)
    layer = NetVLAD(8, 16)
    alpha = layer.init_from_features(features, niter=20, seed=1)
    found = layer.centroids.detach().numpy()
    # the centres are faiss k-means centres (same seed → same centres, possibly reordered)
    kmeans = faiss.Kmeans(16, 8, niter=20, seed=1, max_points_per_centroid=100_000)
    kmeans.train(features)
    assert np.allclose(np.sort(found, axis=0), np.sort(kmeans.centroids, axis=0), atol=1e-5)
    # α from squared distances to the two nearest centres (docs/design.md §2), not neighbour indices
    d2 = np.sort(((features[:, None] - found[None]) ** 2).sum(-1), axis=1)
    expected = math.log(ASSIGNMENT_RATIO) / np.mean(d2[:, 1] - d2[:, 0])
    assert alpha == pytest.approx(expected, rel=1e-3)
    # so the nearest centre gets ≈100× the second's weight on average (in log space)
    x = torch.from_numpy(features.T.copy()).view(1, 16, -1, 1)
    with torch.no_grad():
        logits = layer.conv(x).flatten(2)[0].T.sort(dim=1, descending=True).values
    assert float((logits[:, 0] - logits[:, 1]).mean()) == pytest.approx(math.log(ASSIGNMENT_RATIO), rel=1e-3)


def test_init_from_features_is_seeded_and_validates():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(600, 8)).astype(np.float32)
    a, b = NetVLAD(4, 8), NetVLAD(4, 8)
    a.init_from_features(features, seed=3)
    b.init_from_features(features, seed=3)
    assert torch.equal(a.centroids, b.centroids)
    with pytest.raises(ValueError, match="at least 4"):
        NetVLAD(4, 8).init_from_features(features[:3])
    with pytest.raises(ValueError, match=r"\(M, 8\)"):
        NetVLAD(4, 8).init_from_features(features[:, :5])
