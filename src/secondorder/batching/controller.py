"""The adaptive batch-size controller: from gradient-noise statistics to the next batch size.

:func:`next_batch_size` is the rule as a pure function; :class:`AdaptiveBatchSize` holds the
settings (validated once), the current batch size and how it is realised
(:func:`accumulation_plan`: micro-batch × ranks × accumulation steps).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .._validation import check_bool, check_choice, check_int
from ..kernels import batch_tests as K

__all__ = [
    "TESTS",
    "AccumulationPlan",
    "AdaptiveBatchSize",
    "Decision",
    "accumulation_plan",
    "next_batch_size",
    "required_batch_size",
]

#: the batch-size tests; the first two need only merged statistics, the rest per-sample grads
TESTS = ("norm", "coordinate", "inner_product", "orthogonality", "augmented")
STATS_TESTS = ("norm", "coordinate")


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number > 0, got {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def required_batch_size(
    test: str,
    *,
    stats: K.GradStats | None = None,
    samples: torch.Tensor | None = None,
    eta: float = 0.1,
    theta: float = 0.1,
    nu: float = 0.1,
    segments: list[int] | None = None,
) -> float:
    """The batch size ``test`` asks for (a float, possibly ``inf``).

    ``norm`` and ``coordinate`` use ``stats`` (or compute them from ``samples``); the
    inner-product family needs ``samples`` (``[b, d]`` per-sample gradients); ``segments``
    selects their per-layer form.
    """
    check_choice("test", test, TESTS)
    if test in STATS_TESTS:
        if stats is None:
            if samples is None:
                raise ValueError(f"test={test!r} needs stats or samples")
            stats = K.stats_from_samples(samples)
        return K.norm_test(stats, eta) if test == "norm" else K.coordinate_test(stats, eta)
    if samples is None:
        raise ValueError(
            f"test={test!r} needs the per-sample gradients (samples); merged statistics "
            f"(micro-batches, ranks) only support the tests {STATS_TESTS}"
        )
    if test == "inner_product":
        return K.inner_product_test(samples, theta, segments)
    if test == "orthogonality":
        return K.orthogonality_test(samples, nu, segments)
    return K.augmented_test(samples, theta, nu, segments)


def next_batch_size(current: int, required: float, max_batch: int) -> int:
    """``min(max_batch, max(current, ⌈required⌉))``: never shrinks, capped. A NaN
    requirement keeps ``current``; ``inf`` gives ``max_batch``."""
    if math.isnan(required):
        return current
    target = max_batch if required >= max_batch else math.ceil(required)
    return max(current, target)


@dataclass(frozen=True)
class AccumulationPlan:
    """How a batch of ``batch_size`` examples is processed: ``micro_batch`` examples per
    forward/backward on each of ``world_size`` ranks, ``accumulation`` times per optimizer
    step; ``micro_batch · world_size · accumulation >= batch_size``."""

    batch_size: int
    micro_batch: int
    world_size: int
    accumulation: int

    @property
    def examples_per_step(self) -> int:
        return self.micro_batch * self.world_size * self.accumulation


def accumulation_plan(
    batch_size: int, world_size: int = 1, max_micro_batch: int | None = None
) -> AccumulationPlan:
    """The fewest accumulation steps that keep each micro-batch within ``max_micro_batch``,
    then the smallest micro-batch that covers ``batch_size``."""
    check_int("batch_size", batch_size, low=1)
    check_int("world_size", world_size, low=1)
    per_rank = -(-batch_size // world_size)
    accum = 1
    if max_micro_batch is not None:
        check_int("max_micro_batch", max_micro_batch, low=1)
        accum = -(-per_rank // max_micro_batch)
    micro = -(-batch_size // (world_size * accum))
    return AccumulationPlan(batch_size, micro, world_size, accum)


@dataclass(frozen=True)
class Decision:
    """One controller update: what the test required and the batch size chosen."""

    step: int
    required: float
    batch_size: int
    grew: bool


class AdaptiveBatchSize:
    """Adaptive batch size: grow the batch when the gradient noise says so.

    Args:
        initial_batch: starting (global) batch size ``b_0 >= 1``.
        max_batch: cap ``>= initial_batch`` (e.g. the training-set size).
        test: ``"norm"`` (default), ``"coordinate"``, ``"inner_product"``,
            ``"orthogonality"`` or ``"augmented"`` (inner product and orthogonality).
        eta: tolerance of the norm and coordinate-wise tests (``> 0``; smaller is stricter,
            i.e. larger batches).
        theta: tolerance of the inner-product test (``> 0``).
        nu: tolerance of the orthogonality test (``> 0``).
        per_layer: compute the inner-product family layer by layer and sum (parity with
            the authors' code); ``False`` (default) uses the whole gradient vector.
        max_micro_batch: largest micro-batch per rank and forward/backward; larger batches
            are realised by gradient accumulation (``None``: no limit).
        world_size: data-parallel ranks (default: the initialised process group's size,
            else 1).
        interval: run the test every ``interval`` optimizer steps.

    ``update(...)`` returns the next batch size; ``plan`` says how to realise it. The
    batch size never decreases and never exceeds ``max_batch``; once at the cap the test
    is no longer needed (``needs_test`` is ``False``).
    """

    def __init__(
        self,
        initial_batch: int,
        max_batch: int,
        test: str = "norm",
        eta: float = 0.1,
        theta: float = 0.1,
        nu: float = 0.1,
        *,
        per_layer: bool = False,
        max_micro_batch: int | None = None,
        world_size: int | None = None,
        interval: int = 1,
    ) -> None:
        check_int("initial_batch", initial_batch, low=1)
        check_int("max_batch", max_batch, low=1)
        if max_batch < initial_batch:
            raise ValueError(
                f"max_batch ({max_batch}) must be >= initial_batch ({initial_batch}): the "
                "batch size only grows"
            )
        check_choice("test", test, TESTS)
        self.eta = _check_positive("eta", eta)
        self.theta = _check_positive("theta", theta)
        self.nu = _check_positive("nu", nu)
        check_bool("per_layer", per_layer)
        if max_micro_batch is not None:
            check_int("max_micro_batch", max_micro_batch, low=1)
        if world_size is None:
            dist = torch.distributed
            world_size = (
                dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            )
        check_int("world_size", world_size, low=1)
        check_int("interval", interval, low=1)
        self.initial_batch, self.max_batch, self.test = initial_batch, max_batch, test
        self.per_layer, self.max_micro_batch = per_layer, max_micro_batch
        self.world_size, self.interval = world_size, interval
        self.batch_size = initial_batch
        self.steps = 0
        self.history: list[Decision] = []
        self._warned_nan = False

    @property
    def needs_stats_only(self) -> bool:
        """``True`` when the test works on merged statistics (micro-batches, ranks)."""
        return self.test in STATS_TESTS

    @property
    def needs_test(self) -> bool:
        """Whether the next step should compute the test's statistics."""
        return self.batch_size < self.max_batch and self.steps % self.interval == 0

    @property
    def plan(self) -> AccumulationPlan:
        return accumulation_plan(self.batch_size, self.world_size, self.max_micro_batch)

    def update(
        self,
        stats: K.GradStats | None = None,
        samples: torch.Tensor | None = None,
        segments: list[int] | None = None,
    ) -> int:
        """Count one optimizer step and, when the test is due, grow the batch size from the
        statistics (or ``[b, d]`` per-sample gradients). Returns the next batch size."""
        due = self.needs_test
        self.steps += 1
        if not due or (stats is None and samples is None):
            return self.batch_size
        required = required_batch_size(
            self.test, stats=stats, samples=samples, eta=self.eta, theta=self.theta,
            nu=self.nu, segments=segments if self.per_layer else None,
        )  # fmt: skip
        if math.isnan(required) and not self._warned_nan:
            self._warned_nan = True
            warnings.warn(
                "AdaptiveBatchSize: the batch-size test gave NaN (non-finite gradients?); "
                "the batch size is kept", RuntimeWarning, stacklevel=2,
            )  # fmt: skip
        new = next_batch_size(self.batch_size, required, self.max_batch)
        self.history.append(Decision(self.steps, required, new, new > self.batch_size))
        self.batch_size = new
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        b = check_int("batch_size", state["batch_size"], low=1)
        if not self.initial_batch <= b <= self.max_batch:
            raise ValueError(
                f"loaded batch_size {b} is outside [initial_batch, max_batch] = "
                f"[{self.initial_batch}, {self.max_batch}]"
            )
        self.batch_size, self.steps = b, check_int("steps", state["steps"], low=0)
