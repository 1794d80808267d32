"""Inverse p-th roots of symmetric positive (semi-)definite matrices, batched.

Shampoo needs ``(S + eps_eff * I)^(-1/p)`` for every factor ``S`` of every block. Factors of
the same size are stacked into one ``(B, n, n)`` batch and solved together, so every
function here takes a batch (a single ``(n, n)`` matrix is accepted too and gives unbatched
results).

* :func:`power_iteration` -- largest eigenvalue of each matrix (for the relative ridge).
* :func:`inverse_root_newton` -- coupled Newton iteration (matmuls only;
  docs/algorithms.md#inverse-roots-coupled-newton-iteration).
* :func:`inverse_root_eigh` -- eigendecomposition (exact, robust, slower on accelerators).
* :func:`inverse_root` -- the pipeline the optimizer calls: ridge (relative to
  ``lambda_max`` or absolute), solve, accept or reject each matrix, optionally retry the
  rejected ones with a larger ridge.
* :func:`absolute_ridge_units` -- rewrite an absolute ridge on statistics kept as
  ``scale^2 * S_hat`` so that the solve sees bounded numbers only.

Precision: work is done in float32, or float64 when the input is float64. Half-precision
inputs (bf16/fp16) are upcast to float32 and the results stay float32.

Reproducibility: a matrix's root does not depend on the other matrices of its batch, which
lets a distributed run, whose ranks solve subsets of the blocks, match a single process bit
for bit (docs/algorithms.md#reproducibility). The scalar powers ``x^(-1/p)`` go through
:func:`inverse_pth_root_scalar`, built from correctly rounded operations only (``torch.pow``
on the CPU rounds an element differently in the vectorized part of the loop and in its
scalar tail, i.e. depending on its position and the thread count); on the CPU, eigh sees
matrices bordered to a multiple of 4 (LAPACK's result depended on a matrix's alignment in
the batch); power iteration keeps one-matrix batches on the matrix-matrix product path.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "METHODS",
    "RIDGES",
    "absolute_ridge_units",
    "RootResult",
    "inverse_root",
    "inverse_root_eigh",
    "inverse_pth_root_scalar",
    "inverse_root_newton",
    "power_iteration",
    "root_workspace_bytes",
]

#: accepted values of ``inverse_root(method=...)``
METHODS = ("newton", "eigh")

#: accepted values of ``inverse_root(ridge=...)``: ``eps * lambda_max(A)`` or ``eps``
RIDGES = ("relative", "absolute")

#: smallest ridge ever added (keeps all-zero statistics invertible in fp32 without overflow)
_RIDGE_FLOOR = 1e-30


class RootResult(NamedTuple):
    """Result of :func:`inverse_root` for a ``(B, n, n)`` batch.

    Attributes:
        root: ``(B, n, n)`` approximation of ``(A + eps_eff I)^(-1/p)``.
        error: ``(B,)`` error estimate of each root (method specific, see the solvers).
        lambda_max: ``(B,)`` largest eigenvalue of each raw matrix ``A`` (power iteration).
        ok: ``(B,)`` bool; ``True`` where the root is finite and ``error < failure_threshold``.
            Where it is ``False`` the caller should keep its previous root.
    """

    root: Tensor
    error: Tensor
    lambda_max: Tensor
    ok: Tensor


def inverse_pth_root_scalar(x: Tensor, p: int) -> Tensor:
    """Elementwise ``x^(-1/p)``, bitwise reproducible: independent of layout and threads.

    ``torch.pow`` is accurate but not reproducible per element on the CPU (the vectorized
    loop and its scalar tail use different approximations, so an element's result depends
    on its position and on how the tensor is split across threads). Here only exactly
    rounded operations (``+ - * /``, exponent arithmetic) are used, in float64:
    ``x = m 2^e`` with ``m`` in ``[0.5, 1)``; ``e = p q + r`` with ``0 <= r < p``; then
    ``x^(-1/p) = m^(-1/p) 2^(-r/p) 2^(-q)``, where ``m^(-1/p)`` in ``(1, 2^(1/p)]`` comes
    from six Newton steps ``y <- y ((p + 1) - m y^p) / p`` (from ``y = 1 + (1/m - 1)/p``,
    which converge to float64 accuracy), ``2^(-r/p)`` from a table of ``p`` constants and
    ``2^(-q)`` is exact. Accuracy: a few float64 ulps, i.e. correctly rounded in float32
    but for rare ties.

    Args:
        x: any float tensor; ``x = 0`` gives ``inf``, ``x < 0`` and NaN give NaN,
            ``x = inf`` gives 0.
        p: an integer ``>= 1``.

    Returns:
        ``x^(-1/p)`` in ``x``'s dtype (float32 for half-precision ``x``).
    """
    p = _check_p(p)
    out_dtype = _compute_dtype(x.dtype)
    x64 = x.to(torch.float64)
    m, e = torch.frexp(x64)
    e = e.to(torch.int64)
    q = torch.div(e, p, rounding_mode="floor")
    r = e - q * p
    table = torch.tensor([2.0 ** (-k / p) for k in range(p)], dtype=torch.float64)
    y = 1.0 + (1.0 / m - 1.0) / p
    for _ in range(6):
        yp = y
        for _ in range(p - 1):
            yp = yp * y
        y = y * ((p + 1) - m * yp) / p
    y = y * table.to(x64.device)[r]
    # 2^(-q) in two exact factors (|q| <= 1074 for float64 subnormals: each half fits)
    q1 = torch.div(q, 2, rounding_mode="floor")
    for k in (q1, q - q1):
        y = y * ((1023 - k) << 52).view(torch.float64)
    y = torch.where(x64 == 0, torch.full_like(y, float("inf")), y)
    y = torch.where(x64 == float("inf"), torch.zeros_like(y), y)
    y = torch.where(x64 < 0, torch.full_like(y, float("nan")), y)
    return y.to(out_dtype)


#: peak number of live ``(n, n)`` work matrices per input matrix in :func:`inverse_root`
#: (eigh: input copy, eigenvectors, LAPACK's copy, scaled vectors, root; Newton: M, H, T,
#: T^p, M_new, H_new, identity, ridge-added input), besides the input itself
_WORKSPACE_MATRICES = {"eigh": 5, "newton": 8}


def root_workspace_bytes(
    n: int, method: str, batch: int = 1, dtype: torch.dtype = torch.float32
) -> int:
    """Estimated peak workspace of :func:`inverse_root` on ``batch`` matrices of size ``n``.

    A bound used to cut large refreshes into chunks; it counts the ``(n, n)`` temporaries
    the pipeline keeps alive at once (plus the input), not LAPACK's O(n) vectors.
    """
    size = torch.empty((), dtype=dtype).element_size()
    return (_WORKSPACE_MATRICES[method] + 1) * batch * n * n * size


def _check_p(p: object) -> int:
    """``p`` must be an integer (any integral type except bool) ``>= 1``."""
    if isinstance(p, bool) or not isinstance(p, numbers.Integral) or p < 1:
        raise ValueError(f"p must be an integer >= 1, got {p!r}")
    return int(p)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp32, bf16, fp16, ints) is solved in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_batch(A: Tensor, name: str = "A") -> tuple[Tensor, bool]:
    """Return ``A`` as a ``(B, n, n)`` tensor in the compute dtype, and whether it was 2-d."""
    if A.dim() not in (2, 3) or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"{name} must have shape (n, n) or (B, n, n), got {tuple(A.shape)}")
    unbatched = A.dim() == 2
    if unbatched:
        A = A.unsqueeze(0)
    return A.to(_compute_dtype(A.dtype)), unbatched


def _eye_like(A: Tensor) -> Tensor:
    return torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A)


def _fro_norm(A: Tensor) -> Tensor:
    """Frobenius norm of each matrix, scaled first so that tiny entries do not underflow."""
    scale = A.abs().amax(dim=(-2, -1)).clamp_min(torch.finfo(A.dtype).tiny)
    return scale * torch.linalg.matrix_norm(A / scale[:, None, None], ord="fro")


def _start_vector(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Deterministic unit start vector: uniform plus a small non-uniform perturbation.

    The uniform part overlaps the top eigenvector of any matrix with positive entries (e.g.
    Gram matrices of mostly same-signed data); the perturbation breaks the symmetry for
    matrices whose top eigenvector is orthogonal to the all-ones vector.
    """
    i = torch.arange(n, dtype=dtype, device=device)
    v = 1.0 + 0.1 * torch.sin(1.0 + 2.7 * i)
    return v / torch.linalg.vector_norm(v)


