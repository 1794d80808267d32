"""Shampoo conventions shared with Meta's and Google's implementations, each checked against a
float64 dense reference written here (no library code): tensors whose dims merge into one
get one full-matrix factor, the absolute ridge ``eps * I``, and ``statistics_frequency``.

Tolerances: the library runs in float32 (statistics, roots, parameters) and its Newton
iteration stops at ``max|M - I| <= 1e-6``, i.e. a root accurate to about ``n * 1e-6``
relative; an fp32 root of a matrix of condition ``kappa`` applied to a vector loses up to
``kappa^(1/p)`` float32 epsilons. Each step moves a parameter entry by ``lr * |D|`` with
grafted ``|D| = O(1)``, so after ``T`` steps the entries differ from the fp64 run by about
``T * lr * (n * 1e-6 + 64 eps32 kappa^(1/p))`` (plus ``T`` roundings of the entry itself).
``_tol`` computes that; every test also checks that the alternative it rules out (graft
only, the other ridge, every-step statistics) is at least 10x further away.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secondorder import Shampoo
from secondorder.kernels.roots import absolute_ridge_units, inverse_root

EPS32 = torch.finfo(torch.float32).eps


# --------------------------------------------------------------------------- reference


def merge_reference(shape, block_size):
    """Drop size-1 dims, merge neighbours left to right while the product fits."""
    out = []
    for d in (d for d in shape if d != 1):
        if out and out[-1] * d <= block_size:
            out[-1] *= d
        else:
            out.append(d)
    return tuple(out)


def _root(s, p, eps, ridge):
    lam, q = torch.linalg.eigh(s)
    lam = lam.clamp_min(0)
    r = eps * lam.max() if ridge == "relative" else eps
    return (q * (lam + max(r, 1e-300)).pow(-1.0 / p)) @ q.T


class Ref:
    """Float64 Shampoo (Adam or SGD graft) on a tensor already reshaped to ``merged``.

    ``precondition=False``: graft (Adam) direction only. Statistics are updated at steps
    ``t`` with ``(t - 1) % stat_freq == 0`` and bias corrected by the number of updates.
    """

    def __init__(self, merged, *, lr, betas, eps, ridge="relative", block_size, freq, start,
                 stat_freq=1, graft="adam", precondition=True, exponent=None):  # fmt: skip
        self.lr, (self.b1, self.b2) = lr, betas
        self.eps, self.ridge, self.freq, self.start = eps, ridge, freq, start
        self.stat_freq, self.graft, self.pre = stat_freq, graft, precondition
        self.k = len(merged)
        self.p = exponent or 2 * self.k
        ranges = [[slice(i, min(i + block_size, n)) for i in range(0, n, block_size)]
                  for n in merged]  # fmt: skip
        self.blocks = list(itertools.product(*ranges))
        dims = [[s.stop - s.start for s in b] for b in self.blocks]
        self.stats = [[torch.zeros(n, n, dtype=torch.float64) for n in d] for d in dims]
        self.roots = [[torch.eye(n, dtype=torch.float64) for n in d] for d in dims]
        self.m = torch.zeros(merged, dtype=torch.float64)
        self.v = torch.zeros(merged, dtype=torch.float64)
        self.t = self.updates = 0

    def step(self, w, g):
        self.t += 1
        t, b1, b2, k = self.t, self.b1, self.b2, self.k
        if self.pre and (t - 1) % self.stat_freq == 0:
            self.updates += 1
            for bi, b in enumerate(self.blocks):
                for i in range(k):
                    other = [j for j in range(k) if j != i]
                    gram = torch.tensordot(g[b], g[b], dims=(other, other))
                    self.stats[bi][i] = b2 * self.stats[bi][i] + (1 - b2) * gram
        if self.pre and t >= self.start and (t - self.start) % self.freq == 0:
            bc = 1 - b2**self.updates
            self.roots = [[_root(s / bc, self.p, self.eps, self.ridge) for s in ss]
                          for ss in self.stats]  # fmt: skip
        self.m = b1 * self.m + (1 - b1) * g
        mhat = self.m / (1 - b1**t)
        self.v = b2 * self.v + (1 - b2) * g * g
        adam = mhat / ((self.v / (1 - b2**t)).sqrt() + 1e-8)
        a = adam if self.graft == "adam" else mhat
        if not self.pre or t < self.start:
            return w - self.lr * adam
        out = torch.empty_like(w)
        for bi, b in enumerate(self.blocks):
            d = mhat[b]
            for i, r in enumerate(self.roots[bi]):
                d = torch.tensordot(r, d, dims=([1], [i])).movedim(0, i)
            out[b] = d * a[b].norm() / (d.norm() + 1e-16)
        return w - self.lr * out


def _problem(shape, seed=1, scale=1.0):
    """Gradient of ``0.5 ||A w - c||^2`` (times ``scale``) and a start point."""
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64) / n**0.5
    c = torch.randn(n, generator=gen, dtype=torch.float64)
    w0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    return (lambda w: scale * (a.T @ (a @ w.reshape(-1).double() - c)).reshape(shape)), w0


def _tol(steps, lr, n, kappa, p):
    per_step = n * 1e-6 + 64 * EPS32 * kappa ** (1.0 / p)
    return steps * (lr * per_step + 4 * EPS32)


def _run(shape, steps, refs, *, seed=1, scale=1.0, groups=None, **kw):
    """Train ``shape`` with the library and with each reference (on merged shapes) from the
    same start. Returns the library's final parameter and each reference's (fp64)."""
    grad, w0 = _problem(shape, seed, scale)
    p = torch.nn.Parameter(w0.float().clone())
    opt = Shampoo([p], **kw)
    ws = [w0.reshape(r.m.shape).clone() for r in refs]
    for _ in range(steps):
        p.grad = grad(p.detach()).float()
        opt.step()
        ws = [r.step(w, grad(w).reshape(r.m.shape)) for r, w in zip(refs, ws)]
    return p.detach().double(), [w.reshape(shape) for w in ws], opt


COMMON = dict(lr=0.05, betas=(0.9, 0.95), eps=1e-3, precondition_frequency=2,
              start_preconditioning_step=2)  # fmt: skip


def _ref(merged, *, graft="adam", bs, precondition=True, **kw):
    c = dict(COMMON, **kw)
    return Ref(merged, lr=c["lr"], betas=c["betas"], eps=c["eps"],
               ridge=c.get("ridge", "relative"), block_size=bs, freq=c["precondition_frequency"],
               start=c["start_preconditioning_step"], stat_freq=c.get("statistics_frequency", 1),
               graft=graft, precondition=precondition,
               exponent=c.get("exponent_override"))  # fmt: skip


# ------------------------------------------------- tensors whose dims merge into one


@pytest.mark.parametrize("root_method", ["newton", "eigh"])
@pytest.mark.parametrize(
    "shape, block_size",
    [
        ((4, 3), 12),  # a 4 x 3 weight: 12 <= block_size, one 12 x 12 factor
        ((2, 1, 3, 2), 16),  # a Conv2d(1, 2, (3, 2)) kernel: (2, 3, 2) -> (12,)
        ((3, 1, 4), 64),  # a 3-d tensor with a unit dim
    ],
)
def test_tensor_merging_into_one_dim_gets_one_full_matrix_factor(shape, block_size, root_method):
    merged = merge_reference(shape, block_size)
    assert len(merged) == 1
    steps = 7
    ref = _ref(merged, bs=block_size)
    graft_only = _ref(merged, bs=block_size, precondition=False)
    got, (want, other), opt = _run(
        shape, steps, [ref, graft_only], block_size=block_size, root_method=root_method, **COMMON
    )
    tol = _tol(steps, COMMON["lr"], merged[0], 1 + 1 / COMMON["eps"], 2)
    torch.testing.assert_close(got, want, rtol=0, atol=tol)
    assert (other - want).abs().max() > 10 * tol  # the old, graft-only update is ruled out
    (p,) = opt.state
    assert [tuple(s.shape) for s in opt.state[p]["stats"][0]] == [(1, merged[0], merged[0])]


def test_real_conv_layer_kernel_is_preconditioned_as_one_factor():
    conv = torch.nn.Conv2d(2, 3, kernel_size=2, bias=True)  # weight (3, 2, 2, 2): 24 values
    opt = Shampoo(conv.parameters(), lr=0.1, block_size=32, precondition_frequency=1)
    conv(torch.randn(4, 2, 5, 5)).square().sum().backward()
    opt.step()
    assert [tuple(s.shape) for s in opt.state[conv.weight]["stats"][0]] == [(1, 24, 24)]
    assert "stats" not in opt.state[conv.bias]  # a true vector: graft only by default


@pytest.mark.parametrize("shape", [(12,), (12, 1), (1, 12, 1)])
def test_true_vectors_keep_precondition_1d(shape):
    p = torch.nn.Parameter(torch.randn(shape))
    opt = Shampoo([p], lr=0.1, precondition_frequency=1)
    p.grad = torch.randn(shape)
    opt.step()
    assert "stats" not in opt.state[p]
    q = torch.nn.Parameter(torch.randn(shape))
    opt = Shampoo([q], lr=0.1, precondition_frequency=1, precondition_1d=True)
    q.grad = torch.randn(shape)
    opt.step()
    assert [tuple(s.shape) for s in opt.state[q]["stats"][0]] == [(1, 12, 12)]


def test_exponent_override_applies_to_merged_factor():
    kw = dict(COMMON, exponent_override=4)
    steps, merged = 6, (12,)
    got, (want,), _ = _run((3, 4), steps, [_ref(merged, bs=12, **kw)], block_size=12, **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=_tol(steps, 0.05, 12, 1e3, 4))


@settings(max_examples=12, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=0, max_size=4).map(tuple),
    block_size=st.integers(2, 12),
    p1d=st.booleans(),
)
def test_any_shape_follows_the_merge_rule_and_the_reference(shape, block_size, p1d):
    merged = merge_reference(shape, block_size)
    nonunit = sum(d != 1 for d in shape)
    pre = len(merged) >= 2 or (len(merged) == 1 and (nonunit >= 2 or p1d))
    steps = 5
    kw = dict(COMMON, block_size=block_size, precondition_1d=p1d, root_method="eigh")
    ref = _ref(merged or (1,), bs=block_size, precondition=pre)
    got, (want,), opt = _run(shape, steps, [ref], **kw)
    n = max(merged, default=1)
    kappa = 1 + 1 / COMMON["eps"]
    torch.testing.assert_close(got, want, rtol=0, atol=_tol(steps, 0.05, n, kappa, 2))
    (p,) = opt.state
    assert ("stats" in opt.state[p]) == pre


def test_checkpoint_without_factors_for_a_merged_matrix_loads_and_gains_them():
    """State saved when such tensors were graft-only (no factor entries) still loads."""
    p = torch.nn.Parameter(torch.randn(4, 3))
    kw = dict(lr=0.1, precondition_frequency=2, block_size=12)
    opt = Shampoo([p], **kw)
    for _ in range(3):
        p.grad = torch.randn(4, 3)
        opt.step()
    sd = opt.state_dict()
    old = {k: v for k, v in sd["state"][0].items() if k in ("step", "exp_avg", "graft_v")}
    sd["state"][0] = old
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = Shampoo([q], **kw)
    opt2.load_state_dict(sd)
    st_ = opt2.state[q]
    assert torch.equal(st_["step"], torch.tensor(3.0))
    assert all(not s.any() for s in st_["stats"][0])  # fresh, zero statistics
    assert torch.equal(st_["roots"][0][0][0], torch.eye(12))
    g = torch.randn(4, 3)
    q.grad = g
    opt2.step()
    true = st_["stat_scale"][0][0][0].double() ** 2 * st_["stats"][0][0][0].double()
    want = (1 - 0.999) * torch.outer(g.reshape(-1), g.reshape(-1)).double()
    torch.testing.assert_close(true, want, rtol=0, atol=16 * EPS32 * want.abs().max().item())


# ---------------------------------------------------------------------- absolute ridge


@pytest.mark.parametrize("root_method", ["newton", "eigh"])
def test_absolute_ridge_matches_reference(root_method):
    # eps * I = 0.05 I against statistics whose eigenvalues span ~[0, 1]: the ridge matters
    kw = dict(COMMON, eps=0.05, ridge="absolute", root_method=root_method, block_size=4)
    steps, shape = 7, (5, 4)
    ref = _ref(shape, bs=4, **kw)
    relative = _ref(shape, bs=4, **dict(kw, ridge="relative"))
    got, (want, other), _ = _run(shape, steps, [ref, relative], **kw)
    lam_max = max(torch.linalg.eigvalsh(s).max().item() for ss in ref.stats for s in ss)
    tol = _tol(steps, 0.05, 5, 1 + lam_max / 0.05, 4)
    torch.testing.assert_close(got, want, rtol=0, atol=tol)
    assert (other - want).abs().max() > 10 * tol


@pytest.mark.parametrize(
    "scale, eps",
    [(1e-20, 1e-3), (1.0, 0.1), (1e15, 1e29)],  # ridge dominates / comparable / huge units
)
@pytest.mark.parametrize("method", ["newton", "eigh"])
def test_absolute_ridge_units_give_the_root_of_the_true_statistics(scale, eps, method):
    """Statistics kept as ``scale^2 * S_hat``: the root of ``scale^2 S_hat + eps I`` without
    overflow or underflow whatever the scale (``eps / scale^2`` alone is 1e37 in the
    first case, at the edge of float32)."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    s_hat = g @ g.T  # rank 3 of 6: singular, the ridge decides the null space
    p = 4
    m, sigma, eps_b = absolute_ridge_units(s_hat.float()[None], torch.tensor([scale]), eps)
    res = inverse_root(m, p, method=method, ridge="absolute", ridge_epsilon=eps_b)
    got = res.root[0].double() * sigma[0] ** (-2.0 / p)
    lam, q = torch.linalg.eigh(s_hat * scale**2)
    want = (q * (lam.clamp_min(0) + eps).pow(-1.0 / p)) @ q.T
    kappa = (lam.max().item() + eps) / eps
    tol = 6 * 1e-6 + 64 * EPS32 * kappa ** (1 / p)  # Newton tolerance x n, fp32 x conditioning
    assert bool(res.ok[0])
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


