"""SONew kernels: banded gradient statistics and the LogDet-optimal sparse preconditioner.

Pure tensor math (no optimizer state); the method is described in the docstring of
:class:`secondorder.SONew` and in ``docs/health.md``. Everything here works on one parameter
tensor flattened to a vector of length ``n``.

Storage convention (diagonal-major band storage)
------------------------------------------------
The symmetric band matrix ``H`` with half-bandwidth ``b`` is stored in ``(b + 1) · n``
numbers as an array ``h`` of shape ``(b + 1, n)`` with ``h[k, j] = H[j, j + k]``: row ``k`` is
the ``k``-th diagonal (``k = 0`` the main one), padded with zeros at its end
(``h[k, j] = 0`` for ``j + k >= n``). This is the ``n × (b + 1)`` band array stored
transposed, so that every diagonal is contiguous and all sweeps below are contiguous,
vectorised elementwise operations.

The preconditioner ``X = L · diag(D) · Lᵀ`` is returned as ``psi`` of shape ``(b, n)`` and
``D`` of shape ``(n,)``: ``L`` is unit lower triangular with ``L[j + k, j] = -psi[k - 1, j]``
(``k = 1..b``), so ``X`` has exactly the band pattern of ``H``.

Damping and the stability guard
-------------------------------
The factorisations take ``delta`` (added to the diagonal: the factorised matrix is
``H + delta·I`` on the band) and ``gamma``, the guard threshold: a neighbour set is
kept only while the Schur complement stays above ``gamma`` times the diagonal it came from,
otherwise its farthest edges are dropped (ultimately down to ``psi = 0, s_j = d_j``). This
keeps every ``D_j`` positive and finite and bounds the conditioning of ``X``.
``gamma=None`` disables the guard (the plain formula, for tests and diagnostics only).

Scale-aware statistics
----------------------
Squared gradients overflow the float32/bfloat16 range once ``|g| > ~1.8e19`` and underflow
below ``~1e-23``. The optimizer therefore stores the statistics of ``g / c`` instead of ``g``,
with a per-tensor power of two ``c = 2**e`` (:func:`scale_exponent`) chosen so that every
stored entry is at most 1 (:func:`advance_stats_scale` keeps an upper bound ``B`` of
``sqrt(max_j H_jj)``, and ``c`` is the next power of two above ``B``). When ``c`` changes, the
stored band is multiplied by ``(c_old / c_new)²`` together with the EMA decay
(:func:`update_band_stats_scaled`): powers of two are exact, so the scaled statistics carry
the same rounding as unscaled ones would, only without the overflow. Everything downstream
(damping, guard, ``X m``) is either scale invariant or rescaled by ``c`` explicitly.

Python loops in this module run over the band (``k = 1..b``), never over ``n``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

__all__ = [
    "Scratch",
    "apply_preconditioner",
    "band_inf_norm",
    "band_ldl",
    "band_to_dense",
    "diag_preconditioner",
    "guard_threshold",
    "ldl_to_dense",
    "StatsScale",
    "advance_stats_scale",
    "scale_exponent",
    "tridiag_ldl",
    "update_band_stats",
    "update_band_stats_scaled",
]

#: The statistics scale ``c = 2**e`` is kept within ``2**±SCALE_EXP_MAX``: ``c``, ``1 / c`` and
#: ``min(c, 1/c)**-1`` stay finite normal float32/bfloat16 numbers.
SCALE_EXP_MAX = 126


class Scratch:
    """Reusable flat scratch buffers, one per ``(slot, dtype, device)``, grown on demand.

    Fresh multi-megabyte tensors are page-faulted in on every step on CPU, which costs more
    than the arithmetic of an elementwise pass; the hot kernels therefore write into these
    buffers. Buffers are reused across parameters and steps, so a result taken from a
    slot is only valid until that slot is taken again. Not part of optimizer state.
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}
        # ready-made length-n views: taking one is a dict lookup (this is on the hot path)
        self._views: dict[tuple[str, torch.dtype, torch.device, int], torch.Tensor] = {}

    def take(self, slot: str, n: int, like: torch.Tensor, dtype: torch.dtype | None = None):
        key = (slot, dtype or like.dtype, like.device, n)
        view = self._views.get(key)
        if view is not None:
            return view
        bkey = key[:3]
        buf = self._bufs.get(bkey)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=key[1], device=like.device)
            self._bufs[bkey] = buf
            self._views = {k: v for k, v in self._views.items() if k[:3] != bkey}
        view = self._views[key] = buf[:n]
        return view

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


