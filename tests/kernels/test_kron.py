"""kron kernels against tensordot references, for stacks of order 1 to 4."""

from __future__ import annotations

import pytest
import torch

from secondorder.kernels import kron


def _ref_stats(x: torch.Tensor, axis: int) -> torch.Tensor:
    k = x.dim() - 1
    other = [j + 1 for j in range(k) if j != axis]
    # per block: contract every axis but `axis`
    return torch.stack([torch.tensordot(b, b, dims=([o - 1 for o in other],) * 2) for b in x])


def _ref_precondition(x: torch.Tensor, roots: list[torch.Tensor]) -> torch.Tensor:
    out = []
    for b_idx, b in enumerate(x):
        for i, r in enumerate(roots):
            b = torch.tensordot(r[b_idx], b, dims=([1], [i])).movedim(0, i)
        out.append(b)
    return torch.stack(out)


@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 3), (2, 3, 4, 2), (1, 2, 3, 2, 2)])
@pytest.mark.parametrize("beta2", [0.9, 1.0])
def test_update_statistics_matches_tensordot(shape, beta2):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    k = x.dim() - 1
    stats = [torch.randn(shape[0], n, n, dtype=torch.float64) for n in shape[1:]]
    stats = [s @ s.mT for s in stats]
    want = [
        beta2 * s + (1.0 if beta2 == 1.0 else 1 - beta2) * _ref_stats(x, i)
        for i, s in enumerate(stats)
    ]
    kron.update_statistics(stats, x, beta2)
    assert len(stats) == k
    for got, ref in zip(stats, want):
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 3), (2, 3, 4, 2), (1, 2, 3, 2, 2)])
def test_precondition_matches_tensordot(shape):
    torch.manual_seed(1)
    x = torch.randn(shape, dtype=torch.float64)
    roots = []
    for n in shape[1:]:
        a = torch.randn(shape[0], n, n, dtype=torch.float64)
        roots.append(a + a.mT)  # symmetric, like every root
    torch.testing.assert_close(kron.precondition(x, roots), _ref_precondition(x, roots))


def test_bf16_matmuls_accumulate_into_fp32_statistics():
    torch.manual_seed(2)
    x = torch.randn(2, 40, 30)
    s32 = [torch.zeros(2, 40, 40), torch.zeros(2, 30, 30)]
    s16 = [torch.zeros(2, 40, 40), torch.zeros(2, 30, 30)]
    kron.update_statistics(s32, x, 0.9)
    kron.update_statistics(s16, x, 0.9, matmul_dtype=torch.bfloat16)
    for a, b in zip(s32, s16):
        assert b.dtype == torch.float32
        assert ((a - b).norm() / a.norm()) < 2e-2


@pytest.mark.parametrize("kind", ["adam", "rmsprop", "adagrad", "sgd", None])
@pytest.mark.parametrize("step", [1, 7])
def test_graft_norm_equals_norm_of_graft_direction(kind, step):
    from secondorder.kernels.grafting import graft_direction, graft_norm

    torch.manual_seed(3)
    m, v = torch.randn(50, dtype=torch.float64), torch.rand(50, dtype=torch.float64)
    want = torch.linalg.vector_norm(graft_direction(kind, m, v, step, 0.99, 1e-3))
    torch.testing.assert_close(graft_norm(kind, m, v, step, 0.99, 1e-3), want)


@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 3), (2, 3, 4, 2)])
@pytest.mark.parametrize("beta2", [0.9, 1.0])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("magnitudes", [(1.0, 1.0, 1.0), (1e25, 1e-3, 1e30), (1e-30, 1e-25, 1.0)])
def test_scaled_statistics_equal_the_float64_ema(shape, beta2, packed, magnitudes):
    """``scale^2 * stats`` equals the float64 EMA of the Gram products, for gradients whose
    magnitude jumps by up to 1e33 between steps (where a float32 ``X X^T`` overflows or
    underflows). Each entry is a float32 sum of a few products per step, rescaled: the
    error is a few float32 ulps of the largest entry, relative to each step's contribution
    that survives the decay, so the comparison is relative to the largest entry."""
    gen = torch.Generator().manual_seed(4)
    b, dims = shape[0], shape[1:]
    stats = [
        torch.zeros(b, kron.packed_size(n)) if packed else torch.zeros(b, n, n) for n in dims
    ]
    scales = [torch.zeros(b) for _ in dims]
    ref = [torch.zeros(b, n, n, dtype=torch.float64) for n in dims]
    w = 1.0 if beta2 == 1.0 else 1.0 - beta2
    for mag in magnitudes:
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * mag
        kron.update_scaled_statistics(stats, scales, x.float(), beta2)
        xf = x.float().double()
        ref = [beta2 * r + w * _ref_stats(xf, i) for i, r in enumerate(ref)]
    eps = torch.finfo(torch.float32).eps
    for s, sc, r in zip(stats, scales, ref):
        full = kron.unpack_symmetric(s) if packed else s
        assert torch.isfinite(full).all() and torch.isfinite(sc).all()
        got = sc.double()[:, None, None] ** 2 * full.double()
        tol = 16 * len(magnitudes) * eps * r.abs().amax(dim=(1, 2), keepdim=True)
        assert ((got - r).abs() <= tol).all()
