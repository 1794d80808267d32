"""Row / column normalisation against dense float64 formulas."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secondorder.kernels.normalize import normalization_scale, normalize, reduce_dims

EPS64 = torch.finfo(torch.float64).eps
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
