"""Reshape a parameter into Shampoo blocks and back (docs/algorithms.md#shapes-merge-block-skip).

Two steps turn a tensor of any shape into a few stacks of small, equally shaped blocks:

1. :func:`merge_dims` drops size-1 dims and merges adjacent dims while their product stays
   ``<= block_size`` (a conv kernel ``(64, 32, 3, 3)`` with 1024 becomes ``(64, 288)``).
2. :class:`BlockPlan` cuts every merged dim longer than ``block_size`` into chunks of
   ``block_size`` plus one smaller remainder chunk. Along each dim a block is thus either
   *full* (``block_size`` long) or the *remainder*, so there are at most ``2**k`` distinct
   block shapes ("size classes") for an order-``k`` tensor. Each class is returned as one
   stacked tensor, ready for batched statistics and roots.

Everything is done with ``reshape``/``permute``/slicing, one set of tensor ops per size
class; there is no Python loop over blocks.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["BlockPlan", "merge_dims"]


def _check_size(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def merge_dims(shape: Sequence[int], max_size: int) -> tuple[int, ...]:
    """Drop size-1 dims, then greedily merge adjacent dims while the product is ``<= max_size``.

    Merging goes left to right: the running product absorbs the next dim if the result still
    fits in ``max_size``, otherwise a new merged dim starts. Dims already larger than
    ``max_size`` are kept as they are (blocking cuts them later).

    Examples:
        ``merge_dims((64, 32, 3, 3), 1024) == (64, 288)``;
        ``merge_dims((1, 10, 1), 1024) == (10,)``;
        ``merge_dims((), 1024) == merge_dims((1, 1), 1024) == ()`` -- a 0-d result means
        "a single number". ``merge_dims((24, 12), 512) == (288,)``: a matrix can merge into
        one dim (Shampoo then gives it one full-matrix factor).
    """
    max_size = _check_size("max_size", max_size)
    dims = [int(d) for d in shape if d != 1]
    if any(d < 0 for d in dims):
        raise ValueError(f"shape must have non-negative dims, got {tuple(shape)}")
    merged: list[int] = []
    for d in dims:
        if merged and merged[-1] * d <= max_size:
            merged[-1] *= d
        else:
            merged.append(d)
    return tuple(merged)


def _chunks(dim: int, block_size: int) -> list[tuple[int, int, int]]:
    """Chunk classes of one dim as ``(start, chunk_len, n_chunks)``: full chunks first."""
    full, rem = divmod(dim, block_size)
    out = []
    if full > 0:
        out.append((0, block_size, full))
    if rem > 0 or dim == 0:
        out.append((full * block_size, rem, 1))
    return out


class BlockPlan:
    """How a tensor of a given shape is cut into blocks of at most ``block_size`` per dim.

    Args:
        shape: the original tensor shape.
        block_size: maximum length of every block dim (``>= 1``).
        merge: merge small adjacent dims first (:func:`merge_dims`); with ``False`` only the
            size-1 dims are dropped.

    Attributes:
        shape: the original shape.
        merged_shape: the shape after merging (``()`` for 0-d and all-ones shapes).
        block_shapes: one block shape per size class.
        counts: number of blocks in each size class.

    Order: size classes are enumerated like ``itertools.product`` over the dims, where along
    each dim the full chunks come before the remainder chunk (so the class of all-full blocks
    is first and the all-remainder class last). Within a class, blocks are in row-major order
    of their position in the block grid (last merged dim fastest).

    For a 0-d or all-ones shape there is one class with block shape ``()`` and count 1.
    """

    def __init__(self, shape: Sequence[int], block_size: int, merge: bool = True):
        self.block_size = _check_size("block_size", block_size)
        self.shape: tuple[int, ...] = tuple(int(d) for d in shape)
        if merge:
            self.merged_shape = merge_dims(self.shape, self.block_size)
        else:
            self.merged_shape = tuple(d for d in self.shape if d != 1)
        # One entry per class: (slices into the merged tensor, grid counts, block shape).
        self._classes: list[tuple[tuple[slice, ...], tuple[int, ...], tuple[int, ...]]] = []
        per_dim = [_chunks(d, self.block_size) for d in self.merged_shape]
        for combo in itertools.product(*per_dim):
            slices = tuple(slice(start, start + ln * n) for start, ln, n in combo)
            grid = tuple(n for _, _, n in combo)
            block = tuple(ln for _, ln, _ in combo)
            self._classes.append((slices, grid, block))
        self.block_shapes: list[tuple[int, ...]] = [c[2] for c in self._classes]
        self.counts: list[int] = [math.prod(c[1]) for c in self._classes]

    @property
    def order(self) -> int:
        """Number of merged dims (0 for scalars and all-ones shapes)."""
        return len(self.merged_shape)

    @property
    def num_blocks(self) -> int:
        """Total number of blocks over all size classes."""
        return sum(self.counts)

    def __repr__(self) -> str:
        return (
            f"BlockPlan(shape={self.shape}, block_size={self.block_size}, "
            f"merged_shape={self.merged_shape}, block_shapes={self.block_shapes}, "
            f"counts={self.counts})"
        )

    def split(self, x: Tensor) -> list[Tensor]:
        """Cut ``x`` (of the original shape) into one stacked tensor per size class.

        Returns a list aligned with :attr:`block_shapes`: entry ``c`` has shape
        ``(counts[c], *block_shapes[c])``. Entries may share memory with ``x`` (views) when
        no copy is needed; do not write into them unless you own ``x``.
        """
        if tuple(x.shape) != self.shape:
            raise ValueError(f"expected a tensor of shape {self.shape}, got {tuple(x.shape)}")
        xm = x.reshape(self.merged_shape)
        k = len(self.merged_shape)
        out = []
        for slices, grid, block in self._classes:
            sub = xm[slices]
            # (g0*b0, g1*b1, ...) -> (g0, b0, g1, b1, ...) -> (g0, g1, ..., b0, b1, ...)
            inter = [s for pair in zip(grid, block) for s in pair]
            perm = list(range(0, 2 * k, 2)) + list(range(1, 2 * k, 2))
            out.append(sub.reshape(inter).permute(perm).reshape(math.prod(grid), *block))
        return out

    def merge(self, blocks: Sequence[Tensor]) -> Tensor:
        """Inverse of :meth:`split`: put the blocks back into a tensor of the original shape.

        The result has the blocks' dtype and device (all blocks must agree). When a single
        block covers the whole tensor the result may be a view of that block.
        """
        if len(blocks) != len(self._classes):
            raise ValueError(
                f"expected {len(self._classes)} block stacks (one per size class), "
                f"got {len(blocks)}"
            )
        for c, (b, n, bs) in enumerate(zip(blocks, self.counts, self.block_shapes)):
            if tuple(b.shape) != (n, *bs):
                raise ValueError(
                    f"block stack {c} must have shape {(n, *bs)}, got {tuple(b.shape)}"
                )
        ref = blocks[0]
        if len(blocks) == 1 and self.counts[0] == 1:
            # One block covering the whole tensor: a reshape, no copy (may be a view).
            return ref.reshape(self.shape)
        k = len(self.merged_shape)
        out = torch.empty(self.merged_shape, dtype=ref.dtype, device=ref.device)
        inv = [0] * (2 * k)
        for i in range(k):
            inv[2 * i] = i
            inv[2 * i + 1] = k + i
        for b, (slices, grid, block) in zip(blocks, self._classes):
            sub_shape = tuple(g * s for g, s in zip(grid, block))
            out[slices] = b.reshape(*grid, *block).permute(inv).reshape(sub_shape)
        return out.reshape(self.shape)
