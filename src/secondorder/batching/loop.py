"""Training-loop plumbing for adaptive batch sizes: the data loader that follows the
controller, and a learning-rate schedule that counts examples instead of steps.

With a growing batch, "step 1000" means very different amounts of training from run to
run, so warm-up, decay and the stopping rule are expressed in examples processed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .controller import AccumulationPlan, AdaptiveBatchSize
from .lr import BatchLRScaling

__all__ = ["AdaptiveBatchLoop", "IndexStream", "SampleCountedLR", "linear_warmup_decay"]


class IndexStream:
    """An endless stream of example indices: consecutive seeded permutations (epochs), so
    that every example is seen once per epoch whatever the batch sizes are."""

    def __init__(self, num_examples: int, seed: int = 0) -> None:
        if num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {num_examples}")
        self.num_examples = num_examples
        self.generator = torch.Generator().manual_seed(seed)
        self._buf = torch.empty(0, dtype=torch.long)
        self.epochs = 0

    def take(self, n: int) -> torch.Tensor:
        while self._buf.numel() < n:
            perm = torch.randperm(self.num_examples, generator=self.generator)
            self._buf = torch.cat([self._buf, perm])
            self.epochs += 1
        out, self._buf = self._buf[:n], self._buf[n:]
        return out


def linear_warmup_decay(warmup_samples: int, total_samples: int) -> Callable[[int], float]:
    """LR multiplier of the number of examples processed: linear warm-up to 1 over
    ``warmup_samples``, then linear decay to 0 at ``total_samples``."""
    if not 0 <= warmup_samples <= total_samples or total_samples < 1:
        raise ValueError(
            f"need 0 <= warmup_samples <= total_samples and total_samples >= 1, got "
            f"warmup_samples={warmup_samples}, total_samples={total_samples}"
        )

    def factor(samples: int) -> float:
        if samples < warmup_samples:
            return (samples + 1) / warmup_samples
        return max(0.0, (total_samples - samples) / max(1, total_samples - warmup_samples))

    return factor


class SampleCountedLR:
    """Sets every param group's ``lr`` to ``base_lr · factor(samples) · scale``; call
    :meth:`update` with the number of examples processed so far (and, with
    ``batch_scaling``, the batch size of the next step).

    ``scale`` is 1, or ``batch_scaling(samples, batch)`` (:class:`~.lr.BatchLRScaling`: the
    learning rate follows the batch size). ``base_lr`` is each group's ``lr`` at
    construction."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        factor: Callable[[int], float],
        batch_scaling: BatchLRScaling | None = None,
    ) -> None:
        if batch_scaling is not None and not isinstance(batch_scaling, BatchLRScaling):
            raise TypeError(
                f"batch_scaling must be a BatchLRScaling or None, got "
                f"{type(batch_scaling).__name__}"
            )
        self.optimizer, self.factor, self.batch_scaling = optimizer, factor, batch_scaling
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.scale = 1.0
        self.update(0, None if batch_scaling is None else batch_scaling.initial_batch)

    def update(self, samples: int, batch_size: int | None = None) -> None:
        if self.batch_scaling is not None:
            if batch_size is None:
                raise ValueError("SampleCountedLR with batch_scaling: update() needs batch_size")
            self.scale = self.batch_scaling(samples, batch_size)
        f = self.factor(samples) * self.scale
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(base * f)
            else:
                group["lr"] = base * f


class AdaptiveBatchLoop:
    """Owns the data order, the ``DataLoader`` (rebuilt whenever the micro-batch size
    changes) and the example count, for one data-parallel rank.

    Each :meth:`next_step` returns this rank's micro-batches of the next optimizer step
    (``plan.accumulation`` of them, ``plan.micro_batch`` examples each); after the step,
    :meth:`finish_step` gives the controller its statistics, counts the examples and moves
    the sample-counted LR schedule.
    """

    def __init__(
        self,
        dataset: Dataset,
        controller: AdaptiveBatchSize,
        *,
        rank: int = 0,
        seed: int = 0,
        lr_schedule: SampleCountedLR | None = None,
        **loader_kwargs: Any,
    ) -> None:
        if not 0 <= rank < controller.world_size:
            raise ValueError(f"rank must be in [0, {controller.world_size}), got {rank}")
        self.dataset, self.controller, self.rank = dataset, controller, rank
        self.stream = IndexStream(len(dataset), seed)  # type: ignore[arg-type]
        self.lr_schedule = lr_schedule
        self.loader_kwargs = loader_kwargs
        self.samples = 0
        self.loader_rebuilds = 0
        self._loader: DataLoader | None = None
        self._plan: AccumulationPlan | None = None

    def _batches(self, plan: AccumulationPlan) -> Iterator[list[int]]:
        """This rank's micro-batches, step after step, under a fixed ``plan``."""
        while True:
            indices = self.stream.take(plan.examples_per_step)
            mine = indices.view(plan.world_size, -1)[self.rank].view(plan.accumulation, -1)
            yield from (row.tolist() for row in mine)

    def next_step(self) -> list[Any]:
        """This rank's micro-batches for the next optimizer step.

        The loader is rebuilt when the plan changes. With ``num_workers > 0`` a loader
        prefetches: the examples it had drawn ahead are dropped at a rebuild (the order
        stays seeded and identical across ranks, which is what data parallelism needs)."""
        plan = self.controller.plan
        if self._loader is None or plan != self._plan:
            self._loader = DataLoader(
                self.dataset, batch_sampler=self._batches(plan), **self.loader_kwargs
            )
            self._iter = iter(self._loader)
            self._plan = plan
            self.loader_rebuilds += 1
        return [next(self._iter) for _ in range(plan.accumulation)]

    def finish_step(self, stats: Any = None, samples: torch.Tensor | None = None) -> int:
        """Count the step's examples, update the controller and the LR (for the next step's
        batch size); the next batch size."""
        assert self._plan is not None, "finish_step() before next_step()"
        self.samples += self._plan.examples_per_step
        b = self.controller.update(stats=stats, samples=samples)
        if self.lr_schedule is not None:
            self.lr_schedule.update(self.samples, b)
        return b
