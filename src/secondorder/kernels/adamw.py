"""The AdamW update as multi-tensor (``torch._foreach_*``) math.

It follows ``torch.optim.AdamW`` operation for operation (decoupled decay
``p <- p (1 - lr wd)``, EMAs ``m``/``v``, bias corrections ``1 - beta**t``, denominator
``sqrt(v) / sqrt(1 - beta2**t) + eps``), so its results equal torch's to rounding. SCALE and
Muon use it for the tensors they do not normalise or orthogonalise.

One difference, outside the range where torch's result is finite: the gradient is
saturated at ``+-saturation(dtype)`` (``2**63`` in float32, ``2**511`` in float64) before
it enters the moments, so that ``g**2`` cannot overflow to ``inf`` (torch's second moment
does for ``|g| > 1.8e19`` in float32). Below that bound the values are untouched.
"""

from __future__ import annotations

import math

import torch


def adamw_foreach(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step on every tensor of ``params`` in place (``steps``: each one's 1-based
    step count *after* this step). All lists are aligned; each index shares one dtype."""
    if not params:
        return
    grads = _saturated(grads)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    step_sizes = [-lr / (1.0 - beta1**t) for t in steps]
    bc2_sqrt = [math.sqrt(1.0 - beta2**t) for t in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)


def saturation(dtype: torch.dtype) -> float:
    """The largest power of two whose square is at most a quarter of ``dtype``'s max."""
    return 2.0 ** (math.frexp(torch.finfo(dtype).max)[1] // 2 - 1)


def _saturated(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """``grads`` clamped to ``+-saturation`` of each dtype (new tensors, grads untouched)."""
    out = list(grads)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, g in enumerate(grads):
        by_dtype.setdefault(g.dtype, []).append(i)
    for dtype, idx in by_dtype.items():
        bound = saturation(dtype)
        clamped = torch._foreach_clamp_max([grads[i] for i in idx], bound)
        torch._foreach_clamp_min_(clamped, -bound)
        for i, c in zip(idx, clamped):
            out[i] = c
    return out
