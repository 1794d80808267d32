"""Matrix-free inverse-Fisher products over a window of gradients (M-FAC), batched over blocks.

A *window* is a stack ``G`` of shape ``(..., m, n)``: for each of the leading (block)
indices, ``m`` gradients of dimension ``n`` as rows (rows not yet filled are zero). With its
Gram matrix ``K = G Gᵀ`` (``(..., m, m)``, float64) it defines the damped empirical Fisher

    F = λ I + s Gᵀ G = λ I + s Σ_i g_i g_iᵀ

(``s = 1/m`` as in the authors' code, or ``1/min(t, m)``) and its inverse products are
computed in O(m n + m³), never forming an ``n × n`` matrix:

* for a vector in the row space of the window, ``x = Gᵀ e``, the product is
  ``F⁻¹ x = Gᵀ (λ I + s K)⁻¹ e`` (``F Gᵀ = Gᵀ (λ I + s K)``); the optimizer's query, the
  newest gradient, is row ``slot``: ``e = e_slot``. No large term cancels here.
* for any ``x`` (Woodbury): ``F⁻¹ x = (x − Gᵀ (λ/s I + K)⁻¹ G x) / λ``.

``λ I + s K`` is symmetric positive definite (eigenvalues ``>= λ``), so the ``m × m``
systems are solved by Cholesky in float64; if rounding in ``K`` (computed from the window's
own dtype) makes a factorization fail, that block is solved from an eigendecomposition with
the eigenvalues of ``s K`` clamped at 0, with a warning.

Rows may be stored scaled by powers of two (``exps``: row ``i`` stands for
``G_i · 2**exps_i``), so that gradients of any magnitude (``1e30``, ``1e-30``) neither
overflow nor vanish in the window's float32 products; :func:`ring_write` scales only rows
outside the safe range, and the Gram matrix (float64) is kept in true units.

A window can be spread over several tensors (the optimizer keeps one slice ``G_p`` of
``(m, n_p)`` per parameter): ``K = Σ_p G_p G_pᵀ`` and ``F⁻¹ x`` is ``G_pᵀ a`` slice by slice,
which is why the steps are separate functions.
"""

from __future__ import annotations

import warnings

import torch

from . import pow2

__all__ = [
    "coefficients",
    "combine",
    "gram_row",
    "ihvp",
    "ring_write",
    "row_max",
    "set_gram_row",
    "solve_spd",
]


def ring_write(
    grads: torch.Tensor,
    slot: int,
    g: torch.Tensor,
    exps: torch.Tensor | None = None,
    *,
    row_max: torch.Tensor | None = None,
    row_len: int | None = None,
) -> torch.Tensor:
    """In place: row ``slot`` of the window ``grads`` (``(..., m, n)``) becomes ``g``
    (``(..., n)``, cast to the window's dtype). Returns the row as stored (a tensor of its
    own, not a view of the window: the query for :func:`gram_row`).

    With ``exps`` (int, ``(..., m)``: row ``i`` of the window stands for
    ``grads[..., i, :] · 2**exps[..., i]``), a row whose largest entry is outside the safe
    range of :func:`secondorder.kernels.pow2.safe_exponent` is stored scaled by a power of
    two (largest entry in ``[0.5, 1)``) and its exponent recorded; rows in the range are
    stored as they are, with exponent 0.

    When ``g`` is a piece of a longer row (a shard of a tensor), ``row_max`` (the largest
    magnitude in the whole row, ``(...)``) and ``row_len`` (its length) make the exponent
    the whole row's: every piece then stores its entries exactly as one window of the
    whole row would.
    """
    g = g.to(grads.dtype)
    if exps is not None:
        limit = pow2.safe_exponent(grads.dtype, grads.shape[-1] if row_len is None else row_len)
        of = g if row_max is None else row_max.to(grads.dtype).unsqueeze(-1)
        e = pow2.row_exponents(of, limit)
        g = pow2.mul_pow2(g, -e.unsqueeze(-1))
        exps[..., slot] = e
    grads[..., slot, :] = g
    return g


def row_max(g: torch.Tensor) -> torch.Tensor:
    """The largest magnitude in each row of ``g`` (``(..., n)`` -> ``(...)``); 0 for rows
    without entries (an empty shard)."""
    if g.shape[-1] == 0:
        return g.new_zeros(g.shape[:-1])
    return g.detach().abs().amax(dim=-1)


