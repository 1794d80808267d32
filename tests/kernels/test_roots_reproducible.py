"""A root does not depend on the batch it is solved in (what distributed Shampoo relies on).

References: exact decimal arithmetic for ``x^(-1/p)`` (Python's ``decimal`` powers are
correctly rounded at the context precision), and the same kernel on the full batch for the
batch-composition checks, which must agree bit for bit.

Error bound of :func:`inverse_pth_root_scalar` in float64 (unit roundoff ``u = 2^-53``):
Newton has converged, so what is left is the rounding of its last step (``y^p``: ``p - 1``
products; ``m y^p``, the difference, ``* y`` and ``/ p``: about ``p + 4`` roundings in
all, relative) and of the table product (the table entry and the product: 2), so
``|y - x^(-1/p)| <= (p + 8) u |x^(-1/p)|``. In float32 the result is that value rounded
once more: ``<= 2^-24 + (p + 8) u`` relative.
"""

from __future__ import annotations

import decimal
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secondorder.kernels.roots import inverse_pth_root_scalar, inverse_root

U64 = 2.0**-53


def exact_inverse_root(x: float, p: int) -> float:
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        return float(decimal.Decimal(x) ** (decimal.Decimal(-1) / decimal.Decimal(p)))


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@settings(max_examples=40, deadline=None)
@given(
    p=st.integers(1, 12),
    exps=st.lists(st.integers(-300, 300), min_size=1, max_size=20),
    seed=st.integers(0, 2**16),
)
def test_scalar_root_matches_exact_arithmetic_float64(p, exps, seed):
    g = torch.Generator().manual_seed(seed)
    mant = 1.0 + 9.0 * torch.rand(len(exps), generator=g, dtype=torch.float64)
    x = mant * torch.tensor([10.0**e for e in exps], dtype=torch.float64)
    got = inverse_pth_root_scalar(x, p)
    assert got.dtype == torch.float64
    for xi, yi in zip(x.tolist(), got.tolist()):
        ref = exact_inverse_root(xi, p)
        assert abs(yi - ref) <= (p + 8) * U64 * ref, (xi, p, yi, ref)


