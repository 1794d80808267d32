"""Adaptive batch sizes: per-sample gradients, the tests' statistics, the controller.

References are written here: a Python loop of backward passes for the per-sample
gradients, dense float64 formulas for every statistic, closed forms for Gaussian gradients
with known mean and covariance.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _spawn import run_ranks  # noqa: E402 - tests/ is on sys.path
from secondorder import AdaptiveBatchSize
from secondorder.batching import (
    AdaptiveBatchLoop,
    SampleCountedLR,
    accumulation_plan,
    all_reduce_stats,
    flatten_samples,
    gradient_stats,
    linear_warmup_decay,
    merge_stats,
    next_batch_size,
    per_sample_grads,
    required_batch_size,
    stats_from_micro_batch_means,
)
from secondorder.kernels import batch_tests as K
from secondorder.kernels.batch_tests import stats_from_samples

EPS64 = torch.finfo(torch.float64).eps


# ----------------------------------------------------------------- per-sample gradients
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(2, 3, 3)
        self.fc = torch.nn.Linear(6, 2)
        self.register_buffer("shift", torch.tensor(0.25))

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1) + self.shift)


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def _net_and_batch(n=7):
    torch.manual_seed(0)
    net = Net().double()
    x = torch.randn(n, 2, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (n,))
    return net, (x, y)


def test_per_sample_grads_equal_a_loop():
    net, (x, y) = _net_and_batch()
    got = per_sample_grads(net, _loss, (x, y))
    for i in range(x.shape[0]):
        net.zero_grad()
        _loss(net, (x[i : i + 1], y[i : i + 1])).backward()
        for name, p in net.named_parameters():
            torch.testing.assert_close(got[name][i], p.grad, rtol=0, atol=100 * EPS64)
    # the mean of per-sample gradients is the batch-mean loss's gradient; .grad untouched
    net.zero_grad()
    _loss(net, (x, y)).backward()
    for name, p in net.named_parameters():
        torch.testing.assert_close(got[name].mean(0), p.grad, rtol=0, atol=100 * EPS64)
    chunked = per_sample_grads(net, _loss, (x, y), chunk_size=3)
    for name in got:
        torch.testing.assert_close(chunked[name], got[name], rtol=0, atol=100 * EPS64)


def test_gradient_stats_in_chunks_equal_the_whole_batch():
    net, batch = _net_and_batch(11)
    samples, _ = flatten_samples(per_sample_grads(net, _loss, batch))
    whole = stats_from_samples(samples)
    chunked = gradient_stats(net, _loss, batch, chunk_size=4)
    assert chunked.count == 11
    torch.testing.assert_close(chunked.mean, whole.mean, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(chunked.m2, whole.m2, rtol=1e-10, atol=1e-15)


# ------------------------------------------------------------------- statistics = dense
def _samples(b=9, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=torch.float64) + torch.linspace(-1, 2, d)


def _dense(G):
    """Loop-based reference values of every test's numerator and denominator."""
    b = G.shape[0]
    mean = sum(G[i] for i in range(b)) / b
    var_sum = sum(float((G[i] - mean).square().sum()) for i in range(b)) / (b - 1)
    msq = float(mean @ mean)
    ip = [float(G[i] @ mean) for i in range(b)]
    ip_mean = sum(ip) / b
    ip_var = sum((v - ip_mean) ** 2 for v in ip) / (b - 1)
    res = [G[i] - (float(G[i] @ mean) / msq) * mean for i in range(b)]
    res_mean = sum(res) / b
    orth = sum(float((r - res_mean).square().sum()) for r in res) / (b - 1)
    coord = [
        sum(float(G[i, j] - mean[j]) ** 2 for i in range(b)) / (b - 1) / float(mean[j]) ** 2
        for j in range(G.shape[1])
    ]
    return dict(var_sum=var_sum, msq=msq, ip_var=ip_var, orth=orth, coord=max(coord))