def _matvec(A: Tensor, v: Tensor) -> Tensor:
    """``A @ v`` for ``(B, n, n)`` and ``(B, n, 1)``: the same bits for a matrix whatever ``B``.

    torch hands a batched matrix-vector product of a single matrix to another BLAS routine
    (a matrix-vector one) than a batch of several, and the two round differently. Two equal
    columns keep every batch on the matrix-matrix path at about the same cost (``A`` is read
    once either way).
    """
    return torch.bmm(A, torch.cat([v, v], dim=-1))[..., :1]


def power_iteration(A: Tensor, max_iters: int = 100, tol: float = 1e-6) -> Tensor:
    """Largest eigenvalue of each symmetric PSD matrix in ``A`` by power iteration.

    Args:
        A: ``(B, n, n)`` batch (or one ``(n, n)`` matrix).
        max_iters: maximum number of multiplications by ``A``.
        tol: a matrix is converged when its Rayleigh quotient changes by at most
            ``tol * |lambda|`` in one iteration. Convergence is checked every 10 iterations
            (one host sync each); converged matrices are frozen, so the result for a matrix
            does not depend on the other matrices of the batch.

    Returns:
        ``(B,)`` estimates of ``lambda_max`` (a 0-d tensor for 2-d input), in the compute
        dtype. All-zero matrices give 0; non-finite matrices give NaN.
    """
    A, unbatched = _as_batch(A)
    B, n, _ = A.shape
    v = _start_vector(n, A.dtype, A.device).expand(B, n).unsqueeze(-1).contiguous()
    lam = torch.zeros(B, dtype=A.dtype, device=A.device)
    done = torch.zeros(B, dtype=torch.bool, device=A.device)
    for it in range(max_iters):
        w = _matvec(A, v)
        lam_new = (v * w).sum(dim=(-2, -1))  # Rayleigh quotient, v has unit norm
        norm = torch.linalg.vector_norm(w, dim=(-2, -1), keepdim=True)
        v_new = torch.where(norm > 0, w / norm.clamp_min(torch.finfo(A.dtype).tiny), v)
        converged = (lam_new - lam).abs() <= tol * lam_new.abs()
        lam = torch.where(done, lam, lam_new)
        v = torch.where(done[:, None, None], v, v_new)
        if (it + 1) % 10 == 0:
            done = done | converged | ~torch.isfinite(lam_new)
            if bool(done.all()):
                break
    # The final Rayleigh quotient of the current vector (w was computed from the old one).
    lam = torch.where(done, lam, (v * _matvec(A, v)).sum(dim=(-2, -1)))
    return lam[0] if unbatched else lam


