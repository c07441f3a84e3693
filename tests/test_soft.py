"""Soft order statistics (netvlad.soft): convergence to the exact statistics as α grows,
float64 gradchecks, non-trivial gradients, dtypes, and slow loop references."""

import math

import pytest
import torch

from netvlad import soft

ALPHAS = (1.0, 10.0, 100.0)


def separated(shape, dim=-1, seed=0):
    """Float64 values k + 0.25 + U(−0.1, 0.1), k a random permutation of integers along ``dim``:
    neighbours at least 0.8 apart, every |x| ≥ 0.15, no ties."""
    g = torch.Generator().manual_seed(seed)
    n = shape[dim]
    ranks = torch.rand(shape, generator=g, dtype=torch.float64).argsort(dim).double()
    noise = torch.rand(shape, generator=g, dtype=torch.float64) * 0.2 - 0.1
    return ranks - n // 2 + 0.25 + noise


def errors(op, exact, alphas=ALPHAS):
    return [(op(a) - exact).abs().max().item() for a in alphas]


def assert_converges(errs, bounds, final):
    """Each error under its bound, strictly decreasing, the last one below ``final``."""
    for e, b in zip(errs, bounds):
        assert e <= b, (errs, bounds)
    assert all(a > b for a, b in zip(errs, errs[1:])) or errs[-1] == 0.0, errs
    assert errs[-1] <= final, errs


BATCHED = pytest.mark.parametrize("dim", [1, -1])


# ------------------------------------------------------------------------ convergence α → ∞


@BATCHED
def test_softmax_softmin_converge(dim):
    x = separated((4, 7, 9), dim)
    n = x.shape[dim]
    bounds = [math.log(n) / a for a in ALPHAS]  # 0 ≤ softmax − max ≤ log(n)/α
    assert_converges(errors(lambda a: soft.softmax(x, dim, a), x.amax(dim)), bounds, 1e-12)
    assert_converges(errors(lambda a: soft.softmin(x, dim, a), x.amin(dim)), bounds, 1e-12)
    assert (soft.softmax(x, dim, 1.0) >= x.amax(dim)).all()
    assert (soft.softmin(x, dim, 1.0) <= x.amin(dim)).all()


@BATCHED
def test_softargmax_softargmin_converge_to_one_hot(dim):
    x = separated((4, 7, 9), dim)
    n = x.shape[dim]
    hot_max = torch.nn.functional.one_hot(x.argmax(dim), n).movedim(-1, dim).double()
    hot_min = torch.nn.functional.one_hot(x.argmin(dim), n).movedim(-1, dim).double()
    # runner-up ≥ 0.8 below the max: weight off the max ≤ (n−1)·e^{−0.8α}
    bounds = [min(1.0, (n - 1) * math.exp(-0.8 * a)) for a in ALPHAS]
    assert_converges(errors(lambda a: soft.softargmax(x, dim, a), hot_max), bounds, 1e-30)
    assert_converges(errors(lambda a: soft.softargmin(x, dim, a), hot_min), bounds, 1e-30)
    torch.testing.assert_close(soft.softargmax(x, dim, 1.0).sum(dim), torch.ones(x.sum(dim).shape, dtype=x.dtype))


def test_softabs_softsign_converge():
    x = separated((4, 7, 9))
    abs_bounds = [math.log(2) / a for a in ALPHAS]
    assert_converges(errors(lambda a: soft.softabs(x, a), x.abs()), abs_bounds, 1e-12)
    assert (soft.softabs(x, 1.0) >= x.abs()).all()
    # |x| ≥ 0.15: |softsign − sign| = 2σ(−α|x|) ≤ 2e^{−0.15α}
    sign_bounds = [2 * math.exp(-0.15 * a) for a in ALPHAS]
    assert_converges(errors(lambda a: soft.softsign(x, a), x.sign()), sign_bounds, 1e-6)
    assert soft.softabs(torch.zeros(1), 4.0).item() == pytest.approx(math.log(2) / 4)
    assert soft.softsign(torch.zeros(1), 4.0).item() == 0.0
    torch.testing.assert_close(soft.softsign(x, 3.0), 2 * torch.sigmoid(3.0 * x) - 1)


