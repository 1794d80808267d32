"""Adaptive batch sizes in ``secondorder bench``: ``--batch-schedule adaptive:test=norm,...``.

An adaptive run starts at the workload's (or ``--batch-size``'s) batch and grows it with
:class:`secondorder.AdaptiveBatchSize`; it processes **the same examples in the same order**
as the constant-batch run of the same request (steps × batch size; the last step may run
past the end), so it takes fewer, larger steps, and a run whose batch never grows *is* the
constant run. Its learning-rate schedule counts examples (the constant run's schedule, with
"step ``s``" read as "``s · batch`` examples"), times a factor of the batch size when
``lr_scaling`` is ``linear`` or ``sqrt`` (:mod:`secondorder.batching.lr`). The statistics of
the test are computed from per-sample gradients (``torch.func``, in chunks of ``chunk``
examples) at the current weights, before the step, and that work is inside the timed step:
it is part of what the method costs.

Results add, per optimizer: ``batch_schedule``, ``batch_sizes`` and ``lrs`` (per step; the
first param group's lr), ``examples`` (cumulative, per step), ``examples_processed``,
``examples_to_target``; :func:`summary` gives the extra table lines and
:func:`write_batch_plot` the ``batch_size.png`` figure.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..batching import TESTS, AdaptiveBatchSize, BatchLRScaling, IndexStream, SampleCountedLR
from ..batching.persample import flatten_samples, gradient_stats, per_sample_grads
from . import health
from .errors import BenchUsageError
from .optimizers import Built, parse_value
from .progress import Progress
from .training import (
    Plan,
    _backward,
    _evaluate,
    _Timer,
    forward_context,
    lr_factor,
    make_model,
    run_record,
    state_bytes,
)

BATCH_PLOT_FILE = "batch_size.png"
KEYS = ("test", "eta", "theta", "nu", "max_batch", "max_micro_batch", "per_layer", "interval",
        "chunk", "lr_scaling", "lr_max_scale", "lr_warmup")  # fmt: skip
LR_KEYS = ("lr_scaling", "lr_max_scale", "lr_warmup")


@dataclass(frozen=True)
class BatchSchedule:
    """A parsed ``--batch-schedule adaptive:key=value,...``."""

    text: str
    options: dict[str, Any] = field(default_factory=dict)

    def controller(self, initial_batch: int, num_train: int) -> AdaptiveBatchSize:
        kw = {k: v for k, v in self.options.items()
              if k not in ("max_batch", "chunk", *LR_KEYS)}  # fmt: skip
        max_batch = self.options.get("max_batch", num_train)
        try:
            return AdaptiveBatchSize(initial_batch, max_batch, **kw)
        except (ValueError, TypeError) as exc:
            raise BenchUsageError(f"--batch-schedule {self.text!r}: {exc}") from None

    def lr_scaling(self, initial_batch: int) -> BatchLRScaling:
        """The learning rate's factor of the batch size (``lr_scaling=none`` by default)."""
        kw = {k: v for k, v in self.options.items() if k in LR_KEYS}
        if kw.get("lr_scaling", "none") is None:  # the CLI reads "none" as Python's None
            kw["lr_scaling"] = "none"
        try:
            return BatchLRScaling(initial_batch, **kw)
        except (ValueError, TypeError) as exc:
            raise BenchUsageError(f"--batch-schedule {self.text!r}: {exc}") from None

    @property
    def chunk(self) -> int:
        return int(self.options.get("chunk", 64))


