"""M-FAC window kernels against dense float64 solves."""

from __future__ import annotations

import warnings

import pytest
import torch

from secondorder.kernels import mfac as K

EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps


def _dense_fisher(rows: torch.Tensor, damp: float, scale: float) -> torch.Tensor:
    n = rows.shape[-1]
    return damp * torch.eye(n, dtype=torch.float64) + scale * rows.T @ rows


def _tol(f: torch.Tensor, ref: torch.Tensor) -> float:
    """Backward-stable solves: error <= c * cond(F) * eps * |ref|."""
    cond = torch.linalg.cond(f).item()
    return 64 * f.shape[0] * cond * EPS64 * ref.abs().max().item()


@pytest.mark.parametrize("scale_kind", ["m", "count"])
def test_ring_buffer_ihvp_equals_dense_solve_at_every_step(scale_kind):
    """Streaming 3m+2 gradients through a ring of m rows: partly filled, full and wrapped."""
    m, n, damp = 5, 9, 1e-2
    gen = torch.Generator().manual_seed(0)
    grads = torch.zeros(m, n, dtype=torch.float64)
    gram = torch.zeros(m, m, dtype=torch.float64)
    seen = []
    for t in range(1, 3 * m + 3):
        g = torch.randn(n, generator=gen, dtype=torch.float64)
        slot = (t - 1) % m
        K.ring_write(grads, slot, g)
        K.set_gram_row(gram, slot, K.gram_row(grads, g))
        seen.append(g)
        s = 1.0 / (m if scale_kind == "m" else min(t, m))
        window = torch.stack(seen[-m:])
        f = _dense_fisher(window, damp, s)
        torch.testing.assert_close(gram, grads @ grads.T, rtol=0, atol=16 * n * EPS64 * 100)
        e = torch.zeros(m, dtype=torch.float64)
        e[slot] = 1.0
        u = K.combine(grads, K.coefficients(gram, e, damp, s))
        ref = torch.linalg.solve(f, g)
        torch.testing.assert_close(u, ref, rtol=0, atol=_tol(f, ref))
        x = torch.randn(n, generator=gen, dtype=torch.float64)  # any vector: Woodbury
        ref_x = torch.linalg.solve(f, x)
        torch.testing.assert_close(K.ihvp(grads, gram, x, damp, s), ref_x, rtol=0,
                                   atol=_tol(f, ref_x) / damp)


def test_first_step_closed_form():
    g = torch.randn(11, dtype=torch.float64)
    m, damp = 4, 0.3
    grads = torch.zeros(m, 11, dtype=torch.float64)
    gram = torch.zeros(m, m, dtype=torch.float64)
    K.ring_write(grads, 0, g)
    K.set_gram_row(gram, 0, K.gram_row(grads, g))
    e = torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)
    u = K.combine(grads, K.coefficients(gram, e, damp, 1 / m))
    torch.testing.assert_close(u, g / (damp + g.dot(g) / m), rtol=1e-14, atol=0)


def test_batched_blocks_equal_separate_windows():
    gen = torch.Generator().manual_seed(1)
    nb, m, b = 3, 4, 6
    grads = torch.randn(nb, m, b, generator=gen, dtype=torch.float64)
    gram = grads @ grads.transpose(1, 2)
    x = torch.randn(nb, b, generator=gen, dtype=torch.float64)
    got = K.ihvp(grads, gram, x, 0.1, 0.25)
    for i in range(nb):
        f = _dense_fisher(grads[i], 0.1, 0.25)
        ref = torch.linalg.solve(f, x[i])
        torch.testing.assert_close(got[i], ref, rtol=0, atol=_tol(f, ref) / 0.1)


def test_failed_cholesky_falls_back_to_clamped_eigh_with_a_warning():
    """A Gram matrix made slightly indefinite by rounding: solved with its negative
    eigenvalue clamped to 0 (the exact Gram matrix is PSD)."""
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    w = torch.tensor([-1e-3, 1.0, 2.0], dtype=torch.float64)
    a = q @ torch.diag(w) @ q.T
    good = torch.eye(3, dtype=torch.float64).expand(2, 3, 3) * 2
    stack = torch.stack([a, good[0]])
    rhs = torch.randn(2, 3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        x = K.solve_spd(stack, rhs, 1e-4)
    assert any("Cholesky" in str(r.message) for r in rec)
    want0 = q @ ((q.T @ rhs[0]) / (w.clamp_min(0) + 1e-4))
    torch.testing.assert_close(x[0], want0, rtol=1e-10, atol=0)
    torch.testing.assert_close(x[1], rhs[1] / (2 + 1e-4), rtol=1e-14, atol=0)


@pytest.mark.parametrize("scale", [1.0, 2.0**100, 2.0**-100], ids=["1", "2**100", "2**-100"])
def test_ring_write_of_pieces_stores_the_whole_rows_entries(scale):
    """A row written piece by piece (as the shards of a tensor write it), each piece told
    the whole row's largest magnitude and length, stores exactly the entries and exponent
    that writing the whole row stores; the Gram row from the pieces, summed, is the whole
    one up to the rounding of float32 dot products (``n eps`` relative to ``|G||g|``)."""
    gen = torch.Generator().manual_seed(5)
    m, n, cut = 3, 11, 4
    rows = torch.randn(m, n, generator=gen) * scale
    rows[:, 0] *= 4.0  # the largest entry in the first piece: its exponent differs
    whole = torch.zeros(m, n)
    exps = torch.zeros(m, dtype=torch.int16)
    pieces = [torch.zeros(m, cut), torch.zeros(m, n - cut)]
    piece_exps = [torch.zeros(m, dtype=torch.int16) for _ in pieces]
    for slot in range(m):
        g = rows[slot]
        stored = K.ring_write(whole, slot, g, exps)
        want = K.gram_row(whole, stored, exps, exps[slot])
        got = torch.zeros(m, dtype=torch.float64)
        biggest = K.row_max(g)
        for buf, e, part in zip(pieces, piece_exps, (g[:cut], g[cut:])):
            s = K.ring_write(buf, slot, part, e, row_max=biggest, row_len=n)
            got += K.gram_row(buf, s, e, e[slot])
            assert torch.equal(e, exps)
        assert torch.equal(torch.cat(pieces, dim=1), whole)
        true = whole.double() * torch.exp2(exps.double()).unsqueeze(-1)
        bound = n * EPS32 * (true.abs() @ true[slot].abs())
        assert bool(((got - want).abs() <= bound).all())
    assert (exps != 0).all() == (scale != 1.0)
    assert torch.equal(K.row_max(torch.zeros(2, 0)), torch.zeros(2))
