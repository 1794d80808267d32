"""Kronecker-factored statistics and their application, batched over stacked blocks.

A *stack* is a tensor of shape ``(B, n_1, ..., n_k)``: ``B`` independent order-``k`` blocks
of the same shape. Every function here works on a whole stack with batched matmuls, so
same-size blocks cost one kernel launch, not one per block.
"""

from __future__ import annotations

import torch

from .grafting import ema_weight


def unfold(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Mode-``axis`` unfolding of each block: ``(B, n_axis, prod(other dims))``."""
    b, n = x.shape[0], x.shape[axis + 1]
    return x.movedim(axis + 1, 1).reshape(b, n, -1)


def update_statistics(
    stats: list[torch.Tensor],
    x: torch.Tensor,
    beta2: float,
    matmul_dtype: torch.dtype | None = None,
) -> None:
    """In place: ``stats[i] <- beta2 * stats[i] + w * X_(i) X_(i)^T`` for each axis ``i``.

    ``x`` is a stack ``(B, n_1, ..., n_k)``; ``stats[i]`` has shape ``(B, n_i, n_i)``;
    ``w = 1 - beta2`` (or ``1`` for ``beta2 == 1``, a running sum). With ``matmul_dtype``
    (e.g. bfloat16) the Gram products are computed in that dtype and accumulated into the
    statistics' own dtype.
    """
    w = ema_weight(beta2)
    low = matmul_dtype is not None and matmul_dtype != stats[0].dtype
    if low:
        x = x.to(matmul_dtype)
    for i, s in enumerate(stats):
        # For matrices, X^T is a strided view that bmm consumes without a copy.
        xi = x.transpose(1, 2) if (i == 1 and x.dim() == 3) else unfold(x, i)
        if low:
            gram = torch.bmm(xi, xi.transpose(1, 2))
            s.mul_(beta2).add_(gram, alpha=w)
        else:
            s.baddbmm_(xi, xi.transpose(1, 2), beta=beta2, alpha=w)


def precondition(x: torch.Tensor, roots: list[torch.Tensor]) -> torch.Tensor:
    """Apply one (symmetric) factor per axis: ``x ×_1 P_1 ×_2 P_2 ... ×_k P_k``.

    For a matrix stack this is ``P_1 @ X @ P_2``. Returns a new tensor of ``x``'s shape,
    computed in the roots' dtype (``x`` is cast to it).
    """
    x = x.to(roots[0].dtype)
    k = x.dim() - 1
    if k == 2:
        return torch.bmm(torch.bmm(roots[0], x), roots[1])
    if k == 1:
        return torch.bmm(roots[0], x.unsqueeze(-1)).squeeze(-1)
    # Contract the leading block axis, then rotate it to the back; after k rotations the
    # axes are in their original order again.
    for i in range(k):
        b, n = x.shape[0], x.shape[1]
        rest = x.shape[2:]
        y = torch.bmm(roots[i], x.reshape(b, n, -1)).reshape(b, n, *rest)
        x = y.movedim(1, -1)
    return x.contiguous()
