"""Tests for secondorder.blocking: merge_dims and BlockPlan split/merge."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secondorder.blocking import BlockPlan, merge_dims

SETTINGS = settings(max_examples=50, deadline=None)


@st.composite
def shape_and_block(draw):
    """A block size and a shape (0-d to 5-d) with dims around the block size."""
    bs = draw(st.integers(1, 6))
    dim = st.one_of(
        st.sampled_from([1, 1, 2, max(bs - 1, 1), bs, bs + 1, 2 * bs, 2 * bs + 1]),
        st.integers(1, 3 * bs + 2),
    )
    shape = tuple(draw(st.lists(dim, min_size=0, max_size=5)))
    if math.prod(shape) > 20_000:  # keep tensors small
        shape = shape[:2]
    return shape, bs


def naive_blocks(x: torch.Tensor, plan: BlockPlan) -> list[list[torch.Tensor]]:
    """Reference: blocks by explicit slicing, grouped by shape in the documented order."""
    xm = x.reshape(plan.merged_shape)
    bs = plan.block_size
    per_dim = []
    for d in plan.merged_shape:
        full, rem = divmod(d, bs)
        opts = []
        if full:
            opts.append([(i * bs, bs) for i in range(full)])
        if rem or d == 0:
            opts.append([(full * bs, rem)])
        per_dim.append(opts)
    classes = []
    for combo in itertools.product(*per_dim):
        blocks = []
        for starts in itertools.product(*combo):  # row-major over the block grid
            sl = tuple(slice(s, s + n) for s, n in starts)
            blocks.append(xm[sl])
        classes.append(blocks)
    return classes


@SETTINGS
@given(shape_and_block(), st.booleans())
def test_split_merge_roundtrip_and_invariants(sb, merge):
    shape, bs = sb
    plan = BlockPlan(shape, bs, merge=merge)
    x = torch.randn(shape, dtype=torch.float64)
    blocks = plan.split(x)
    assert len(blocks) == len(plan.block_shapes) == len(plan.counts)
    assert len(blocks) <= 2 ** len(plan.merged_shape)
    for b, n, bshape in zip(blocks, plan.counts, plan.block_shapes):
        assert tuple(b.shape) == (n, *bshape)
        assert all(d <= bs for d in bshape)
    assert sum(b.numel() for b in blocks) == x.numel()
    assert 1 not in plan.merged_shape
    assert math.prod(plan.merged_shape) == x.numel()
    y = plan.merge(blocks)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y, x)


@SETTINGS
@given(shape_and_block())
def test_split_matches_naive_slicing(sb):
    shape, bs = sb
    plan = BlockPlan(shape, bs)
    x = torch.arange(math.prod(shape), dtype=torch.int64).reshape(shape)
    got = plan.split(x)
    want = naive_blocks(x, plan)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape[0] == len(w)
        for gi, wi in zip(g, w):
            assert torch.equal(gi, wi)


@SETTINGS
@given(shape_and_block())
def test_merge_dims_invariants(sb):
    shape, bs = sb
    merged = merge_dims(shape, bs)
    assert math.prod(merged) == math.prod(shape)
    assert 1 not in merged
    big = [d for d in shape if d > bs]
    # dims above the block size are never merged with anything; all others fit
    assert [d for d in merged if d > bs] == big
    # greedy merge: two adjacent merged dims could not have been merged further
    for a, b in zip(merged, merged[1:]):
        assert a * b > bs


@pytest.mark.parametrize(
    "shape, bs, expected",
    [
        ((64, 32, 3, 3), 1024, (64, 288)),
        ((1, 10, 1), 1024, (10,)),
        ((), 1024, ()),
        ((1, 1, 1), 1024, ()),
        ((2048, 3), 1024, (2048, 3)),
        ((3, 2048), 1024, (3, 2048)),
        ((4, 4, 4, 4), 16, (16, 16)),
        ((784, 1000), 1024, (784, 1000)),
        ((1000,), 1024, (1000,)),
    ],
)
def test_merge_dims_examples(shape, bs, expected):
    assert merge_dims(shape, bs) == expected


def test_block_order_is_documented_row_major():
    x = torch.arange(35).reshape(5, 7)
    plan = BlockPlan((5, 7), 3)
    assert plan.block_shapes == [(3, 3), (3, 1), (2, 3), (2, 1)]
    assert plan.counts == [2, 1, 2, 1]
    b = plan.split(x)
    assert torch.equal(b[0][0], x[0:3, 0:3]) and torch.equal(b[0][1], x[0:3, 3:6])
    assert torch.equal(b[1][0], x[0:3, 6:7])
    assert torch.equal(b[2][0], x[3:5, 0:3]) and torch.equal(b[2][1], x[3:5, 3:6])
    assert torch.equal(b[3][0], x[3:5, 6:7])


def test_conv_kernel_plan():
    plan = BlockPlan((64, 32, 3, 3), 1024)
    assert plan.merged_shape == (64, 288)
    assert plan.block_shapes == [(64, 288)] and plan.counts == [1]
    assert plan.order == 2 and plan.num_blocks == 1


def test_merge_false_only_drops_ones():
    plan = BlockPlan((64, 1, 32, 3, 3), 1024, merge=False)
    assert plan.merged_shape == (64, 32, 3, 3)
    assert plan.block_shapes == [(64, 32, 3, 3)]


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_scalar_like_shapes(shape):
    plan = BlockPlan(shape, 4)
    assert plan.merged_shape == () and plan.block_shapes == [()] and plan.counts == [1]
    x = torch.tensor(3.5).reshape(shape)
    blocks = plan.split(x)
    assert [tuple(b.shape) for b in blocks] == [(1,)]
    assert torch.equal(plan.merge(blocks), x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int32, torch.bool])
def test_any_dtype_roundtrip(dtype):
    x = (torch.randn(9, 1, 5) * 10).to(dtype)
    plan = BlockPlan(x.shape, 4)
    blocks = plan.split(x)
    assert all(b.dtype == dtype for b in blocks)
    y = plan.merge(blocks)
    assert y.dtype == dtype and torch.equal(y, x)


def test_non_contiguous_input():
    base = torch.randn(11, 6, dtype=torch.float64)
    x = base.T  # (6, 11), non-contiguous
    plan = BlockPlan(x.shape, 4)
    blocks = plan.split(x)
    torch.testing.assert_close(blocks[0][1], x[0:4, 4:8], rtol=0, atol=0)
    assert torch.equal(plan.merge(blocks), x)


def test_large_matrix_classes():
    plan = BlockPlan((2500, 1300), 1024)
    assert plan.block_shapes == [(1024, 1024), (1024, 276), (452, 1024), (452, 276)]
    assert plan.counts == [2, 2, 1, 1]


def test_errors():
    with pytest.raises(ValueError, match="block_size"):
        BlockPlan((3, 4), 0)
    with pytest.raises(ValueError, match="max_size"):
        merge_dims((3, 4), 0)
    plan = BlockPlan((5, 7), 3)
    with pytest.raises(ValueError, match="shape"):
        plan.split(torch.zeros(7, 5))
    blocks = plan.split(torch.zeros(5, 7))
    with pytest.raises(ValueError, match="size class"):
        plan.merge(blocks[:-1])
    with pytest.raises(ValueError, match="block stack"):
        plan.merge([blocks[0][:1], *blocks[1:]])