def test_ridge_is_per_param_group():
    a = torch.nn.Parameter(torch.randn(5, 4))
    b = torch.nn.Parameter(torch.randn(5, 4))
    opt = Shampoo([{"params": [a]}, {"params": [b], "ridge": "absolute", "eps": 0.05}],
                  lr=0.05, block_size=4, precondition_frequency=1)  # fmt: skip
    assert [g["ridge"] for g in opt.param_groups] == ["relative", "absolute"]
    # the groups are solved apart: one group's roots equal a run of that group alone
    solo = torch.nn.Parameter(b.detach().clone())
    opt_solo = Shampoo([solo], lr=0.05, block_size=4, precondition_frequency=1,
                       ridge="absolute", eps=0.05)  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        gb = torch.randn(5, 4, generator=gen)
        a.grad, b.grad, solo.grad = torch.randn(5, 4, generator=gen), gb, gb.clone()
        opt.step()
        opt_solo.step()
    assert torch.equal(b, solo)


@pytest.mark.parametrize("value", ["abs", "Relative", None, 1])
def test_bad_ridge_raises_naming_argument_and_values(value):
    p = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"ridge must be one of 'relative', 'absolute'"):
        Shampoo([p], ridge=value)
    opt = Shampoo([p])
    q = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="ridge"):
        opt.add_param_group({"params": [q], "ridge": value})
    assert len(opt.param_groups) == 1


