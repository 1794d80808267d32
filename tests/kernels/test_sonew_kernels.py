"""SONew kernels against dense float64 references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secondorder.kernels import sonew as K


def _band_mask(n: int, b: int) -> torch.Tensor:
    i = torch.arange(n)
    return (i[:, None] - i[None, :]).abs() <= b


def _random_stats(n: int, b: int, seed: int, dtype=torch.float64, samples: int | None = None):
    """Band of an EMA of g gᵀ over random gradients: every fully specified block is PSD."""
    gen = torch.Generator().manual_seed(seed)
    samples = samples or 2 * n
    h = torch.zeros(b + 1, n, dtype=dtype)
    mix = torch.randn(n, n, generator=gen, dtype=torch.float64) / n**0.5 + torch.eye(n)
    for _ in range(samples):
        g = (mix @ torch.randn(n, generator=gen, dtype=torch.float64)).to(dtype)
        K.update_band_stats(h, g, 0.95, 0.05)
    return h


def _ldl(h, delta, gamma):
    b = h.shape[1] - 1
    if b == 1:
        return K.tridiag_ldl(h, delta, gamma)
    return K.band_ldl(h, delta, gamma)


def test_update_band_stats_matches_dense_outer_products():
    gen = torch.Generator().manual_seed(0)
    n, b = 13, 3
    h = torch.zeros(b + 1, n, dtype=torch.float64)
    dense = torch.zeros(n, n, dtype=torch.float64)
    for _ in range(5):
        g = torch.randn(n, generator=gen, dtype=torch.float64)
        K.update_band_stats(h, g, 0.9, 0.1)
        dense = 0.9 * dense + 0.1 * torch.outer(g, g)
    expected = torch.where(_band_mask(n, b), dense, torch.zeros(()))
    torch.testing.assert_close(K.band_to_dense(h), expected)
    # entries past the end stay zero
    for k in range(1, b + 1):
        assert torch.all(h[k, n - k :] == 0)


def test_band_stats_running_sum_when_beta2_is_one():
    g = torch.arange(1.0, 6.0, dtype=torch.float64)
    h = torch.zeros(2, 5, dtype=torch.float64)
    K.update_band_stats(h, g, 1.0, 1.0)
    K.update_band_stats(h, g, 1.0, 1.0)
    torch.testing.assert_close(h[0], 2 * g * g)
    torch.testing.assert_close(h[1, :-1], 2 * g[:-1] * g[1:])


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 50), b=st.integers(0, 4), seed=st.integers(0, 10_000))
def test_band_inf_norm_is_exact(n, b, seed):
    h = _random_stats(n, b, seed, samples=3)
    dense = K.band_to_dense(h)
    torch.testing.assert_close(K.band_inf_norm(h), dense.abs().sum(dim=1).max())


@settings(max_examples=25, deadline=None)
@given(n=st.integers(12, 50), b=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_ldl_is_the_max_det_completion(n, b, seed):
    """X has the band pattern, (X⁻¹)_ij = Ĥ_ij + δ[i=j] on the band, X m = dense product."""
    h = _random_stats(n, b, seed)
    delta = 1e-3
    psi, D = _ldl(h, delta, gamma=K.guard_threshold(torch.float64))
    assert psi.shape == (b, n) and D.shape == (n,)
    assert torch.all(D > 0)
    X = K.ldl_to_dense(psi, D)
    mask = _band_mask(n, b)
    assert torch.all(X[~mask] == 0), "X must have the band pattern"
    torch.testing.assert_close(X, X.T)
    assert torch.linalg.eigvalsh(X).min() > 0
    target = K.band_to_dense(h, delta)
    Xinv = torch.linalg.inv(X)
    torch.testing.assert_close(Xinv[mask], target[mask], rtol=1e-8, atol=1e-10)
    m = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    torch.testing.assert_close(K.apply_preconditioner(psi, D, m), X @ m)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17])
def test_band_ldl_handles_short_vectors_and_matches_tridiag(n):
    h = _random_stats(n, 1, seed=n)
    p1, d1 = K.tridiag_ldl(h, 1e-3, 1e-12)
    p2, d2 = K.band_ldl(h, 1e-3, 1e-12)
    torch.testing.assert_close(p1, p2)
    torch.testing.assert_close(d1, d2)
    for b in (2, 3, 4):
        hb = _random_stats(n, b, seed=n)
        psi, D = K.band_ldl(hb, 1e-3, 1e-12)
        X = K.ldl_to_dense(psi, D)
        mask = _band_mask(n, b)
        torch.testing.assert_close(
            torch.linalg.inv(X)[mask], K.band_to_dense(hb, 1e-3)[mask], rtol=1e-8, atol=1e-10
        )


def test_tridiag_explicit_entries():
    """Tridiagonal closed form: X_jj = D_j + ψ_{j−1}² D_{j−1}, X_{j+1,j} = −ψ_j D_j."""
    h = _random_stats(20, 1, seed=3)
    psi, D = K.tridiag_ldl(h, 1e-4, None)
    X = K.ldl_to_dense(psi, D)
    p = psi[0]
    diag = D.clone()
    diag[1:] += p[:-1] ** 2 * D[:-1]
    torch.testing.assert_close(torch.diagonal(X), diag)
    torch.testing.assert_close(torch.diagonal(X, -1), -p[:-1] * D[:-1])


def test_diag_preconditioner_has_no_square_root():
    h = torch.tensor([[4.0, 9.0]])
    torch.testing.assert_close(K.diag_preconditioner(h, 1.0), torch.tensor([1 / 5, 1 / 10]))
    psi, D = K.band_ldl(h, 1.0, None)
    assert psi.shape == (0, 2)
    torch.testing.assert_close(K.apply_preconditioner(psi, D, torch.ones(2)), D)


@settings(max_examples=10, deadline=None)
@given(
    n=st.integers(2, 40),
    b=st.integers(0, 4),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 1000),
)
def test_low_precision_close_to_fp64(n, b, dtype, seed):
    h64 = _random_stats(n, b, seed)
    m64 = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    delta = 1e-2 * float(K.band_inf_norm(h64))
    psi, D = K.band_ldl(h64, delta, K.guard_threshold(torch.float64))
    ref = K.apply_preconditioner(psi, D, m64)
    psi, D = K.band_ldl(h64.to(dtype), delta, K.guard_threshold(dtype))
    out = K.apply_preconditioner(psi, D, m64.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    tol = 1e-4 if dtype == torch.float32 else 0.5  # worst seen over 6,000 cases: 6e-6, 0.22
    rel = (out.double() - ref).norm() / ref.norm()
    assert rel < tol


# ------------------------------------------------------------------ stability guard
def _correlated_bf16_stats(n: int, b: int) -> torch.Tensor:
    """bf16 statistics of strongly correlated gradients: neighbours nearly proportional."""
    gen = torch.Generator().manual_seed(0)
    h = torch.zeros(b + 1, n, dtype=torch.bfloat16)
    base = torch.linspace(1.0, 2.0, n)
    for _ in range(40):
        g = base * torch.randn((), generator=gen) + 1e-3 * torch.randn(n, generator=gen)
        K.update_band_stats(h, g.to(torch.bfloat16), 0.9, 0.1)
    return h


@pytest.mark.parametrize("b", [1, 2, 4])
def test_guard_keeps_X_positive_definite_in_bf16(b):
    n = 32
    h = _correlated_bf16_stats(n, b)
    delta = torch.tensor(1e-6, dtype=torch.bfloat16)

    # Unguarded: the Schur complements cancel to zero or below in bf16 -> X is not PD.
    psi, D = _ldl(h, delta, gamma=None)
    X = K.ldl_to_dense(psi.double(), D.double())
    bad = (~torch.isfinite(D)).any() or (D <= 0).any()
    if not bad:
        bad = bool(torch.linalg.eigvalsh(X).min() <= 0)
    assert bad, "the unguarded formula was expected to fail on these statistics"

    # Guarded: every D_j > 0 and finite, X positive definite, X m finite.
    psi, D = _ldl(h, delta, gamma=K.guard_threshold(torch.bfloat16))
    assert torch.isfinite(psi).all() and torch.isfinite(D).all()
    assert (D > 0).all()
    X = K.ldl_to_dense(psi.double(), D.double())
    assert torch.linalg.eigvalsh(X).min() > 0
    u = K.apply_preconditioner(psi, D, torch.ones(n, dtype=torch.bfloat16))
    assert torch.isfinite(u).all()


def test_guard_drops_only_bad_edges():
    """On well-conditioned statistics the guard changes nothing."""
    h = _random_stats(30, 3, seed=7)
    p0, d0 = K.band_ldl(h, 1e-3, None)
    p1, d1 = K.band_ldl(h, 1e-3, K.guard_threshold(torch.float64))
    torch.testing.assert_close(p0, p1)
    torch.testing.assert_close(d0, d1)


def test_guard_threshold_follows_dtype():
    assert K.guard_threshold(torch.bfloat16) == torch.finfo(torch.bfloat16).eps
    assert K.guard_threshold(torch.float32) == torch.finfo(torch.float32).eps


def test_scratch_buffers_give_identical_results_across_sizes():
    scratch = K.Scratch()
    for n, b in [(40, 1), (7, 1), (50, 0), (3, 1), (45, 1), (30, 3), (12, 4), (2, 4), (33, 2)]:
        h = _random_stats(n, b, seed=n, dtype=torch.float32)
        m = torch.randn(n, generator=torch.Generator().manual_seed(n))
        ref_norm = K.band_inf_norm(h)
        norm = K.band_inf_norm(h, scratch)
        assert torch.equal(norm, ref_norm)
        if b == 0:
            ref = K.diag_preconditioner(h, 1e-3) * m
            out = K.apply_preconditioner(
                h.new_zeros((0, n)), K.diag_preconditioner(h, 1e-3, scratch), m, scratch
            )
        else:
            ldl = K.tridiag_ldl if b == 1 else K.band_ldl
            psi, D = ldl(h, 1e-3, 1e-7)
            ref = K.apply_preconditioner(psi, D, m)
            psi, D = ldl(h, 1e-3, 1e-7, scratch)
            out = K.apply_preconditioner(psi, D, m, scratch)
        assert torch.equal(out, ref)
    assert scratch.nbytes() > 0


@pytest.mark.parametrize("b", [0, 1, 2])
@pytest.mark.parametrize("n", [1, 2, 20])
def test_inf_norm_nonneg_diag_shortcut(b, n):
    h = _random_stats(n, b, seed=1)
    dense = K.band_to_dense(h).abs().sum(dim=1).max()
    torch.testing.assert_close(K.band_inf_norm(h, nonneg_diag=True), dense)
    torch.testing.assert_close(K.band_inf_norm(h, K.Scratch(), nonneg_diag=True), dense)


# ------------------------------------------------------------------ scale-aware statistics
@settings(max_examples=30, deadline=None)
@given(x=st.floats(0.0, 2.0**127, allow_subnormal=False, width=32))
def test_scale_exponent_is_the_next_power_of_two(x):
    import math

    e = K.scale_exponent(torch.tensor(x, dtype=torch.float32))
    assert e.dtype == torch.float32 and e.dim() == 0
    if x == 0.0:
        assert float(e) == 0.0
        return
    want = math.frexp(x)[1]  # x = m · 2**want, m in [0.5, 1): 2**want > x >= 2**(want-1)
    want = min(max(want, -K.SCALE_EXP_MAX), K.SCALE_EXP_MAX)
    assert float(e) == want


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    decades=st.lists(st.integers(-30, 30), min_size=1, max_size=8),
    beta2=st.sampled_from([0.0, 0.5, 0.999, 1.0]),
    b=st.integers(0, 3),
)
def test_scaled_statistics_track_a_float64_reference_without_overflow(seed, decades, beta2, b):
    """h · 4**e equals the float64 EMA of g gᵀ (to float32 rounding relative to the largest
    entry), every stored entry is at most 1, and the bound covers sqrt(max H_jj)."""
    gen = torch.Generator().manual_seed(seed)
    n = 9
    w = 1.0 if beta2 == 1.0 else 1.0 - beta2
    h = torch.zeros(b + 1, n)
    H = torch.zeros(b + 1, n, dtype=torch.float64)
    bound = torch.zeros(())
    for d in decades:
        g = (torch.randn(n, generator=gen, dtype=torch.float64) * 10.0**d).float()
        sc = K.advance_stats_scale(bound, g.abs().max(), beta2, w)
        bound, e = sc.bound, sc.exponent
        assert float(sc.inv_scale) == 2.0 ** -float(e)
        K.update_band_stats_scaled(h, g, sc.decay, sc.inv_scale, w)
        K.update_band_stats(H, g.double(), beta2, w)
        assert torch.isfinite(h).all() and h.abs().max() <= 1.0
        assert float(bound) ** 2 >= float(H[0].max()) * (1 - 1e-6)
    c2 = 4.0 ** float(e)
    big = float(H.abs().max())
    got = h.double() * c2
    # each stored entry carries ~len(decades) float32 roundings of at most the largest entry
    torch.testing.assert_close(got, H, rtol=0, atol=4 * len(decades) * 2.0**-24 * big)


def test_robust_norm_neither_overflows_nor_underflows():
    from secondorder.kernels.grafting import robust_norm

    for scale in (1e30, 1e-30, 1.0):
        x = torch.full((1000,), 3.0) * scale
        for dtype in (torch.float32, torch.bfloat16):
            got = float(robust_norm(x.to(dtype)))
            want = float(x.to(dtype).double().norm())
            assert got == pytest.approx(want, rel=1e-12)
    assert float(robust_norm(torch.zeros(5))) == 0.0


def test_advance_stats_scale_is_elementwise():
    """Vectorised over tensors (one call for all parameters) == one call per tensor."""
    bound = torch.tensor([0.0, 3.0, 1e30, 1e-30])
    gmax = torch.tensor([1.0, 0.5, 1e-3, 1e30])
    beta2 = torch.tensor([0.999, 0.0, 0.5, 1.0])
    weight = torch.tensor([1e-3, 1.0, 0.5, 1.0])
    floor = torch.tensor([0.0, 0.0, 0.0, 1e31])
    vec = K.advance_stats_scale(bound, gmax, beta2, weight, floor)
    for i in range(4):
        one = K.advance_stats_scale(
            bound[i], gmax[i], float(beta2[i]), float(weight[i]), float(floor[i])
        )
        for a, b in zip(vec, one):
            assert torch.equal(a[i], b)
    assert float(vec.bound[3]) == pytest.approx(1e31, rel=1e-6)  # the floor
