"""Grafting: take the step *size* of a diagonal method and the *direction* of a preconditioner.

One implementation shared by Shampoo and SONew. All functions are pure tensor math on
float tensors; the optimizer classes own the state.

Conventions (``beta`` is the EMA coefficient, ``t >= 1`` the step):

* ``ema_weight(beta)`` is ``1 - beta``, or ``1`` when ``beta == 1`` (a running sum);
* ``bias_correction(beta, t)`` is ``1 - beta**t``, or ``1`` when ``beta == 1`` or ``beta == 0``.

Graft kinds and their accumulator ``v`` / direction ``a`` (for an input vector ``m``, which
is the gradient or its momentum):

=========  ================================  ==================================
kind       accumulator update                direction ``a``
=========  ================================  ==================================
sgd        none                              ``m``
adagrad    ``v += g**2``                     ``m / (sqrt(v) + eps)``
rmsprop    ``v = beta2 v + w g**2``          ``m / (sqrt(v) + eps)``
adam       as rmsprop                        ``m / (sqrt(v / bc(beta2, t)) + eps)``
None       none                              no rescaling
=========  ================================  ==================================
"""

from __future__ import annotations

import math
from typing import Any

import torch

GRAFT_KINDS: tuple[str | None, ...] = ("adam", "rmsprop", "adagrad", "sgd", None)
#: graft kinds that keep a per-element second-moment accumulator
GRAFTS_WITH_STATE = ("adam", "rmsprop", "adagrad")


def ema_weight(beta: float) -> float:
    """Weight of the new sample in an EMA with coefficient ``beta`` (1 for a running sum)."""
    return 1.0 if beta == 1.0 else 1.0 - beta


def bias_correction(beta: float, step: int) -> float:
    """Adam-style bias correction ``1 - beta**step`` (1 for ``beta`` in {0, 1})."""
    if beta == 1.0 or beta == 0.0:
        return 1.0
    return 1.0 - beta**step


def update_second_moment(kind: str | None, v: torch.Tensor, g: torch.Tensor, beta2: float) -> None:
    """Update the graft accumulator ``v`` in place with gradient ``g`` (no-op for sgd/None)."""
    if kind not in ("adagrad", "rmsprop", "adam"):
        return
    # Running sums are kept below the dtype's largest value: a long run of huge (callers
    # clamp entries at 2**63, see Shampoo) but finite gradients saturates instead of inf.
    if kind == "adagrad" or beta2 == 1.0:
        v.addcmul_(g, g).clamp_(max=torch.finfo(v.dtype).max)
    else:
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)


