"""Newton-Schulz orthogonalisation against float64 SVD references.

The quintic iteration maps every singular value ``s`` (of ``G / ||G||_F``) through the same
scalar polynomial ``phi`` and keeps the singular vectors, so there are two references:

* exact: ``NS(G) = U phi^K(S) V^T`` (``phi^K`` evaluated in float64 on the SVD's values);
* the polar factor ``U V^T``: ``NS(G)`` is *not* equal to it; it is within the iteration's
  accuracy band, ``max |phi^K(s) - 1|`` over the range the normalised singular values lie in
  (computed here from ``phi`` on a dense grid, not typed in).

Rounding slack: ``phi`` has slope at most ``a = 3.4445`` (at zero), so a rounding error can
grow by at most that factor per step; a product of matrices of size ``n`` has relative error
about ``n * eps``. Tolerances are ``AMP * n * eps`` with ``AMP = 10 * a**steps``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import secondorder.kernels.newton_schulz as ns
from secondorder.kernels.newton_schulz import (
    NS_COEFFICIENTS,
    newton_schulz,
    orthogonalize_many,
    scalar_map,
)

EPS64 = torch.finfo(torch.float64).eps
EPS32 = torch.finfo(torch.float32).eps


def amp(steps: int) -> float:
    return 10.0 * NS_COEFFICIENTS[0] ** steps


def with_spectrum(m: int, n: int, cond: float, seed: int, batch: tuple[int, ...] = ()):
    """float64 ``U diag(s) V^T`` with singular values log-spaced over ``cond``."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(*batch, m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -math.log10(cond), k, dtype=torch.float64) * 3.7
    return (u * s.unsqueeze(-2)) @ v.mT


def polar(g: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    return u @ vh


def band(lo: float, steps: int) -> tuple[float, float]:
    """Range of ``phi^steps`` over normalised singular values in ``[lo, 1]`` (dense grid)."""
    s = torch.logspace(math.log10(lo), 0, 200_001, dtype=torch.float64)
    y = scalar_map(s, steps)
    return float(y.min()), float(y.max())


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 24), n=st.integers(1, 24), steps=st.integers(1, 6), seed=st.integers(0, 99))
def test_equals_the_scalar_map_of_the_singular_values(m, n, steps, seed):
    """Exact reference: U phi^K(S / ||G||_F) V^T, in float64 (tall and wide matrices)."""
    g = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    ref = (u * scalar_map(s / (s.norm() + ns.NS_EPS), steps)) @ vh
    got = newton_schulz(g, steps, dtype=torch.float64)
    assert got.dtype == torch.float64 and got.shape == (m, n)
    tol = amp(steps) * max(m, n) * EPS64
    torch.testing.assert_close(got, ref, rtol=0, atol=tol)


@pytest.mark.parametrize("shape", [(16, 16), (12, 40), (40, 12), (3, 64)])
def test_within_the_band_of_the_polar_factor(shape):
    """float32 result vs the float64 polar factor ``U V^T``: within the accuracy band."""
    m, n = shape
    g = with_spectrum(m, n, cond=8.0, seed=1)
    s = torch.linalg.svdvals(g)
    lo_s = float(s.min() / s.norm())
    assert lo_s >= 0.01  # the matrices are built so that the band below applies
    lo, hi = band(0.01, 5)
    assert 0.6 < lo < 1.0 < hi < 1.25  # the known character of the usual coefficients
    got = newton_schulz(g.float(), 5).double()
    slack = amp(5) * max(m, n) * EPS32
    err = torch.linalg.matrix_norm(got - polar(g), ord=2)
    assert err <= max(1 - lo, hi - 1) + slack
    sv = torch.linalg.svdvals(got)
    assert sv.min() >= lo - slack and sv.max() <= hi + slack
    # not exact: the band is real (the iteration does not converge to one)
    assert err > slack


def test_float32_matches_float64():
    g = with_spectrum(20, 50, cond=100.0, seed=2)
    tol = amp(5) * 50 * EPS32
    torch.testing.assert_close(
        newton_schulz(g.float(), 5).double(), newton_schulz(g, 5, torch.float64), rtol=0, atol=tol
    )


def test_scale_invariant_and_zero_stays_zero():
    g = with_spectrum(10, 30, cond=10.0, seed=3).float()
    ref = newton_schulz(g)
    tol = amp(5) * 30 * EPS32
    for c in (1e-3, 7.0, 1e4):
        torch.testing.assert_close(newton_schulz(c * g), ref, rtol=0, atol=tol)
    assert torch.equal(newton_schulz(torch.zeros(4, 6)), torch.zeros(4, 6))


def test_batched_equals_one_by_one():
    g = with_spectrum(8, 20, cond=10.0, seed=4, batch=(3,)).float()
    got = newton_schulz(g)
    tol = amp(5) * 20 * EPS32
    for i in range(3):
        torch.testing.assert_close(got[i], newton_schulz(g[i]), rtol=0, atol=tol)


def test_orthogonalize_many_one_call_per_shape_class(monkeypatch):
    """(8, 20) and (20, 8) share a class; (5, 5) is another: two batched calls in all."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(8, 20), (5, 5), (20, 8), (8, 20), (5, 5)]
    mats = [torch.randn(s, generator=gen) for s in shapes]
    calls = []
    real = ns.newton_schulz

    def counting(x, steps, dtype):
        calls.append(tuple(x.shape))
        return real(x, steps, dtype)

    monkeypatch.setattr(ns, "newton_schulz", counting)
    out = orthogonalize_many(mats, 5)
    assert sorted(calls) == [(2, 5, 5), (3, 8, 20)]
    tol = amp(5) * 20 * EPS32
    for m, o in zip(mats, out):
        assert o.shape == m.shape
        torch.testing.assert_close(o, real(m, 5), rtol=0, atol=tol)


def test_rejects_vectors():
    with pytest.raises(ValueError, match="matrices"):
        newton_schulz(torch.ones(3))
    with pytest.raises(ValueError, match="2-d"):
        orthogonalize_many([torch.ones(2, 2, 2)])
