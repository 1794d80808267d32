"""Exact power-of-two rescaling, on device, for products that would overflow or underflow.

Multiplying a floating-point number by a power of two changes only its exponent, so it is
exact (as long as the result stays in the normal range), and rounding commutes with it:
a dot product of ``x · 2**-a`` and ``y · 2**-b``, multiplied back by ``2**(a + b)``, equals
the dot product of ``x`` and ``y`` bit for bit whenever neither computation overflows or
underflows. The optimizers use this to keep huge or tiny gradients (``1e30``, ``1e-30``)
out of the range where squares overflow or vanish, while leaving every value in the
ordinary range untouched: :func:`row_exponents` returns 0 for rows that are safe as they
are, so those rows are stored and multiplied exactly as before.

Exponents are integer tensors (no host reads); ``2**e`` is built from its bits.
"""

from __future__ import annotations

import math

import torch

__all__ = ["mul_pow2", "pow2", "row_exponents", "safe_exponent"]


def safe_exponent(dtype: torch.dtype, n: int) -> int:
    """The largest ``E`` such that a sum of ``n`` products of two numbers of magnitude at
    most ``2**E`` stays below a quarter of ``dtype``'s largest value.

    Rows whose largest entry lies in ``[2**-E, 2**E]`` are safe to multiply as they are
    (``n · 2**2E <= max / 4``), and their products do not fall far below the normal range.
    """
    emax = math.frexp(torch.finfo(dtype).max)[1]  # max < 2**emax
    return max((emax - 2 - max(n - 1, 0).bit_length()) // 2, 1)


def row_exponents(x: torch.Tensor, limit: int, dim: int | tuple[int, ...] = -1) -> torch.Tensor:
    """Per row of ``x`` (reduced over ``dim``), the exponent ``e`` to store it as
    ``x · 2**-e``: 0 where the largest entry is within ``[2**-limit, 2**limit]`` (or the row
    is 0), else the exponent that brings the largest entry into ``[0.5, 1)``.

    Returns an int32 tensor of ``x``'s shape with ``dim`` removed.
    """
    amax = x.detach().abs().amax(dim=dim)
    _, e = torch.frexp(amax.float() if amax.dtype != torch.float64 else amax)
    e = e.to(torch.int32)
    inside = (e.abs() <= limit) | (amax == 0)
    return torch.where(inside, torch.zeros_like(e), e)


def pow2(e: torch.Tensor) -> torch.Tensor:
    """``2.0**e`` in float64, exactly, for an integer tensor ``e`` (``|e| <= 2046``: two
    exact factors; results beyond float64's range are ``inf`` or ``0`` as they should be)."""
    e = e.to(torch.int64)
    lo = torch.div(e, 2, rounding_mode="floor")
    out = ((lo + 1023) << 52).view(torch.float64)
    return out * ((e - lo + 1023) << 52).view(torch.float64)


def mul_pow2(x: torch.Tensor, e: torch.Tensor, *, out: torch.Tensor | None = None):
    """``x · 2**e`` in ``x``'s dtype, exact unless the result leaves the range; ``e``
    (integer) broadcasts against ``x``. Two multiplications by in-range powers of two, so
    that ``2**e`` need not be representable in ``x``'s dtype. In place into ``out`` if
    given (it may be ``x``)."""
    e = e.to(torch.int64)
    lo = torch.div(e, 2, rounding_mode="floor")
    first = ((lo + 1023) << 52).view(torch.float64).to(x.dtype)
    second = ((e - lo + 1023) << 52).view(torch.float64).to(x.dtype)
    if out is None:
        return (x * first).mul_(second)
    torch.mul(x, first, out=out)
    return out.mul_(second)
