"""The AdamW update as list math, multi-tensor (``torch._foreach_*``) or per tensor.

It follows ``torch.optim.AdamW`` operation for operation (decoupled decay
``p <- p (1 - lr wd)``, EMAs ``m``/``v``, bias corrections ``1 - beta**t``, denominator
``sqrt(v) / sqrt(1 - beta2**t) + eps``), so its results equal torch's to rounding. SCALE and
Muon use it for the tensors they do not normalise or orthogonalise.

One difference, outside the range where torch's result is finite: the gradient is
saturated at ``+-saturation(dtype)`` (``2**63`` in float32, ``2**511`` in float64) before
it enters the moments, so that ``g**2`` cannot overflow to ``inf`` (torch's second moment
does for ``|g| > 1.8e19`` in float32). Below that bound the values are untouched.

``foreach=True`` runs each operation as one ``torch._foreach_*`` call per (device, dtype)
group, ``foreach=False`` as the same operation on one tensor at a time
(:mod:`secondorder.kernels.foreach`); on the CPU both give bit-identical results.
"""

from __future__ import annotations

import math

import torch

from . import foreach as F


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
    foreach: bool = True,
) -> None:
    """One AdamW step on every tensor of ``params`` in place (``steps``: each one's 1-based
    step count *after* this step). All lists are aligned; each index shares one dtype.
    ``foreach``: multi-tensor calls (default) or a loop of single-tensor ones."""
    if not params:
        return
    grads = _saturated(grads, foreach)
    if weight_decay != 0:
        F.mul_(params, 1.0 - lr * weight_decay, foreach)
    F.lerp_(exp_avgs, grads, 1.0 - beta1, foreach)
    F.mul_(exp_avg_sqs, beta2, foreach)
    F.addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2, foreach)
    step_sizes = [-lr / (1.0 - beta1**t) for t in steps]
    bc2_sqrt = [math.sqrt(1.0 - beta2**t) for t in steps]
    denom = F.sqrt(exp_avg_sqs, foreach)
    F.div_(denom, bc2_sqrt, foreach)
    F.add_scalar_(denom, eps, foreach)
    F.addcdiv_(params, exp_avgs, denom, step_sizes, foreach)


def saturation(dtype: torch.dtype) -> float:
    """The largest power of two whose square is at most a quarter of ``dtype``'s max."""
    return 2.0 ** (math.frexp(torch.finfo(dtype).max)[1] // 2 - 1)


def _saturated(grads: list[torch.Tensor], foreach: bool = True) -> list[torch.Tensor]:
    """``grads`` clamped to ``+-saturation`` of each dtype (new tensors, grads untouched)."""
    out = list(grads)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, g in enumerate(grads):
        by_dtype.setdefault(g.dtype, []).append(i)
    for dtype, idx in by_dtype.items():
        bound = saturation(dtype)
        clamped = F.clamp_max([grads[i] for i in idx], bound, foreach)
        F.clamp_min_(clamped, -bound, foreach)
        for i, c in zip(idx, clamped):
            out[i] = c
    return out