# ----------------------------------------------------------------- statistics_frequency


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("root_method", ["newton", "eigh"])
def test_statistics_frequency_matches_reference(k, root_method):
    """k = 2: statistics at steps 1, 3, 5, ... (bias corrected by the number of updates);
    roots every 2 steps from step 2 see the statistics of the steps before."""
    kw = dict(COMMON, statistics_frequency=k, root_method=root_method, block_size=4)
    steps, shape = 9, (5, 4)
    ref = _ref(shape, bs=4, **kw)
    every_step = _ref(shape, bs=4, **dict(kw, statistics_frequency=1))
    got, (want, other), _ = _run(shape, steps, [ref, every_step], **kw)
    tol = _tol(steps, 0.05, 5, 1 + 1 / COMMON["eps"], 4)
    torch.testing.assert_close(got, want, rtol=0, atol=tol)
    assert (other - want).abs().max() > 10 * tol


def test_statistics_frequency_skips_exactly_the_off_steps():
    p = torch.nn.Parameter(torch.zeros(4, 3))
    opt = Shampoo([p], lr=0.0, betas=(0.0, 1.0), graft="adagrad", block_size=4,
                  statistics_frequency=3)  # fmt: skip
    gs = [torch.randn(4, 3) for _ in range(7)]
    for g in gs:
        p.grad = g
        opt.step()
    st_ = opt.state[p]
    true = st_["stat_scale"][0][0][0].double() ** 2 * st_["stats"][0][0][0].double()
    want = sum(gs[i].double() @ gs[i].double().T for i in (0, 3, 6))  # steps 1, 4, 7
    torch.testing.assert_close(true, want, rtol=0, atol=16 * EPS32 * want.abs().max().item())