@BATCHED
@pytest.mark.parametrize(
    "method,bounds,final",
    [("rank", (0.1, 1e-3, 1e-12), 1e-12), ("deviation", (0.1, 1e-3, 1e-12), 1e-12)],
)
def test_softmedian_converges_to_torch_median_odd_n(dim, method, bounds, final):
    x = separated((4, 7, 9), dim)  # n = 7 (dim=1) or 9 (dim=-1): odd
    errs = errors(lambda a: soft.softmedian(x, dim, a, method), x.median(dim).values)
    assert errs[0] > 0.01  # α = 1 really is soft
    assert_converges(errs, bounds, final)


@pytest.mark.parametrize("method", ["rank", "deviation"])
def test_softmedian_even_n_is_mean_of_middle_pair(method):
    x = separated((5, 8))
    got = soft.softmedian(x, -1, 100.0, method)
    torch.testing.assert_close(got, torch.quantile(x, 0.5, dim=-1), atol=1e-9, rtol=0)
    lower = x.median(-1).values  # torch.median: the lower middle value
    assert ((got - lower) > 0.35).all()  # middle pair ≥ 0.8 apart, we return their mean


def test_ties_rank_form_blends_deviation_form_exact():
    x = torch.tensor([[1.0, 3.0, 1.0, 2.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(soft.softmedian(x, alpha=100.0, method="deviation"), torch.tensor([1.0], dtype=torch.float64))
    # documented limitation: the three tied 1s share rank −2, as far from 0 as the 2's rank +2
    torch.testing.assert_close(soft.softmedian(x, alpha=100.0, method="rank"), torch.tensor([1.25], dtype=torch.float64))


@BATCHED
def test_softquantile_matches_torch_quantile(dim):
    x = separated((4, 7, 9), dim)
    n = x.shape[dim]
    for q in (0.0, 0.1, 0.25, 0.4, 0.5, 0.75, 0.9, 1.0):
        h = q * (n - 1)
        if abs(h - round(h)) < 1e-9:
            ref = torch.quantile(x, q, dim=dim)  # integer rank: every interpolation agrees
        elif abs(h % 1 - 0.5) < 1e-9:
            ref = torch.quantile(x, q, dim=dim, interpolation="midpoint")
        else:
            ref = torch.quantile(x, q, dim=dim, interpolation="nearest")
        errs = errors(lambda a: soft.softquantile(x, q, dim, a), ref)
        assert_converges(errs, (1.5, 1e-2, 1e-9), 1e-9)
    # a half-integer rank position: q(n−1) = 2.5 gives the midpoint of ranks 2 and 3
    q = 2.5 / (n - 1)
    mid = torch.quantile(x, q, dim=dim, interpolation="midpoint")
    torch.testing.assert_close(soft.softquantile(x, q, dim, 100.0), mid, atol=1e-9, rtol=0)
    torch.testing.assert_close(soft.softquantile(x, 0.5, dim, 3.0), soft.softmedian(x, dim, 3.0))


def test_units_scale_equivariance():
    x = torch.randn(3, 11, dtype=torch.float64)
    s = 250.0
    for method in ("rank", "deviation"):
        torch.testing.assert_close(
            soft.softmedian(s * x, alpha=2.0 / s, method=method, rank_alpha=2.0),
            s * soft.softmedian(x, alpha=2.0, method=method, rank_alpha=2.0),
        )
    torch.testing.assert_close(soft.softmax(s * x, alpha=2.0 / s), s * soft.softmax(x, alpha=2.0))


# ------------------------------------------------------------------------ weighted soft median


def weighted_median_exact(x, w):
    """Scalars (n,), weights (n,): smallest value whose cumulative weight reaches half."""
    order = x.argsort()
    cum = (w[order] / w.sum()).cumsum(0)
    return x[order][(cum >= 0.5).nonzero()[0, 0]]


def weighted_medoid_exact(pts, w):
    """Points (n, d): the candidate minimising Σ_i w_i ‖p_i − p_j‖₁."""
    cost = ((pts[None, :, :] - pts[:, None, :]).abs().sum(-1) * w[None, :]).sum(-1)
    return pts[cost.argmin()]


def weighted_loop_reference(pts, w, alpha):
    """Slow scalar-loop soft weighted medoid: D_j = Σ_i n·w_i/Σw Σ_c softabs(p_ic − p_jc)."""
    n, d = len(pts), len(pts[0])
    wsum = sum(w)
    total = []
    for j in range(n):
        t = 0.0
        for i in range(n):
            for c in range(d):
                u = alpha * (pts[i][c] - pts[j][c])
                t += n * w[i] / wsum * (max(u, -u) + math.log1p(math.exp(-2 * abs(u)))) / alpha
        total.append(t)
    lo = min(total)
    e = [math.exp(-alpha * (t - lo)) for t in total]
    return [sum(e[j] * pts[j][c] for j in range(n)) / sum(e) for c in range(d)]


def test_weighted_softmedian_matches_loop_reference():
    g = torch.Generator().manual_seed(3)
    pts = torch.randn(2, 6, 2, generator=g, dtype=torch.float64)
    w = torch.rand(2, 6, generator=g, dtype=torch.float64)
    w = w / w.sum(-1, keepdim=True)
    for alpha in (0.5, 3.0):
        got = soft.weighted_softmedian(pts, w, alpha=alpha)  # (2, 2)
        assert got.shape == (2, 2)
        for b in range(2):
            ref = weighted_loop_reference(pts[b].tolist(), w[b].tolist(), alpha)
            torch.testing.assert_close(got[b], torch.tensor(ref, dtype=torch.float64), atol=1e-12, rtol=0)
        scalar = soft.weighted_softmedian(pts[..., 0], w, alpha=alpha)
        ref0 = [weighted_loop_reference([[v] for v in pts[b, :, 0].tolist()], w[b].tolist(), alpha)[0] for b in range(2)]
        torch.testing.assert_close(scalar, torch.tensor(ref0, dtype=torch.float64), atol=1e-12, rtol=0)


def test_weighted_softmedian_converges_to_exact_weighted_median():
    g = torch.Generator().manual_seed(5)
    x = separated((6, 9), seed=5)
    w = torch.rand(6, 9, generator=g, dtype=torch.float64) ** 3  # skewed weights
    w = w / w.sum(-1, keepdim=True)
    exact = torch.stack([weighted_median_exact(x[b], w[b]) for b in range(6)])
    plain = x.median(-1).values
    assert (exact != plain).any()  # the weights matter for this data
    errs = errors(lambda a: soft.weighted_softmedian(x, w, alpha=a), exact, (1.0, 10.0, 1000.0))
    assert_converges(errs, (2.0, 0.5, 1e-9), 1e-9)
    # points (…, n, 2) converge to the exact weighted L1-medoid; candidate axis dim=1 of (6, 9)
    pts = torch.stack([x, separated((6, 9), seed=6)], -1).transpose(0, 1)  # (9, 6, 2)
    got = soft.weighted_softmedian(pts, w.T, dim=0, alpha=1000.0)
    ref = torch.stack([weighted_medoid_exact(pts[:, b], w[b]) for b in range(6)])
    torch.testing.assert_close(got, ref, atol=1e-9, rtol=0)


def test_weighted_softmedian_uniform_weights_is_deviation_median():
    x = torch.randn(4, 10, dtype=torch.float64)
    uniform = torch.full((4, 10), 0.1, dtype=torch.float64)
    torch.testing.assert_close(
        soft.weighted_softmedian(x, uniform, alpha=2.0), soft.softmedian(x, alpha=2.0, method="deviation")
    )


# ------------------------------------------------------------------------ remedian


def remedian_reference(values, block):
    """Slow median of medians of one row: chunks of ``block`` (last one partial), recurse."""
    while len(values) > block:
        chunks = [values[i : i + block] for i in range(0, len(values), block)]
        values = [torch.quantile(torch.tensor(c, dtype=torch.float64), 0.5).item() for c in chunks]
    return torch.quantile(torch.tensor(values, dtype=torch.float64), 0.5).item()


@pytest.mark.parametrize("method", ["rank", "deviation"])
@pytest.mark.parametrize("n,block", [(128, 5), (50, 3), (7, 5)])
def test_remedian_is_median_of_medians_for_hard_alpha(method, n, block):
    x = separated((3, n, 2), dim=1, seed=n)
    got = soft.softremedian(x, dim=1, alpha=1000.0, block=block, method=method)  # (3, 2)
    ref = [[remedian_reference(x[b, :, c].tolist(), block) for c in range(2)] for b in range(3)]
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64), atol=1e-9, rtol=0)
    if n <= block:  # a single level is the plain soft median
        torch.testing.assert_close(got, soft.softmedian(x, 1, 1000.0, method))


def test_remedian_estimates_quantiles_of_large_random_n():
    x = torch.randn(8, 15625, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for q, tol in ((0.5, 0.025), (0.1, 0.05), (0.25, 0.04), (0.75, 0.04), (0.9, 0.05)):
        est = soft.softremedian(x, alpha=1000.0, q=q)
        cdf_at_est = (x <= est[:, None]).double().mean(-1)  # where the estimate sits, in probability
        assert (cdf_at_est - q).abs().max().item() < tol, (q, cdf_at_est)


def test_remedian_quantile_padding_is_exact_in_one_block():
    x = separated((4, 9), seed=2)  # with block ≥ n + pads the padded median is the quantile itself
    for q in (0.0, 0.125, 0.25, 0.375, 0.625, 0.75, 1.0):  # q·(n−1) integer
        got = soft.softremedian(x, alpha=1000.0, block=64, q=q)
        torch.testing.assert_close(got, torch.quantile(x, q, dim=-1), atol=1e-9, rtol=0)


# ------------------------------------------------------------------------ gradients

OPS = {
    "softmax": lambda x: soft.softmax(x, -1, 2.0),
    "softmin": lambda x: soft.softmin(x, 0, 2.0),
    "softargmax": lambda x: soft.softargmax(x, -1, 2.0),
    "softargmin": lambda x: soft.softargmin(x, 0, 2.0),
    "softabs": lambda x: soft.softabs(x, 2.0),
    "softsign": lambda x: soft.softsign(x, 2.0),
    "softmedian_rank": lambda x: soft.softmedian(x, -1, 2.0, "rank"),
    "softmedian_deviation": lambda x: soft.softmedian(x, 0, 2.0, "deviation"),
    "softquantile": lambda x: soft.softquantile(x, 0.3, -1, 2.0),
    "softremedian_rank": lambda x: soft.softremedian(x, -1, 2.0, block=3, method="rank"),
    "softremedian_q": lambda x: soft.softremedian(x, -1, 2.0, block=3, q=0.25),
    "weighted_softmedian": lambda x: soft.weighted_softmedian(x, torch.linspace(1, 3, 13, dtype=x.dtype).expand(3, 13), alpha=2.0),
}
REDUCING = [k for k in OPS if k not in ("softabs", "softsign")]


@pytest.mark.parametrize("name", list(OPS))
def test_gradcheck_float64(name):
    x = torch.randn(3, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    assert torch.autograd.gradcheck(OPS[name], (x,))


def test_gradcheck_weighted_softmedian_weights_and_points():
    g = torch.Generator().manual_seed(7)
    pts = torch.randn(2, 5, 2, dtype=torch.float64, generator=g, requires_grad=True)
    w = (torch.rand(2, 5, dtype=torch.float64, generator=g) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda p, v: soft.weighted_softmedian(p, v, alpha=1.5), (pts, w))


@pytest.mark.parametrize("name", REDUCING)
def test_gradient_reaches_several_elements(name):
    x = torch.randn(3, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(8), requires_grad=True)
    out = OPS[name](x)
    (out * torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(9))).sum().backward()
    nonzero = (x.grad.abs() > 1e-4).sum().item()
    hard_count = x.grad.shape[-1] if name.startswith("softargm") else out.numel()  # one per output if hard
    assert nonzero > 2 * hard_count, (name, nonzero)


# ------------------------------------------------------------------------ dtypes / devices


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 0.05), (torch.bfloat16, 0.1)])
@pytest.mark.parametrize("name", list(OPS))
def test_dtypes_match_float64(name, dtype, tol):
    x = torch.randn(3, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    ref = OPS[name](x)
    got = OPS[name](x.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), ref, atol=tol * (1 + ref.abs().max().item()), rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(OPS))
def test_cuda_matches_cpu(name):
    x = torch.randn(3, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(OPS[name](x.cuda()).cpu(), OPS[name](x))


# ------------------------------------------------------------------------ argument errors


@pytest.mark.parametrize(
    "call",
    [
        lambda x: soft.softmax(x, alpha=0.0),
        lambda x: soft.softabs(x, alpha=-1.0),
        lambda x: soft.softargmin(x, alpha=math.inf),
        lambda x: soft.softmedian(x, method="mean"),
        lambda x: soft.softmedian(x, rank_alpha=0.0),
        lambda x: soft.softmedian(x[:, :0]),
        lambda x: soft.softquantile(x, 1.5),
        lambda x: soft.softremedian(x, block=1),
        lambda x: soft.softremedian(x, q=-0.1),
        lambda x: soft.softremedian(x, q=0.3, method="rank"),
        lambda x: soft.weighted_softmedian(x, -torch.ones(3, 5)),
        lambda x: soft.weighted_softmedian(x, torch.ones(3, 4)),
        lambda x: soft.weighted_softmedian(x[..., None, None], torch.ones(3, 5)),
    ],
)
def test_bad_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call(torch.randn(3, 5))
