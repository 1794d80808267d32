"""Row / column normalisation of an update (the direction SCALE applies).

A weight of ``torch`` layout ``(out, in, ...)`` is normalised per *output unit* (each row
of the ``(out, in * ...)`` matrix, i.e. each column of the ``in x out`` matrix of the
math convention ``y = W^T x``): ``axis=1`` divides every row by a scale computed over all
dims but the first. ``axis=0`` divides every column by a scale computed over the first dim;
for an embedding table ``(vocab, width)`` that is the vocabulary axis, so each hidden
feature is normalised across tokens (rows of rare tokens receive tiny gradients and must not
be blown up to the size of frequent ones).

``norm="rms"`` uses the root mean square ``sqrt(mean(u^2))`` (a normalised row then has RMS
one, so its entries are O(1) whatever the width); ``norm="l2"`` the Euclidean norm (a
normalised row has norm one; the same direction, ``sqrt(fan)`` times smaller). Scales are
clamped below at ``eps``, so an all-zero row stays zero.

When the rows of ``u`` are spread over several pieces (the shards of a tensor sharded along
dim 0), a per-column scale is a sum over all of them: :func:`sum_of_squares` gives each
piece's part (float64), the caller adds the parts up, and
:func:`scale_from_sum_of_squares` finishes the scale from the total and the whole row
count. Per-row scales need no such split (a row lives in one piece).
"""

from __future__ import annotations

import math

import torch

NORMS = ("rms", "l2")
AXES = (0, 1)


def reduce_dims(ndim: int, axis: int) -> tuple[int, ...]:
    """The dims a scale is computed over: all but the first (``axis=1``) or the first only."""
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    if ndim < 2:
        raise ValueError(f"normalisation needs a tensor with >= 2 dims, got {ndim}")
    return tuple(range(1, ndim)) if axis == 1 else (0,)


def normalization_scale(u: torch.Tensor, axis: int, norm: str = "rms", eps: float = 1e-8):
    """Per-row (``axis=1``) or per-column (``axis=0``) scale of ``u``, broadcastable to it."""
    dims = reduce_dims(u.dim(), axis)
    s = torch.linalg.vector_norm(u, dim=dims, keepdim=True)
    if norm == "rms":
        count = math.prod(u.shape[d] for d in dims)
        s.mul_(1.0 / math.sqrt(count))
    elif norm != "l2":
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return s.clamp_min_(eps)


def sum_of_squares(u: torch.Tensor, axis: int) -> torch.Tensor:
    """The squared Euclidean norm per row (``axis=1``) or column (``axis=0``) of ``u``,
    broadcastable to it, accumulated in float64 (float32 on devices without float64). Zero
    for a column of an empty piece (no rows)."""
    dims = reduce_dims(u.dim(), axis)
    dtype = torch.float32 if u.device.type == "mps" else torch.float64
    return torch.linalg.vector_norm(u, dim=dims, keepdim=True, dtype=dtype).square_()


def scale_from_sum_of_squares(
    sq: torch.Tensor, count: int, norm: str, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """The scale of :func:`normalization_scale` from the squared norms ``sq`` of rows or
    columns of ``count`` entries each, in ``dtype``."""
    s = sq.sqrt()
    if norm == "rms":
        s.mul_(1.0 / math.sqrt(count))
    elif norm != "l2":
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return s.to(dtype).clamp_min_(eps)


def normalize(u: torch.Tensor, axis: int, norm: str = "rms", eps: float = 1e-8) -> torch.Tensor:
    """``u`` divided by its :func:`normalization_scale` (a new tensor)."""
    return u / normalization_scale(u, axis, norm, eps)
