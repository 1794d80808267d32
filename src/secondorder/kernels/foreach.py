"""Elementwise list operations with a multi-tensor (``torch._foreach_*``) path and a per-tensor
twin, for the optimizers that take ``foreach=None | True | False``.

Each function applies one torch operation to every tensor of a list (aligned lists for the
operands, a Python number or a list of numbers for the scalars). With ``foreach=True`` the
tensors are grouped by (device, dtype) and each group goes to one ``torch._foreach_*``
call; with ``foreach=False`` a Python loop applies the single-tensor operation of the same
name to each tensor. Elementwise both compute the same operation on the same operands: on
the CPU, torch runs a ``_foreach_*`` call as those single-tensor operations, so the two
paths are bit-identical there (tested). On CUDA, torch fuses a group into a few kernel
launches, which is the point of the multi-tensor path (the step of a model with hundreds of
small tensors is dominated by launch overhead); its fused kernels may round a few
operations in another order than the single-tensor kernels (``addcmul``'s product, for
one), as ``torch.optim``'s own foreach and for-loop paths may differ in the last bit.

``foreach=None`` (auto) means on when every tensor is a plain tensor (or parameter) on a
CPU or CUDA device (:func:`resolve_foreach`), off otherwise (other devices, tensor
subclasses), where the per-tensor loop is the safe choice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

#: devices on which ``foreach=None`` turns the multi-tensor path on
FOREACH_DEVICES = ("cpu", "cuda")
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)

Scalars = float | torch.Tensor | Sequence[float]


def check_foreach(value: Any) -> None:
    """``foreach`` must be ``None`` (auto), ``True`` or ``False``."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(
            f"foreach must be None (auto), True or False, got {type(value).__name__} ({value!r})"
        )


def resolve_foreach(flag: bool | None, tensors: Sequence[torch.Tensor]) -> bool:
    """The path to take for ``tensors``: ``flag`` itself, or for ``None`` whether every
    tensor is a plain tensor on a CPU or CUDA device."""
    if flag is not None:
        return flag
    return all(type(t) in _PLAIN_TYPES and t.device.type in FOREACH_DEVICES for t in tensors)


def use_foreach_off_cpu(group: dict[str, Any], tensors: Sequence[torch.Tensor]) -> bool:
    """torch.optim's auto rule, for optimizers whose per-tensor loop is faster on the CPU:
    the group's ``foreach``, or for ``None`` whether no tensor is on the CPU."""
    if group.get("foreach") is not None:
        return group["foreach"]
    return all(t.device.type != "cpu" for t in tensors)