def parse_batch_schedule(text: str | None) -> BatchSchedule | None:
    """``None``/``constant`` (a fixed batch) or ``adaptive[:key=value,...]`` with keys
    ``test`` (one of the tests), ``eta``, ``theta``, ``nu``, ``max_batch`` (default: the
    training set), ``max_micro_batch``, ``per_layer``, ``interval``, ``chunk`` (examples per
    per-sample-gradient chunk, default 64), and the learning rate's batch-size policy
    ``lr_scaling`` (``none``, ``linear``, ``sqrt``), ``lr_max_scale`` (cap on the factor,
    default 8), ``lr_warmup`` (examples over which the factor follows a growth, default 0)."""
    if text is None or text.strip() == "constant":
        return None
    kind, _, rest = text.partition(":")
    if kind.strip() != "adaptive":
        raise BenchUsageError(
            f"unknown --batch-schedule {text!r}; valid: constant, adaptive[:test=norm,eta=0.1,...]"
        )
    options: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in KEYS:
            raise BenchUsageError(
                f"cannot parse {item!r} in --batch-schedule {text!r}: expected key=value with "
                f"key one of {', '.join(KEYS)}"
            )
        options[key] = parse_value(value)
    if "test" in options and options["test"] not in TESTS:
        raise BenchUsageError(
            f"--batch-schedule {text!r}: unknown test {options['test']!r}; valid tests: "
            + ", ".join(TESTS)
        )
    if "chunk" in options and not (isinstance(options["chunk"], int) and options["chunk"] >= 1):
        raise BenchUsageError(f"--batch-schedule {text!r}: chunk must be an int >= 1")
    schedule = BatchSchedule(text.strip(), options)
    schedule.controller(1, 1)  # checks every controller argument (names it when bad)
    schedule.lr_scaling(1)  # and the learning-rate policy's
    return schedule


class _Replay:
    """The constant run's example order (``plan.order`` row after row), then a seeded
    stream: an adaptive run sees the same examples in the same order, so one whose batch
    never grows is the constant run, step for step."""

    def __init__(self, order: torch.Tensor, num_train: int, seed: int) -> None:
        self.order, self.pos = order, 0
        self.rest = IndexStream(num_train, seed + 1)

    def take(self, n: int) -> torch.Tensor:
        head = self.order[self.pos : self.pos + n]
        self.pos += head.numel()
        return head if head.numel() == n else torch.cat([head, self.rest.take(n - head.numel())])