def _fresh(slot: str, n: int, like: torch.Tensor, dtype: torch.dtype | None = None):
    return torch.empty(n, dtype=dtype or like.dtype, device=like.device)


def _taker(scratch: Scratch | None):
    """``take(slot, n, like, dtype=None)``: a scratch view, or a fresh tensor without scratch."""
    return _fresh if scratch is None else scratch.take


@functools.cache
def guard_threshold(dtype: torch.dtype) -> float:
    """The default guard threshold ``gamma`` for factorising in ``dtype``: its machine epsilon.

    float32: 1.19e-7, bfloat16: 7.8e-3, float64: 2.2e-16. A relative Schur complement
    below this level is indistinguishable from rounding noise in that dtype.
    """
    return float(torch.finfo(dtype).eps)


def update_band_stats(h: torch.Tensor, g: torch.Tensor, beta2: float, weight: float) -> None:
    """In place: ``h[k, j] ← beta2 · h[k, j] + weight · g[j] · g[j + k]`` (band of ``g gᵀ``)."""
    n = g.shape[0]
    if beta2 != 1.0:
        h.mul_(beta2)
    h[0].addcmul_(g, g, value=weight)
    for k in range(1, min(h.shape[0], n)):
        h[k, : n - k].addcmul_(g[: n - k], g[k:], value=weight)


def scale_exponent(bound: torch.Tensor) -> torch.Tensor:
    """``e`` (float, same shape) with ``2**e`` the next power of two strictly above ``bound``.

    ``bound = 0`` gives ``e = 0``; ``e`` is clamped to ``[-SCALE_EXP_MAX, SCALE_EXP_MAX]``.
    Computed with ``frexp`` (exact, no rounding of a logarithm), on device.
    """
    _, e = torch.frexp(bound.float())
    return e.clamp_(-SCALE_EXP_MAX, SCALE_EXP_MAX).float()


class StatsScale(NamedTuple):
    """One step of the statistics scale (:func:`advance_stats_scale`); same shape as the
    bound it came from (0-d for one tensor, ``(P,)`` for ``P`` tensors at once)."""

    bound: torch.Tensor  #: new upper bound of sqrt(max_j H_jj)
    exponent: torch.Tensor  #: new ``e``: the statistics are stored as ``H / 4**e``
    decay: torch.Tensor  #: multiplier of the stored band: ``beta2 · 4**(e_old - e)``
    inv_scale: torch.Tensor  #: ``2**-e``, exact


def advance_stats_scale(
    bound: torch.Tensor,
    gmax: torch.Tensor,
    beta2: float | torch.Tensor,
    weight: float | torch.Tensor,
    floor: float | torch.Tensor = 0.0,
) -> StatsScale:
    """The scale of the statistics after one more EMA update, elementwise over any shape.

    ``H_jj ← beta2 · H_jj + weight · g_j²`` with ``|g_j| <= gmax`` and ``H_jj <= bound²``
    gives ``sqrt(H_jj) <= hypot(sqrt(beta2) · bound, sqrt(weight) · gmax)``; ``hypot`` never
    squares, so it neither overflows nor underflows. By Cauchy-Schwarz every off-diagonal
    entry of the band is bounded by the same number, so the stored entries stay ``<= 1``.
    The new bound is at least ``floor`` and at most ``2**SCALE_EXP_MAX``; the exponent shift
    in ``decay`` is capped at ``2 · SCALE_EXP_MAX / 2`` so that it is finite (reached only
    when the stored entries were below ``4**-SCALE_EXP_MAX / beta2`` anyway).
    """
    bound = bound.float()
    e_old = scale_exponent(bound)
    new = torch.hypot(bound * torch.as_tensor(beta2).sqrt(), gmax * torch.as_tensor(weight).sqrt())
    new = torch.maximum(new, torch.as_tensor(floor, dtype=new.dtype, device=new.device))
    new.clamp_(max=2.0**SCALE_EXP_MAX)
    e = scale_exponent(new)
    shift = torch.sub(e_old, e).mul_(2.0).clamp_(max=SCALE_EXP_MAX)
    decay = torch.exp2(shift).mul_(beta2)
    return StatsScale(new, e, decay, torch.exp2(-e))


