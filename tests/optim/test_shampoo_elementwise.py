"""Shampoo's elementwise pipeline: pieces, multi-tensor ops, scaled Kronecker products.

* ``OldShampoo`` below is a copy of the per-parameter computation Shampoo used before the
  pipeline was cut into pieces, run with multi-tensor ops and preconditioned in scaled
  units: one tensor at a time, whole tensors, ``kron.precondition`` in true units. With
  ordinary gradients the new optimizer must give bit-identical parameters and state. (Both
  share the final ``p -= lr * d``, which for bfloat16 parameters is now rounded once from
  float32: torch's bfloat16 ``add_`` rounds a tensor's tail elements differently.)
* A tiny ``root_memory_budget`` cuts every tensor into pieces of one block row (or a few
  elements): bit-identical to ``root_memory_budget=None`` (whole tensors).
* ``pieces.row_blocks`` maps rows to the very blocks ``BlockPlan.split`` makes.
* ``kron.precondition_scaled`` is ``kron.precondition`` up to exact powers of two, and stays
  finite where the unscaled product overflows.

The shapes are small, so the batched matmuls run torch's plain loops (no BLAS kernel choice
that could depend on the CPU): the bit-identical comparisons hold on any CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secondorder import Shampoo
from secondorder.blocking import BlockPlan
from secondorder.kernels import kron
from secondorder.kernels.grafting import graft_direction, graft_rescale, update_second_moment
from secondorder.optim import pieces
from secondorder.optim import shampoo_steps as shampoo_module

# blocked rows and columns, remainders, a merged conv kernel, a 3-d tensor, a vector, a scalar
SHAPES = [(11, 7), (6, 13), (4, 3, 2, 2), (5, 4, 6), (9,), ()]
BASE = dict(lr=0.05, block_size=4, precondition_frequency=2, start_preconditioning_step=2)
CONFIGS = {
    "adam": dict(weight_decay=0.01),
    "rmsprop-nesterov-1d": dict(graft="rmsprop", nesterov=True, precondition_1d=True),
    "adagrad-l2": dict(graft="adagrad", weight_decay=0.1, decoupled_weight_decay=False),
    "sgd": dict(graft="sgd", betas=(0.5, 0.9)),
    "none-nomomentum": dict(graft=None, betas=(0.0, 1.0), eps=1e-4),
    "bf16-matmuls": dict(matmul_dtype=torch.bfloat16, packed_statistics=True),
    "graft-on-failure": dict(on_root_failure="graft", max_consecutive_root_failures=1),
}


class OldShampoo(Shampoo):
    """Shampoo with the previous per-parameter code (a copy kept here as the reference)."""

    def _update_local(self, items):
        for it in items:
            self._apply_direction(it.group, it.p, self._old_direction(it))

    def _old_direction(self, it):
        group, state, g, plan, t = it.group, it.state, it.g, it.plan, it.t
        beta1, beta2 = group["betas"]
        preconditioned = plan is not None and t >= self._start(group)
        kind = self._graft_kind(group, preconditioned)
        if beta1 > 0:
            m = state["exp_avg"]
            m.lerp_(g, 1.0 - beta1)
            mhat = self._momentum_hat(group, m, g, t)
        else:
            mhat = g
        v = state.get("graft_v")
        if v is not None and kind is not None:
            update_second_moment(kind, v, g, beta2)
        a = None if kind is None else graft_direction(kind, mhat, v, t, beta2, group["graft_eps"])
        if not preconditioned:
            return a
        a_blocks = plan.split(a) if kind is not None else None
        graft_failed = group["on_root_failure"] == "graft" and "root_streak" in state
        d_blocks = []
        for c, (x, roots) in enumerate(zip(plan.split(mhat), state["roots"])):
            d = kron.precondition(x, roots).float()
            ab = None
            if kind is not None:
                ab = a_blocks[c]
                graft_rescale(d, ab)
            if graft_failed:
                limit = group["max_consecutive_root_failures"]
                bad = torch.stack([s >= limit for s in state["root_streak"][c]]).any(0)
                fallback = ab if ab is not None else x.float()
                d = torch.where(bad.view(-1, *([1] * (d.dim() - 1))), fallback, d)
            d_blocks.append(d)
        return plan.merge(d_blocks)


def _params(dtype=torch.float32, shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def _run(cls, params, steps=7, seed=1, **kw):
    opt = cls(params, **kw)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()
    return opt


def _flat(x, out):
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, dict):
        for k in sorted(x, key=str):
            _flat(x[k], out)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _flat(v, out)
    return out


def _assert_identical(o1, p1, o2, p2, where):
    for i, (a, b) in enumerate(zip(p1, p2)):
        assert torch.equal(a, b), f"{where}: parameter {i} {tuple(a.shape)} differs"
    for i, (a, b) in enumerate(zip(p1, p2)):
        s1, s2 = _flat(dict(o1.state[a]), []), _flat(dict(o2.state[b]), [])
        assert len(s1) == len(s2)
        for x, y in zip(s1, s2):
            assert x.dtype == y.dtype and torch.equal(x, y), f"{where}: state of parameter {i}"


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ordinary_gradients_step_bit_identically_to_the_previous_code(config, dtype):
    kw = dict(BASE, **CONFIGS[config])
    p_new, p_old = _params(dtype), _params(dtype)
    o_new = _run(Shampoo, p_new, root_memory_budget=None, **kw)
    o_old = _run(OldShampoo, p_old, root_memory_budget=None, **kw)
    _assert_identical(o_new, p_new, o_old, p_old, f"{config}, {dtype}")


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pieces_under_a_tiny_budget_equal_whole_tensors(config, dtype, monkeypatch):
    # budget 1: one block row (or one element) per piece, one root matrix per solver call
    monkeypatch.setattr(shampoo_module, "_MIN_PIECE_ELEMENTS", 1)
    kw = dict(BASE, **CONFIGS[config])
    shapes = SHAPES + [(17, 5), (3, 9)]
    p_cut, p_whole = _params(dtype, shapes), _params(dtype, shapes)
    o_cut = _run(Shampoo, p_cut, root_memory_budget=1, **kw)
    o_whole = _run(Shampoo, p_whole, root_memory_budget=None, **kw)
    _assert_identical(o_cut, p_cut, o_whole, p_whole, f"{config}, {dtype}")


def test_pieces_are_actually_cut(monkeypatch):
    seen = []
    real = Shampoo._update_pieces

    def spy(self, chunk):
        seen.append([(tuple(pc.item.p.shape), pc.rows) for pc in chunk])
        return real(self, chunk)

    monkeypatch.setattr(Shampoo, "_update_pieces", spy)
    monkeypatch.setattr(shampoo_module, "_MIN_PIECE_ELEMENTS", 1)
    params = _params(shapes=[(11, 7), (9,), (2, 2)])
    _run(Shampoo, params, steps=2, root_memory_budget=4 * 8 * 28, **BASE)  # 28 elements
    first = seen[: len(seen) // 2]
    rows = [r for chunk in first for s, r in chunk if s == (11, 7)]
    assert rows == [(0, 4), (4, 8), (8, 11)]  # block rows of 4 x 7 = 28 elements
    assert [r for chunk in first for s, r in chunk if s == (9,)] == [None]  # fits: whole
    # small tensors of one group share a chunk (one multi-tensor call per operation)
    assert any(len(chunk) > 1 for chunk in first)


def test_a_tiny_budget_keeps_pieces_of_a_reasonable_size(monkeypatch):
    seen = []
    real = Shampoo._update_pieces

    def spy(self, chunk):
        seen.extend(pc.numel for pc in chunk)
        return real(self, chunk)

    monkeypatch.setattr(Shampoo, "_update_pieces", spy)
    _run(Shampoo, _params(shapes=[(300_000,)]), steps=1, root_memory_budget=1, **BASE)
    assert seen == [2**16] * 4 + [300_000 - 4 * 2**16]


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    block_size=st.integers(1, 6),
    max_elements=st.integers(1, 200),
)
def test_row_blocks_are_the_blocks_of_the_full_plan(shape, block_size, max_elements):
    plan = BlockPlan(shape, block_size)
    if not plan.merged_shape:
        return
    x = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    full = plan.split(x)
    xm = x.view(plan.merged_shape)
    covered = [torch.zeros(n, dtype=torch.int64) for n in plan.counts]
    rebuilt = torch.empty_like(xm)
    for lo, hi in pieces.row_ranges(plan, x.numel(), max_elements):
        rb = pieces.row_blocks(plan, lo, hi)
        stacks = rb.split(xm[lo:hi])
        for (c, first, end), s in zip(rb.classes, stacks):
            assert torch.equal(full[c][first:end], s)
            covered[c][first:end] += 1
        rebuilt[lo:hi] = rb.merge(stacks).reshape(hi - lo, *plan.merged_shape[1:])
    assert all(bool((c == 1).all()) for c in covered)  # every block exactly once
    assert torch.equal(rebuilt, xm)


# ------------------------------------------------------------------ scaled products


def _stack(shape, gen, scale=1.0):
    x = torch.randn(shape, generator=gen) * scale
    roots = []
    for n in shape[1:]:
        a = torch.randn(shape[0], n, n, generator=gen)
        roots.append(a + a.mT)
    return x, roots


@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 3), (2, 3, 4, 2), (1, 2, 3, 2, 2)])
@pytest.mark.parametrize("scale", [1.0, 1e-20, 1e20])
def test_precondition_scaled_is_precondition_times_powers_of_two(shape, scale):
    gen = torch.Generator().manual_seed(3)
    x, roots = _stack(shape, gen, scale)
    d, s = kron.precondition_scaled(x, roots)
    assert d.abs().amax() < 2 and s.dtype == torch.float64
    assert torch.equal(s, torch.exp2(torch.log2(s).round()))  # powers of two
    want = kron.precondition(x, roots).float()
    assert torch.equal(kron.unscale(d.clone(), s, limit=math.inf), want)
    assert torch.equal(kron.unscale(d.clone(), s), want.clamp(-(2.0**63), 2.0**63))


def test_precondition_scaled_is_finite_where_the_plain_product_overflows():
    gen = torch.Generator().manual_seed(4)
    x, roots = _stack((2, 6, 5), gen, 1e19)
    roots = [r * 1e15 for r in roots]  # roots of tiny statistics
    assert not torch.isfinite(kron.precondition(x, roots)).all()
    d, s = kron.precondition_scaled(x, roots)
    assert torch.isfinite(d).all() and d.abs().amax() >= 1
    # float64 reference of the direction (the product's overflow-free unit vector)
    ref = kron.precondition(x.double(), [r.double() for r in roots])
    ref = ref / torch.linalg.vector_norm(ref.flatten(1), dim=1).view(-1, 1, 1)
    got = d.double() / torch.linalg.vector_norm(d.double().flatten(1), dim=1).view(-1, 1, 1)
    # float32 products over 6 + 5 terms: a few hundred eps at most
    assert (got - ref).abs().max() < 1e3 * torch.finfo(torch.float32).eps
    sat = kron.unscale(d.clone(), s)
    assert torch.isfinite(sat).all() and sat.abs().amax() == kron.DIRECTION_LIMIT


def test_pow2_floor_is_exact_and_clamped():
    a = torch.tensor([0.0, 1e-40, 2.0**-126, 0.75, 1.0, 3.0, 2.0**63 * 1.5, 3e38])
    want = torch.tensor([2.0**-126, 2.0**-126, 2.0**-126, 0.5, 1.0, 2.0, 2.0**63, 2.0**127])
    assert torch.equal(kron.pow2_floor(a), want)
    x = torch.tensor([[0.0, -3.0], [1e-3, 2e-3]])
    assert torch.equal(kron.block_amax(x), torch.tensor([3.0, 2e-3]))


def test_graft_rescale_keeps_zero_blocks_zero_with_an_underflowing_tiny():
    d = torch.zeros(2, 3, 3)
    d[1] = 1.0
    a = torch.ones(2, 3, 3)
    out = graft_rescale(d, a, torch.zeros(2, 1, 1))
    assert torch.equal(out[0], torch.zeros(3, 3)) and torch.allclose(out[1], torch.ones(3, 3))


def test_huge_gradient_after_tiny_ones_stays_finite_and_points_like_float64():
    """The jump of the contract test, on one matrix: roots of 1e-30 statistics meet 1e30
    gradients. The grafted direction is finite and parallel to the float64 one."""
    p = torch.nn.Parameter(torch.zeros(6, 5))
    opt = Shampoo([p], lr=1.0, betas=(0.0, 0.99), block_size=8, precondition_frequency=100,
                  start_preconditioning_step=1, graft="adagrad")
    gen = torch.Generator().manual_seed(5)
    p.grad = torch.randn(6, 5, generator=gen) * 1e-30
    opt.step()  # roots of tiny statistics, kept for 100 steps
    before = p.detach().clone()
    g = torch.randn(6, 5, generator=gen) * 1e30
    p.grad = g
    opt.step()
    step = (before - p.detach()).double()
    assert torch.isfinite(step).all()
    st_ = opt.state[p]
    r = [x[0].double() for x in st_["roots"][0]]
    ref = r[0] @ g.clamp(-(2.0**63), 2.0**63).double() @ r[1]
    cos = (step * ref).sum() / (step.norm() * ref.norm())
    assert cos > 1 - 1e-5
    assert step.norm() > 0
