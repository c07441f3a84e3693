"""Tests for netvlad.losses: reference implementations, hand-computed values, gradchecks."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck
from torch.func import functional_call

from netvlad.losses import (
    RealignedSoftmaxWarpingLoss,
    SoftLabelCrossEntropy,
    TripletRankingLoss,
    geo_soft_labels,
    reduce_loss,
    select_violating_negatives,
    soft_cross_entropy,
)

# ---------------------------------------------------------------- reduction and distances


def test_reduce_loss_modes_and_mask():
    loss = torch.tensor([1.0, 2.0, 3.0, 6.0])
    mask = torch.tensor([True, False, True, True])
    assert reduce_loss(loss, "mean").item() == pytest.approx(3.0)
    assert reduce_loss(loss, "sum").item() == pytest.approx(12.0)
    assert reduce_loss(loss, "mean", mask).item() == pytest.approx(10.0 / 3.0)
    assert reduce_loss(loss, "none", mask).tolist() == [1.0, 0.0, 3.0, 6.0]
    assert reduce_loss(loss, "mean", torch.zeros(4, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="reduction"):
        reduce_loss(loss, "avg")


# ---------------------------------------------------------------- triplet ranking


def triplet_reference(q, pos, neg, pos_mask, neg_mask, margin, max_negatives):
    """Slow loop: per-query losses, active triplets, violators per query before the cap."""
    losses, active, violators = [], 0, []
    for b in range(q.shape[0]):
        best = min(
            float(((q[b] - pos[b, i]) ** 2).sum()) for i in range(pos.shape[1]) if pos_mask[b, i]
        )
        hinges = []
        for j in range(neg.shape[1]):
            if neg_mask[b, j]:
                h = best + margin - float(((q[b] - neg[b, j]) ** 2).sum())
                if h > 0:
                    hinges.append(h)
        violators.append(len(hinges))
        hinges = sorted(hinges, reverse=True)[:max_negatives]
        losses.append(sum(hinges))
        active += len(hinges)
    return torch.tensor(losses, dtype=torch.float64), active, violators


def random_triplet_batch(seed, B=6, P=4, M=12, D=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, D, generator=g, dtype=torch.float64)
    pos = q.unsqueeze(1) + 0.6 * torch.randn(B, P, D, generator=g, dtype=torch.float64)
    neg = q.unsqueeze(1) + 0.9 * torch.randn(B, M, D, generator=g, dtype=torch.float64)
    pos_mask = torch.rand(B, P, generator=g) < 0.7
    pos_mask[:, 0] = True
    neg_mask = torch.rand(B, M, generator=g) < 0.8
    # Padding holds decoys that would change the result if it were used.
    pos = torch.where(pos_mask.unsqueeze(-1), pos, q.unsqueeze(1))
    neg = torch.where(neg_mask.unsqueeze(-1), neg, q.unsqueeze(1) + 1e-3)
    return q, pos, neg, pos_mask, neg_mask


@pytest.mark.parametrize("seed", [0, 1, 4])
def test_triplet_matches_loop_reference_with_masks(seed):
    q, pos, neg, pos_mask, neg_mask = random_triplet_batch(seed)
    margin, max_negatives = 2.0, 2
    expected, active, violators = triplet_reference(
        q, pos, neg, pos_mask, neg_mask, margin, max_negatives
    )
    # The batch exercises both the max_negatives cap and queries with fewer violators.
    assert max(violators) > max_negatives and min(violators) < max_negatives
    loss_fn = TripletRankingLoss(margin=margin, max_negatives=max_negatives, reduction="none")
    per_query = loss_fn(q, pos, neg, pos_mask, neg_mask)
    torch.testing.assert_close(per_query, expected)
    assert loss_fn.num_active_triplets == active
    mean = TripletRankingLoss(margin, max_negatives, "mean")(q, pos, neg, pos_mask, neg_mask)
    total = TripletRankingLoss(margin, max_negatives, "sum")(q, pos, neg, pos_mask, neg_mask)
    torch.testing.assert_close(mean, expected.mean())
    torch.testing.assert_close(total, expected.sum())


def test_triplet_hand_values_and_gradient_only_to_selected_negatives():
    q = torch.zeros(1, 2)
    pos = torch.tensor([[[1.0, 0.0], [2.0, 0.0]]])  # d² = 1, 4 → best 1
    # d² = 0.5, 1.04, 1.21
    neg = torch.tensor([[[0.5, 0.5], [1.0, 0.2], [1.1, 0.0]]], requires_grad=True)
    loss_fn = TripletRankingLoss(margin=0.1, max_negatives=10)
    loss = loss_fn(q, pos, neg)
    assert loss.item() == pytest.approx(0.6 + 0.06, abs=1e-6)
    assert loss_fn.num_active_triplets == 2
    loss.backward()
    # d/dn of −‖q − n‖² is −2(n − q); the non-violating third negative gets nothing.
    torch.testing.assert_close(neg.grad[0], torch.tensor([[-1.0, -1.0], [-2.0, -0.4], [0.0, 0.0]]))

    neg.grad = None
    capped = TripletRankingLoss(margin=0.1, max_negatives=1)
    loss = capped(q, pos, neg)
    assert loss.item() == pytest.approx(0.6, abs=1e-6)
    assert capped.num_active_triplets == 1
    loss.backward()
    assert neg.grad[0, 1:].abs().sum() == 0


def test_select_violating_negatives_orders_hardest_first():
    pos_d2 = torch.tensor([1.0, 0.2])
    neg_d2 = torch.tensor([[1.05, 0.3, 2.0, 0.9], [0.25, 5.0, 0.1, 0.4]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, True]])
    indices, valid = select_violating_negatives(pos_d2, neg_d2, 0.1, 3, mask)
    assert indices.tolist() == [[1, 3, 0], [0, 3, 1]]
    assert valid.tolist() == [[True, True, True], [True, False, False]]


def test_triplet_without_negatives_is_zero():
    q = torch.randn(2, 4)
    loss_fn = TripletRankingLoss()
    loss = loss_fn(q, q.unsqueeze(1) + 0.1, torch.empty(2, 0, 4))
    assert loss.item() == 0.0 and loss_fn.num_active_triplets == 0


def test_triplet_gradcheck():
    q, pos, neg, pos_mask, neg_mask = random_triplet_batch(3, B=3, P=3, M=6, D=4)
    loss_fn = TripletRankingLoss(margin=4.0, max_negatives=2)
    inputs = tuple(t.clone().requires_grad_() for t in (q, pos, neg))
    assert gradcheck(lambda a, b, c: loss_fn(a, b, c, pos_mask, neg_mask), inputs)
    assert loss_fn.num_active_triplets > 0


def test_triplet_errors():
    loss_fn = TripletRankingLoss()
    q, pos, neg = torch.randn(2, 4), torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="positive"):
        loss_fn(q, pos, neg, positives_mask=torch.tensor([[True, False, False], [False] * 3]))
    with pytest.raises(ValueError, match="candidates"):
        loss_fn(q, pos, torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="negatives_mask"):
        loss_fn(q, pos, neg, negatives_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_negatives"):
        TripletRankingLoss(max_negatives=0)


# ---------------------------------------------------------------- soft-label cross entropy


def test_soft_cross_entropy_equals_cross_entropy_with_class_indices():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=g)
    labels = torch.randint(0, 5, (7,), generator=g)
    got = soft_cross_entropy(logits, F.one_hot(labels, 5).float())
    torch.testing.assert_close(got, F.cross_entropy(logits, labels, reduction="none"))


def test_soft_cross_entropy_equals_cross_entropy_with_probabilities_on_any_dim():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 6, 3, generator=g)
    probs = torch.softmax(2 * torch.randn(4, 6, 3, generator=g), dim=1)
    got = soft_cross_entropy(logits, probs, dim=1)
    assert got.shape == (4, 3)
    torch.testing.assert_close(got, F.cross_entropy(logits, probs, reduction="none"))


def test_soft_cross_entropy_ignores_impossible_classes_with_zero_target():
    logits = torch.tensor([[0.3, float("-inf"), -1.2]], requires_grad=True)
    target = torch.tensor([[0.25, 0.0, 0.75]])
    got = soft_cross_entropy(logits, target)
    got.backward()
    expected = F.cross_entropy(logits.detach()[:, [0, 2]], target[:, [0, 2]], reduction="none")
    torch.testing.assert_close(got.detach(), expected)
    assert torch.isfinite(logits.grad).all()


def test_soft_cross_entropy_gradcheck():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    probs = torch.softmax(torch.randn(3, 4, generator=g, dtype=torch.float64), 1).requires_grad_()
    assert gradcheck(soft_cross_entropy, (logits, probs))


def test_pair_form_hand_values():
    loss_fn = SoftLabelCrossEntropy("pair", init_a=1.0, init_b=2.0, reduction="none")
    assert loss_fn.b.item() == pytest.approx(2.0)
    q = torch.zeros(1, 2)
    cands = torch.tensor([[[0.5, 0.0], [1.0, 0.0]]])  # d² = 0.25, 1.0
    s = torch.tensor([[0.8, 0.1]])
    # c = σ(1 − 2·0.25) = σ(0.5), σ(1 − 2·1) = σ(−1)
    c = torch.sigmoid(loss_fn.logits(torch.tensor([0.25, 1.0])))
    torch.testing.assert_close(c, torch.tensor([0.6224593312, 0.2689414214]))
    # −0.8·ln 0.62245933 − 0.2·ln 0.37754067 and −0.1·ln 0.26894142 − 0.9·ln 0.73105858
    expected = torch.tensor([[0.5740769842, 0.4132616875]])
    torch.testing.assert_close(loss_fn(q, cands, s), expected)
    mask = torch.tensor([[False, True]])
    mean = SoftLabelCrossEntropy("pair", 1.0, 2.0)(q, cands, s, mask)
    assert mean.item() == pytest.approx(0.4132616875, abs=1e-6)


def test_pair_form_b_init_is_exact_for_large_values():
    assert SoftLabelCrossEntropy("pair", init_b=50.0).b.item() == pytest.approx(50.0)
    assert SoftLabelCrossEntropy("pair", init_b=1e-3).b.item() == pytest.approx(1e-3, rel=1e-4)


def listwise_reference(q, cands, s, mask, tau):
    out = []
    for b in range(q.shape[0]):
        keep = mask[b]
        d2 = ((cands[b, keep] - q[b]) ** 2).sum(-1)
        p = s[b, keep] / s[b, keep].sum()
        out.append(F.cross_entropy(-d2 / tau, p))
    return torch.stack(out)


def test_listwise_form_matches_per_query_reference_with_mask():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(4, 5, generator=g, dtype=torch.float64)
    cands = torch.randn(4, 6, 5, generator=g, dtype=torch.float64)
    s = geo_soft_labels(torch.rand(4, 6, generator=g, dtype=torch.float64) * 30.0)
    mask = torch.rand(4, 6, generator=g) < 0.7
    mask[:, 0] = True
    loss_fn = SoftLabelCrossEntropy("listwise", temperature=0.5, reduction="none").double()
    expected = listwise_reference(q, cands, s, mask, 0.5)
    torch.testing.assert_close(loss_fn(q, cands, s, mask), expected)
    # Without a mask it is cross entropy with probability targets p ∝ s.
    d2 = ((cands - q.unsqueeze(1)) ** 2).sum(-1)
    expected = F.cross_entropy(-d2 / 0.5, s / s.sum(1, keepdim=True))
    mean_loss = SoftLabelCrossEntropy("listwise", temperature=0.5)(q, cands, s)
    torch.testing.assert_close(mean_loss, expected)


def test_geo_soft_labels_values():
    got = geo_soft_labels(torch.tensor([0.0, 10.0, 20.0, 5.0]), sigma_m=10.0)
    expected = torch.tensor([1.0, math.exp(-1), math.exp(-4), math.exp(-0.25)])
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="sigma_m"):
        geo_soft_labels(torch.zeros(1), sigma_m=0.0)


def test_soft_label_gradcheck_including_learned_parameters():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    cands = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.rand(2, 4, generator=g, dtype=torch.float64)
    pair = SoftLabelCrossEntropy("pair", init_a=0.5, init_b=0.7).double()
    a, raw_b = (p.detach().clone().requires_grad_() for p in (pair.a, pair.raw_b))
    assert gradcheck(
        lambda q_, c_, a_, b_: functional_call(pair, {"a": a_, "raw_b": b_}, (q_, c_, s)),
        (q, cands, a, raw_b),
    )
    listwise = SoftLabelCrossEntropy("listwise", temperature=0.8, learn_temperature=True).double()
    log_t = listwise.log_temperature.detach().clone().requires_grad_()
    assert gradcheck(
        lambda q_, c_, t_: functional_call(listwise, {"log_temperature": t_}, (q_, c_, s)),
        (q, cands, log_t),
    )
    assert [n for n, _ in listwise.named_parameters()] == ["log_temperature"]
    assert [n for n, _ in SoftLabelCrossEntropy("listwise").named_parameters()] == []


def test_soft_label_errors():
    q, cands = torch.randn(2, 3), torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        SoftLabelCrossEntropy("pair")(q, cands, torch.full((2, 4), 1.5))
    with pytest.raises(ValueError, match="positive soft label"):
        SoftLabelCrossEntropy("listwise")(q, cands, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="soft_labels"):
        SoftLabelCrossEntropy("pair")(q, cands, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="form"):
        SoftLabelCrossEntropy("triplet")


# ---------------------------------------------------------------- realigned softmax warping


def rsw_batch(seed, N=6, C=4, E=5, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    emb = scale * torch.randn(N, E, generator=g, dtype=torch.float64)
    labels = torch.randint(0, C, (N,), generator=g)
    return emb, labels


def make_rsw(C=4, E=5, seed=0, **kw):
    torch.manual_seed(seed)
    return RealignedSoftmaxWarpingLoss(C, E, **kw).double()


def reference_distances(emb, proxies):
    return (emb.unsqueeze(1) - proxies.unsqueeze(0)).pow(2).sum(-1).sqrt()


def analytic_embedding_grad(emb, labels, proxies, T, true_scale):
    """∂/∂e of mean CE(−T·W) when forward W = d and ∂W_y/∂d_y = true_scale."""
    d = reference_distances(emb, proxies)
    onehot = F.one_hot(labels, proxies.shape[0]).to(emb.dtype)
    dL_dW = -T * (torch.softmax(-T * d, 1) - onehot) / emb.shape[0]
    scale = 1.0 + (true_scale - 1.0) * onehot
    unit = (emb.unsqueeze(1) - proxies.unsqueeze(0)) / d.unsqueeze(-1)
    return ((dL_dW * scale).unsqueeze(-1) * unit).sum(1)


def test_rsw_warp_off_is_softmax_cross_entropy_on_distances():
    emb, labels = rsw_batch(0, scale=2.0)
    loss_fn = make_rsw(k1=1.0, k2=1.0, alpha=1.0, temperature=0.5)
    d = reference_distances(emb, loss_fn.proxies.detach())
    expected = F.cross_entropy(-0.5 * d, labels)
    torch.testing.assert_close(loss_fn(emb, labels), expected)


def test_rsw_inside_radius_keeps_value_and_scales_true_class_gradient_by_k1():
    emb, labels = rsw_batch(1)
    T, k1 = 0.7, 0.25
    warped = make_rsw(alpha=100.0, k1=k1, k2=2.0, temperature=T)
    plain = make_rsw(alpha=100.0, k1=1.0, k2=1.0, temperature=T)
    proxies = warped.proxies.detach()
    e1, e2 = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    loss_w, loss_p = warped(e1, labels), plain(e2, labels)
    torch.testing.assert_close(loss_w, loss_p)
    loss_w.backward()
    loss_p.backward()
    torch.testing.assert_close(e2.grad, analytic_embedding_grad(emb, labels, proxies, T, 1.0))
    torch.testing.assert_close(e1.grad, analytic_embedding_grad(emb, labels, proxies, T, k1))
    assert not torch.allclose(e1.grad, e2.grad)
    # The true-class warped distance itself: value d_y, gradient k1 · ∇d_y.
    e3 = emb.clone().requires_grad_()
    rows = torch.arange(len(labels))
    w_true = warped.warped_distances(e3, labels)[rows, labels]
    d_true = reference_distances(emb, proxies)[rows, labels]
    torch.testing.assert_close(w_true.detach(), d_true)
    w_true.sum().backward()
    torch.testing.assert_close(e3.grad, k1 * (emb - proxies[labels]) / d_true.unsqueeze(1))


def test_rsw_outside_radius_follows_steeper_line():
    emb, labels = rsw_batch(2, scale=3.0)
    alpha, k2, T = 0.5, 2.0, 0.3
    loss_fn = make_rsw(alpha=alpha, k1=0.25, k2=k2, temperature=T)
    proxies = loss_fn.proxies.detach()
    d = reference_distances(emb, proxies)
    rows = torch.arange(len(labels))
    assert d[rows, labels].min() > alpha + 0.1
    e = emb.clone().requires_grad_()
    w = loss_fn.warped_distances(e, labels)
    expected = d.clone()
    expected[rows, labels] = alpha + k2 * (d[rows, labels] - alpha)
    torch.testing.assert_close(w.detach(), expected)
    torch.testing.assert_close(loss_fn(emb, labels), F.cross_entropy(-T * expected, labels))
    w[rows, labels].sum().backward()
    torch.testing.assert_close(e.grad, k2 * (emb - proxies[labels]) / d[rows, labels].unsqueeze(1))


def test_rsw_gradcheck_on_both_sides_of_radius():
    emb, labels = rsw_batch(3, N=8)
    loss_fn = make_rsw(alpha=2.2, k1=0.25, k2=2.0, temperature=0.8)
    d_true = reference_distances(emb, loss_fn.proxies.detach())[torch.arange(8), labels]
    assert (d_true < 2.2).any() and (d_true > 2.2).any()
    assert (d_true - 2.2).abs().min() > 1e-3  # away from the kink
    proxies = loss_fn.proxies.detach().clone().requires_grad_()
    # Inside the radius the stop-gradient deliberately makes the gradient k1 times the value's
    # derivative, so finite differences agree there only for k1 = 1 (the k1 scaling is checked
    # analytically above); both branches and the proxy gradients are exercised here.
    loss_fn.set_warp(k1=1.0)
    assert gradcheck(
        lambda e, p: functional_call(loss_fn, {"proxies": p}, (e, labels)),
        (emb.clone().requires_grad_(), proxies),
    )


def test_rsw_kaiming_normal_fan_out_proxies_as_the_authors():
    torch.manual_seed(0)
    proxies = RealignedSoftmaxWarpingLoss(64, 500).proxies.detach()  # (C, E): fan_out = C
    assert proxies.mean().item() == pytest.approx(0.0, abs=0.005)
    assert proxies.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.02)


@pytest.mark.parametrize("margin", [1.0, 1.3, 1.348])
def test_rsw_margin_value_and_gradient_on_both_sides_against_a_re_derivation(margin):
    """Inside α: W_y = (k1 + m(1 − k1))·d_y with gradient k1·∇d_y; outside: α + k2(d_y − α),
    whatever the margin. Plain float64 re-derivation, no autograd on the reference side."""
    emb, labels = rsw_batch(4, N=8)
    alpha, k1, k2, T = 2.2, 0.6, 1.5, 0.9
    loss_fn = make_rsw(alpha=alpha, k1=k1, k2=k2, temperature=T, margin=margin)
    proxies = loss_fn.proxies.detach()
    rows = torch.arange(len(labels))
    d = reference_distances(emb, proxies)
    d_true = d[rows, labels]
    inside = d_true <= alpha
    assert inside.any() and (~inside).any() and (d_true - alpha).abs().min() > 1e-3
    e = emb.clone().requires_grad_()
    w = loss_fn.warped_distances(e, labels)
    expected = d.clone()
    expected[rows, labels] = torch.where(inside, (k1 + margin * (1 - k1)) * d_true, alpha + k2 * (d_true - alpha))
    torch.testing.assert_close(w.detach(), expected)
    torch.testing.assert_close(loss_fn(emb, labels), F.cross_entropy(-T * expected, labels))
    w[rows, labels].sum().backward()
    slope = torch.where(inside, torch.full_like(d_true, k1), torch.full_like(d_true, k2))
    torch.testing.assert_close(e.grad, slope.unsqueeze(1) * (emb - proxies[labels]) / d_true.unsqueeze(1))


def test_rsw_published_presets():
    cub = RealignedSoftmaxWarpingLoss.from_preset("cub", 10, 8)
    assert (cub.alpha, cub.k1, cub.k2, cub.temperature, cub.margin) == (28.40, 0.93, 1.15, 4.525, 1.30)
    sop = RealignedSoftmaxWarpingLoss.from_preset("sop", 10, 8)
    assert (sop.alpha, sop.k1, sop.k2, sop.temperature, sop.margin) == (13.025, 0.8563, 1.1181, 3.7442, 1.348)
    default = RealignedSoftmaxWarpingLoss.from_preset("default", 10, 8)
    assert (default.alpha, default.k1, default.k2, default.temperature, default.margin) == (8.0, 0.25, 2.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="unknown RSW preset"):
        RealignedSoftmaxWarpingLoss.from_preset("imagenet", 10, 8)


def test_rsw_set_warp_and_validation():
    loss_fn = RealignedSoftmaxWarpingLoss(3, 4)
    assert (loss_fn.alpha, loss_fn.k1, loss_fn.k2, loss_fn.temperature) == (8.0, 0.25, 2.0, 1.0)
    loss_fn.set_warp(k1=0.5, temperature=2.0)
    assert (loss_fn.alpha, loss_fn.k1, loss_fn.k2, loss_fn.temperature) == (8.0, 0.5, 2.0, 2.0)
    with pytest.raises(ValueError, match="k2"):
        loss_fn.set_warp(k2=0.0)
    with pytest.raises(ValueError, match="labels"):
        loss_fn(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="embeddings"):
        loss_fn(torch.randn(2, 5), torch.tensor([0, 1]))


def test_rsw_param_groups_and_training_separates_classes():
    torch.manual_seed(0)
    centres = 3.0 * torch.randn(4, 8)
    labels = torch.arange(4).repeat_interleave(50)
    x = centres[labels] + torch.randn(200, 8)
    model = torch.nn.Linear(8, 3)
    loss_fn = RealignedSoftmaxWarpingLoss(4, 3, alpha=2.0, k1=0.25, k2=2.0)
    groups = loss_fn.param_groups(model.parameters(), lr=1e-2, proxy_lr_mult=10.0)
    assert [g["lr"] for g in groups] == [1e-2, 1e-1]
    assert groups[1]["params"] == [loss_fn.proxies]
    assert all(p is not loss_fn.proxies for p in groups[0]["params"])
    opt = torch.optim.Adam(groups)
    first = loss_fn(model(x), labels).item()
    for _ in range(150):
        opt.zero_grad()
        loss = loss_fn(model(x), labels)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    nearest = loss_fn.distances(model(x)).argmin(1)
    assert (nearest == labels).float().mean() > 0.95