def inverse_root_newton(
    A: Tensor, p: int, *, max_iters: int = 100, tol: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """``A^(-1/p)`` for a batch of SPD matrices by the coupled Newton iteration.

    The iteration (docs/algorithms.md#inverse-roots-coupled-newton-iteration) keeps the pair
    ``(H, M)`` with ``M = H^p A``, starting from ``M = z A``, ``H = z^(1/p) I`` with
    ``z = (1 + p) / (2 ||A||_F)``, and repeats ``T = ((p + 1) I - M) / p``, ``M <- T^p M``,
    ``H <- H T`` until ``M`` is the identity.

    Every matrix of the batch runs its own iteration: it stops when its error
    ``e = max|M - I|`` drops to ``tol``, or when ``e`` grows above ``1.2`` times the
    previous error (then the previous, better ``H`` is kept). Stopped matrices are no
    longer computed on; the loop ends when all have stopped or after ``max_iters``
    iterations. One host sync per iteration (cheap next to its ``~log2(p) + 2`` matmuls).

    Args:
        A: ``(B, n, n)`` SPD batch (or one ``(n, n)`` matrix), ridge already added.
        p: root order, an integer ``>= 1``.
        max_iters: maximum number of Newton iterations.
        tol: target for ``max|M - I|``.

    Returns:
        ``(H, err)``: ``H`` of shape ``(B, n, n)`` in the compute dtype (fp32, or fp64 for
        fp64 input) and ``err`` of shape ``(B,)``, the final ``max|M - I|`` of the returned
        ``H`` (NaN/Inf when the input or the iteration blew up).
    """
    p = _check_p(p)
    A, unbatched = _as_batch(A)
    B = A.shape[0]
    eye = _eye_like(A)
    norm = _fro_norm(A).clamp_min(torch.finfo(A.dtype).tiny)
    z = (1.0 + p) / (2.0 * norm)
    M = z[:, None, None] * A
    H = (1.0 / inverse_pth_root_scalar(z, p))[:, None, None] * eye
    err = (M - eye).abs().amax(dim=(-2, -1))
    active = err > tol  # NaN compares False: a non-finite start is returned as is
    idx = torch.arange(B, device=A.device)
    for _ in range(max_iters):
        if not bool(active.any()):
            break
        if not bool(active.all()):
            idx_a = idx[active]
            M_a, H_a, err_a = M[idx_a], H[idx_a], err[idx_a]
        else:
            idx_a, M_a, H_a, err_a = None, M, H, err
        eye_a = eye[: M_a.shape[0]]
        T = ((p + 1) * eye_a - M_a) / p
        M_new = torch.linalg.matrix_power(T, p) @ M_a if p > 1 else T @ M_a
        H_new = H_a @ T
        err_new = (M_new - eye_a).abs().amax(dim=(-2, -1))
        accept = err_new <= 1.2 * err_a  # False for NaN: keep the previous (good) H
        M_a = torch.where(accept[:, None, None], M_new, M_a)
        H_a = torch.where(accept[:, None, None], H_new, H_a)
        err_a = torch.where(accept, err_new, err_a)
        still = accept & (err_new > tol)
        if idx_a is None:
            M, H, err, active = M_a, H_a, err_a, still
        else:
            M = M.index_copy(0, idx_a, M_a)
            H = H.index_copy(0, idx_a, H_a)
            err = err.index_copy(0, idx_a, err_a)
            active = active.index_copy(0, idx_a, still)
    if unbatched:
        return H[0], err[0]
    return H, err


def _eigh_fp64(A: Tensor) -> tuple[Tensor, Tensor]:
    """fp64 eigh of a batch; matrix by matrix if the batch call raises (failures -> NaN)."""
    A64 = A.to(torch.float64)
    try:
        return torch.linalg.eigh(A64)
    except RuntimeError:
        pass
    Ls, Qs = [], []
    for a in A64:
        try:
            l_i, q_i = torch.linalg.eigh(a)
        except RuntimeError:
            l_i = torch.full_like(a[0], float("nan"))
            q_i = torch.full_like(a, float("nan"))
        Ls.append(l_i)
        Qs.append(q_i)
    return torch.stack(Ls), torch.stack(Qs)


def _pad_to_aligned(A: Tensor, pad: int) -> Tensor:
    """``A`` bordered to size ``n + pad`` with a diagonal block above its spectrum.

    The border ``diag(2 c, 3 c, ...)``, ``c = max(||A||_inf, tiny)`` (``||A||_inf >=
    lambda_max``), has eigenvalues above all of ``A``'s and no coupling to it: the
    eigendecomposition of the bordered matrix is ``A``'s (first ``n`` eigenpairs, in
    ascending order) plus the border's.
    """
    B, n, _ = A.shape
    c = A.abs().sum(dim=-1).amax(dim=-1).clamp_min(torch.finfo(A.dtype).tiny)
    out = A.new_zeros(B, n + pad, n + pad)
    out[:, :n, :n] = A
    scale = torch.arange(2, pad + 2, dtype=A.dtype, device=A.device)
    out[:, n:, n:] = torch.diag_embed(c[:, None] * scale)
    return out


def _eigh(A: Tensor) -> tuple[Tensor, Tensor]:
    """Batched eigh in ``A``'s dtype; matrices where it fails are redone in fp64.

    "Fails" means the batched call raises (then every matrix is redone) or returns
    non-finite values for a matrix (then only that matrix is redone; one host sync).
    Matrices whose decomposition fails even in fp64 get NaN eigenvalues and vectors.
    Results are returned in ``A``'s dtype.

    On the CPU, LAPACK's result for a matrix can depend on the memory alignment of the matrix
    within the batch (seen with MKL for 5x5 float32 matrices, whose position in the batch
    sets their alignment), i.e. on which other matrices share the batch. Matrices whose size
    is not a multiple of 4 are therefore bordered to the next multiple (see
    :func:`_pad_to_aligned`): every matrix then starts on a 64-byte boundary wherever it sits
    in the batch, and its decomposition is the same bits in any batch.
    """
    n = A.shape[-1]
    pad = (-n) % 4 if A.device.type == "cpu" else 0
    if pad:
        L, Q = _eigh_unpadded(_pad_to_aligned(A, pad))
        return L[..., :n], Q[..., :n, :n]
    return _eigh_unpadded(A)


def _eigh_unpadded(A: Tensor) -> tuple[Tensor, Tensor]:
    try:
        L, Q = torch.linalg.eigh(A)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        L64, Q64 = _eigh_fp64(A)
        return L64.to(A.dtype), Q64.to(A.dtype)
    finite = torch.isfinite(L).all(dim=-1) & torch.isfinite(Q).all(dim=-1).all(dim=-1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().squeeze(-1)
        L64, Q64 = _eigh_fp64(A[bad])
        L = L.index_copy(0, bad, L64.to(A.dtype))
        Q = Q.index_copy(0, bad, Q64.to(A.dtype))
    return L, Q


def inverse_root_eigh(A: Tensor, p: int, *, eps: float | Tensor = 0.0) -> tuple[Tensor, Tensor]:
    """``A^(-1/p)`` for a batch of symmetric matrices by eigendecomposition.

    ``A = Q diag(lam) Q^T`` gives ``A^(-1/p) = Q diag(max(lam, eps)^(-1/p)) Q^T``. The
    decomposition runs in fp32 (fp64 for fp64 input) and is retried in fp64 when it raises
    or returns non-finite values.

    Args:
        A: ``(B, n, n)`` symmetric batch (or one ``(n, n)`` matrix).
        p: root order, an integer ``>= 1``.
        eps: floor for the eigenvalues, a float or a ``(B,)`` tensor (one floor per matrix).
            With ``eps = 0`` a singular matrix gives an infinite root (and ``err = inf``).

    Returns:
        ``(root, err)``: root in the compute dtype (fp32 for half-precision input). ``err``
        (``(B,)``) is the relative reconstruction error of the decomposition,
        ``||Q diag(lam) Q^T - A||_F / ||A||_F`` -- about ``n`` machine epsilons when the
        decomposition is good. It does not measure the effect of the ``eps`` floor. It is
        ``inf`` where the root is not finite (failed decomposition, NaN input, or a
        non-positive eigenvalue with ``eps = 0``).
    """
    p = _check_p(p)
    A, unbatched = _as_batch(A)
    L, Q = _eigh(A)
    if isinstance(eps, Tensor):
        eps_t = eps.to(device=A.device, dtype=A.dtype).reshape(-1, 1)
    else:
        eps_t = torch.tensor(float(eps), device=A.device, dtype=A.dtype)
    d = inverse_pth_root_scalar(torch.maximum(L, eps_t), p)
    root = (Q * d.unsqueeze(-2)) @ Q.transpose(-2, -1)
    recon = (Q * L.unsqueeze(-2)) @ Q.transpose(-2, -1)
    a_norm = _fro_norm(A).clamp_min(torch.finfo(A.dtype).tiny)
    err = _fro_norm(recon - A) / a_norm
    finite = torch.isfinite(root).all(dim=-1).all(dim=-1)
    err = torch.where(finite, err, torch.full_like(err, float("inf")))
    if unbatched:
        return root[0], err[0]
    return root, err


def _probes(n: int, k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``k`` fixed, deterministic, mutually different probe vectors as an ``(n, k)`` matrix."""
    i = torch.arange(n, dtype=dtype, device=device)[:, None]
    j = torch.arange(1, k + 1, dtype=dtype, device=device)[None, :]
    return torch.cos(0.5 + 1.3 * i * j + j)


def _ridge(ridge: str, ridge_epsilon: float | Tensor, lam_max: Tensor) -> Tensor:
    """``eps_eff`` of each matrix: ``eps * lambda_max`` or ``eps``, floored at 1e-30."""
    if ridge == "relative":
        return (ridge_epsilon * lam_max).clamp_min(_RIDGE_FLOOR)
    eps = torch.as_tensor(ridge_epsilon, dtype=lam_max.dtype, device=lam_max.device)
    return eps.expand_as(lam_max).clamp_min(_RIDGE_FLOOR)


def _eigh_root(
    A: Tensor, p: int, ridge_epsilon: float | Tensor, ridge: str = "relative"
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Root pipeline by one eigendecomposition of the raw statistics.

    ``eigh`` gives ``lambda_max`` for free (no power iteration), and the ridge is added to the
    eigenvalues: ``(A + eps_eff I)^(-1/p) = Q diag(max(lam, 0) + eps_eff)^(-1/p) Q^T``. The
    error is the relative residual of the decomposition on a few fixed probe vectors,
    ``||Q diag(lam) Q^T V - A V||_F / ||A V||_F``: O(n^2) work instead of a full
    reconstruction matmul, and about ``n`` machine epsilons for a good decomposition.

    Returns ``(root, err, lambda_max, eps_eff)``.
    """
    L, Q = _eigh(A)
    lam_max = L[..., -1].clamp_min(0)  # eigh sorts ascending
    eps_eff = _ridge(ridge, ridge_epsilon, lam_max)
    d = inverse_pth_root_scalar(L.clamp_min(0) + eps_eff[:, None], p)
    root = (Q * d.unsqueeze(-2)) @ Q.transpose(-2, -1)
    V = _probes(A.shape[-1], min(4, A.shape[-1]), A.dtype, A.device)
    AV = A @ V
    rec = Q @ (L.unsqueeze(-1) * (Q.transpose(-2, -1) @ V))
    err = _fro_norm(rec - AV) / _fro_norm(AV).clamp_min(torch.finfo(A.dtype).tiny)
    finite = torch.isfinite(root).all(dim=-1).all(dim=-1)
    err = torch.where(finite, err, torch.full_like(err, float("inf")))
    return root, err, lam_max, eps_eff


def _solve(A: Tensor, eps_eff: Tensor, p: int, method: str, max_iters: int, tol: float):
    A_reg = A + eps_eff[:, None, None] * _eye_like(A)
    if method == "newton":
        return inverse_root_newton(A_reg, p, max_iters=max_iters, tol=tol)
    return inverse_root_eigh(A_reg, p, eps=eps_eff)


def _accept(root: Tensor, err: Tensor, failure_threshold: float) -> Tensor:
    finite = torch.isfinite(root).all(dim=-1).all(dim=-1)
    return finite & torch.isfinite(err) & (err < failure_threshold)


def inverse_root(
    A: Tensor,
    p: int,
    *,
    method: str = "newton",
    ridge_epsilon: float | Tensor = 1e-6,
    ridge: str = "relative",
    max_iters: int = 100,
    tol: float = 1e-6,
    failure_threshold: float = 0.1,
    retries: int = 0,
) -> RootResult:
    """``(A + eps_eff I)^(-1/p)`` for a batch of raw Shampoo statistics, with acceptance.

    Steps: ``lambda_max``; ridge ``eps_eff = max(ridge_epsilon * lambda_max, 1e-30)``
    (``ridge="relative"``) or ``max(ridge_epsilon, 1e-30)`` (``ridge="absolute"``; the floor
    keeps all-zero matrices solvable); solve with ``method``
    (``"newton"``: ``lambda_max`` by :func:`power_iteration`, then
    :func:`inverse_root_newton` on ``A + eps_eff I``, error ``max|M - I|``; ``"eigh"``: one
    eigendecomposition of ``A`` gives ``lambda_max`` and the root, error = relative residual
    of the decomposition on fixed probe vectors); accept each root when it is finite
    and its error is below ``failure_threshold``. With ``retries > 0`` the rejected matrices
    (only those) are solved again with a ridge ten times larger, up to ``retries`` times
    (one host sync per retry round; none when ``retries == 0``).

    Args:
        A: ``(B, n, n)`` symmetric PSD statistics (or one ``(n, n)`` matrix).
        p: root order, an integer ``>= 1``.
        method: ``"newton"`` or ``"eigh"``.
        ridge_epsilon: ridge ``epsilon`` (``>= 0``): a number, a 1-element tensor or a
            ``(B,)`` tensor (one value per matrix).
        ridge: ``"relative"`` (``eps * lambda_max``: scale free, bounds the condition
            number by ``1 + 1/eps``) or ``"absolute"`` (``eps * I``, in the units of ``A``).
        max_iters, tol: iteration limit and tolerance of both the power iteration and the
            Newton iteration.
        failure_threshold: largest accepted error.
        retries: how many times to retry rejected matrices with a 10x larger ridge.

    Returns:
        A :class:`RootResult`; tensors are in the compute dtype (fp32, or fp64 for fp64
        input). The caller keeps its previous root wherever ``ok`` is ``False``.
    """
    p = _check_p(p)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if ridge not in RIDGES:
        raise ValueError(f"ridge must be one of {RIDGES}, got {ridge!r}")
    if isinstance(ridge_epsilon, Tensor):
        if ridge_epsilon.dim() > 1:
            raise ValueError(
                "ridge_epsilon must be a number, a 1-element tensor or a (B,) tensor (one "
                f"value per matrix), got shape {tuple(ridge_epsilon.shape)}"
            )
        if not bool((ridge_epsilon >= 0).all()):
            raise ValueError("ridge_epsilon must be >= 0 (and not NaN) for every matrix")
    elif not ridge_epsilon >= 0:
        raise ValueError(f"ridge_epsilon must be >= 0, got {ridge_epsilon!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
    A, unbatched = _as_batch(A)
    if method == "eigh":
        root, err, lam, eps_eff = _eigh_root(A, p, ridge_epsilon, ridge)
    else:
        lam = power_iteration(A, max_iters=max_iters, tol=tol)
        eps_eff = _ridge(ridge, ridge_epsilon, lam)
        root, err = _solve(A, eps_eff, p, method, max_iters, tol)
    ok = _accept(root, err, failure_threshold)
    for _ in range(retries):
        if bool(ok.all()):
            break
        bad = (~ok).nonzero().squeeze(-1)
        eps_eff = eps_eff.index_copy(0, bad, eps_eff[bad] * 10.0)
        r_bad, e_bad = _solve(A[bad], eps_eff[bad], p, method, max_iters, tol)
        root = root.index_copy(0, bad, r_bad)
        err = err.index_copy(0, bad, e_bad)
        ok = ok.index_copy(0, bad, _accept(r_bad, e_bad, failure_threshold))
    if unbatched:
        return RootResult(root[0], err[0], lam[0], ok[0])
    return RootResult(root, err, lam, ok)


def absolute_ridge_units(
    matrix: Tensor, scale: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Write ``scale^2 * matrix + eps I`` as ``sigma^2 (matrix' + eps' I)`` with bounded terms.

    Statistics kept as ``scale^2 * S_hat`` (``S_hat`` bounded, ``scale`` following the
    gradients' magnitude) need an absolute ridge ``eps * I`` on the *true* statistics. In
    ``S_hat``'s units that is ``eps / scale^2``, which overflows float32 for tiny gradients
    (and is undefined for ``scale = 0``). With ``sigma = max(scale, sqrt(eps))``::

        scale^2 S_hat + eps I = sigma^2 ((scale / sigma)^2 S_hat + (eps / sigma^2) I)

    where ``(scale / sigma)^2`` and ``eps / sigma^2`` both lie in ``[0, 1]``. The root of the
    bracket, multiplied by ``sigma^(-2/p)``, is the root of the true regularised statistics.

    Args:
        matrix: ``(B, n, n)`` scaled statistics ``S_hat``.
        scale: ``(B,)`` scales (``None``: 1, i.e. ``matrix`` is in true units).
        eps: the absolute ridge (``> 0``).

    Returns:
        ``(matrix', sigma, eps')``: ``(B, n, n)`` in ``matrix``'s dtype, and ``(B,)`` float64
        ``sigma`` and ``eps'``; solve
        ``matrix' + eps' I`` (``ridge="absolute"``, ``ridge_epsilon=eps'``) and scale the root
        back with ``sigma``.
    """
    B = matrix.shape[0]
    s = (
        torch.ones(B, dtype=torch.float64, device=matrix.device)
        if scale is None
        else scale.to(device=matrix.device, dtype=torch.float64)
    )
    sigma = torch.clamp(s, min=float(eps) ** 0.5)
    sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma))  # eps = 0 and scale = 0
    shrink = (s / sigma).square().to(matrix.dtype)
    return matrix * shrink[:, None, None], sigma, eps / sigma.square()
