"""kernels.eigenbasis against explicit float64 loops and closed forms."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secondorder.kernels.eigenbasis import (
    mode_product,
    orthogonality_error,
    permute_axis,
    refresh_bases,
    rotate,
    tie_break,
    unrotate,
)

EPS32 = torch.finfo(torch.float32).eps


def random_orthogonal(b, n, g):
    return torch.linalg.qr(torch.randn(b, n, n, generator=g, dtype=torch.float64)).Q


def ref_rotate(x, bases, transpose):
    """Per block, per axis: ``x_b <- mat @ (mode-i fibres of x_b)``, with explicit loops."""
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        y = x[b]
        for i, q in enumerate(bases):
            mat = q[b].T if transpose else q[b]
            y = torch.movedim(torch.tensordot(mat, y, dims=([1], [i])), 0, i)
        out[b] = y
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    block=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    count=st.integers(1, 3),
    seed=st.integers(0, 10**6),
)
def test_rotate_and_unrotate_match_explicit_mode_products(block, count, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(count, *block, generator=g, dtype=torch.float64)
    bases = [random_orthogonal(count, n, g) for n in block]
    f32 = [q.float() for q in bases]
    # float32 products: each output element sums n terms per axis
    tol = 4 * EPS32 * sum(block) * x.abs().max().item()
    r = rotate(x.float(), f32)
    assert r.dtype == torch.float32 and r.shape == x.shape
    torch.testing.assert_close(r.double(), ref_rotate(x, bases, True), rtol=0, atol=tol)
    u = unrotate(x.float(), f32)
    torch.testing.assert_close(u.double(), ref_rotate(x, bases, False), rtol=0, atol=tol)
    # orthogonal bases: unrotate undoes rotate (exactly, in float64)
    torch.testing.assert_close(unrotate(rotate(x, bases), bases), x, rtol=0, atol=1e-12)


def test_mode_product_matches_tensordot_per_block():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    for axis, n in enumerate(x.shape[1:]):
        mat = torch.randn(2, 6, n, generator=g, dtype=torch.float64)  # may change the size
        y = mode_product(x, axis, mat)
        for b in range(2):
            ref = torch.movedim(torch.tensordot(mat[b], x[b], dims=([1], [axis])), 0, axis)
            torch.testing.assert_close(y[b], ref, rtol=1e-12, atol=1e-12)


def test_permute_axis_matches_loops():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 2, generator=g)
    for axis, n in enumerate(x.shape[1:]):
        perm = torch.stack([torch.randperm(n, generator=g) for _ in range(3)])
        y = permute_axis(x, axis, perm)
        for b in range(3):
            for j in range(n):
                assert torch.equal(y[b].select(axis, j), x[b].select(axis, int(perm[b, j])))


def spd_batch(b, n, g, gap=0.2):
    """Symmetric PSD matrices with eigenvalues 1, 1 - gap, ... (relative gaps >= gap/2)."""
    q = random_orthogonal(b, n, g)
    lam = torch.clamp(1.0 - gap * torch.arange(n, dtype=torch.float64), min=gap / 2)
    lam[-1] = gap / 4 if n > 1 else 1.0
    return (q * lam) @ q.mT, q, lam


@pytest.mark.parametrize("n", [1, 3, 6])
def test_eigh_refresh_is_the_sorted_eigenbasis(n):
    g = torch.Generator().manual_seed(n)
    a, q, lam = spd_batch(4, n, g)
    old = random_orthogonal(4, n, g)
    res = refresh_bases(a.float(), old.float(), "eigh")
    assert res.ok.all()
    # eigenvalues in decreasing order, as the closed form gives them
    torch.testing.assert_close(res.eigenvalues.double(), lam.expand(4, n), rtol=0, atol=20 * EPS32)
    # columns are eigenvectors up to sign: |Q_ref^T Q| = I
    overlap = (q.mT @ res.basis.double()).abs()
    gap = 0.05
    torch.testing.assert_close(overlap, torch.eye(n).double().expand(4, n, n), rtol=0,
                               atol=20 * EPS32 * n / gap)  # fmt: skip
    # perm sorts the old columns by their Rayleigh quotients, largest first
    rq = torch.einsum("bij,bjk,bki->bi", old.mT, a, old)
    for b in range(4):
        assert torch.equal(res.perm[b], torch.argsort(rq[b].float(), descending=True, stable=True))


def test_qr_refresh_is_one_subspace_iteration_step():
    g = torch.Generator().manual_seed(1)
    a, _, _ = spd_batch(3, 5, g)
    old = random_orthogonal(3, 5, g)
    res = refresh_bases(a.float(), old.float(), "qr")
    for b in range(3):
        oldp = old[b][:, res.perm[b]]
        ref = torch.linalg.qr(a[b] @ oldp).Q
        signs = torch.sign((ref * res.basis[b].double()).sum(0))
        cond = torch.linalg.cond(a[b] @ oldp).item()
        torch.testing.assert_close(res.basis[b].double(), ref * signs, rtol=0,
                                   atol=20 * EPS32 * 5 * cond)  # fmt: skip
        est = torch.diag(oldp.T @ a[b] @ oldp)
        torch.testing.assert_close(res.eigenvalues[b].double(), est, rtol=0, atol=20 * EPS32)


@pytest.mark.parametrize("method", ["qr", "eigh"])
@pytest.mark.parametrize("n", [2, 3, 5, 7, 8])
def test_a_refresh_does_not_depend_on_the_rest_of_the_batch(n, method):
    """A factor's new basis is the same bits alone and anywhere in a batch of others (SOAP
    batches the refreshes of all parameters; a parameter's step must not depend on the
    others, e.g. on the other shards' shapes under FSDP)."""
    g = torch.Generator().manual_seed(n)
    a, _, _ = spd_batch(7, n, g)
    old = random_orthogonal(7, n, g).float().contiguous()
    a = a.float()
    alone = refresh_bases(a[3:4], old[3:4], method)
    for lo, hi in ((0, 7), (1, 4), (2, 5), (3, 7)):
        res = refresh_bases(a[lo:hi].clone(), old[lo:hi].clone(), method)
        for x, y in zip(res, alone):
            assert torch.equal(x[3 - lo : 4 - lo], y), (lo, hi)


