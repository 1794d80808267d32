"""Argument checks shared by every optimizer.

Each check raises ``ValueError`` (bad value) or ``TypeError`` (bad type) with a message that
names the argument and the accepted values, so a mistake surfaces at construction time and
never as an obscure failure deep inside a training run.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch


def _is_real_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_inf: bool = False,
) -> float:
    """Check that ``value`` is a real number within the given bounds.

    ``inf``/``-inf`` are rejected (an infinite learning rate or weight decay is never
    meant) unless ``allow_inf=True`` and the infinite end of the interval is unbounded.
    ``nan`` is always rejected.
    """
    if isinstance(value, torch.Tensor):
        # torch.optim's rule for tensor hyperparameters (lr, betas): exactly one element.
        if value.numel() != 1:
            raise ValueError(
                f"Tensor {name} must be 1-element, got a tensor of shape {tuple(value.shape)}"
            )
        value = value.item()
    if not _is_real_number(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    interval = f"{left}{lo}, {hi}{right}"
    bad = (
        math.isnan(value)
        or (low is not None and (value < low or (low_open and value == low)))
        or (high is not None and (value > high or (high_open and value == high)))
        or (math.isinf(value) and not (allow_inf and (high is None if value > 0 else low is None)))
    )
    if bad:
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return value


def check_int(name: str, value: Any, *, low: int | None = None) -> int:
    """Check that ``value`` is an integer (not a bool), optionally ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Check that ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")
    return value


def check_betas(value: Any, *, allow_beta2_one: bool = True) -> tuple[float, float]:
    """Check ``betas=(beta1, beta2)``: beta1 in [0, 1); beta2 in [0, 1] (or [0, 1))."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {value!r}")
    b1 = check_float("betas[0]", value[0], low=0.0, high=1.0, high_open=True)
    b2 = check_float("betas[1]", value[1], low=0.0, high=1.0, high_open=not allow_beta2_one)
    return (b1, b2)


def check_params_dtype(params: Iterable[torch.Tensor], optimizer: str) -> None:
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{optimizer}: params must be tensors, got {type(p).__name__}")
        if p.is_complex():
            raise TypeError(
                f"{optimizer} does not support complex parameters (got dtype {p.dtype}); "
                "view them as real with torch.view_as_real"
            )
        if not p.is_floating_point():
            raise TypeError(f"{optimizer} needs floating-point parameters, got dtype {p.dtype}")


def check_grad(p: torch.Tensor, optimizer: str) -> None:
    """Reject gradients this library cannot handle (sparse, complex)."""
    g = p.grad
    if g.is_sparse or g.layout != torch.strided:
        raise TypeError(
            f"{optimizer} does not support sparse gradients (got layout {g.layout}); "
            "use a dense optimizer state or torch.optim.SparseAdam"
        )
    if g.is_complex():
        raise TypeError(f"{optimizer} does not support complex gradients (got dtype {g.dtype})")
    if g.shape != p.shape:
        raise ValueError(
            f"{optimizer}: gradient shape {tuple(g.shape)} does not match parameter "
            f"shape {tuple(p.shape)}"
        )


def check_common_hparams(group: dict) -> None:
    """The hyperparameters every ``secondorder`` optimizer shares (one place, one message).

    ``lr >= 0``; ``betas``: beta1 in [0, 1), beta2 in [0, 1] (1: running sums); ``eps > 0``;
    ``weight_decay >= 0``; ``graft_eps > 0`` (a zero would divide by zero wherever the
    graft's second moment is zero).
    """
    check_float("lr", group["lr"], low=0.0)
    group["betas"] = check_betas(group["betas"], allow_beta2_one=True)
    check_float("eps", group["eps"], low=0.0, low_open=True)
    check_float("weight_decay", group["weight_decay"], low=0.0)
    check_float("graft_eps", group["graft_eps"], low=0.0, low_open=True)


def split_named_params(params: list[Any]) -> tuple[list[Any], list[str] | None]:
    """Split ``model.named_parameters()``-style ``(name, tensor)`` pairs, as torch.optim does.

    Returns the tensors and their names (``None`` when no parameter is named). Either every
    parameter of a group is named or none is.
    """
    named = [isinstance(p, tuple) for p in params]
    if not any(named):
        return params, None
    if not all(named):
        raise ValueError(
            "all optimizer params should be with/without names: some are (name, tensor) "
            "pairs from named_parameters(), some are bare tensors"
        )
    for p in params:
        if len(p) != 2 or not isinstance(p[0], str):
            raise TypeError(
                "params: a named parameter must be a (name: str, tensor) pair, as "
                f"named_parameters() yields; got {p!r:.80}"
            )
    return [p[1] for p in params], [p[0] for p in params]


def check_param_names(group: dict[str, Any]) -> None:
    """A group's ``param_names`` (if any) name each of its parameters with a string."""
    if "param_names" not in group:
        return
    names, params = group["param_names"], group["params"]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"param_names must be a list of str, got {names!r:.80}")
    if len(names) != len(params):
        raise ValueError(
            f"param_names has {len(names)} names for a group of {len(params)} parameters"
        )


#: torch.optim flags this library does not implement, with what to do instead. A group
#: that sets one of them to a true value is rejected (it would otherwise be ignored).
UNSUPPORTED_FLAGS = {
    "maximize": "minimize the negated objective instead (loss = -objective)",
    "capturable": "the step reads a flag on the host (non-finite check), so it cannot be "
    "captured in a CUDA graph",
    "differentiable": "the step runs under torch.no_grad(); gradients through the update "
    "are not supported",
}


def check_unsupported_flags(group: dict[str, Any], implemented: Iterable[str], name: str) -> None:
    """Reject torch.optim flags set to true that the optimizer does not ``implement``.

    ``foreach`` and ``fused`` are performance hints and are accepted: ``fused`` is
    ignored, ``foreach`` too except by the optimizers that take it as an argument (SONew,
    SOAP, Muon, SCALE, AdaGradNorm, M-FAC, AdaHessian: ``None`` auto, ``True``
    multi-tensor, ``False`` per tensor, bit-identical on the CPU); the others pick their
    own multi-tensor paths.
    """
    for flag, instead in UNSUPPORTED_FLAGS.items():
        if flag not in implemented and group.get(flag):
            raise ValueError(f"{name} does not support {flag}={group[flag]!r}: {instead}")


def check_loaded_step(value: Any, where: str) -> torch.Tensor:
    """A loaded step counter: a tensor as is, a Python number converted as torch.optim does.

    Older torch versions and other tools save ``step`` as a Python number; torch.optim turns
    it into a 0-d CPU tensor when it loads it. A count that is not a whole number >= 0, or
    not a number, is rejected here rather than failing at the next step.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(
                f"{where}: a step count must be a number or a 1-element real tensor, got a "
                f"{value.dtype} tensor of shape {tuple(value.shape)}"
            )
        number = value.item()
    elif _is_real_number(value):
        number = value
    else:
        raise ValueError(
            f"{where}: a step count must be a number or a 1-element tensor, got "
            f"{type(value).__name__} ({value!r:.40})"
        )
    if not (math.isfinite(number) and number >= 0 and float(number).is_integer()):
        raise ValueError(f"{where}: a step count must be a whole number >= 0, got {number!r}")
    if isinstance(value, torch.Tensor):
        return value
    # torch.optim's choice of dtype for step counters
    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return torch.tensor(float(number), dtype=dtype)