@settings(max_examples=20, deadline=None)
@given(b=st.integers(2, 12), d=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_tests_equal_dense_formulas(b, d, seed):
    G = _samples(b, d, seed)
    ref = _dense(G)
    s = stats_from_samples(G)
    tol = dict(rel=1e-9)  # float64 sums of a few dozen terms, ratios of O(1) values
    eta, theta, nu = 0.3, 0.7, 0.9
    assert K.norm_test(s, eta) == pytest.approx(ref["var_sum"] / (eta**2 * ref["msq"]), **tol)
    assert K.coordinate_test(s, eta) == pytest.approx(ref["coord"] / eta**2, **tol)
    ip = ref["ip_var"] / (theta**2 * ref["msq"] ** 2)
    orth = ref["orth"] / (nu**2 * ref["msq"])
    assert K.inner_product_test(G, theta) == pytest.approx(ip, **tol)
    assert K.orthogonality_test(G, nu) == pytest.approx(orth, **tol)
    assert K.augmented_test(G, theta, nu) == pytest.approx(max(ip, orth), **tol)


def test_per_layer_tests_sum_over_layers():
    G = _samples(10, 7, 3)
    segments = [4, 3]
    blocks = [G[:, :4], G[:, 4:]]
    refs = [_dense(x) for x in blocks]
    msq = sum(r["msq"] for r in refs)
    ip = sum(r["ip_var"] for r in refs) / (0.5**2 * msq**2)
    orth = sum(r["orth"] for r in refs) / (0.5**2 * msq)
    assert K.inner_product_test(G, 0.5, segments) == pytest.approx(ip, rel=1e-9)
    assert K.orthogonality_test(G, 0.5, segments) == pytest.approx(orth, rel=1e-9)
    # the whole-vector statistic sees the cross-layer covariance the per-layer one ignores
    assert K.inner_product_test(G, 0.5) != pytest.approx(ip, rel=1e-6)
    # norm test: separable, per-layer or not
    s = stats_from_samples(G)
    parts = [stats_from_samples(x) for x in blocks]
    num = sum(float(p.variance.sum()) for p in parts)
    den = 0.5**2 * sum(float(p.mean.square().sum()) for p in parts)
    assert K.norm_test(s, 0.5) == pytest.approx(num / den, rel=1e-12)


@settings(max_examples=20, deadline=None)
@given(sizes=st.lists(st.integers(1, 6), min_size=1, max_size=5), seed=st.integers(0, 10_000))
def test_merge_is_the_law_of_total_variance(sizes, seed):
    G = _samples(sum(sizes), 5, seed)
    whole = stats_from_samples(G)
    merged = merge_stats([stats_from_samples(x) for x in torch.split(G, sizes)])
    assert merged.count == whole.count
    torch.testing.assert_close(merged.mean, whole.mean, rtol=0, atol=50 * EPS64)
    # m2 sums O(b) squared deviations of O(1) values: absolute error ~ b * a few eps
    torch.testing.assert_close(merged.m2, whole.m2, rtol=0, atol=sum(sizes) * 50 * EPS64)


def test_degenerate_statistics():
    zeros = stats_from_samples(torch.zeros(4, 3, dtype=torch.float64))
    assert K.norm_test(zeros, 0.1) == 0.0 and K.coordinate_test(zeros, 0.1) == 0.0
    centred = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=torch.float64)  # mean 0, noisy
    assert K.norm_test(stats_from_samples(centred), 0.1) == math.inf
    assert K.inner_product_test(centred, 0.1) == 0.0  # ⟨g_i, 0⟩ = 0: no variance
    assert K.orthogonality_test(centred, 0.1) == math.inf
    with pytest.raises(ValueError, match="at least 2"):
        _ = stats_from_samples(centred[:1]).variance


