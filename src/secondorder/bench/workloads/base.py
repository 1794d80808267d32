"""The interface every benchmark workload implements.

A workload is a data set plus a model and a loss. The runner owns everything else (data
order, timing, schedules, metrics), so a new workload is one small module:

1. subclass :class:`Workload`, set the class attributes, implement the four methods;
2. decorate the class with :func:`secondorder.bench.workloads.register`.

Examples are addressed by integer index so that the runner can draw a deterministic,
seeded order and fetch each batch *before* the timed region starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class Setup:
    """Facts the harness needs from a workload whose data has been loaded."""

    num_train: int
    num_val: int = 0
    info: dict[str, Any] = field(default_factory=dict)  # goes into results.json


class Workload:
    """Base class; see the module docstring."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    default_batch_size: ClassVar[int] = 32
    default_epochs: ClassVar[int | None] = None  # exactly one of these two is set
    default_steps: ClassVar[int | None] = None
    default_schedule: ClassVar[str] = "constant"
    default_warmup: ClassVar[float] = 0.05
    # learning rates to use when an --opt spec gives none (by optimizer name): untuned
    # starting points from short sweeps, not the paper's tuned values; pass lr= to tune
    default_lrs: ClassVar[dict[str, float]] = {}
    default_optimizers: ClassVar[tuple[str, ...]] = ("adamw", "shampoo", "sonew")
    needs_data_dir: ClassVar[bool] = False  # reads --data-dir (others reject it)
    # importable modules the workload needs beyond torch (checked before a run)
    requires: ClassVar[tuple[str, ...]] = ()
    # torch CPU threads when --threads is not given (None: torch's own setting)
    default_threads: ClassVar[int | None] = None

    def __init__(self, data_dir: str | None = None) -> None:
        self.data_dir = data_dir

    # ---------------------------------------------------------------- to implement
    def setup(self, device: torch.device, dtype: torch.dtype) -> Setup:
        """Load the data onto ``device`` (floating data in ``dtype``); called once."""
        raise NotImplementedError

    def make_model(self) -> nn.Module:
        """A freshly initialised model (the runner seeds the RNG before calling this)."""
        raise NotImplementedError

    def train_batch(self, index: torch.Tensor) -> Any:
        """The training batch made of the examples at ``index`` (a 1-d int64 CPU tensor)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Scalar training loss of ``model`` on ``batch`` (differentiable)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ optional
    def validation_loss(self, model: nn.Module) -> float | None:
        """Loss on the held-out split, or ``None`` when the workload has none."""
        return None

    def default_lr(self, optimizer: str) -> float | None:
        return self.default_lrs.get(optimizer)