@settings(max_examples=40, deadline=None)
@given(p=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_scalar_root_float32_is_rounded_once(p, seed):
    g = torch.Generator().manual_seed(seed)
    # float32 normal and subnormal range
    x = torch.rand(64, generator=g) * 10.0 ** torch.randint(-44, 38, (64,), generator=g).float()
    x = x[x > 0]
    got = inverse_pth_root_scalar(x, p)
    assert got.dtype == torch.float32
    for xi, yi in zip(x.tolist(), got.tolist()):
        ref = exact_inverse_root(xi, p)
        if ref > torch.finfo(torch.float32).max:
            assert yi == math.inf
        else:
            assert abs(yi - ref) <= (2.0**-24 + (p + 8) * U64) * ref, (xi, p, yi, ref)


def test_scalar_root_special_values_and_dtypes():
    x = torch.tensor([0.0, math.inf, -1.0, -math.inf, math.nan, 1.0, 16.0])
    y = inverse_pth_root_scalar(x, 4)
    assert y[0] == math.inf and y[1] == 0.0
    assert torch.isnan(y[2:5]).all()
    assert y[5] == 1.0 and y[6] == 0.5
    # float64 extremes: the smallest subnormal overflows for p = 1, not for p = 2
    tiny = torch.tensor([5e-324], dtype=torch.float64)
    assert inverse_pth_root_scalar(tiny, 1).item() == math.inf
    assert inverse_pth_root_scalar(tiny, 2).item() == pytest.approx(
        exact_inverse_root(5e-324, 2), rel=1e-15
    )
    assert inverse_pth_root_scalar(torch.tensor([4.0], dtype=torch.bfloat16), 2).dtype == (
        torch.float32
    )
    with pytest.raises(ValueError, match="p must be an integer"):
        inverse_pth_root_scalar(x, 0)


@pytest.mark.parametrize("threads", [1, 2])
def test_scalar_root_does_not_depend_on_position_layout_or_threads(threads):
    # torch.pow on the CPU does (vectorized loop vs scalar tail): the reason for this kernel
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(70_001, generator=g) * 100.0
    full = inverse_pth_root_scalar(x, 4)
    for start in (0, 1, 5, 17, 33):
        part = inverse_pth_root_scalar(x[start : start + 40], 4)
        assert torch.equal(part, full[start : start + 40])
    strided = inverse_pth_root_scalar(x[:-1].view(-1, 2)[:, 0], 4)
    assert torch.equal(strided, full[:-1:2])
    single = torch.stack([inverse_pth_root_scalar(x[i : i + 1], 4)[0] for i in range(50)])
    assert torch.equal(single, full[:50])


def _spd_batch(n: int, batch: int, seed: int) -> torch.Tensor:
    """Gram matrices of few samples: many nearly singular, like early Shampoo statistics."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(1, n + 3, (batch,), generator=g)
    mats = []
    for i in range(batch):
        x = torch.randn(n, int(k[i]), generator=g) * 10.0 ** float(torch.randint(-3, 3, ()))
        mats.append(x @ x.T)
    return torch.stack(mats)


@settings(max_examples=30, deadline=None)
@given(
    n=st.sampled_from([1, 2, 3, 4, 5, 8, 24]),
    method=st.sampled_from(["eigh", "newton"]),
    p=st.sampled_from([2, 4, 6]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_root_of_a_matrix_does_not_depend_on_its_batch(n, method, p, seed, data):
    """Distributed Shampoo solves each rank's subset of a bucket; a single process solves
    the whole bucket. Each matrix must come out bit-identical either way: every stage of the
    pipeline (power iteration, eigh, Newton, the scalar roots, the error estimate) works on
    each matrix independently of its neighbours."""
    torch.set_num_threads(data.draw(st.sampled_from([1, 2]), label="threads"))
    A = _spd_batch(n, 9, seed)
    subset = data.draw(st.lists(st.integers(0, 8), min_size=1, max_size=9, unique=True))
    full = inverse_root(A, p, method=method)
    part = inverse_root(A[subset].contiguous(), p, method=method)
    for name in ("root", "error", "lambda_max", "ok"):
        assert torch.equal(getattr(full, name)[subset], getattr(part, name)), name


@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("n", [3, 24, 64])
def test_single_matrix_batches_take_the_same_path(method, n):
    """A batch of one matrix is where libraries switch kernels (e.g. matrix-vector instead of
    batched matrix-matrix products): a rank that owns one block of a class gets that."""
    A = _spd_batch(n, 4, seed=n)
    full = inverse_root(A, 4, method=method)
    for i in range(A.shape[0]):
        one = inverse_root(A[i : i + 1].contiguous(), 4, method=method)
        for name in ("root", "error", "lambda_max", "ok"):
            assert torch.equal(getattr(full, name)[i : i + 1], getattr(one, name)), (i, name)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bordered_eigh_is_the_eigh_of_the_matrix(n, dtype):
    """Sizes that are not multiples of 4 are decomposed bordered by a block above their
    spectrum; the first ``n`` eigenpairs must be the matrix's own (float64 reference)."""
    from secondorder.kernels.roots import _eigh

    A = torch.cat([_spd_batch(n, 6, seed=n), torch.zeros(1, n, n)]).to(dtype)
    A = (A + A.transpose(-2, -1)) / 2  # exactly symmetric: eigh reads one triangle
    L, Q = _eigh(A)
    assert L.shape == (7, n) and Q.shape == (7, n, n)
    ref = torch.linalg.eigvalsh(A.double())
    scale = ref.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
    eps = torch.finfo(dtype).eps
    assert ((L.double() - ref).abs() <= 8 * n * eps * scale).all()
    eye = torch.eye(n, dtype=torch.float64)
    assert ((Q.double().transpose(-2, -1) @ Q.double() - eye).abs() <= 8 * n * eps).all()
    rec = (Q.double() * L.double().unsqueeze(-2)) @ Q.double().transpose(-2, -1)
    assert ((rec - A.double()).abs() <= 8 * n * eps * scale[..., None]).all()
