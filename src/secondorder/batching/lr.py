"""Learning rate that follows the batch size, counted in examples.

A larger batch averages away gradient noise, so each step can afford to be longer; at a
fixed learning rate a grown batch makes *less* progress per example than the small one did,
which is why an adaptive-batch run can end above the small-constant-batch run over the same
examples. The policy here multiplies the learning rate by a factor of the batch size
relative to the starting batch ``b_0``:

* ``"none"``: ``1`` (the authors of the adaptive-batch tests keep the lr schedule of the
  small batch, counted in examples, and rely on the optimizer's own step-size adaptation);
* ``"linear"``: ``b / b_0`` (the classical rule for SGD: ``k`` times the batch, ``k`` times
  the step, so that ``k`` small steps and one large step move the weights alike);
* ``"sqrt"``: ``sqrt(b / b_0)`` (keeps the step's noise level constant; the rule usually
  recommended for adaptive methods such as Adam, RMSProp and AdaGrad, whose step is already
  normalised by the gradient's size);

capped at ``lr_max_scale`` (the rules hold for moderate growth; past a few times the
starting lr they usually overshoot). When the batch grows, the factor does not jump: it
moves linearly from its current value to the new target over the next ``lr_warmup``
examples (``0``: at once), so a sudden ×8 batch does not bring a sudden ×8 lr.

:func:`batch_lr_scale` and :func:`ramp` are the two pure pieces;
:class:`BatchLRScaling` keeps the one piece of state (where the current ramp started).
"""

from __future__ import annotations

import math
from typing import Any

from .._validation import check_choice, check_float, check_int

__all__ = ["LR_SCALINGS", "BatchLRScaling", "batch_lr_scale", "ramp"]

#: the batch-size scaling rules of the learning rate
LR_SCALINGS = ("none", "linear", "sqrt")


def batch_lr_scale(
    batch: int, initial_batch: int, lr_scaling: str = "none", lr_max_scale: float = math.inf
) -> float:
    """``min(lr_max_scale, r(batch / initial_batch))`` with ``r`` the rule: ``1``, ``x`` or
    ``sqrt(x)``."""
    check_choice("lr_scaling", lr_scaling, LR_SCALINGS)
    ratio = batch / initial_batch
    if lr_scaling == "none":
        raw = 1.0
    elif lr_scaling == "linear":
        raw = ratio
    else:
        raw = math.sqrt(ratio)
    return min(lr_max_scale, raw)


def ramp(samples: float, start: float, begin: float, end: float, length: float) -> float:
    """Linear ramp from ``begin`` (at ``samples == start``) to ``end`` (``length`` examples
    later, and after); ``length == 0`` is a step to ``end``."""
    if length <= 0 or samples >= start + length:
        return end
    return begin + (end - begin) * max(0.0, samples - start) / length


class BatchLRScaling:
    """The learning-rate factor of the batch size (see the module docstring).

    Args:
        initial_batch: the starting batch ``b_0 >= 1``; its factor is 1.
        lr_scaling: ``"none"`` (default), ``"linear"`` or ``"sqrt"``.
        lr_max_scale: cap on the factor (a real number ``>= 1``, ``inf`` allowed; default 8).
        lr_warmup: examples (``>= 0``) over which the factor moves to a new target after the
            batch grows (default 0: at once).

    ``scaling(samples, batch)`` gives the factor to use for the step taken with ``batch``
    examples after ``samples`` examples processed; call it with non-decreasing ``samples``.
    """

    def __init__(
        self,
        initial_batch: int,
        lr_scaling: str = "none",
        lr_max_scale: float = 8.0,
        lr_warmup: int = 0,
    ) -> None:
        self.initial_batch = check_int("initial_batch", initial_batch, low=1)
        self.lr_scaling = check_choice("lr_scaling", lr_scaling, LR_SCALINGS)
        self.lr_max_scale = check_float("lr_max_scale", lr_max_scale, low=1.0, allow_inf=True)
        self.lr_warmup = check_int("lr_warmup", lr_warmup, low=0)
        self._target = 1.0  # factor of the current batch
        self._start, self._begin = 0.0, 1.0  # the ramp towards it: where, from what

    def target(self, batch: int) -> float:
        """The factor of ``batch`` once the ramp is over."""
        return batch_lr_scale(batch, self.initial_batch, self.lr_scaling, self.lr_max_scale)

    def __call__(self, samples: float, batch: int) -> float:
        new = self.target(batch)
        if new != self._target:  # the batch changed: ramp from where we are now
            self._begin = ramp(samples, self._start, self._begin, self._target, self.lr_warmup)
            self._start, self._target = float(samples), new
        return ramp(samples, self._start, self._begin, self._target, self.lr_warmup)

    def state_dict(self) -> dict[str, Any]:
        return {"target": self._target, "start": self._start, "begin": self._begin}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        values = {k: check_float(f"state[{k!r}]", state[k], low=0.0)
                  for k in ("target", "start", "begin")}  # fmt: skip
        self._target, self._start, self._begin = values["target"], values["start"], values["begin"]
