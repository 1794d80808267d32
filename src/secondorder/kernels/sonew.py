"""SONew kernels: banded gradient statistics and the LogDet-optimal sparse preconditioner.

Pure tensor math (no optimizer state); see ``ALGORITHMS.md`` §2. Everything here works on
one parameter tensor flattened to a vector of length ``n``.

Storage convention
------------------
The symmetric band matrix ``H`` with half-bandwidth ``b`` is stored as an ``(n, b + 1)``
array ``h`` with ``h[j, k] = H[j, j + k]`` (``k = 0`` is the diagonal). Entries that would
fall past the end (``j + k >= n``) are kept at zero.

The preconditioner ``X = L · diag(D) · Lᵀ`` is returned as ``psi`` of shape ``(n, b)`` and
``D`` of shape ``(n,)``: ``L`` is unit lower triangular with ``L[j + k, j] = -psi[j, k - 1]``
(``k = 1..b``), so ``X`` has exactly the band pattern of ``H``.

Damping and the stability guard
-------------------------------
All factorisations take ``delta`` (added to the diagonal: the factorised matrix is
``H + delta·I`` on the band) and ``gamma``, the guard threshold (§2.3): a neighbour set is
kept only while the Schur complement stays above ``gamma`` times the diagonal it came from,
otherwise its farthest edges are dropped (ultimately down to ``psi = 0, s_j = d_j``). This
keeps every ``D_j`` positive and bounds the conditioning of ``X``. ``gamma=None`` disables
the guard (the plain formula, for tests and diagnostics only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "apply_preconditioner",
    "band_inf_norm",
    "band_ldl",
    "band_to_dense",
    "band_windows",
    "diag_preconditioner",
    "guard_threshold",
    "ldl_to_dense",
    "tridiag_ldl",
    "update_band_stats",
]


def guard_threshold(dtype: torch.dtype) -> float:
    """The default guard threshold ``gamma`` for factorising in ``dtype``: its machine epsilon.

    float32: 1.19e-7, bfloat16: 7.8e-3, float64: 2.2e-16. A relative Schur complement
    below this level is indistinguishable from rounding noise in that dtype.
    """
    return float(torch.finfo(dtype).eps)


def band_windows(x: torch.Tensor, band: int) -> torch.Tensor:
    """``(n, band + 1)`` read-only view ``W[j, k] = x[j + k]`` (zero past the end)."""
    n = x.shape[0]
    xp = F.pad(x, (0, band)) if band > 0 else x.contiguous()
    return xp.as_strided((n, band + 1), (1, 1))


def update_band_stats(h: torch.Tensor, g: torch.Tensor, beta2: float, weight: float) -> None:
    """In place: ``h[j, k] ← beta2 · h[j, k] + weight · g[j] · g[j + k]`` (band of ``g gᵀ``)."""
    band = h.shape[1] - 1
    if band == 0:
        h = h[:, 0]
        if beta2 != 1.0:
            h.mul_(beta2)
        h.addcmul_(g, g, value=weight)
        return
    w = band_windows(g, band)
    if beta2 != 1.0:
        h.mul_(beta2)
    h.addcmul_(g.unsqueeze(1), w, value=weight)


def band_inf_norm(h: torch.Tensor) -> torch.Tensor:
    """Exact ∞-norm (max absolute row sum) of the symmetric band matrix stored in ``h``.

    Row ``j`` holds the stored entries ``h[j, 0..b]`` and the mirrored ones
    ``h[j - k, k]`` (``k = 1..b``). Returns a 0-d tensor (no host sync).
    """
    n, bp1 = h.shape
    a = h.abs()
    rows = a.sum(dim=1)
    for k in range(1, bp1):
        if k < n:
            rows[k:] += a[: n - k, k]
    return rows.max()


def diag_preconditioner(h: torch.Tensor, delta: torch.Tensor | float) -> torch.Tensor:
    """``band = 0``: the diagonal of ``X = diag(1 / (H_jj + delta))`` (no square root)."""
    return (h[:, 0] + delta).reciprocal_()


def tridiag_ldl(
    h: torch.Tensor, delta: torch.Tensor | float, gamma: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``band = 1`` closed form, purely elementwise (O(n)).

    With ``d = H_jj + delta`` and ``e_j = H[j, j + 1]``: ``psi_j = e_j / d_{j+1}``,
    ``s_j = d_j − e_j · psi_j`` (``s_{n-1} = d_{n-1}``), ``D_j = 1 / s_j``; where
    ``s_j <= gamma · d_j`` the edge ``(j, j + 1)`` is dropped (``psi_j = 0, s_j = d_j``).
    Returns ``psi`` ``(n, 1)`` and ``D`` ``(n,)``.
    """
    n = h.shape[0]
    d = h[:, 0] + delta
    psi = torch.zeros_like(d)
    if n > 1:
        torch.div(h[:-1, 1], d[1:], out=psi[:-1])
    s = torch.addcmul(d, psi, h[:, 1], value=-1.0)
    if gamma is not None:
        ok = s > d * gamma
        psi.mul_(ok)
        s = torch.where(ok, s, d)
    return psi.unsqueeze(1), s.reciprocal_()


