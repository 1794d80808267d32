"""Muon against a dense float64 reference written here, and torch.optim.AdamW.

The reference orthogonalisation is the quintic polynomial applied to the singular values
of an SVD in float64 (exactly what the iteration computes in exact arithmetic); the
float32 iteration matches it to ``AMP * n * eps32`` (``AMP = 10 * 3.4445**steps``, the
largest slope of the polynomial per step, see tests/kernels/test_newton_schulz.py).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _role_models import TinyLM, lm_batch, lm_loss, lm_train
from torch import nn

import secondorder.kernels.newton_schulz as ns
from secondorder import Muon
from secondorder.kernels.newton_schulz import NS_COEFFICIENTS, scalar_map
from secondorder.optim.muon import shape_factor
from secondorder.roles import param_roles

EPS32 = torch.finfo(torch.float32).eps


def amp(steps: int) -> float:
    return 10.0 * NS_COEFFICIENTS[0] ** steps


def ns_reference(u: torch.Tensor, steps: int) -> torch.Tensor:
    """float64: U phi^steps(S / ||U||_F) V^T of the (out, -1) matrix of ``u``."""
    mat = u.double().reshape(u.shape[0], -1)
    a, s, bh = torch.linalg.svd(mat, full_matrices=False)
    return (a * scalar_map(s / (s.norm() + ns.NS_EPS), steps)) @ bh


def muon_reference(grads, lr, beta, nesterov, steps, scaling, wd, w0):
    """Dense float64 Muon trajectory of one matrix."""
    w, m = w0.double().clone(), torch.zeros_like(w0, dtype=torch.float64)
    for g in grads:
        g = g.double()
        m = beta * m + (1 - beta) * g
        u = (1 - beta) * g + beta * m if nesterov else m
        o = ns_reference(u, steps).reshape(w.shape)
        rows = w.shape[0]
        w = (1 - lr * wd) * w - lr * shape_factor(scaling, rows, w.numel() // rows) * o
    return w


@pytest.mark.parametrize(
    "shape, nesterov, scaling, ns_steps",
    [((6, 10), True, "rms", 5), ((10, 6), False, "spectral", 5), ((4, 3, 2, 2), True, "none", 3),
     ((8, 8), False, "rms", 6)],
)  # fmt: skip
def test_matches_the_dense_reference(shape, nesterov, scaling, ns_steps):
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(shape, generator=g)
    grads = [torch.randn(shape, generator=g) for _ in range(4)]
    kw = dict(lr=0.02, momentum=0.9, nesterov=nesterov, ns_steps=ns_steps, scaling=scaling)
    p = nn.Parameter(w0.clone())
    opt = Muon([p], weight_decay=0.1, **kw)
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
    ref = muon_reference(grads, wd=0.1, steps=ns_steps, beta=0.9, w0=w0,
                         **{k: kw[k] for k in ("lr", "nesterov", "scaling")})  # fmt: skip
    rows, cols = shape[0], math.prod(shape[1:])
    c = shape_factor(scaling, rows, cols)
    # per step: the orthogonalised direction to AMP*n*eps (times lr*c), the parameter to |w| eps
    tol = len(grads) * (0.02 * c * amp(ns_steps) * max(rows, cols) + 4 * ref.abs().max()) * EPS32
    torch.testing.assert_close(p.detach().double(), ref, rtol=0, atol=float(tol))


def test_update_is_close_to_the_polar_factor_and_rms_matches_adamw():
    """One step of a full-rank, well-conditioned gradient: ``-lr c O`` with ``O`` within the
    iteration's band of ``U V^T``; with ``scaling="rms"`` the update's RMS is 0.2 lr times a
    factor inside the same band (AdamW's first update has RMS exactly lr times 1)."""
    g = torch.Generator().manual_seed(1)
    q1, _ = torch.linalg.qr(torch.randn(24, 12, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    grad = (q1 * torch.logspace(0, -0.5, 12, dtype=torch.float64)) @ q2.T  # cond ~3
    p = nn.Parameter(torch.zeros(24, 12))
    p.grad = grad.float()
    lr = 0.1
    Muon([p], lr=lr, momentum=0.0).step()
    o = -p.detach().double() / (lr * shape_factor("rms", 24, 12))
    sv = torch.linalg.svdvals(grad)
    s = torch.logspace(math.log10(float(sv.min() / sv.norm())), 0, 100_001, dtype=torch.float64)
    band = scalar_map(s, 5)
    lo, hi = float(band.min()), float(band.max())
    slack = amp(5) * 24 * EPS32
    err = torch.linalg.matrix_norm(o - q1 @ q2.T, ord=2)
    assert err <= max(1 - lo, hi - 1) + slack
    rms = p.detach().double().pow(2).mean().sqrt() / lr
    assert 0.2 * (lo - slack) <= rms <= 0.2 * (hi + slack)


def test_same_shape_matrices_are_orthogonalised_in_one_batched_call(monkeypatch):
    """Three (6, 10) matrices, one (10, 6), and a (4, 3, 2, 2) conv kernel (flattened to
    (4, 12)), across two param groups: two Newton-Schulz calls, results as if alone."""
    g = torch.Generator().manual_seed(2)
    shapes = [(6, 10), (6, 10), (10, 6), (4, 3, 2, 2), (6, 10)]
    init = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    ps = [nn.Parameter(t.clone()) for t in init]
    opt = Muon([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.01}], lr=0.02)
    calls = []
    real = ns.newton_schulz

    def counting(x, steps, dtype):
        calls.append(tuple(x.shape))
        return real(x, steps, dtype)

    monkeypatch.setattr(ns, "newton_schulz", counting)
    for k in range(3):
        for p, gr in zip(ps, grads[k]):
            p.grad = gr.clone()
        opt.step()
    assert sorted(calls) == [(1, 4, 12), (1, 4, 12), (1, 4, 12), (4, 6, 10), (4, 6, 10),
                             (4, 6, 10)]  # fmt: skip
    for i, t in enumerate(init):
        alone = nn.Parameter(t.clone())
        single = Muon([alone], lr=0.02 if i < 2 else 0.01)
        for k in range(3):
            alone.grad = grads[k][i].clone()
            single.step()
        torch.testing.assert_close(ps[i], alone, rtol=0, atol=3 * 0.02 * 3 * amp(5) * 10 * EPS32)


def test_embeddings_output_and_vectors_use_torch_adamw():
    torch.manual_seed(0)
    model = TinyLM()
    ref_model = copy.deepcopy(model)
    opt = Muon.from_model(model, lr=0.01, weight_decay=0.05, adamw_betas=(0.9, 0.95))
    roles = param_roles(ref_model)
    adamw_params = [p for r in ("embedding", "output", "vector") for p in roles[r].values()]
    ref = torch.optim.AdamW(adamw_params, lr=0.01, weight_decay=0.05, betas=(0.9, 0.95))
    hidden_ref = Muon(list(roles["hidden"].values()), lr=0.01, weight_decay=0.05)
    steps = 5
    lm_train(model, opt, range(steps))
    for k in range(steps):  # the same run, with torch's AdamW for the non-hidden tensors
        ref.zero_grad()
        hidden_ref.zero_grad()
        lm_loss(ref_model, lm_batch(k)).backward()
        ref.step()
        hidden_ref.step()
    # the same elementwise operations as torch's: equal up to rounding of each step
    for (n, a), b in zip(model.named_parameters(), ref_model.parameters()):
        tol = 4 * steps * (0.01 + b.abs().max().item()) * EPS32
        torch.testing.assert_close(a, b, rtol=0, atol=tol, msg=n)


def test_state_size_and_roles_from_model():
    model = TinyLM()
    opt = Muon.from_model(model, adamw_lr=3e-3)
    assert {g["role"]: g["lr"] for g in opt.param_groups} == {
        "hidden": 1e-3, "embedding": 3e-3, "output": 3e-3, "vector": 3e-3}  # fmt: skip
    lm_train(model, opt, range(2))
    numel = {r: sum(p.numel() for p in d.values()) for r, d in param_roles(model).items()}
    assert opt.state_numel(per_element_only=True) == numel["hidden"] + 2 * (
        numel["embedding"] + numel["output"] + numel["vector"]
    )


def test_bfloat16_iteration_runs_and_stays_close():
    """ns_dtype=bfloat16 (for accelerators): a loose check only. bfloat16's eps (2**-8)
    times the amplification bound AMP exceeds one, so no useful bound follows from the
    analysis; the band [0.68, 1.2] is checked widened to [0.3, 1.5] and the update must be
    within 10% of the float32 one."""
    g = torch.Generator().manual_seed(3)
    grad = torch.randn(16, 32, generator=g)
    a, b = nn.Parameter(torch.zeros(16, 32)), nn.Parameter(torch.zeros(16, 32))
    a.grad, b.grad = grad.clone(), grad.clone()
    Muon([a], momentum=0.0, lr=1.0, scaling="none").step()
    Muon([b], momentum=0.0, lr=1.0, scaling="none", ns_dtype=torch.bfloat16).step()
    sv = torch.linalg.svdvals(b.detach().double())
    assert torch.isfinite(b).all() and 0.3 < float(sv.min()) and float(sv.max()) < 1.5
    assert float((a - b).detach().norm() / a.detach().norm()) < 0.1


def test_from_model_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    model = TinyLM()
    opt = Muon.from_model(model, lr=0.01)
    lm_train(model, opt, range(3))
    sd = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = Muon.from_model(model2, lr=0.3, nesterov=False)  # the checkpoint's settings win
    opt2.load_state_dict(sd)
    lm_train(model, opt, range(3, 6))
    lm_train(model2, opt2, range(3, 6))
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_diagnostics_report_the_singular_value_range():
    torch.manual_seed(0)
    model = TinyLM()
    opt = Muon.from_model(model)
    lm_train(model, opt, range(3))
    recs = opt.diagnostics()
    hidden = [r for r in recs if r["update"] == "muon"]
    assert {r["role"] for r in hidden} == {"hidden"}
    conv = next(r for r in hidden if len(r["shape"]) == 3)
    assert conv["matrix"] == (6, 18)
    assert conv["shape_factor"] == pytest.approx(0.2 * math.sqrt(18))
    for r in hidden:
        assert 0 <= r["sv_min"] <= r["sv_max"] <= 1.21 and r["momentum_norm"] > 0
    assert all(r["step"] == 3 for r in recs if r["update"] == "adamw")
