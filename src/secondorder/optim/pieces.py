"""Cut a step's per-parameter elementwise work into pieces of bounded size.

Shampoo's update of one parameter (momentum, graft accumulator and direction, the Kronecker
product, weight decay, the update itself) creates several temporaries the size of what it
works on. For a large tensor (an embedding of 50257 x 768 is 154 MB in float32) a handful
of them is a large share of the optimizer's memory, so a large tensor is processed in
*pieces*: runs of rows of its merged shape (see :mod:`secondorder.blocking`), each a whole
number of block rows, so that every block lies in one piece. Graft-only tensors (no block
plan) are cut into runs of elements. Every operation is either elementwise or per block,
so the pieces together compute exactly what the whole tensor would.

:class:`Piece` is one such piece (or a whole tensor); :func:`row_ranges` chooses them and
:class:`RowBlocks` maps the rows of a piece to the blocks (size class and block range) of
the tensor's plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..blocking import BlockPlan


@dataclass(frozen=True)
class RowBlocks:
    """The blocks of rows ``lo:hi`` of a tensor's merged shape.

    ``plan`` cuts the piece (of shape ``(hi - lo, *merged_shape[1:])``) into blocks;
    ``classes[j] = (c, first, end)`` says that the stack of ``plan``'s class ``j`` is blocks
    ``first:end`` of the full plan's class ``c``; ``shapes[j]`` is that class's block shape.
    """

    plan: BlockPlan
    classes: tuple[tuple[int, int, int], ...]
    shapes: tuple[tuple[int, ...], ...]

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The block stacks of ``x`` (the piece), shaped like the full plan's stacks."""
        return [s.reshape(s.shape[0], *bs) for s, bs in zip(self.plan.split(x), self.shapes)]

    def merge(self, stacks: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`split`."""
        shaped = [s.reshape(s.shape[0], *bs) for s, bs in zip(stacks, self.plan.block_shapes)]
        return self.plan.merge(shaped)


def whole_blocks(plan: BlockPlan) -> RowBlocks:
    """All blocks of a tensor (pieces of the original shape)."""
    classes = tuple((c, 0, n) for c, n in enumerate(plan.counts))
    return RowBlocks(plan, classes, tuple(plan.block_shapes))


def row_blocks(plan: BlockPlan, lo: int, hi: int) -> RowBlocks:
    """The blocks of rows ``lo:hi`` of ``plan``'s merged shape.

    ``lo`` must be a multiple of ``block_size`` and ``hi`` too, or the end of the tensor
    (as :func:`row_ranges` chooses them). Blocks within a size class are in row-major order
    of the block grid, so rows of whole block rows are one contiguous range of each class.
    """
    bs, m0 = plan.block_size, plan.merged_shape[0]
    full_rows = m0 // bs * bs
    if lo % bs or (hi % bs and hi != m0) or not 0 <= lo < hi <= m0 or (lo < full_rows < hi):
        raise ValueError(f"rows {lo}:{hi} do not cut {plan} at block rows")
    sub = BlockPlan((hi - lo, *plan.merged_shape[1:]), bs, merge=False)
    remainder = lo >= full_rows
    # Classes are enumerated with the first dim slowest and its full chunk first: the
    # classes of the remainder rows follow all classes of the full rows.
    offset = len(sub.counts) if (remainder and full_rows > 0) else 0
    classes = []
    for j, n in enumerate(sub.counts):
        if remainder:
            classes.append((offset + j, 0, n))
        else:
            per_row = n // ((hi - lo) // bs)
            first = lo // bs * per_row
            classes.append((offset + j, first, first + n))
    shapes = tuple(plan.block_shapes[c] for c, _, _ in classes)
    return RowBlocks(sub, tuple(classes), shapes)


def row_ranges(plan: BlockPlan | None, numel: int, max_elements: int) -> list[tuple[int, int]]:
    """Row ranges ``(lo, hi)`` of at most ``max_elements`` elements each (at least one block
    row: a block is never cut) covering a tensor: rows of ``plan``'s merged shape, or
    elements when ``plan`` is ``None``."""
    if plan is None or not plan.merged_shape:
        step = max(1, max_elements)
        return [(lo, min(lo + step, numel)) for lo in range(0, numel, step)]
    bs, m0 = plan.block_size, plan.merged_shape[0]
    row = math.prod(plan.merged_shape[1:])
    full_rows = m0 // bs * bs
    step = max(bs, max_elements // max(row, 1) // bs * bs)
    out = [(lo, min(lo + step, full_rows)) for lo in range(0, full_rows, step)]
    if full_rows < m0:
        out.append((full_rows, m0))
    return out


@dataclass
class Piece:
    """A whole tensor (``rows is None``) or rows ``rows[0]:rows[1]`` of it, of a step item."""

    item: Any  # the optimizer's per-parameter record (has ``p``, ``plan``, ``state``, ...)
    rows: tuple[int, int] | None
    numel: int

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """This piece of ``x`` (a tensor of the parameter's shape; a view for row pieces)."""
        if self.rows is None:
            return x
        lo, hi = self.rows
        plan = self.item.plan
        if plan is None or not plan.merged_shape:
            return x.view(-1)[lo:hi]
        return x.view(plan.merged_shape)[lo:hi]

    def blocks(self) -> RowBlocks:
        """Which blocks of the parameter's plan this piece holds."""
        plan = self.item.plan
        if self.rows is None:
            return whole_blocks(plan)
        return row_blocks(plan, *self.rows)


def cut(item: Any, tensors: list[torch.Tensor], max_elements: int | None) -> list[Piece]:
    """The pieces of one parameter: the whole tensor when it fits ``max_elements`` (or
    ``None``: unbounded) or when one of ``tensors`` (the parameter, its gradient and state
    of its shape) is not contiguous; row pieces otherwise."""
    n = item.p.numel()
    if max_elements is None or n <= max_elements or not all(t.is_contiguous() for t in tensors):
        return [Piece(item, None, n)]
    ranges = row_ranges(item.plan, n, max_elements)
    if len(ranges) == 1:
        return [Piece(item, None, n)]
    plan = item.plan
    row = 1 if plan is None or not plan.merged_shape else math.prod(plan.merged_shape[1:])
    return [Piece(item, (lo, hi), (hi - lo) * row) for lo, hi in ranges]
