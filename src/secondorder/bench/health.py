"""Optimizer health over training, from each optimizer's own ``diagnostics()``.

Every ``secondorder`` optimizer offers ``diagnostics()``: a list of records (dicts), one per
preconditioned piece (a Kronecker factor, a block, a layer), whose meaning is documented per
optimizer. The bench samples it at every evaluation point, outside the timed steps, and
reduces each numeric field over all records to one number per sample:

* fields that count events (their name contains ``fail``, ``skip``, ``reject`` or
  ``count``) are **summed**: e.g. ``failures (sum)`` is the number of rejected roots so far;
* every other numeric field is reduced to its **maximum**: e.g. ``root_error (max)`` is the
  worst inverse-root residual, ``lambda_max (max)`` the largest statistic eigenvalue;
* fields naming a record (``param``, ``axis``, ``shape``, ...) are skipped;
* non-finite values are left out of the reduction and counted in ``<field> non-finite``.

``skipped_steps`` (steps dropped because of non-finite gradients, kept by the optimizers of
this package) is added when the optimizer has it. Optimizers without ``diagnostics()``
(``torch.optim``'s) have no health record.

:func:`warm_up_note` tells when a run never got to use its preconditioner, so that a row
that merely repeats its grafting method (e.g. Shampoo before its first root equals AdamW)
is not read as the preconditioner's result.
"""

from __future__ import annotations

import math
from typing import Any

import torch

IDENTITY_FIELDS = frozenset(
    {"param", "index", "group", "axis", "size", "shape", "block_shape", "num_blocks",
     "blocks", "step", "name", "kind", "dim", "dims"}
)  # fmt: skip
COUNT_WORDS = ("fail", "skip", "reject", "count")


def _numbers(value: Any) -> list[float] | None:
    """The numbers in a field value (a number, or a flat list/tuple of numbers)."""
    if isinstance(value, bool):
        return [float(value)]
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, torch.Tensor) and not value.is_complex():
        return [float(v) for v in value.detach().flatten().cpu().tolist()]
    if isinstance(value, (list, tuple)) and value:
        out = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                return None
            out.append(float(v))
        return out
    return None


def summarize(records: list[dict[str, Any]]) -> dict[str, float]:
    """One number per numeric field (see the module docstring)."""
    collected: dict[str, list[float]] = {}
    for record in records:
        for key, value in record.items():
            if key in IDENTITY_FIELDS:
                continue
            numbers = _numbers(value)
            if numbers is not None:
                collected.setdefault(key, []).extend(numbers)
    out: dict[str, float] = {}
    for key, numbers in collected.items():
        finite = [v for v in numbers if math.isfinite(v)]
        counting = any(word in key.lower() for word in COUNT_WORDS)
        if finite:
            reduced = sum(finite) if counting else max(finite)
            out[f"{key} ({'sum' if counting else 'max'})"] = reduced
        if len(finite) < len(numbers):
            out[f"{key} non-finite"] = float(len(numbers) - len(finite))
    return out


def sample(optimizer: torch.optim.Optimizer) -> dict[str, float] | None:
    """The optimizer's health now, or ``None`` when it reports none."""
    values: dict[str, float] = {}
    diagnostics = getattr(optimizer, "diagnostics", None)
    if callable(diagnostics):
        values.update(summarize(list(diagnostics())))
    skipped = getattr(optimizer, "skipped_steps", None)
    if isinstance(skipped, int) and not isinstance(skipped, bool):
        values["skipped_steps"] = float(skipped)
    return values or None


def first_preconditioned_step(optimizer: torch.optim.Optimizer) -> int | None:
    """The first step at which the optimizer uses its preconditioner, for optimizers that
    start with a warm-up on a diagonal method (the ``start_preconditioning_step``
    hyperparameter; where it is ``None``, the first root comes at ``precondition_frequency``)."""
    starts = []
    for group in optimizer.param_groups:
        if "start_preconditioning_step" in group:
            start = group["start_preconditioning_step"]
            if start is None:
                start = group.get("precondition_frequency")
            if isinstance(start, int):
                starts.append(start)
    return min(starts) if starts else None


def warm_up_note(optimizer: torch.optim.Optimizer, steps_run: int, label: str) -> str | None:
    """A warning when few or none of the run's losses come after a preconditioned update.

    The loss of step ``t`` is measured before step ``t``'s update, so with the first
    preconditioned step ``s`` only the losses of steps ``s + 1 ...`` can show its effect."""
    start = first_preconditioned_step(optimizer)
    if start is None or steps_run == 0:
        return None
    after = steps_run - start
    if after <= 0:
        return (
            f"{label} never left its warm-up: its first preconditioned step is {start} and the "
            f"run has {steps_run} steps, so every loss it reports comes from its "
            "grafting/diagonal method (train longer or lower start_preconditioning_step / "
            "precondition_frequency)"
        )
    if after < 0.1 * steps_run:
        return (
            f"{label}: only {after} of {steps_run} losses come after preconditioned updates "
            f"(from step {start} on); its row mostly reflects its warm-up method"
        )
    return None