def gram_row(
    grads: torch.Tensor,
    g: torch.Tensor,
    exps: torch.Tensor | None = None,
    g_exp: torch.Tensor | None = None,
) -> torch.Tensor:
    """``G g`` in float64, shape ``(..., m)``: the dot products of ``g`` with every row.

    With ``exps`` (the window's row exponents, see :func:`ring_write`) and ``g_exp`` (``g``
    stands for ``g · 2**g_exp``), the products are of the stored rows and returned in true
    units, ``(Ĝ ĝ)_i · 2**(exps_i + g_exp)`` (exact scaling, in float64).
    """
    g = g.to(grads.dtype)
    if grads.dim() == 2 and g.dim() == 1:  # one window: a GEMV streams the buffer once
        out = torch.mv(grads, g).to(torch.float64)
    else:
        out = torch.matmul(grads, g.unsqueeze(-1)).squeeze(-1).to(torch.float64)
    if exps is not None:
        e = exps if g_exp is None else exps + g_exp.unsqueeze(-1)
        out = out * pow2.pow2(e)
    return out


def set_gram_row(gram: torch.Tensor, slot: int, row: torch.Tensor) -> None:
    """In place: row and column ``slot`` of the symmetric Gram stack become ``row``."""
    gram[..., slot, :] = row
    gram[..., :, slot] = row


def solve_spd(a: torch.Tensor, rhs: torch.Tensor, shift: float) -> torch.Tensor:
    """Solve ``(a + shift I) x = rhs`` for a stack of symmetric positive semidefinite
    ``a`` (``(..., m, m)``) and ``rhs`` (``(..., m)``), with ``shift > 0``.

    Cholesky; a block whose factorization fails (rounding made ``a`` slightly indefinite)
    is solved through ``eigh`` with ``a``'s eigenvalues clamped at 0, with a warning.
    """
    m = a.shape[-1]
    mat = a + shift * torch.eye(m, dtype=a.dtype, device=a.device)
    chol, info = torch.linalg.cholesky_ex(mat)
    x = torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)
    bad = info != 0
    if bool(bad.any()):  # one host read of a small int tensor
        warnings.warn(
            "M-FAC: a Cholesky factorization of the damped window Gram matrix failed "
            "(rounding made it indefinite; consider a larger damp); solved it through an "
            "eigendecomposition instead",
            RuntimeWarning,
            stacklevel=3,
        )
        w, q = torch.linalg.eigh(a)
        w = w.clamp_min(0).add(shift)
        proj = (q.transpose(-1, -2) @ rhs.unsqueeze(-1)).squeeze(-1) / w
        alt = (q @ proj.unsqueeze(-1)).squeeze(-1)
        x = torch.where(bad.unsqueeze(-1), alt, x)
    return x


def coefficients(gram: torch.Tensor, rhs: torch.Tensor, damp: float, scale: float):
    """``(λ I + s K)⁻¹ rhs`` (float64): the row weights ``a`` with ``F⁻¹ Gᵀ rhs = Gᵀ a``."""
    return solve_spd(gram.mul(scale), rhs.to(torch.float64), damp)


def combine(
    grads: torch.Tensor, a: torch.Tensor, exps: torch.Tensor | None = None
) -> torch.Tensor:
    """``Gᵀ a`` in the window's dtype: ``(..., n)`` from ``(..., m, n)`` and ``(..., m)``.

    With ``exps`` (see :func:`ring_write`) the stored rows are scaled back through the
    coefficients: ``Ĝᵀ (a ⊙ 2**exps)`` (the scaling is exact in float64)."""
    if exps is not None:
        a = a.to(torch.float64) * pow2.pow2(exps)
    a = a.to(grads.dtype)
    if grads.dim() == 2 and a.dim() == 1:
        return torch.mv(grads.t(), a)
    return torch.matmul(a.unsqueeze(-2), grads).squeeze(-2)


def ihvp(
    grads: torch.Tensor,
    gram: torch.Tensor,
    x: torch.Tensor,
    damp: float,
    scale: float,
    exps: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F⁻¹ x`` for any ``x`` (``(..., n)``) by the Woodbury identity, in ``x``'s dtype
    promoted with the window's (``exps``: the window's row exponents, if it has them)."""
    x_exp = None
    xs = x.to(grads.dtype)
    if exps is not None:
        x_exp = pow2.row_exponents(xs, pow2.safe_exponent(grads.dtype, grads.shape[-1]))
        xs = pow2.mul_pow2(xs, -x_exp.unsqueeze(-1))
    gx = gram_row(grads, xs, exps, x_exp)
    c = solve_spd(gram, gx, damp / scale)
    dt = torch.promote_types(grads.dtype, x.dtype)
    return (x.to(dt) - combine(grads, c, exps).to(dt)) / damp