# ------------------------------------------------------------ Gaussian: known answers
def _gaussian(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = 8
    mu = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    a = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    cov = a @ a.T + torch.diag(torch.linspace(0.5, 3.0, d, dtype=torch.float64))
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    return mu + z @ torch.linalg.cholesky(cov).T, mu, cov


def test_gaussian_gradients_give_the_predicted_batch_size():
    n = 20_000
    G, mu, cov = _gaussian(n)
    msq = float(mu @ mu)
    eta, theta, nu = 0.2, 0.3, 0.4
    predicted = {
        "norm": float(cov.trace()) / (eta**2 * msq),
        "coordinate": float((cov.diagonal() / mu.square()).max()) / eta**2,
        "inner_product": float(mu @ cov @ mu) / (theta**2 * msq**2),
        "orthogonality": (float(cov.trace()) - float(mu @ cov @ mu) / msq) / (nu**2 * msq),
    }
    # Sampling error, estimated from the data themselves: the spread of the statistic over
    # 20 disjoint sub-samples of n/20 scales by 1/sqrt(20) to the full sample's standard
    # error; allow 5 standard errors (plus the O(1/n) bias of a ratio, far below that).
    for test, value in predicted.items():
        got = required_batch_size(test, samples=G, eta=eta, theta=theta, nu=nu)
        subs = torch.tensor(
            [required_batch_size(test, samples=x, eta=eta, theta=theta, nu=nu)
             for x in G.view(20, n // 20, -1)]
        )  # fmt: skip
        se = float(subs.std()) / math.sqrt(20)
        assert abs(got - value) <= 5 * se, (test, got, value, se)
        assert se < 0.05 * value, (test, se)  # the check is sharp: SE within 5% of the value
    # the cheap estimate from 400 micro-batch means of 50: ~1/sqrt(400) relative error
    means = G.view(400, 50, -1).mean(1)
    cheap = stats_from_micro_batch_means(means, 50)
    assert cheap.count == n
    assert K.norm_test(cheap, eta) == pytest.approx(predicted["norm"], rel=5 / math.sqrt(400))
    # the controller turns the requirement into the next batch size
    c = AdaptiveBatchSize(8, 10_000, "norm", eta=eta)
    want = math.ceil(K.norm_test(stats_from_samples(G), eta))
    assert c.update(stats=stats_from_samples(G)) == want


# --------------------------------------------------------------------- the controller
@settings(max_examples=200, deadline=None)
@given(cur=st.integers(1, 1000), req=st.floats(0, 1e5), cap=st.integers(1, 2000))
def test_next_batch_size_never_shrinks_and_is_capped(cur, req, cap):
    new = next_batch_size(cur, req, cap)
    assert new >= cur
    assert new <= max(cap, cur)
    if cur <= cap:
        assert new == min(cap, max(cur, math.ceil(req)))


def test_next_batch_size_special_values():
    assert next_batch_size(5, math.inf, 100) == 100
    assert next_batch_size(5, math.nan, 100) == 5


@settings(max_examples=300, deadline=None)
@given(
    b=st.integers(1, 100_000),
    world=st.integers(1, 16),
    cap=st.one_of(st.none(), st.integers(1, 5000)),
)
def test_accumulation_arithmetic(b, world, cap):
    plan = accumulation_plan(b, world, cap)
    assert plan.micro_batch * plan.world_size * plan.accumulation >= b
    if cap is not None:
        assert plan.micro_batch <= cap
        # the fewest accumulation steps that respect the cap
        assert plan.accumulation == 1 or -(-b // (world * (plan.accumulation - 1))) > cap
    else:
        assert plan.accumulation == 1
    # the smallest micro-batch that covers b: less than one example of waste per slot
    assert (plan.micro_batch - 1) * world * plan.accumulation < b


def test_controller_grows_monotonically_to_the_cap():
    c = AdaptiveBatchSize(2, 50, "norm", eta=0.5, max_micro_batch=8, world_size=2)
    sizes = []
    for k in range(1, 30):
        g = torch.randn(40, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
        sizes.append(c.update(stats=stats_from_samples(g + 1.0 / k)))  # signal fades
    assert all(a <= b for a, b in zip(sizes, sizes[1:]))
    assert sizes[-1] == 50 and not c.needs_test
    assert c.plan == accumulation_plan(50, 2, 8) and c.plan.accumulation == 4
    assert all(d.batch_size <= 50 for d in c.history)


def test_controller_interval_and_state_dict():
    c = AdaptiveBatchSize(4, 100, "norm", eta=0.1, interval=3)
    s = stats_from_samples(_samples(10, 4, 1))
    assert [c.needs_test for _ in range(1)] == [True]
    seen = []
    for _ in range(6):
        seen.append(c.needs_test)
        c.update(stats=s)
    assert seen == [True, False, False, True, False, False]
    d = AdaptiveBatchSize(4, 100, "norm", eta=0.1, interval=3)
    d.load_state_dict(c.state_dict())
    assert (d.batch_size, d.steps) == (c.batch_size, c.steps)
    with pytest.raises(ValueError, match="batch_size"):
        d.load_state_dict({"batch_size": 101, "steps": 0})


def test_inner_product_family_needs_samples():
    c = AdaptiveBatchSize(4, 100, "inner_product")
    with pytest.raises(ValueError, match="per-sample"):
        c.update(stats=stats_from_samples(_samples()))
    assert c.update(samples=_samples()) >= 4


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(test="variance"), "test"),
        (dict(eta=0.0), "eta"),
        (dict(eta=-0.1), "eta"),
        (dict(theta=0.0), "theta"),
        (dict(nu=-1.0), "nu"),
        (dict(nu=math.nan), "nu"),
        (dict(initial_batch=64, max_batch=32), "max_batch"),
        (dict(initial_batch=0), "initial_batch"),
        (dict(max_micro_batch=0), "max_micro_batch"),
        (dict(interval=0), "interval"),
        (dict(eta="0.1"), "eta"),
        (dict(per_layer=1), "per_layer"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    args = {"initial_batch": 8, "max_batch": 64, **kwargs}
    with pytest.raises((ValueError, TypeError), match=name):
        AdaptiveBatchSize(**args)


def test_unknown_test_lists_the_valid_ones():
    with pytest.raises(ValueError, match="norm.*coordinate.*inner_product"):
        AdaptiveBatchSize(8, 64, test="ip")


# ------------------------------------------------------------------------- the loop
def test_loop_follows_the_controller_and_counts_samples():
    data = torch.utils.data.TensorDataset(torch.arange(100.0))
    c = AdaptiveBatchSize(4, 40, "norm", eta=0.5, max_micro_batch=6)
    model_lr = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = SampleCountedLR(model_lr, linear_warmup_decay(20, 200))
    loop = AdaptiveBatchLoop(data, c, seed=0, lr_schedule=sched)
    seen: list[float] = []
    samples = 0
    for k in range(6):
        plan = c.plan
        micro = loop.next_step()
        assert len(micro) == plan.accumulation
        assert all(m[0].shape[0] == plan.micro_batch for m in micro)
        seen += [float(v) for m in micro for v in m[0]]
        samples += plan.examples_per_step
        g = torch.randn(10, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
        loop.finish_step(stats=stats_from_samples(g + 0.2))
        assert loop.samples == samples
        assert model_lr.param_groups[0]["lr"] == pytest.approx(
            2.0 * linear_warmup_decay(20, 200)(samples)
        )
    assert c.batch_size > 4
    # an epoch is a permutation: the first 100 examples drawn are all distinct
    assert len(set(seen[:100])) == min(100, len(seen))
    assert loop.loader_rebuilds >= 2


def test_loop_ranks_get_disjoint_slices():
    data = torch.utils.data.TensorDataset(torch.arange(60.0))
    got = []
    for rank in range(3):
        c = AdaptiveBatchSize(9, 9, world_size=3, max_micro_batch=2)
        loop = AdaptiveBatchLoop(data, c, rank=rank, seed=5)
        got.append([float(v) for m in loop.next_step() for v in m[0]])
    flat = [v for r in got for v in r]
    assert len(flat) == c.plan.examples_per_step == 12 and len(set(flat)) == 12


# ---------------------------------------------------------------------- distributed
def _dist_check(rank, world, tmp):
    G = _samples(13, 5, 7)
    parts = torch.tensor_split(G, world)  # uneven shards
    red = all_reduce_stats(stats_from_samples(parts[rank]))
    return {"count": red.count, "mean": red.mean.tolist(), "m2": red.m2.tolist()}


@pytest.mark.distributed
def test_all_reduced_statistics_equal_single_process(tmp_path):
    world = 2
    reports = run_ranks(_dist_check, world, tmp_path)
    whole = stats_from_samples(_samples(13, 5, 7))
    for rep in reports:
        assert rep["count"] == whole.count
        mean = torch.tensor(rep["mean"], dtype=torch.float64)
        m2 = torch.tensor(rep["m2"], dtype=torch.float64)
        torch.testing.assert_close(mean, whole.mean, rtol=0, atol=50 * EPS64)
        torch.testing.assert_close(m2, whole.m2, rtol=0, atol=13 * 50 * EPS64)
        assert K.norm_test(whole, 0.1) == pytest.approx(
            K.norm_test(K.GradStats(rep["count"], mean, m2), 0.1), rel=1e-12
        )