def robust_norm(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of ``x`` (0-d) that neither overflows nor underflows for finite ``x``.

    float32/bfloat16 entries above ``~1.8e19`` overflow a float32 sum of squares, entries
    below ``~1e-23`` vanish from it. The squares are accumulated in float64 (result in
    float64) where the device has it; elsewhere ``x`` is divided by ``max |x|`` first.
    About three times the cost of a plain norm (a float64 copy): for diagnostics and
    checks, not for every step.
    """
    if x.device.type != "mps":
        return torch.linalg.vector_norm(x, dtype=torch.float64)
    amax = torch.linalg.vector_norm(x, ord=float("inf"))
    scale = torch.where(amax > 0, amax, torch.ones_like(amax))
    return torch.linalg.vector_norm(x / scale) * scale


def graft_direction(
    kind: str | None,
    m: torch.Tensor,
    v: torch.Tensor | None,
    step: int,
    beta2: float,
    eps: float | torch.Tensor,
) -> torch.Tensor:
    """The diagonal method's direction ``a`` for input ``m`` (a new tensor).

    ``eps`` may be a 0-d tensor (e.g. expressed in the units of scaled statistics)."""
    if kind in (None, "sgd"):
        return m.clone()
    if kind not in GRAFTS_WITH_STATE:
        raise ValueError(f"graft must be one of {GRAFT_KINDS}, got {kind!r}")
    assert v is not None
    bc = bias_correction(beta2, step) if kind == "adam" else 1.0
    denom = (v / bc).sqrt_().add_(eps) if bc != 1.0 else v.sqrt().add_(eps)
    return m / denom


def graft_norm(
    kind: str | None,
    m: torch.Tensor,
    v: torch.Tensor | None,
    step: int,
    beta2: float,
    eps: float | torch.Tensor,
) -> torch.Tensor:
    """``||graft_direction(kind, m, v, ...)||`` as a 0-d tensor, without keeping the direction.

    For Adam, ``m / (sqrt(v / bc) + eps) = s * m / (sqrt(v) + eps * s)`` with ``s = sqrt(bc)``:
    three elementwise passes into one scratch tensor and a norm, where building the direction
    and then its norm takes five passes and two allocations.
    """
    if kind in (None, "sgd"):
        return torch.linalg.vector_norm(m)
    if kind not in GRAFTS_WITH_STATE:
        raise ValueError(f"graft must be one of {GRAFT_KINDS}, got {kind!r}")
    assert v is not None
    s = math.sqrt(bias_correction(beta2, step)) if kind == "adam" else 1.0
    d = v.sqrt().add_(eps * s)
    torch.div(m, d, out=d)
    return torch.linalg.vector_norm(d).mul_(s)


def block_norms(x: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of each block of a stacked ``(B, ...)`` tensor, shape ``(B, 1, ..., 1)``."""
    b = x.shape[0]
    n = torch.linalg.vector_norm(x.reshape(b, -1), dim=1)
    return n.reshape((b,) + (1,) * (x.dim() - 1))


def graft_rescale(
    d: torch.Tensor,
    a: torch.Tensor,
    tiny: float | torch.Tensor = 1e-16,
    a_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rescale each block of ``d`` (stacked ``(B, ...)``) to the norm of the same block of ``a``.

    Returns ``d * ||a_b|| / (||d_b|| + tiny)`` per block ``b`` (in place on ``d``). ``tiny``
    may be a per-block tensor ``(B, 1, ..., 1)``; ``a_norms`` (that shape too) replaces
    ``block_norms(a)`` when given. A block of zeros stays zero (never ``0 * inf``).
    """
    ratio = (block_norms(a) if a_norms is None else a_norms).div_(block_norms(d).add_(tiny))
    return d.mul_(ratio.nan_to_num_(nan=0.0, posinf=0.0))


# ------------------------------------------------------------------ lists of tensors
# The same arithmetic on lists of tensors, one ``torch._foreach_*`` call per operation for
# the whole list when the coefficients are plain numbers (a loop of the per-tensor ops
# otherwise, e.g. for tensor hyperparameters). On the CPU the foreach ops run the per-tensor
# kernels, so the results are bit-identical to the single-tensor functions above.


def _plain(*coefficients: Any) -> bool:
    return not any(isinstance(c, torch.Tensor) for c in coefficients)


def update_second_moments(
    kind: str | None, vs: list[torch.Tensor], gs: list[torch.Tensor], beta2: float
) -> None:
    """:func:`update_second_moment` for lists (in place on ``vs``)."""
    if kind not in GRAFTS_WITH_STATE or not vs:
        return
    if not _plain(beta2):
        for v, g in zip(vs, gs):
            update_second_moment(kind, v, g, beta2)
        return
    if kind == "adagrad" or beta2 == 1.0:
        torch._foreach_addcmul_(vs, gs, gs)
        torch._foreach_clamp_max_(vs, torch.finfo(vs[0].dtype).max)
    else:
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2)


def graft_directions(
    kind: str | None,
    ms: list[torch.Tensor],
    vs: list[torch.Tensor] | None,
    step: int,
    beta2: float,
    eps: float | torch.Tensor,
    inplace: bool = False,
) -> list[torch.Tensor]:
    """:func:`graft_direction` for lists. For ``sgd`` and ``None`` the inputs themselves are
    returned (no copy: the caller must not modify them in place); ``inplace=True`` writes
    the directions into ``ms`` (one allocation fewer)."""
    if kind in (None, "sgd"):
        return list(ms)
    if kind not in GRAFTS_WITH_STATE:
        raise ValueError(f"graft must be one of {GRAFT_KINDS}, got {kind!r}")
    assert vs is not None
    if not ms:
        return []
    if not _plain(beta2, eps):
        return [graft_direction(kind, m, v, step, beta2, eps) for m, v in zip(ms, vs)]
    bc = bias_correction(beta2, step) if kind == "adam" else 1.0
    denom = torch._foreach_div(vs, bc) if bc != 1.0 else torch._foreach_sqrt(vs)
    if bc != 1.0:
        torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    if inplace:
        torch._foreach_div_(ms, denom)
        return list(ms)
    return torch._foreach_div(ms, denom)