def test_repeated_qr_steps_converge_to_the_eigenbasis():
    g = torch.Generator().manual_seed(2)
    a, q, lam = spd_batch(2, 4, g, gap=0.2)
    basis = torch.eye(4).expand(2, 4, 4).clone()
    for _ in range(200):  # slowest ratio 0.1/0.2 of the two smallest eigenvalues
        basis = refresh_bases(a.float(), basis, "qr").basis
    overlap = (q.mT @ basis.double()).abs()
    torch.testing.assert_close(overlap, torch.eye(4).double().expand(2, 4, 4), rtol=0, atol=1e-4)


def test_non_finite_factors_keep_the_old_basis():
    g = torch.Generator().manual_seed(3)
    a, _, _ = spd_batch(2, 3, g)
    a = a.float()
    a[1, 0, 0] = float("inf")
    old = random_orthogonal(2, 3, g).float()
    for method in ("qr", "eigh"):
        res = refresh_bases(a, old, method)
        assert res.ok.tolist() == [True, False]
        assert torch.equal(res.basis[1], old[1][:, res.perm[1]])


def test_tie_break_and_orthogonality_error_closed_forms():
    a = torch.zeros(1, 3, 3)
    a[0].fill_diagonal_(3.0)
    out = tie_break(a, 0.1)  # tr/n = 3 -> diagonal + 0.3 * (1, 4/3, 5/3)
    torch.testing.assert_close(out[0], torch.diag(torch.tensor([3.3, 3.4, 3.5])))
    # the zero eigenspace of a rank-one factor gets a definite, continuous basis
    v = torch.tensor([[1.0, 1.0, 0.0]]) / 2**0.5
    rank1 = (v.T @ v)[None]
    res = refresh_bases(tie_break(rank1, 1e-3), torch.eye(3)[None], "eigh")
    torch.testing.assert_close(res.basis[0][:, 0].abs(), v[0], rtol=0, atol=1e-3)
    q = torch.eye(4)[None] * 1.5
    torch.testing.assert_close(orthogonality_error(q), torch.tensor([1.25]))