def train_run_adaptive(
    plan: Plan,
    build: Callable[[torch.nn.Module], Built],
    label: str,
    progress: Progress | None,
    schedule: BatchSchedule,
    batch_size: int,
    num_train: int,
) -> dict[str, Any]:
    """Train a fresh model with an adaptive batch size; the keys of
    :func:`~secondorder.bench.training.train_run` plus the adaptive ones (module docstring)."""
    workload = plan.workload
    total = plan.order.shape[0] * batch_size
    controller = schedule.controller(batch_size, num_train)
    model = make_model(plan)
    built = build(model)
    optimizer = built.optimizer
    # the constant run's schedule with "step s" read as "s x batch examples processed"
    per_step = lr_factor(plan.schedule, plan.order.shape[0], plan.warmup_steps)
    # times the factor of the batch size (1 unless lr_scaling is set), for the next step's batch
    lr = SampleCountedLR(optimizer, lambda seen: per_step(seen / batch_size),
                         schedule.lr_scaling(batch_size))  # fmt: skip
    stream = _Replay(plan.order.reshape(-1), num_train, plan.seed)

    def loss_of(m: Any, batch: Any) -> torch.Tensor:
        return workload.loss(m, batch)

    timer = _Timer(plan.device)
    losses: list[torch.Tensor] = []
    sizes: list[int] = []
    lrs: list[Any] = []
    examples: list[int] = []
    val: list[dict[str, float]] = []
    samples: list[dict[str, float]] = []
    peak, status, error, seen, step = 0, "ok", None, 0, 0
    eval_examples = plan.eval_every * batch_size
    if progress is not None:
        progress.start(label, plan.order.shape[0])  # in constant-batch steps of examples
    wall_start = time.perf_counter()

    _evaluate(model, workload, val, 0)
    while seen < total:
        step += 1
        bplan = controller.plan
        index = stream.take(bplan.examples_per_step)
        micro = [workload.train_batch(i) for i in index.split(bplan.micro_batch)]
        lr_now = optimizer.param_groups[0]["lr"]  # the lr of this step (a tensor: no sync)
        lrs.append(lr_now.detach().clone() if isinstance(lr_now, torch.Tensor) else lr_now)
        timer.start()
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=plan.device)
        for chunk, idx in zip(micro, index.split(bplan.micro_batch)):
            with forward_context(built):
                loss = workload.loss(model, chunk) * (idx.numel() / index.numel())
            _backward(loss, built)
            loss_sum = loss_sum + loss.detach().float()
        stats = grads = segments = None
        if controller.needs_test:
            batch = workload.train_batch(index)
            if controller.needs_stats_only:
                stats = gradient_stats(model, loss_of, batch, chunk_size=schedule.chunk)
            else:
                grads, segments = flatten_samples(per_sample_grads(model, loss_of, batch,
                                                                   chunk_size=schedule.chunk))
        try:
            optimizer.step()
        except FloatingPointError as exc:
            timer.stop()
            status, error = "diverged", f"step {step}: {exc}"
            break
        timer.stop()
        before = seen
        seen += index.numel()
        losses.append(loss_sum)
        sizes.append(index.numel())
        examples.append(seen)
        controller.update(stats=stats, samples=grads, segments=segments)
        lr.update(seen, controller.batch_size)
        peak = max(peak, state_bytes(optimizer))
        if seen // eval_examples > before // eval_examples or seen >= total:
            _evaluate(model, workload, val, step)
            health_now = health.sample(optimizer)
            if health_now is not None:
                samples.append({"step": step, **health_now})
        if progress is not None:
            for _ in range(seen // batch_size - before // batch_size):
                progress.step()
        latest = float(loss_sum)
        if not math.isfinite(latest):
            status, error = "diverged", f"loss became {latest} at step {step}"
            break
        if progress is not None:
            progress.loss(latest)
    wall = time.perf_counter() - wall_start
    optimizer.zero_grad(set_to_none=True)

    window = max(1, min(plan.window, len(losses) // 20))
    return {
        **run_record(
            built=built, status=status, error=error, losses=losses, timer=timer,
            window=window, val=val, samples=samples, peak=peak, wall=wall, warnings=[],
        ),
        "batch_schedule": schedule.text,
        "smoothing_window": window,
        "batch_sizes": sizes,
        "lrs": [float(x) for x in lrs],
        "examples": examples,
        "examples_processed": seen,
    }


def add_examples_to_target(records: list[dict[str, Any]]) -> None:
    """``examples_to_target`` from ``steps_to_target`` (constant runs: steps × batch)."""
    for r in records:
        hit = r.get("steps_to_target")
        ex = r.get("examples")
        r["examples_to_target"] = None if hit is None or not ex else ex[hit - 1]


def summary(results: dict[str, Any]) -> list[str]:
    """Extra table lines for runs with a batch schedule (empty when there are none)."""
    s = results["settings"]
    if not s.get("batch_schedule"):
        return []
    lines = [f"batch schedule: {s['batch_schedule']} (constant batch {s['batch_size']} runs "
             "the same number of examples)"]  # fmt: skip
    for r in results["optimizers"]:
        if not r.get("steps_run"):
            continue
        sizes = r.get("batch_sizes") or [s["batch_size"]]
        ex = r.get("examples_processed", r["steps_run"] * s["batch_size"])
        tgt = r.get("examples_to_target")
        if tgt is None and r.get("steps_to_target") and not r.get("examples"):
            tgt = r["steps_to_target"] * s["batch_size"]
        lrs = r.get("lrs") or []
        lr_text = f", lr {lrs[0]:.3g} -> {lrs[-1]:.3g}" if lrs else ""
        lines.append(
            f"  {r['label']}: {ex} examples in {r['steps_run']} steps, batch "
            f"{sizes[0]} -> {sizes[-1]}{lr_text}, steps->tgt {r.get('steps_to_target') or '-'}, "
            f"examples->tgt {tgt if tgt is not None else '-'}"
        )
    return lines


def write_batch_plot(results: dict[str, Any], out_dir: str | Path) -> Path | None:
    """``batch_size.png``: batch size, learning rate and loss against examples processed;
    ``None`` when no run had an adaptive batch (or matplotlib is missing)."""
    runs = [(i, r) for i, r in enumerate(results["optimizers"]) if r.get("batch_sizes")]
    if not runs:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4))
    for i, r in runs:
        left.step(r["examples"], r["batch_sizes"], where="post", color=f"C{i % 10}",
                  label=r["label"])  # fmt: skip
        if r.get("lrs"):
            middle.step(r["examples"], r["lrs"], where="post", color=f"C{i % 10}",
                        label=r["label"])  # fmt: skip
        right.plot(r["examples"], r["train_loss_smoothed"], color=f"C{i % 10}", label=r["label"])
    left.set_yscale("log")
    left.set_ylabel("batch size")
    middle.set_ylabel("learning rate")
    right.set_ylabel("train loss")
    for ax in (left, middle, right):
        ax.set_xlabel("examples processed")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{results['workload']['name']}: {results['settings']['batch_schedule']}",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    path = Path(out_dir) / BATCH_PLOT_FILE
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
