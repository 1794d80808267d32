"""AdaGradNorm against its closed form (float64 references written here)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secondorder import AdaGradNorm


def _grads(shapes, steps, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(steps)
    ]


def _run(shapes, grads, **kw):
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in shapes]
    opt = AdaGradNorm(params, **kw)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return params, opt


@settings(max_examples=15, deadline=None)
@given(
    shapes=st.lists(
        st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=3
    ),
    steps=st.integers(1, 5),
    seed=st.integers(0, 1000),
)
def test_scalar_mode_matches_closed_form(shapes, steps, seed):
    lr, b0, eps = 0.3, 0.5, 1e-10
    grads = _grads(shapes, steps, seed)
    params, _ = _run(shapes, grads, lr=lr, initial_accumulator=b0, eps=eps)
    # reference: one scalar over the concatenated gradient of all parameters
    w = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    acc = b0
    for gs in grads:
        acc += sum(float(g.square().sum()) for g in gs)
        for x, g in zip(w, gs):
            x -= lr * g / (math.sqrt(acc) + eps)
    # float64 parameters: float64 arithmetic throughout (sums in another order only)
    for p, x in zip(params, w):
        torch.testing.assert_close(p.detach(), x, rtol=1e-12, atol=1e-14)


def test_scalar_step_norm_is_at_most_lr():
    # first step: ‖Δw‖ = lr ‖g‖ / sqrt(b0² + ‖g‖²) < lr
    shapes = [(5, 3), (3,)]
    grads = _grads(shapes, 1, 0)
    params, _ = _run(shapes, grads, lr=0.7, initial_accumulator=1e-2)
    norm = math.sqrt(sum(float(p.detach().square().sum()) for p in params))
    gn = math.sqrt(sum(float(g.square().sum()) for g in grads[0]))
    assert norm == pytest.approx(0.7 * gn / math.sqrt(1e-2 + gn**2), rel=1e-6)


def test_row_mode_matches_closed_form():
    shapes = [(4, 3), (2, 3, 2, 2), (5,), ()]
    lr, b0 = 0.2, 1.0
    grads = _grads(shapes, 4, 3)
    params, opt = _run(shapes, grads, lr=lr, initial_accumulator=b0, mode="row")
    for i, s in enumerate(shapes):
        x = torch.zeros(s, dtype=torch.float64)
        rows = x.reshape(s[0], -1) if len(s) else x.reshape(1, 1)
        acc = torch.full((rows.shape[0],), b0, dtype=torch.float64)
        for gs in grads:
            g = gs[i].reshape(rows.shape)
            acc += g.square().sum(1)
            rows -= lr * g / (acc.sqrt() + 1e-10).unsqueeze(1)  # default eps
        torch.testing.assert_close(params[i].detach(), x, rtol=1e-12, atol=1e-14)
        assert opt.state[params[i]]["sum_sq"].shape == (rows.shape[0],)


def test_params_without_grad_keep_their_share():
    a = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = AdaGradNorm([a, b], lr=1.0, initial_accumulator=1.0, eps=0.0)
    a.grad, b.grad = torch.ones(3, dtype=torch.float64), torch.full((2,), 2.0, dtype=torch.float64)
    opt.step()  # acc = 1 + 3 + 8 = 12
    b.grad = None
    a_before = a.detach().clone()
    opt.step()  # acc = 12 + 3 = 15; b untouched
    torch.testing.assert_close(a.detach(), a_before - 1 / math.sqrt(15.0))
    expected_b = torch.full((2,), -2 / math.sqrt(12.0), dtype=torch.float64)
    torch.testing.assert_close(b.detach(), expected_b)


def test_weight_decay_is_l2_on_the_gradient():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = AdaGradNorm([p], lr=0.5, initial_accumulator=1.0, weight_decay=0.1, eps=0.0)
    p.grad = torch.tensor([0.3, 0.4], dtype=torch.float64)
    g = p.grad + 0.1 * p.detach()
    expected = p.detach() - 0.5 * g / math.sqrt(1.0 + float(g.square().sum()))
    opt.step()
    torch.testing.assert_close(p.detach(), expected)


def test_diagnostics_and_state_bytes():
    shapes = [(4, 3), (3,)]
    grads = _grads(shapes, 2, 1)
    _, opt = _run(shapes, grads, lr=0.5, initial_accumulator=0.25, eps=0.0)
    (rec,) = opt.diagnostics()
    acc = 0.25 + sum(float(g.square().sum()) for gs in grads for g in gs)
    assert rec["step"] == 2 and rec["mode"] == "scalar"
    assert rec["accumulator"] == pytest.approx(acc, rel=1e-6)
    assert rec["effective_lr"] == pytest.approx(0.5 / math.sqrt(acc), rel=1e-6)
    assert opt.state_bytes() == 2 * (4 + 8)  # per param: step (fp32) + sum_sq (fp64, 0-d)
    _, opt = _run(shapes, grads, mode="row")
    (rec,) = opt.diagnostics()
    assert rec["accumulator_min"] <= rec["accumulator_max"]
    assert opt.state_bytes() == 2 * 4 + (4 + 3) * 8


def test_loading_state_that_does_not_fit_the_mode_raises():
    p = torch.nn.Parameter(torch.zeros(4, 3))
    p.grad = torch.ones(4, 3)
    row = AdaGradNorm([p], mode="row")
    row.step()
    sd = row.state_dict()
    sd["param_groups"][0]["mode"] = "scalar"  # row statistics under a scalar-mode group
    target = AdaGradNorm([p])
    before = p.detach().clone()
    with pytest.raises(ValueError, match="sum_sq"):
        target.load_state_dict(sd)
    assert not target.state and torch.equal(p.detach(), before)
    target.load_state_dict(row.state_dict())  # as saved: loads, mode from the checkpoint
    assert target.param_groups[0]["mode"] == "row"


def test_changing_mode_mid_training_raises_before_any_change():
    ps = [torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(2))]
    for p in ps:
        p.grad = torch.ones_like(p)
    opt = AdaGradNorm(ps, mode="row")
    opt.step()
    opt.param_groups[0]["mode"] = "scalar"
    before = [p.detach().clone() for p in ps]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in ps]
    with pytest.raises(ValueError, match="mode cannot change"):
        opt.step()
    for p, b, saved in zip(ps, before, state):
        assert torch.equal(p.detach(), b)
        assert all(torch.equal(opt.state[p][k], v) for k, v in saved.items())