def update_band_stats_scaled(
    h: torch.Tensor,
    g: torch.Tensor,
    decay: torch.Tensor,
    inv_scale: torch.Tensor,
    weight: float,
    scratch: Scratch | None = None,
) -> None:
    """In place: the band of ``H / c_old²`` in ``h`` becomes that of ``H' / c²``.

    ``H' = beta2 · H + weight · g gᵀ`` (on the band), with ``decay = beta2 · (c_old / c)²``
    and ``inv_scale = 1 / c`` from :func:`advance_stats_scale` (0-d tensors: no host sync).
    One pass multiplies ``h`` by ``decay``, one forms ``g / c``, then the products are
    accumulated as in :func:`update_band_stats`. Powers of two are exact: the stored values
    carry the same rounding as an unscaled accumulation would, without its overflow.
    """
    n = g.shape[0]
    h.mul_(decay)
    gs = torch.mul(g, inv_scale, out=_taker(scratch)("gs", n, h))
    update_band_stats(h, gs, 1.0, weight)


def band_inf_norm(
    h: torch.Tensor, scratch: Scratch | None = None, *, nonneg_diag: bool = False
) -> torch.Tensor:
    """Exact ∞-norm (max absolute row sum) of the symmetric band matrix stored in ``h``.

    Row ``j`` of ``H`` holds ``h[k, j]`` (``k = 0..b``) and the mirrored ``h[k, j - k]``.
    ``nonneg_diag=True`` promises ``h[0] >= 0`` (true for gradient statistics) and saves a
    pass. Returns a 0-d tensor (no host sync).
    """
    bp1, n = h.shape
    take = _taker(scratch)
    rows = take("rows", n, h)
    if nonneg_diag and bp1 == 2 and n > 1:  # tridiagonal fast path: 4 passes
        a = torch.abs(h[1], out=take("abs", n, h))  # a[n-1] = 0 (padding)
        torch.add(h[0], a, out=rows)
        rows[1:] += a[: n - 1]
        return rows.max()
    if nonneg_diag:
        rows.copy_(h[0])
    else:
        torch.abs(h[0], out=rows)
    for k in range(1, min(bp1, n)):
        a = torch.abs(h[k, : n - k], out=take("abs", n - k, h))
        rows[: n - k] += a
        rows[k:] += a
    return rows.max()


def diag_preconditioner(
    h: torch.Tensor, delta: torch.Tensor | float, scratch: Scratch | None = None
) -> torch.Tensor:
    """``band = 0``: the diagonal of ``X = diag(1 / (H_jj + delta))`` (no square root)."""
    out = _taker(scratch)("q", h.shape[1], h)
    return torch.add(h[0], delta, out=out).reciprocal_()


