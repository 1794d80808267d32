"""Kronecker-factored statistics and their application, batched over stacked blocks.

A *stack* is a tensor of shape ``(B, n_1, ..., n_k)``: ``B`` independent order-``k`` blocks
of the same shape. Every function here works on a whole stack with batched matmuls, so
same-size blocks cost one kernel launch, not one per block.
"""

from __future__ import annotations

import math

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


def packed_size(n: int) -> int:
    """Entries of the upper triangle (diagonal included) of an ``n x n`` matrix."""
    return n * (n + 1) // 2


def packed_dim(m: int) -> int:
    """``n`` such that ``packed_size(n) == m``."""
    n = (math.isqrt(8 * m + 1) - 1) // 2
    if packed_size(n) != m:
        raise ValueError(f"{m} is not the size of a packed triangle")
    return n


_TRI_CACHE: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _tri_index(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of the upper triangle of an ``n x n`` matrix (row major) and of the
    mirrored entries (``(i, j) -> (j, i)``)."""
    key = (n, torch.device(device))
    if key not in _TRI_CACHE:
        i, j = torch.triu_indices(n, n, device=device)
        _TRI_CACHE[key] = (i * n + j, j * n + i)
    return _TRI_CACHE[key]


def pack_symmetric(a: torch.Tensor) -> torch.Tensor:
    """``(B, n, n)`` symmetric matrices -> ``(B, n (n + 1) / 2)`` upper triangles."""
    upper, _ = _tri_index(a.shape[-1], a.device)
    return a.reshape(a.shape[0], -1).index_select(1, upper)


def unpack_symmetric(p: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, n (n + 1) / 2)`` upper triangles -> full ``(B, n, n)`` symmetric matrices
    (written into ``out``, a contiguous ``(B, n, n)`` tensor, when given)."""
    n = packed_dim(p.shape[-1])
    if out is None:
        out = torch.empty(p.shape[0], n, n, dtype=p.dtype, device=p.device)
    upper, lower = _tri_index(n, p.device)
    flat = out.view(p.shape[0], n * n)
    flat.index_copy_(1, lower, p)
    flat.index_copy_(1, upper, p)
    return out


#: bytes of Gram products formed at once when updating packed statistics
GRAM_CHUNK_BYTES = 32 * 2**20


def update_scaled_statistics(
    stats: list[torch.Tensor],
    scales: list[torch.Tensor],
    x: torch.Tensor,
    beta2: float,
    matmul_dtype: torch.dtype | None = None,
) -> None:
    """In place: statistics kept as ``S_i = s_i^2 * stats[i]`` with per-block scales ``s_i``.

    The true update is ``S_i <- beta2 S_i + w X_(i) X_(i)^T``. With the block's largest
    entry ``c = max|X|`` the new scale is ``s' = max(c, sqrt(beta2) max_i s_i)`` (it follows
    the decay of the EMA, so small gradients after large ones are not lost to underflow), and

        ``stats[i] <- beta2 (s_i / s')^2 stats[i] + w (X / s')_(i) (X / s')_(i)^T``.

    ``X / s'`` has entries in ``[-1, 1]`` and ``beta2 (s_i / s')^2 <= 1``, so ``stats`` stay
    bounded by ``w * (number of columns)`` times the number of accumulated steps for *any*
    finite gradient: no overflow in float32 even for gradients near its largest value,
    where the plain products ``X X^T`` would be infinite. ``scales[i]`` (``(B,)``) become
    ``s'`` (a block that has only seen zeros keeps ``s = 0``), each block together with its
    statistics, so an interruption never leaves a block's statistics and scale apart.

    ``stats[i]`` is either ``(B, n_i, n_i)`` or packed ``(B, n_i (n_i + 1) / 2)`` (upper
    triangle, see :func:`pack_symmetric`); packed statistics form their Gram products a few
    blocks at a time (at most :data:`GRAM_CHUNK_BYTES`).
    """
    b = x.shape[0]
    w = ema_weight(beta2)
    old_max = torch.stack(list(scales)).amax(dim=0)
    peak = x.reshape(b, -1).abs().amax(dim=1).float()
    new = torch.maximum(peak, old_max * math.sqrt(beta2))
    safe = torch.where(new > 0, new, torch.ones_like(new))
    xs = x / safe.view(b, *([1] * (x.dim() - 1))).to(x.dtype)
    low = matmul_dtype is not None and matmul_dtype != stats[0].dtype
    if low:
        xs = xs.to(matmul_dtype)
    for i, (s, sc) in enumerate(zip(stats, scales)):
        ratio = (sc / safe).square_().mul_(beta2)
        u = xs.transpose(1, 2) if (i == 1 and xs.dim() == 3) else unfold(xs, i)
        if s.dim() == 2:  # packed
            n = u.shape[1]
            step = max(1, GRAM_CHUNK_BYTES // (4 * n * n))
            for lo in range(0, b, step):
                hi = min(b, lo + step)
                gram = torch.bmm(u[lo:hi], u[lo:hi].transpose(1, 2))
                packed = pack_symmetric(gram).to(s.dtype)
                s[lo:hi].mul_(ratio[lo:hi, None]).add_(packed, alpha=w)
                sc[lo:hi].copy_(new[lo:hi])
            continue
        if low:
            gram = torch.bmm(u, u.transpose(1, 2))
            s.mul_(ratio[:, None, None]).add_(gram, alpha=w)
        else:
            s.mul_(ratio[:, None, None]).baddbmm_(u, u.transpose(1, 2), alpha=w)
        sc.copy_(new)


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


# ------------------------------------------------------------ scaled application
#: ``|entries|`` of a saturated unscaled direction (see :func:`unscale`)
DIRECTION_LIMIT = 2.0**63
_EXPONENT_BITS = 0x7F800000
_F32_MIN, _F32_MAX_POW2 = 2.0**-126, 2.0**127


def block_amax(x: torch.Tensor) -> torch.Tensor:
    """Largest ``|entry|`` of each block of a stack ``(B, ...)``, float32 ``(B,)``."""
    flat = x.reshape(x.shape[0], -1)  # max and -min: no |x| temporary (vector_norm(inf) is slow)
    return torch.maximum(flat.amax(dim=1), flat.amin(dim=1).neg_()).float()


def pow2_floor(a: torch.Tensor) -> torch.Tensor:
    """The largest power of two ``<= a`` (float32, elementwise, exact: the exponent bits of
    ``a``), and ``2**-126`` for ``a`` below it (zero included). Dividing a block by
    ``pow2_floor(block_amax(x))`` brings its entries into ``(-2, 2)``."""
    bits = a.float().clamp_min(_F32_MIN).view(torch.int32) & _EXPONENT_BITS
    return bits.view(torch.float32)


def _per_block(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return s.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def _normalize(x: torch.Tensor, scales: list[torch.Tensor]) -> torch.Tensor:
    """Divide each block of ``x`` (in place) by the power of two of its largest entry,
    appended to ``scales``."""
    s = pow2_floor(block_amax(x))
    scales.append(s)
    return x.div_(_per_block(s, x))


def _product(scales: list[torch.Tensor]) -> torch.Tensor:
    """The product of per-block powers of two, in float64 (exact: no over- or underflow)."""
    return torch.stack(scales).double().prod(dim=0)


def precondition_scaled(
    x: torch.Tensor, roots: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`precondition` in scaled units: ``(d, scale)`` with ``d * scale ==
    precondition(x, roots)`` per block; ``d`` float32 with entries in ``(-2, 2)``,
    ``scale`` a float64 power of two per block ``(B,)``.

    ``x`` and the product after each factor are divided by a power of two (per block) that
    brings their largest entry into ``[1, 2)``, so no intermediate overflows as long as each
    root's entries times its size stay below the dtype's largest value, whatever the
    magnitude of ``x`` or of the roots' product (large gradients hitting the roots of tiny
    statistics overflow :func:`precondition`). Scaling by powers of two is exact: in the
    normal range ``d * scale`` is bit-identical to :func:`precondition` (the matmuls see
    the same operands up to powers of two). Squares of ``d`` cannot overflow, so norms of
    ``d`` are safe in float32.
    """
    dt = roots[0].dtype
    scales = [pow2_floor(block_amax(x))]
    xs = torch.div(x.float(), _per_block(scales[0], x)).to(dt).contiguous()
    k = xs.dim() - 1
    if k == 1:
        out = torch.bmm(roots[0], xs.unsqueeze(-1)).squeeze(-1)
        return _normalize(out.float(), scales), _product(scales)
    if k == 2:
        y = _normalize(torch.bmm(roots[0], xs), scales)
        return _normalize(torch.bmm(y, roots[1]).float(), scales), _product(scales)
    for i in range(k):
        b, n = xs.shape[0], xs.shape[1]
        rest = xs.shape[2:]
        y = torch.bmm(roots[i], xs.reshape(b, n, -1)).reshape(b, n, *rest)
        xs = _normalize(y, scales).movedim(1, -1)
    return xs.contiguous().float(), _product(scales)


def unscale(
    d: torch.Tensor, scale: torch.Tensor, limit: float = DIRECTION_LIMIT
) -> torch.Tensor:
    """``d * scale`` per block (in place; ``scale`` float64 powers of two), entries saturated at
    ``+-limit``: finite even where the true product is beyond float32, and exact
    (bit-identical to the unscaled product) below."""
    s1 = scale.clamp(_F32_MIN, _F32_MAX_POW2)
    s2 = (scale / s1).clamp(_F32_MIN, _F32_MAX_POW2)  # 1 in the normal range
    d.mul_(_per_block(s1, d)).mul_(_per_block(s2, d))  # beyond it: inf, or 0
    return d.clamp_(-limit, limit)
