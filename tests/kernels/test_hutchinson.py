"""Hutchinson estimates against dense autograd Hessians, and spatial averaging by hand."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from secondorder.kernels import hutchinson as H

EPS64 = torch.finfo(torch.float64).eps


def _problem(d: int = 6, seed: int = 0):
    """A non-quadratic function of one vector, with its dense Hessian at ``x``."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    a = a + a.T
    c = torch.randn(d, generator=g, dtype=torch.float64)
    x0 = torch.randn(d, generator=g, dtype=torch.float64)

    def f(x):
        return 0.5 * x @ a @ x + (c * torch.sin(x)).sum() + 0.1 * (x**4).sum()

    hess = torch.autograd.functional.hessian(f, x0)
    return f, x0, hess


def _grads(f, x0):
    x = torch.nn.Parameter(x0.clone())
    (g,) = torch.autograd.grad(f(x), [x], create_graph=True)
    return x, g


def test_enumerating_every_probe_gives_the_exact_moments():
    """Over all 2^d sign vectors, mean(z*Hz) = diag H and mean((z*Hz)^2) = row norms^2."""
    f, x0, hess = _problem()
    d = x0.numel()
    x, g = _grads(f, x0)
    signs = [torch.tensor(s, dtype=torch.float64) for s in itertools.product([-1.0, 1.0], repeat=d)]
    mean = H.hutchinson_diag([x], [g], probes=[[z] for z in signs], retain_graph=True)[0]
    singles = torch.stack(
        [H.hutchinson_diag([x], [g], probes=[[z]], retain_graph=True)[0] for z in signs]
    )
    tol = 8 * d * EPS64 * hess.abs().max().item()
    torch.testing.assert_close(mean, hess.diagonal(), rtol=0, atol=tol)
    torch.testing.assert_close(singles.pow(2).mean(0), hess.pow(2).sum(1), rtol=1e-12, atol=tol)
    # ... which is not diag^2: the RMS estimate targets the row norms of H.
    assert (singles.pow(2).mean(0) - hess.diagonal().pow(2)).abs().max() > 0.1


def test_seeded_random_probes_are_unbiased():
    """N seeded probes: the mean is within 5 standard errors of diag H (the standard error
    from the exact variance sum_{j != i} H_ij^2 / N)."""
    f, x0, hess = _problem(seed=1)
    x, g = _grads(f, x0)
    n = 2000
    est = torch.stack(
        [H.hutchinson_diag([x], [g], seed=3, step=s, retain_graph=True)[0] for s in range(n)]
    )
    off = hess.pow(2).sum(1) - hess.diagonal().pow(2)
    se = (off / n).sqrt()
    assert ((est.mean(0) - hess.diagonal()).abs() <= 5 * se).all()
    # n_probes averages the signed estimates of n probes in one call.
    avg = H.hutchinson_diag([x], [g], n_probes=4, seed=3, step=0, retain_graph=True)[0]
    by_hand = torch.stack(
        [H.hutchinson_diag([x], [g], probes=[[H.rademacher(x, _gen(3, 0, 0, k))]],
                           retain_graph=True)[0] for k in range(4)]
    ).mean(0)
    torch.testing.assert_close(avg, by_hand, rtol=1e-15, atol=0)


def _gen(seed, step, index, probe):
    return torch.Generator().manual_seed(H.probe_seed(seed, step, index, probe))


def test_probes_are_rademacher_and_reproducible():
    like = torch.zeros(1000)
    z = H.rademacher(like, _gen(0, 5, 2, 0))
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(z, H.rademacher(like, _gen(0, 5, 2, 0)))  # same seed: same probe
    for other in [(1, 5, 2, 0), (0, 6, 2, 0), (0, 5, 3, 0), (0, 5, 2, 1)]:
        assert not torch.equal(z, H.rademacher(like, _gen(*other)))
    assert abs(z.mean().item()) < 5 / math.sqrt(1000)
    assert 0 <= H.probe_seed(2**70, -1, 3) < 2**63


def test_no_graph_raises_naming_the_fix():
    x = torch.nn.Parameter(torch.randn(3))
    (x**3).sum().backward()
    with pytest.raises(RuntimeError, match=r"create_graph=True"):
        H.hutchinson_diag([x])


def test_conv_window_average_matches_a_dense_hessian():
    """Tiny conv layer: the 'conv' estimate is constant on each kh x kw window and equals
    the window mean of |z * Hz| with Hz from the dense Hessian."""
    torch.manual_seed(0)
    x_in = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    w0 = torch.randn(3, 2, 2, 2, dtype=torch.float64)

    def loss(w):
        return torch.tanh(torch.nn.functional.conv2d(x_in, w)).pow(2).sum()

    dense = torch.autograd.functional.hessian(loss, w0).reshape(w0.numel(), w0.numel())
    z = H.rademacher(w0, _gen(0, 0, 0, 0))
    raw = z.reshape(-1) * (dense @ z.reshape(-1))
    want = raw.abs().reshape(3, 2, 4).mean(-1, keepdim=True).expand(3, 2, 4).reshape(w0.shape)
    w = torch.nn.Parameter(w0.clone())
    (g,) = torch.autograd.grad(loss(w), [w], create_graph=True)
    d = H.hutchinson_diag([w], [g], probes=[[z]])[0]
    got = H.spatial_average(d, "conv")
    tol = 64 * EPS64 * dense.abs().max().item() * w0.numel()
    torch.testing.assert_close(d, raw.reshape(w0.shape), rtol=0, atol=tol)
    torch.testing.assert_close(got, want, rtol=0, atol=tol)
    assert torch.equal(got, got[:, :, :1, :1].expand_as(got))  # constant per window


def test_spatial_average_modes_by_hand():
    d = torch.randn(3, 5, dtype=torch.float64)
    a = d.abs()
    assert torch.equal(H.spatial_average(d, "none"), a)
    assert torch.equal(H.spatial_average(d, "conv"), a)  # only 4-d tensors are averaged
    torch.testing.assert_close(H.spatial_average(d, "row"), a.mean(1, keepdim=True).expand(3, 5))
    flat = a.reshape(-1)  # blocks of 4 over 15 elements: 4, 4, 4, 3
    want = torch.cat([flat[i : i + 4].mean().expand(len(flat[i : i + 4])) for i in range(0, 15, 4)])
    torch.testing.assert_close(H.spatial_average(d, 4), want.reshape(3, 5))
    # signed average first, then |.|
    torch.testing.assert_close(
        H.spatial_average(d, "row", abs_first=False), d.mean(1, keepdim=True).abs().expand(3, 5)
    )
    v = torch.randn(7, dtype=torch.float64)
    assert torch.equal(H.spatial_average(v, "row"), v.abs())  # 1-d: no rows to average
    k = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(
        H.spatial_average(k, "row"), k.abs().reshape(2, -1).mean(1).view(2, 1, 1, 1).expand_as(k)
    )
    for bad in ("window", 0, -2, True, 1.5):
        with pytest.raises(ValueError, match="spatial_average"):
            H.spatial_average(d, bad)