def tridiag_ldl(
    h: torch.Tensor,
    delta: torch.Tensor | float,
    gamma: float | None,
    scratch: Scratch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``band = 1`` closed form, purely elementwise (O(n)).

    With ``d = H_jj + delta`` and ``e_j = H[j, j + 1]``: ``psi_j = e_j / d_{j+1}``,
    ``s_j = d_j − e_j · psi_j`` (``s_{n-1} = d_{n-1}``), ``D_j = 1 / s_j``; where
    ``s_j <= gamma · d_j`` the edge ``(j, j + 1)`` is dropped (``psi_j = 0, s_j = d_j``).
    Returns ``psi`` ``(1, n)`` and ``D`` ``(n,)``.
    """
    n = h.shape[1]
    take = _taker(scratch)
    d = torch.add(h[0], delta, out=take("d", n, h))
    p = take("psi", n, h)
    torch.div(h[1, : n - 1], d[1:], out=p[: n - 1])
    p[n - 1 :].zero_()
    s = torch.addcmul(d, p, h[1], value=-1.0, out=take("q", n, h))
    if gamma is not None:
        # keep the edge iff s_j > gamma · d_j; otherwise psi_j = 0 and s_j = d_j
        thr = torch.mul(d, gamma, out=take("thr", n, h))
        drop = torch.le(s, thr, out=take("mask", n, h, torch.bool))
        torch.where(drop, d, s, out=s)
        p.masked_fill_(drop, 0.0)
    return p.view(1, n), s.reciprocal_()


def band_ldl(
    h: torch.Tensor,
    delta: torch.Tensor | float,
    gamma: float | None,
    scratch: Scratch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """General banded closed form: batched ``b×b`` solves over all columns at once.

    For column ``j`` with later neighbours ``I_j = {j+1 … j+b}``, ``A_j = H[I_j, I_j]`` and
    ``c_j = H[I_j, j]``: ``psi_j = A_j⁻¹ c_j``, ``s_j = d_j − c_jᵀ psi_j``, ``D_j = 1/s_j``.

    The solve is an unrolled Cholesky ``A_j = R Rᵀ`` vectorised over ``j`` (the loops run
    over the band only); columns near the end are padded with identity rows. With
    ``r = R⁻¹ c``, the Schur complement of the first ``k`` neighbours is
    ``d_j − Σ_{i<k} r_i²``, non-increasing in ``k``. The guard keeps the longest prefix of
    neighbours whose Cholesky pivots and Schur complement stay above ``gamma`` times their
    diagonal and drops the farther edges (``psi = R⁻ᵀ r`` with the dropped ``r_i`` zeroed).
    Returns ``psi`` ``(b, n)`` and ``D`` ``(n,)``. With ``scratch`` every intermediate
    lives in a reusable buffer (about ``b²/2 + 4b + 8`` vectors of length ``n``).
    """
    bp1, n = h.shape
    b = bp1 - 1
    if b == 0:
        return h.new_zeros((0, n)), diag_preconditioner(h, delta, scratch)

    take = _taker(scratch)

    def vec(slot: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return take(slot, n, h, dtype)

    # Columns n .. n+b of hp are identity padding.
    width = n + b + 1
    hp = take("hp", bp1 * width, h).view(bp1, width)
    hp[:, :n].copy_(h)
    hp[:, n:].zero_()
    hp[0, n:] = 1.0
    hp[0, :n] += delta
    d = hp[0, :n]
    thr_d = torch.mul(d, gamma, out=vec("thr_d")) if gamma is not None else None

    def a_entry(p: int, q: int) -> torch.Tensor:  # A_j[p, q] = H[j+1+p, j+1+q], for all j
        lo = 1 + min(p, q)
        return hp[abs(p - q), lo : lo + n]

    # Unrolled Cholesky of every A_j (lower factor R), vectorised over j.
    R: list[list[torch.Tensor]] = [[] for _ in range(b)]
    pivot_bad: list[torch.Tensor] = []  # prefix i+1 of A_j is not numerically PD
    for i in range(b):
        diag = a_entry(i, i)
        piv = vec(f"R{i}{i}").copy_(diag)
        for k in range(i):
            piv.addcmul_(R[i][k], R[i][k], value=-1.0)
        if gamma is not None:
            thr = torch.mul(diag, gamma, out=vec("thr"))
            bad = torch.le(piv, thr, out=vec(f"bad{i}", torch.bool))
            if pivot_bad:
                bad.logical_or_(pivot_bad[-1])
            pivot_bad.append(bad)
            torch.where(bad, diag, piv, out=piv)  # any positive value: masked out below
        rii = piv.sqrt_()
        for r in range(i + 1, b):
            v = vec(f"R{r}{i}").copy_(a_entry(r, i))
            for k in range(i):
                v.addcmul_(R[r][k], R[i][k], value=-1.0)
            R[r].append(v.div_(rii))
        R[i].append(rii)
    # Forward substitution r = R⁻¹ c with the Schur complement of each prefix.
    rr: list[torch.Tensor] = []
    s = vec("s").copy_(d)
    drop = None  # edges i and farther of column j are dropped
    for i in range(b):
        v = vec(f"r{i}").copy_(h[i + 1])  # c_j[i] = H[j + 1 + i, j]
        for k in range(i):
            v.addcmul_(R[i][k], rr[k], value=-1.0)
        v.div_(R[i][i])
        s_next = torch.addcmul(s, v, v, value=-1.0, out=vec("s_next"))
        if gamma is not None:
            low = torch.le(s_next, thr_d, out=vec("low", torch.bool))
            if drop is None:
                drop = torch.logical_or(pivot_bad[i], low, out=vec("drop", torch.bool))
            else:
                drop.logical_or_(pivot_bad[i]).logical_or_(low)
            v.masked_fill_(drop, 0.0)
            torch.where(drop, s, s_next, out=s)
        else:
            s.copy_(s_next)
        rr.append(v)
    # Back substitution psi = R⁻ᵀ r.
    psi = take("psi", b * n, h).view(b, n)
    for i in reversed(range(b)):
        v = psi[i]
        v.copy_(rr[i])
        for k in range(i + 1, b):
            v.addcmul_(R[k][i], psi[k], value=-1.0)
        v.div_(R[i][i])
    return psi, s.reciprocal_()


def apply_preconditioner(
    psi: torch.Tensor, D: torch.Tensor, m: torch.Tensor, scratch: Scratch | None = None
) -> torch.Tensor:
    """``u = X m = L · diag(D) · Lᵀ m`` in three O(n·b) sweeps.

    ``w = Lᵀ m`` (``w_j = m_j − Σ_k psi[k-1, j] m_{j+k}``), ``w ← D w``,
    ``u = L w`` (``u_i = w_i − Σ_k psi[k-1, i-k] w_{i-k}``).
    """
    b, n = psi.shape
    take = _taker(scratch)
    if b == 0:
        return torch.mul(D, m, out=take("u", n, m))
    if b == 1:  # three passes
        p = psi[0, : n - 1]
        w = take("rows", n, m)
        torch.addcmul(m[: n - 1], p, m[1:], value=-1.0, out=w[: n - 1])
        w[n - 1 :].copy_(m[n - 1 :])
        w.mul_(D)
        u = take("u", n, m)
        u[:1].copy_(w[:1])
        torch.addcmul(w[1:], p, w[: n - 1], value=-1.0, out=u[1:])
        return u
    w = take("rows", n, m).copy_(m)
    for k in range(1, min(b + 1, n)):
        w[: n - k].addcmul_(psi[k - 1, : n - k], m[k:], value=-1.0)
    w.mul_(D)
    u = take("u", n, m).copy_(w)
    for k in range(1, min(b + 1, n)):
        u[k:].addcmul_(psi[k - 1, : n - k], w[: n - k], value=-1.0)
    return u


# ----------------------------------------------------------------------- dense, tests only
def band_to_dense(h: torch.Tensor, delta: float = 0.0) -> torch.Tensor:
    """Dense symmetric ``H + delta·I`` from the band storage (tests and debugging only)."""
    bp1, n = h.shape
    out = torch.diag(h[0] + delta)
    for k in range(1, min(bp1, n)):
        off = torch.diag(h[k, : n - k], diagonal=k)
        out = out + off + off.T
    return out


def ldl_to_dense(psi: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Dense ``X = L diag(D) Lᵀ`` from ``(psi, D)`` (tests and debugging only)."""
    b, n = psi.shape
    L = torch.eye(n, dtype=psi.dtype, device=psi.device)
    for k in range(1, min(b + 1, n)):
        L = L - torch.diag(psi[k - 1, : n - k], diagonal=-k)
    return L @ torch.diag(D) @ L.T
