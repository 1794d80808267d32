"""Eigenbases of Kronecker factors and moves of block stacks into and out of them (SOAP).

A *stack* is ``(B, n_1, ..., n_k)``: ``B`` blocks of the same shape (see
:mod:`secondorder.kernels.kron`). A *basis* per axis is a ``(B, n_i, n_i)`` stack of
orthogonal matrices ``Q_i`` whose columns are (approximate) eigenvectors of the axis-``i``
factor ``L_i``, in order of decreasing eigenvalue.

* :func:`rotate` / :func:`unrotate`: ``X -> X x_1 Q_1^T ... x_k Q_k^T`` and back (for a
  matrix: ``Q_1^T X Q_2`` and ``Q_1 Y Q_2^T``), through the batched mode products of
  :func:`secondorder.kernels.kron.precondition`;
* :func:`refresh_bases`: a new basis for a batch of factors from the previous one: the old
  columns are first ordered by their Rayleigh quotients ``diag(Q^T L Q)`` (largest first;
  the permutation is returned so that per-coordinate statistics can follow their
  directions, :func:`permute_axis`), then either a full eigendecomposition or one step of
  subspace (power) iteration, ``Q <- qr(L Q)``, is taken;
* :func:`orthogonality_error`: ``max |Q^T Q - I|`` per block (health check).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import kron
from .roots import _eigh as _robust_eigh
from .roots import _pad_to_aligned

__all__ = [
    "BASIS_METHODS",
    "BasisRefresh",
    "mode_product",
    "orthogonality_error",
    "permute_axis",
    "refresh_bases",
    "rotate",
    "unrotate",
]

BASIS_METHODS = ("qr", "eigh")


def _mode_products(x: torch.Tensor, mats: list[torch.Tensor]) -> torch.Tensor:
    """``x x_1 M_1 ... x_k M_k``: ``M_i`` multiplies every mode-``i`` fibre from the left.

    :func:`kron.precondition` computes ``P_1 X P_2`` for a matrix stack (it assumes
    symmetric factors), i.e. the mode-2 product with ``P_2^T``: pass the transpose there.
    """
    if x.dim() == 3:
        mats = [mats[0], mats[1].mT]
    return kron.precondition(x, mats)


def rotate(x: torch.Tensor, bases: list[torch.Tensor]) -> torch.Tensor:
    """Coordinates of the stack ``x`` in the eigenbases: ``x x_1 Q_1^T ... x_k Q_k^T``.

    Returns a new tensor in the bases' dtype (``x`` is cast to it).
    """
    return _mode_products(x, [q.mT for q in bases])


def unrotate(y: torch.Tensor, bases: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`rotate` for orthogonal bases: ``y x_1 Q_1 ... x_k Q_k``."""
    return _mode_products(y, list(bases))


def mode_product(x: torch.Tensor, axis: int, mat: torch.Tensor) -> torch.Tensor:
    """``x x_axis mat`` for a stack: ``mat[b]`` (``(B, r, n_axis)``) multiplies every
    mode-``axis`` fibre of block ``b`` from the left. Returns a new contiguous tensor."""
    y = x.movedim(axis + 1, 1)
    shape = y.shape
    z = torch.bmm(mat, y.reshape(shape[0], shape[1], -1))
    return z.reshape(shape[0], mat.shape[1], *shape[2:]).movedim(1, axis + 1).contiguous()


def permute_axis(x: torch.Tensor, axis: int, perm: torch.Tensor) -> torch.Tensor:
    """Reorder block axis ``axis`` of the stack ``x`` by a per-block permutation.

    ``perm`` is ``(B, n_axis)`` (integer); the result ``y`` has
    ``y[b, ..., j, ...] = x[b, ..., perm[b, j], ...]`` (``j`` at block axis ``axis``).
    """
    k = x.dim() - 1
    shape = [x.shape[0]] + [1] * k
    shape[axis + 1] = x.shape[axis + 1]
    index = perm.reshape(shape).expand(x.shape)
    return torch.gather(x, axis + 1, index)