def band_ldl(
    h: torch.Tensor, delta: torch.Tensor | float, gamma: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """General banded closed form: batched ``b×b`` solves over all columns at once.

    For column ``j`` with later neighbours ``I_j = {j+1 … j+b}``, ``A_j = H[I_j, I_j]`` and
    ``c_j = H[I_j, j]``: ``psi_j = A_j⁻¹ c_j``, ``s_j = d_j − c_jᵀ psi_j``, ``D_j = 1/s_j``.

    The solve is an unrolled Cholesky ``A_j = R Rᵀ`` vectorised over ``j`` (Python loops run
    over the band only, never over ``n``); columns near the end are padded with identity
    rows. With ``r = R⁻¹ c``, the Schur complement of the first ``k`` neighbours is
    ``d_j − Σ_{i<k} r_i²``, non-increasing in ``k``. The guard keeps the longest prefix of
    neighbours whose Cholesky pivots and Schur complement stay above ``gamma`` times their
    diagonal and drops the farther edges (``psi = R⁻ᵀ r`` with the dropped ``r_i`` zeroed).
    Returns ``psi`` ``(n, b)`` and ``D`` ``(n,)``.
    """
    n, bp1 = h.shape
    b = bp1 - 1
    if b == 0:
        return h.new_zeros((n, 0)), diag_preconditioner(h, delta)
    # hp[i] for i in [n, n + b) are identity padding rows.
    hp = F.pad(h, (0, 0, 0, b + 1))
    hp[n:, 0] = 1.0
    hp[:n, 0] += delta
    d = hp[:n, 0]

    def a_entry(p: int, q: int) -> torch.Tensor:  # A_j[p, q] for all j, p >= q
        return hp[1 + q : 1 + q + n, p - q]

    c = [h[:, p + 1] for p in range(b)]  # c_j[p] = H[j + 1 + p, j]
    # Unrolled Cholesky of A_j (lower R), vectorised over j.
    R: list[list[torch.Tensor | None]] = [[None] * b for _ in range(b)]
    ok_prefix = None
    pivots_ok = []
    for i in range(b):
        diag = a_entry(i, i)
        piv = diag.clone()
        for k in range(i):
            piv.addcmul_(R[i][k], R[i][k], value=-1.0)
        if gamma is not None:
            ok = piv > diag * gamma
            ok_prefix = ok if ok_prefix is None else ok_prefix & ok
            pivots_ok.append(ok_prefix)
            piv = torch.where(ok_prefix, piv, diag.abs() + 1.0)
        rii = piv.sqrt()
        R[i][i] = rii
        for r in range(i + 1, b):
            v = a_entry(r, i).clone()
            for k in range(i):
                v.addcmul_(R[r][k], R[i][k], value=-1.0)
            R[r][i] = v.div_(rii)
    # Forward substitution r = R⁻¹ c, with the Schur complement of each prefix.
    rr: list[torch.Tensor] = []
    s = d.clone()
    keep_prefix = None
    for i in range(b):
        v = c[i].clone()
        for k in range(i):
            v.addcmul_(R[i][k], rr[k], value=-1.0)
        v.div_(R[i][i])
        s_next = torch.addcmul(s, v, v, value=-1.0)
        if gamma is not None:
            keep = pivots_ok[i] & (s_next > d * gamma)
            keep_prefix = keep if keep_prefix is None else keep_prefix & keep
            v = v * keep_prefix
            s = torch.where(keep_prefix, s_next, s)
        else:
            s = s_next
        rr.append(v)
    # Back substitution psi = R⁻ᵀ r.
    psi = h.new_empty((n, b))
    for i in reversed(range(b)):
        v = rr[i].clone()
        for k in range(i + 1, b):
            v.addcmul_(R[k][i], psi[:, k], value=-1.0)
        psi[:, i] = v.div_(R[i][i])
    return psi, s.reciprocal_()


def apply_preconditioner(psi: torch.Tensor, D: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``u = X m = L · diag(D) · Lᵀ m`` in three O(n·b) sweeps (a new tensor).

    ``w = Lᵀ m`` (``w_j = m_j − Σ_k psi[j, k-1] m_{j+k}``), ``w ← D w``,
    ``u = L w`` (``u_i = w_i − Σ_k psi[i-k, k-1] w_{i-k}``).
    """
    n, b = psi.shape
    if b == 0:
        return D * m
    if b == 1:
        p = psi[:-1, 0]
        w = m.clone()
        w[:-1].addcmul_(p, m[1:], value=-1.0)
        w.mul_(D)
        w[1:].addcmul_(p, w[:-1].clone(), value=-1.0)
        return w
    mw = band_windows(m, b)[:, 1:]
    w = m - (psi * mw).sum(dim=1)
    w.mul_(D)
    # Pad b zero rows in front; row i of the strided view lists P[i-k, k-1] for k = b..1.
    pw = F.pad(psi * w.unsqueeze(1), (0, 0, b, 0))
    shifted = pw.as_strided((n, b), (b, b - 1), b - 1)
    return w - shifted.sum(dim=1)


# ----------------------------------------------------------------------- dense, tests only
def band_to_dense(h: torch.Tensor, delta: float = 0.0) -> torch.Tensor:
    """Dense symmetric ``H + delta·I`` from the band storage (tests and debugging only)."""
    n, bp1 = h.shape
    out = torch.diag(h[:, 0] + delta)
    for k in range(1, bp1):
        if k < n:
            off = torch.diag(h[: n - k, k], diagonal=k)
            out = out + off + off.T
    return out


def ldl_to_dense(psi: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Dense ``X = L diag(D) Lᵀ`` from ``(psi, D)`` (tests and debugging only)."""
    n, b = psi.shape
    L = torch.eye(n, dtype=psi.dtype, device=psi.device)
    for k in range(1, b + 1):
        if k < n:
            L = L - torch.diag(psi[: n - k, k - 1], diagonal=-k)
    return L @ torch.diag(D) @ L.T
