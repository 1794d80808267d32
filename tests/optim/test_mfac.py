"""secondorder.MFAC: each step against dense float64 solves of the damped empirical Fisher."""

from __future__ import annotations

import pytest
import torch

from secondorder import MFAC

EPS64 = torch.finfo(torch.float64).eps


def _params(sizes=(7, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64)) for n in sizes]


def _step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    before = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    opt.step()
    after = torch.cat([p.detach().reshape(-1) for p in params])
    return before - after  # lr * u


def _block_diag_mask(sizes, block):
    """Blocks of ``block`` consecutive entries within each parameter (last ones shorter)."""
    n = sum(sizes)
    mask = torch.zeros(n, n, dtype=torch.bool)
    start = 0
    for size in sizes:
        bl = min(block, size)
        for lo in range(0, size, bl):
            hi = min(lo + bl, size)
            mask[start + lo : start + hi, start + lo : start + hi] = True
        start += size
    return mask


@pytest.mark.parametrize("block_size", [None, 3])
@pytest.mark.parametrize("scale", ["m", "count"])
def test_every_step_is_a_dense_solve(block_size, scale):
    """lr * (λI + s Σ_window g gᵀ)⁻¹ g at every step: partly filled, full, wrapped twice.
    Dense: one window over both parameters; blocked: the block-diagonal part of F."""
    sizes, m, damp, lr = (7, 5), 4, 1e-2, 0.5
    params = _params(sizes)
    opt = MFAC(params, lr=lr, num_grads=m, damp=damp, block_size=block_size, scale=scale)
    gen = torch.Generator().manual_seed(1)
    seen = []
    n = sum(sizes)
    mask = _block_diag_mask(sizes, block_size) if block_size else torch.ones(n, n, dtype=bool)
    for t in range(1, 3 * m + 3):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in sizes]
        g = torch.cat(grads)
        seen.append(g)
        du = _step(opt, params, grads)
        window = torch.stack(seen[-m:])
        s = 1.0 / (m if scale == "m" else min(t, m))
        f = damp * torch.eye(n, dtype=torch.float64) + s * window.T @ window
        f = torch.where(mask, f, torch.zeros((), dtype=torch.float64))
        ref = lr * torch.linalg.solve(f, g)
        tol = 64 * n * torch.linalg.cond(f).item() * EPS64 * ref.abs().max().item()
        torch.testing.assert_close(du, ref, rtol=0, atol=tol, msg=f"step {t}")


def test_momentum_and_weight_decay():
    """wd is added to the gradient before it enters the window; momentum is an EMA of the
    preconditioned direction: v = μ v + (1 − μ) u."""
    m, damp, lr, mu, wd = 3, 0.1, 0.2, 0.7, 0.05
    (p,) = _params((6,))
    opt = MFAC([p], lr=lr, num_grads=m, damp=damp, momentum=mu, weight_decay=wd)
    gen = torch.Generator().manual_seed(2)
    v = torch.zeros(6, dtype=torch.float64)
    seen = []
    for _ in range(5):
        g = torch.randn(6, generator=gen, dtype=torch.float64)
        gw = g + wd * p.detach()
        seen.append(gw)
        w = torch.stack(seen[-m:])
        u = torch.linalg.solve(damp * torch.eye(6, dtype=torch.float64) + w.T @ w / m, gw)
        v = mu * v + (1 - mu) * u
        du = _step(opt, [p], [g])
        torch.testing.assert_close(du, lr * v, rtol=1e-10, atol=1e-13)


def test_param_without_grad_leaves_the_window_of_the_others():
    """Dense window over the parameters that have a gradient on that step."""
    a, b = _params((4, 3))
    opt = MFAC([a, b], lr=1.0, num_grads=2, damp=0.5)
    gen = torch.Generator().manual_seed(3)
    ga = [torch.randn(4, generator=gen, dtype=torch.float64) for _ in range(3)]
    gb = torch.randn(3, generator=gen, dtype=torch.float64)
    _step(opt, [a, b], [ga[0], gb])
    b.grad = None
    before_b = b.detach().clone()
    a.grad = ga[1].clone()
    a0 = a.detach().clone()
    opt.step()
    w = torch.stack([ga[0], ga[1]])
    ref = torch.linalg.solve(0.5 * torch.eye(4, dtype=torch.float64) + w.T @ w / 2, ga[1])
    torch.testing.assert_close(a0 - a.detach(), ref, rtol=1e-10, atol=1e-13)
    assert torch.equal(b, before_b)


def test_memory_is_m_times_d_plus_small_gram():
    sizes, m = (50, 30, 20), 8
    params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    opt = MFAC(params, lr=1e-3, num_grads=m)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    d = sum(sizes)
    # + per parameter: its step counter (4) and the int16 exponents of its m rows (2 m)
    small = (4 + 2 * m) * len(sizes)
    assert opt.state_bytes() == 4 * m * d + 8 * m * m * len(sizes) + small
    opt.param_groups[0]["momentum"] = 0.9
    opt.step()
    assert opt.state_bytes() == 4 * m * d + 8 * m * m * len(sizes) + small + 4 * d
    recs = opt.diagnostics()
    assert len(recs) == 1 and recs[0]["filled"] == 2 and recs[0]["rank"] <= 2


def test_structural_change_raises_and_changes_nothing():
    (p,) = _params((6,))
    opt = MFAC([p], lr=0.1, num_grads=3)
    p.grad = torch.randn(6, dtype=torch.float64)
    opt.step()
    snap = {k: v.clone() for k, v in opt.state[p].items()}
    p0 = p.detach().clone()
    opt.param_groups[0]["num_grads"] = 5
    with pytest.raises(ValueError, match="num_grads"):
        opt.step()
    assert torch.equal(p, p0) and all(torch.equal(snap[k], opt.state[p][k]) for k in snap)


@pytest.mark.parametrize(
    "kw,match",
    [(dict(num_grads=0), "num_grads"), (dict(damp=0.0), "damp"), (dict(damp=-1.0), "damp"),
     (dict(scale="t"), "scale"), (dict(block_size=0), "block_size")],
)
def test_bad_input_names_the_argument(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MFAC([torch.nn.Parameter(torch.zeros(2))], **kw)