class BasisRefresh(NamedTuple):
    """New bases for a batch of factors.

    Attributes:
        basis: ``(B, n, n)`` new orthogonal bases, columns by decreasing eigenvalue.
        perm: ``(B, n)`` the order given to the *old* columns (largest Rayleigh quotient
            first): coordinate ``j`` of the new basis continues coordinate ``perm[j]`` of
            the old one.
        eigenvalues: ``(B, n)`` eigenvalue estimates of the factor in the new order: exact
            for ``"eigh"``, the sorted Rayleigh quotients of the old basis for ``"qr"``.
        ok: ``(B,)`` bool, ``False`` where the new basis is not finite (then ``basis`` holds
            the old basis, reordered by ``perm``).
    """

    basis: torch.Tensor
    perm: torch.Tensor
    eigenvalues: torch.Tensor
    ok: torch.Tensor


def tie_break(factors: torch.Tensor, rel: float) -> torch.Tensor:
    """``L + rel * (tr L / n) * diag(1, 1 + 1/n, ..., 2 - 1/n)`` for each factor.

    Directions no gradient has reached yet span a repeated (zero) eigenvalue, where the
    eigenvectors are whatever rounding makes them, so the basis, and Adam's per-coordinate
    step in it, would jump with the last bit of the gradients. A small, graded diagonal
    makes the choice definite (the unseen directions lean towards the coordinate axes, in
    order) and continuous in the factors; directions whose eigenvalues differ by much more
    than ``rel * tr L / n`` barely move.
    """
    n = factors.shape[-1]
    scale = torch.diagonal(factors, dim1=-2, dim2=-1).sum(-1) * (rel / n)
    ramp = 1.0 + torch.arange(n, dtype=factors.dtype, device=factors.device) / n
    return factors + torch.diag_embed(scale[:, None] * ramp)


def _qr_q(x: torch.Tensor) -> torch.Tensor:
    """``Q`` of ``qr(x)`` for a batch ``(B, n, n)``, the same bits wherever a matrix sits in
    the batch. On the CPU, LAPACK's result can depend on a matrix's memory alignment in the
    batch (seen for 5 x 5 and 7 x 7 float32 matrices), i.e. on which other matrices share it;
    as for ``eigh`` (:func:`secondorder.kernels.roots._eigh`), matrices whose size is not a
    multiple of 4 are bordered by a decoupled diagonal block, which leaves the leading ``n``
    columns of ``Q`` as they are (Householder reflections of columns that are zero below
    row ``n`` never reach the border), and every matrix then starts on a 64-byte boundary."""
    n = x.shape[-1]
    pad = (-n) % 4 if x.device.type == "cpu" else 0
    if not pad:
        return torch.linalg.qr(x).Q
    return torch.linalg.qr(_pad_to_aligned(x, pad)).Q[..., :n, :n]


def refresh_bases(
    factors: torch.Tensor, bases: torch.Tensor, method: str = "qr"
) -> BasisRefresh:
    """New eigenbases of the symmetric PSD ``factors`` ``(B, n, n)`` from ``bases``.

    ``method="eigh"``: a full eigendecomposition (eigenvalues decreasing; a failing batch is
    redone in float64 matrix by matrix). ``method="qr"``: one step of subspace iteration from
    the reordered old basis, ``qr(L Q)``: cheap, and close to the eigenbasis when the factor
    changes slowly between refreshes.
    """
    if method not in BASIS_METHODS:
        raise ValueError(f"method must be one of {BASIS_METHODS}, got {method!r}")
    lq = torch.bmm(factors, bases)
    rayleigh = (bases * lq).sum(dim=-2)  # diag(Q^T L Q)
    perm = torch.argsort(rayleigh, dim=-1, descending=True, stable=True)
    cols = perm.unsqueeze(-2).expand_as(bases)
    old = torch.gather(bases, -1, cols)
    if method == "qr":
        new = _qr_q(torch.gather(lq, -1, cols))
        eigenvalues = torch.gather(rayleigh, -1, perm)
    else:
        w, v = _robust_eigh(factors)
        new, eigenvalues = v.flip(-1), w.flip(-1)
    ok = torch.isfinite(new).flatten(1).all(dim=1) & torch.isfinite(eigenvalues).all(dim=1)
    new = torch.where(ok[:, None, None], new, old)
    return BasisRefresh(new, perm, eigenvalues, ok)


def orthogonality_error(bases: torch.Tensor) -> torch.Tensor:
    """``max |Q^T Q - I|`` of each basis in the ``(B, n, n)`` stack, shape ``(B,)``."""
    gram = torch.bmm(bases.mT, bases)
    eye = torch.eye(bases.shape[-1], dtype=bases.dtype, device=bases.device)
    return (gram - eye).abs().flatten(1).amax(dim=1)
