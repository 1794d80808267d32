"""Orthogonalisation by a quintic Newton-Schulz iteration (the direction Muon applies).

For a matrix ``G = U S V^T`` (reduced SVD) the *orthogonal polar factor* is ``U V^T``: the
matrix with the same singular vectors and every singular value set to one. Computing it
with an SVD is slow on accelerators; instead we run a few steps of an odd matrix
polynomial, which acts on each singular value separately and leaves the singular vectors
alone::

    X_0 = G / (||G||_F + eps)                    # all singular values now in [0, 1]
    X_{k+1} = a X_k + b (X_k X_k^T) X_k + c (X_k X_k^T)^2 X_k

so ``X_K = U phi^K(S) V^T`` with the scalar map ``phi(s) = a s + b s^3 + c s^5``. The usual
coefficients ``(a, b, c) = (3.4445, -4.7750, 2.0315)`` make ``phi`` steep at zero (slope
3.44: small singular values grow fast) at the price of not converging to exactly one: after
five steps every singular value that started above about ``1e-3`` of the Frobenius norm
ends inside a band around one (roughly 0.68 to 1.2, see :func:`scalar_map` for the exact
numbers). Muon only needs "approximately orthogonal", and the band is what makes five
steps enough.

Work is ``O(m^2 n)`` per step for an ``m x n`` matrix with ``m <= n`` (tall matrices are
transposed first, so the Gram matrix is the small one). Matrices of the same shape are
stacked and iterated as one batch (:func:`orthogonalize_many`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: (a, b, c) of the quintic ``phi(s) = a s + b s^3 + c s^5``
NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
#: dtypes the iteration may run in
NS_DTYPES = (torch.float32, torch.bfloat16)
#: added to the Frobenius norm before dividing (an all-zero input stays zero)
NS_EPS = 1e-7


def scalar_map(s: torch.Tensor, steps: int) -> torch.Tensor:
    """``phi`` applied ``steps`` times to singular values ``s`` (already divided by the
    Frobenius norm): what :func:`newton_schulz` does to each singular value, exactly."""
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        s2 = s * s
        s = s * (a + s2 * (b + c * s2))
    return s


def newton_schulz(
    g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Approximate orthogonal polar factor of every matrix in ``g`` (shape ``(..., m, n)``).

    Runs in ``dtype`` and returns a tensor of that dtype and of ``g``'s shape. Each matrix is
    scaled by its own Frobenius norm, so the result does not depend on ``g``'s scale.
    """
    if g.dim() < 2:
        raise ValueError(f"newton_schulz needs matrices (..., m, n), got shape {tuple(g.shape)}")
    x = g.to(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
    x = x / (norm + NS_EPS)
    a, b, c = NS_COEFFICIENTS
    batched = x.dim() == 3
    for _ in range(steps):
        gram = x @ x.mT
        if batched:
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.baddbmm(x, poly, x, beta=a)
        else:
            poly = b * gram + c * (gram @ gram)
            x = a * x + poly @ x
    return x.mT if tall else x


def orthogonalize_many(
    mats: Sequence[torch.Tensor], steps: int = 5, dtype: torch.dtype = torch.float32
) -> list[torch.Tensor]:
    """:func:`newton_schulz` of each 2-d matrix in ``mats``, one batched call per shape class.

    Matrices of shape ``(m, n)`` and ``(n, m)`` share a class (the tall ones are transposed
    before stacking). Returns the results in input order, each of its input's shape.

    On the CPU a matrix's result does not depend on which other matrices share its stack
    (torch's batched CPU matmuls and norms treat each matrix of a stack on its own; tested
    in tests/test_fsdp_muon.py): an FSDP rank that orthogonalises only the matrices it owns
    gets the bits one process gets stacking all of them.
    """
    out: list[torch.Tensor | None] = [None] * len(mats)
    classes: dict[tuple[int, int, torch.device], list[int]] = {}
    for i, m in enumerate(mats):
        if m.dim() != 2:
            raise ValueError(f"orthogonalize_many needs 2-d matrices, got shape {tuple(m.shape)}")
        rows, cols = m.shape
        classes.setdefault((min(rows, cols), max(rows, cols), m.device), []).append(i)
    for (rows, _cols, _device), idx in classes.items():
        stack = torch.stack([mats[i].mT if mats[i].shape[0] != rows else mats[i] for i in idx])
        res = newton_schulz(stack, steps, dtype)
        for j, i in enumerate(idx):
            out[i] = res[j].mT if mats[i].shape[0] != rows else res[j]
    return out  # type: ignore[return-value]
