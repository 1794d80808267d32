"""Row / column normalisation against dense float64 formulas."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secondorder.kernels.normalize import (
    normalization_scale,
    normalize,
    reduce_dims,
    scale_from_sum_of_squares,
    sum_of_squares,
)

EPS64 = torch.finfo(torch.float64).eps
EPS32 = torch.finfo(torch.float32).eps
shapes = st.lists(st.integers(1, 7), min_size=2, max_size=4).map(tuple)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, axis=st.sampled_from([0, 1]), norm=st.sampled_from(["rms", "l2"]),
       seed=st.integers(0, 99))  # fmt: skip
def test_matches_dense_formula(shape, axis, norm, seed):
    u = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    # dense reference: the (out, rest) matrix, normalised per row (axis=1) or per column of
    # the (first, rest) matrix for axis=0 -- written with explicit sums
    mat = u.reshape(shape[0], -1)
    if axis == 1:
        sq = (mat * mat).sum(1, keepdim=True)
        count = mat.shape[1]
    else:
        sq = (mat * mat).sum(0, keepdim=True)
        count = mat.shape[0]
    scale = torch.sqrt(sq / count) if norm == "rms" else torch.sqrt(sq)
    ref = (mat / scale).reshape(shape)
    got = normalize(u, axis, norm, eps=1e-300)
    torch.testing.assert_close(got, ref, rtol=8 * math.prod(shape) * EPS64, atol=0)
    # every normalised row (column) has RMS one (rms) or Euclidean norm one (l2)
    dims = reduce_dims(u.dim(), axis)
    size = torch.linalg.vector_norm(got, dim=dims)
    want = math.sqrt(count) if norm == "rms" else 1.0
    torch.testing.assert_close(size, torch.full_like(size, want), rtol=8 * count * EPS64, atol=0)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, cut=st.integers(0, 7), norm=st.sampled_from(["rms", "l2"]),
       seed=st.integers(0, 99))  # fmt: skip
def test_column_scale_from_pieces_of_the_rows(shape, cut, norm, seed):
    """Per-column scales of a tensor whose rows are cut in two pieces (as FSDP2 shards cut
    them; a piece may be empty): the pieces' float64 sums of squares, added, give the
    dense float64 scale rounded once to float32."""
    u = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    cut = min(cut, shape[0])
    sq = sum_of_squares(u[:cut], 0) + sum_of_squares(u[cut:], 0)
    got = scale_from_sum_of_squares(sq, shape[0], norm, 1e-30, torch.float32)
    mat = u.double().reshape(shape[0], -1)
    ref = (mat * mat).sum(0).sqrt() / (math.sqrt(shape[0]) if norm == "rms" else 1.0)
    assert got.dtype == torch.float32 and got.shape == (1, *shape[1:])
    # float64 rounding (sums of squares of float32 values, sqrt, division) then one float32
    tol = (EPS32 / 2 + (shape[0] + 4) * EPS64) * ref
    assert bool(((got.reshape(-1).double() - ref).abs() <= tol).all())
    # without a cut it is normalization_scale's scale to float32 rounding of its own sum
    whole = normalization_scale(u, 0, norm, 1e-30).reshape(-1).double()
    assert bool(((whole - ref).abs() <= (shape[0] + 4) * EPS32 * ref).all())


def test_zero_rows_stay_zero_and_scale_is_clamped():
    u = torch.randn(4, 6)
    u[1] = 0
    out = normalize(u, 1, "rms", eps=1e-8)
    assert torch.equal(out[1], torch.zeros(6)) and torch.isfinite(out).all()
    s = normalization_scale(u, 1, "rms", eps=1e-8)
    assert s.shape == (4, 1) and s[1, 0] == 1e-8


def test_bad_arguments():
    with pytest.raises(ValueError, match="axis"):
        normalize(torch.ones(2, 2), 2)
    with pytest.raises(ValueError, match="norm"):
        normalize(torch.ones(2, 2), 1, "l1")
    with pytest.raises(ValueError, match=">= 2 dims"):
        normalize(torch.ones(3), 1)