def test_statistics_frequency_is_per_group_and_round_trips_state_dict():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    clone = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))

    def make(m):
        return Shampoo([{"params": m[0].parameters(), "statistics_frequency": 2},
                        {"params": m[2].parameters(), "statistics_frequency": 3}],
                       lr=0.05, precondition_frequency=2, block_size=5)  # fmt: skip

    opt = make(model)
    x, y = torch.randn(32, 6), torch.randn(32, 3)

    def train(m, o, n):
        for _ in range(n):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()

    train(model, opt, 5)
    sd = opt.state_dict()
    assert [g["statistics_frequency"] for g in sd["param_groups"]] == [2, 3]
    clone.load_state_dict(model.state_dict())
    opt2 = make(clone)
    opt2.load_state_dict(sd)
    train(model, opt, 6)
    train(clone, opt2, 6)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("value", [0, -1, 1.5, "2", True])
def test_bad_statistics_frequency_raises_naming_argument(value):
    p = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises((ValueError, TypeError), match="statistics_frequency"):
        Shampoo([p], statistics_frequency=value)


def test_inverse_root_rejects_bad_ridge_arguments():
    a = torch.eye(3)
    with pytest.raises(ValueError, match="ridge must be one of"):
        inverse_root(a, 2, ridge="abs")
    with pytest.raises(ValueError, match="ridge_epsilon"):
        inverse_root(a[None], 2, ridge="absolute", ridge_epsilon=torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="ridge_epsilon"):
        inverse_root(a[None], 2, ridge="absolute", ridge_epsilon=torch.ones(1, 1))


def test_absolute_ridge_per_matrix_tensor_is_exact_on_diagonal_matrices():
    """``(diag(d) + e I)^(-1/2) = diag((d + e)^(-1/2))``, one ``e`` per matrix."""
    d = torch.tensor([[4.0, 1.0, 0.0], [9.0, 0.0, 0.0]])
    e = torch.tensor([0.5, 2.0])
    res = inverse_root(torch.diag_embed(d), 2, method="eigh", ridge="absolute", ridge_epsilon=e)
    want = torch.diag_embed((d + e[:, None]).double().pow(-0.5))
    torch.testing.assert_close(res.root.double(), want, rtol=8 * EPS32, atol=8 * EPS32)