def groups(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), in first-seen order."""
    out: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        out.setdefault((t.device, t.dtype), []).append(i)
    return list(out.values())


def _apply(
    foreach: bool,
    multi: Callable[..., Any],
    single: Callable[..., Any],
    lists: Sequence[Sequence[torch.Tensor]],
    scalars: Scalars | None = None,
    tensor_scalar: bool = False,
) -> list[Any]:
    """``multi(*lists, scalars)`` per (device, dtype) group, or ``single(*tensors, scalar)``
    per index. Returns the results aligned with ``lists[0]`` (for out-of-place ops).
    ``tensor_scalar``: ``multi`` takes one 0-d tensor as its scalar (no host read)."""
    n = len(lists[0])
    if n == 0:
        return []
    if not (tensor_scalar and isinstance(scalars, torch.Tensor)):
        scalars = _numbers(scalars)
    per_index = isinstance(scalars, (list, tuple))
    if not foreach:
        out = []
        for i in range(n):
            args: tuple[Any, ...] = () if scalars is None else (scalars,)
            if per_index:
                args = (scalars[i],)  # type: ignore[index]
            out.append(single(*(xs[i] for xs in lists), *args))
        return out
    out: list[Any] = [None] * n
    for idx in groups(lists[0]):
        sub = [[xs[i] for i in idx] for xs in lists]
        args = () if scalars is None else (scalars,)
        if per_index:
            args = ([scalars[i] for i in idx],)  # type: ignore[index]
        res = multi(*sub, *args)
        if res is not None:
            for i, r in zip(idx, res):
                out[i] = r
    return out


def _numbers(scalars: Any) -> Any:
    """Tensor hyperparameters (0-d, e.g. a tensor ``lr``) as Python numbers, as a
    single-tensor call reads them; multi-tensor calls take numbers (a tensor there means a
    1-d pack of scalars). Reads a device value once per call when the tensor is on one."""
    if isinstance(scalars, torch.Tensor):
        return scalars.item()
    if isinstance(scalars, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in scalars):
        return [x.item() if isinstance(x, torch.Tensor) else x for x in scalars]
    return scalars


def mul_(xs: Sequence[torch.Tensor], s: Scalars, foreach: bool) -> None:
    """``x.mul_(s)`` for every ``x`` (``s`` one number, one 0-d tensor, which is not read
    on the host, or one number per tensor)."""
    _apply(foreach, torch._foreach_mul_, torch.Tensor.mul_, [xs], s, tensor_scalar=True)


def add_scalar_(xs: Sequence[torch.Tensor], s: Scalars, foreach: bool) -> None:
    """``x.add_(s)`` for every ``x``."""
    _apply(foreach, torch._foreach_add_, torch.Tensor.add_, [xs], s)


def add_(
    xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], alpha: float, foreach: bool
) -> None:
    """``x.add_(y, alpha=alpha)`` for every pair."""
    alpha = _numbers(alpha)
    _apply(
        foreach,
        lambda a, b: torch._foreach_add_(a, b, alpha=alpha),
        lambda a, b: a.add_(b, alpha=alpha),
        [xs, ys],
    )


def lerp_(
    xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], weight: float, foreach: bool
) -> None:
    """``x.lerp_(y, weight)`` for every pair."""
    _apply(foreach, torch._foreach_lerp_, torch.Tensor.lerp_, [xs, ys], weight)


def lerp(
    xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], weight: float, foreach: bool
) -> list[torch.Tensor]:
    """``torch.lerp(x, y, weight)`` for every pair (new tensors)."""
    return _apply(foreach, torch._foreach_lerp, torch.lerp, [xs, ys], weight)


def addcmul_(
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor],
    zs: Sequence[torch.Tensor],
    value: Scalars,
    foreach: bool,
) -> None:
    """``x.addcmul_(y, z, value=v)`` for every triple."""
    _apply(
        foreach,
        torch._foreach_addcmul_,
        lambda a, b, c, v: a.addcmul_(b, c, value=v),
        [xs, ys, zs],
        value,
    )


def addcdiv_(
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor],
    zs: Sequence[torch.Tensor],
    value: Scalars,
    foreach: bool,
) -> None:
    """``x.addcdiv_(y, z, value=v)`` for every triple."""
    _apply(
        foreach,
        torch._foreach_addcdiv_,
        lambda a, b, c, v: a.addcdiv_(b, c, value=v),
        [xs, ys, zs],
        value,
    )


def sqrt(xs: Sequence[torch.Tensor], foreach: bool) -> list[torch.Tensor]:
    """``torch.sqrt(x)`` for every ``x`` (new tensors)."""
    return _apply(foreach, torch._foreach_sqrt, torch.sqrt, [xs])


def div_(xs: Sequence[torch.Tensor], s: Scalars, foreach: bool) -> None:
    """``x.div_(s)`` for every ``x``."""
    _apply(foreach, torch._foreach_div_, torch.Tensor.div_, [xs], s)


def clamp_max(xs: Sequence[torch.Tensor], bound: float, foreach: bool) -> list[torch.Tensor]:
    """``torch.clamp_max(x, bound)`` for every ``x`` (new tensors)."""
    return _apply(foreach, torch._foreach_clamp_max, torch.clamp_max, [xs], bound)


def clamp_max_(xs: Sequence[torch.Tensor], bound: float, foreach: bool) -> None:
    """``x.clamp_max_(bound)`` for every ``x``."""
    _apply(foreach, torch._foreach_clamp_max_, torch.Tensor.clamp_max_, [xs], bound)


def clamp_min_(xs: Sequence[torch.Tensor], bound: float, foreach: bool) -> None:
    """``x.clamp_min_(bound)`` for every ``x``."""
    _apply(foreach, torch._foreach_clamp_min_, torch.Tensor.clamp_min_, [xs], bound)


def copy_(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], foreach: bool) -> None:
    """``x.copy_(y)`` for every pair."""
    _apply(foreach, torch._foreach_copy_, torch.Tensor.copy_, [xs, ys])


def add_steps_(steps: Sequence[torch.Tensor], foreach: bool) -> None:
    """Advance 0-d step counters by one (``step += 1``), as torch.optim does."""
    add_scalar_(steps, 1.0, foreach)


def sqrt_(xs: Sequence[torch.Tensor], foreach: bool) -> None:
    """``x.sqrt_()`` for every ``x``."""
    _apply(foreach, torch._foreach_sqrt_, torch.Tensor.sqrt_, [xs])


def div(xs: Sequence[torch.Tensor], s: Scalars, foreach: bool) -> list[torch.Tensor]:
    """``torch.div(x, s)`` for every ``x`` (new tensors)."""
    return _apply(foreach, torch._foreach_div, torch.div, [xs], s)


def div_tensors(
    xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], foreach: bool
) -> list[torch.Tensor]:
    """``torch.div(x, y)`` for every pair (new tensors; ``y`` may broadcast, e.g. 0-d)."""
    return _apply(foreach, torch._foreach_div, torch.div, [xs, ys])


def add_tensors_(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], foreach: bool) -> None:
    """``x.add_(y)`` for every pair (``y`` may broadcast, e.g. a 0-d tensor)."""
    _apply(foreach, torch._foreach_add_, torch.Tensor.add_, [xs, ys])


def add(
    xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], alpha: float, foreach: bool
) -> list[torch.Tensor]:
    """``torch.add(x, y, alpha=alpha)`` for every pair (new tensors)."""
    alpha = _numbers(alpha)
    return _apply(
        foreach,
        lambda a, b: torch._foreach_add(a, b, alpha=alpha),
        lambda a, b: torch.add(a, b, alpha=alpha),
        [xs, ys],
    )


def add_scalar(xs: Sequence[torch.Tensor], s: Scalars, foreach: bool) -> list[torch.Tensor]:
    """``torch.add(x, s)`` for every ``x`` (new tensors)."""
    return _apply(foreach, torch._foreach_add, torch.add, [xs], s)


def mul_tensors(
    xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], foreach: bool
) -> list[torch.Tensor]:
    """``torch.mul(x, y)`` for every pair (new tensors; ``y`` may broadcast, e.g. 0-d)."""
    return _apply(foreach, torch._foreach_mul, torch.mul, [xs, ys])
