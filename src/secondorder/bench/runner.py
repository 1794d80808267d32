"""The training loop and the metrics of ``secondorder bench``.

Fairness and reproducibility: every optimizer starts from the same initial weights (the
RNG is reseeded before the model is built) and sees the same batches in the same order (a
per-epoch permutation drawn from a generator seeded with ``seed``).

Timing: only ``zero_grad``, forward, backward and ``optimizer.step`` are timed. Fetching
the batch, the LR scheduler, evaluation, state accounting and progress output happen
outside the timed region, and the timed region itself adds no host-device sync: on CUDA
it is measured with events that are read once at the end of the run.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch

from .optimizers import (
    BenchUsageError,
    OptimizerSpec,
    OptimizerUnavailable,
    build_optimizer,
    parse_spec,
)
from .workloads import DEFAULT_WORKLOAD, Workload, get_workload

SCHEDULES = ("constant", "warmup-linear")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class BenchConfig:
    """Everything one ``secondorder bench`` invocation asks for (``None``: workload default)."""

    workload: str = DEFAULT_WORKLOAD
    data_dir: str | None = None
    optimizers: list[str] = field(default_factory=list)
    steps: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    schedule: str | None = None
    warmup: float | None = None
    target_loss: float | None = None
    eval_every: int | None = None
    threads: int | None = None  # torch intra-op threads (None: leave torch's setting)


# -------------------------------------------------------------------------- helpers
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise BenchUsageError(f"invalid --device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchUsageError(f"--device {name} requested but CUDA is not available")
    return device


def lr_factor(schedule: str, total: int, warmup: int) -> Callable[[int], float]:
    """Multiplier of the base LR for 0-based step ``s``: linear warm-up to 1 over ``warmup``
    steps, then linear decay reaching 0 just after the last step."""
    if schedule == "constant":
        return lambda s: 1.0

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return max(0.0, (total - s) / max(1, total - warmup))

    return factor


def batch_order(num_examples: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """``[steps, batch_size]`` example indices: consecutive slices of seeded per-epoch
    permutations (the incomplete last batch of each epoch is dropped)."""
    generator = torch.Generator().manual_seed(seed)
    per_epoch = num_examples // batch_size
    epochs = -(-steps // per_epoch)
    rows = [
        torch.randperm(num_examples, generator=generator)[: per_epoch * batch_size].view(
            per_epoch, batch_size
        )
        for _ in range(epochs)
    ]
    return torch.cat(rows)[:steps]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of distinct tensor storage reachable from ``optimizer.state``."""
    seen: set[tuple[str, int]] = set()
    total = 0
    stack: list[Any] = list(optimizer.state.values())
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            key = (str(item.device), storage.data_ptr())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set)):
            stack.extend(item)
    return total


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values (fewer at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


class _Timer:
    """Per-step durations; CUDA events (read at the end) on GPUs, perf_counter elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.spans: list[Any] = []

    def start(self) -> None:
        if self.cuda:
            self._begin = torch.cuda.Event(enable_timing=True)
            self._begin.record()
        else:
            self._begin = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.spans.append((self._begin, end))
        else:
            self.spans.append(time.perf_counter() - self._begin)

    def seconds(self) -> list[float]:
        if not self.cuda:
            return list(self.spans)
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1000.0 for a, b in self.spans]


class Progress:
    """A plain-text progress line on ``stream`` (rewritten in place on a terminal)."""

    def __init__(self, stream: TextIO | None, label: str, total: int) -> None:
        self.stream, self.label, self.total = stream, label, total
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self.last_print = 0.0
        self.last_decile = -1
        self.start = time.perf_counter()

    def due(self, step: int) -> bool:
        if self.stream is None:
            return False
        if step == self.total:
            return True
        if self.tty:
            return time.perf_counter() - self.last_print > 0.25
        return step * 10 // self.total > self.last_decile

    def show(self, step: int, loss: float, note: str = "") -> None:
        assert self.stream is not None
        self.last_print = time.perf_counter()
        self.last_decile = step * 10 // self.total
        width = 24
        filled = width * step // self.total
        bar = "#" * filled + "." * (width - filled)
        text = (
            f"{self.label:>14} [{bar}] {step}/{self.total} loss {loss:.4g} "
            f"{self.last_print - self.start:.1f}s{note}"
        )
        if self.tty:
            end = "\n" if step == self.total or note else ""
            self.stream.write("\r" + text.ljust(78) + end)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


# ------------------------------------------------------------------------ one optimizer
@dataclass
class Plan:
    """What is shared by every optimizer in one benchmark run."""

    workload: Workload
    order: torch.Tensor
    device: torch.device
    dtype: torch.dtype
    seed: int
    schedule: str
    warmup_steps: int
    eval_every: int
    window: int


def _unavailable(spec: OptimizerSpec, status: str, reason: str) -> dict[str, Any]:
    return {"name": spec.name, "label": spec.label, "spec": spec.text, "status": status,
            "error": reason, "hyperparameters": dict(spec.overrides)}  # fmt: skip


def run_optimizer(plan: Plan, spec: OptimizerSpec, stream: TextIO | None) -> dict[str, Any]:
    """Train a fresh model with one optimizer; the per-optimizer record of results.json."""
    workload, steps = plan.workload, plan.order.shape[0]
    torch.manual_seed(plan.seed)
    model = workload.make_model().to(device=plan.device, dtype=plan.dtype)
    try:
        optimizer, kwargs = build_optimizer(
            spec, model.parameters(), workload.default_lr(spec.name)
        )
    except OptimizerUnavailable as exc:
        return _unavailable(spec, "unavailable", str(exc))
    except NotImplementedError as exc:
        return _unavailable(spec, "unavailable", f"not implemented yet ({exc})")
    factor = lr_factor(plan.schedule, steps, plan.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    # one untimed forward/backward so that the first timed step is not a cold start
    workload.loss(model, workload.train_batch(plan.order[0])).backward()
    optimizer.zero_grad(set_to_none=True)

    timer = _Timer(plan.device)
    progress = Progress(stream, spec.label, steps)
    check_every = 1 if plan.device.type == "cpu" else 50
    losses: list[torch.Tensor] = []
    val: list[dict[str, float]] = []
    peak, status, error = 0, "ok", None
    wall_start = time.perf_counter()

    def evaluate(step: int) -> None:
        if not val or val[-1]["step"] != step:
            model.eval()
            value = workload.validation_loss(model)
            model.train()
            if value is not None:
                val.append({"step": step, "loss": value})

    evaluate(0)
    for step in range(1, steps + 1):
        batch = workload.train_batch(plan.order[step - 1])
        timer.start()
        optimizer.zero_grad(set_to_none=True)
        loss = workload.loss(model, batch)
        loss.backward()
        try:
            optimizer.step()
        except NotImplementedError as exc:
            return _unavailable(spec, "unavailable", f"not implemented yet ({exc})")
        timer.stop()
        losses.append(loss.detach())
        scheduler.step()
        peak = max(peak, state_bytes(optimizer))
        if step % plan.eval_every == 0 or step == steps:
            evaluate(step)
        if step % check_every == 0 or step == steps or progress.due(step):
            latest = float(losses[-1])
            if not math.isfinite(latest):
                status, error = "diverged", f"loss became {latest} at step {step}"
                if stream is not None:
                    progress.show(step, latest, f"  diverged at step {step}")
                break
            if progress.due(step):
                progress.show(step, latest)
    wall = time.perf_counter() - wall_start

    step_seconds = timer.seconds()
    train_loss = [float(v) for v in torch.stack(losses).float().cpu()] if losses else []
    smoothed = smooth(train_loss, plan.window)
    cumulative = []
    acc = 0.0
    for s in step_seconds:
        acc += s
        cumulative.append(acc)
    return {
        "name": spec.name,
        "label": spec.label,
        "spec": spec.text,
        "status": status,
        "error": error,
        "optimizer_class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
        "hyperparameters": kwargs,
        "resolved_hyperparameters": dict(optimizer.defaults),
        "steps_run": len(train_loss),
        "train_loss": train_loss,
        "train_loss_smoothed": smoothed,
        "val_loss": val,
        "step_seconds": step_seconds,
        "cumulative_seconds": cumulative,
        "final_train_loss": smoothed[-1] if smoothed else None,
        "final_val_loss": val[-1]["loss"] if val else None,
        "train_seconds": acc,
        "wall_seconds": wall,
        "mean_step_seconds": acc / len(step_seconds) if step_seconds else None,
        "median_step_seconds": statistics.median(step_seconds) if step_seconds else None,
        "peak_state_bytes": peak,
    }


def _add_comparisons(records: list[dict[str, Any]], target: float | None) -> tuple[Any, Any]:
    """Ratios to the first optimizer that ran, and steps/seconds to the target loss."""
    ran = [r for r in records if r["status"] != "unavailable" and r.get("steps_run")]
    reference = ran[0] if ran else None
    source = "--target-loss"
    if target is None and reference is not None:
        target, source = reference["final_train_loss"], f"final train loss of {reference['label']}"
    for r in ran:
        for key in ("mean", "median"):
            ref = reference[f"{key}_step_seconds"] if reference else None
            mine = r[f"{key}_step_seconds"]
            r[f"{key}_step_ratio"] = mine / ref if ref and mine is not None else None
        hit = None
        if target is not None and math.isfinite(target):
            hit = next((i for i, v in enumerate(r["train_loss_smoothed"]) if v <= target), None)
        r["steps_to_target"] = None if hit is None else hit + 1
        r["seconds_to_target"] = None if hit is None else r["cumulative_seconds"][hit]
    return target, (source if target is not None else None)


# ------------------------------------------------------------------------ the benchmark
def _warn_if_busy(device: torch.device, stream: TextIO) -> None:
    """CPU timings with several threads are badly skewed when the machine is already busy."""
    if device.type != "cpu" or not hasattr(os, "getloadavg") or torch.get_num_threads() == 1:
        return
    load = os.getloadavg()[0]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if cpus and load > cpus:
        stream.write(
            f"secondorder bench: note: the machine is busy (load {load:.1f} on {cpus} CPUs); "
            f"timings with {torch.get_num_threads()} threads will be noisy and slow, "
            "--threads 1 gives steadier ones\n"
        )


def run_benchmark(config: BenchConfig, stream: TextIO | None = sys.stderr) -> dict[str, Any]:
    """Run every optimizer of ``config`` on its workload; the content of results.json."""
    workload_cls = get_workload(config.workload)
    specs = [parse_spec(s) for s in (config.optimizers or workload_cls.default_optimizers)]
    if config.dtype not in DTYPES:
        raise BenchUsageError(f"unknown --dtype {config.dtype!r}; valid: {', '.join(DTYPES)}")
    schedule = config.schedule or workload_cls.default_schedule
    if schedule not in SCHEDULES:
        raise BenchUsageError(f"unknown --schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    counts = {"steps": config.steps, "epochs": config.epochs,
              "batch-size": config.batch_size, "eval-every": config.eval_every,
              "threads": config.threads}  # fmt: skip
    for name, value in counts.items():
        if value is not None and value < 1:
            raise BenchUsageError(f"--{name} must be a positive integer, got {value}")
    if config.steps is not None and config.epochs is not None:
        raise BenchUsageError("give --steps or --epochs, not both")
    device = resolve_device(config.device)
    dtype = DTYPES[config.dtype]
    previous_threads = torch.get_num_threads()
    threads = config.threads
    if threads is None and device.type == "cpu":
        threads = workload_cls.default_threads
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(config, workload_cls, specs, device, dtype, stream)
    finally:
        torch.set_num_threads(previous_threads)


def _run(
    config: BenchConfig,
    workload_cls: type[Workload],
    specs: list[OptimizerSpec],
    device: torch.device,
    dtype: torch.dtype,
    stream: TextIO | None,
) -> dict[str, Any]:
    schedule = config.schedule or workload_cls.default_schedule
    workload = workload_cls(config.data_dir)
    setup = workload.setup(device, dtype)
    batch_size = config.batch_size or workload_cls.default_batch_size
    if batch_size > setup.num_train:
        raise BenchUsageError(
            f"--batch-size {batch_size} exceeds the {setup.num_train} training examples"
        )
    per_epoch = setup.num_train // batch_size
    if config.steps is not None:
        steps = config.steps
    elif config.epochs is not None:
        steps = config.epochs * per_epoch
    elif workload_cls.default_steps is not None:
        steps = workload_cls.default_steps
    else:
        steps = (workload_cls.default_epochs or 1) * per_epoch
    warmup = workload_cls.default_warmup if config.warmup is None else config.warmup
    if warmup < 0:
        raise BenchUsageError(f"--warmup must be >= 0, got {warmup}")
    warmup_steps = round(warmup * steps) if warmup < 1 else int(warmup)
    warmup_steps = min(warmup_steps, steps) if schedule == "warmup-linear" else 0
    eval_every = config.eval_every or max(1, steps // 20)
    window = max(1, min(per_epoch, steps // 20))

    torch.manual_seed(config.seed)
    num_params = sum(p.numel() for p in workload.make_model().parameters())
    plan = Plan(
        workload=workload,
        order=batch_order(setup.num_train, batch_size, steps, config.seed),
        device=device,
        dtype=dtype,
        seed=config.seed,
        schedule=schedule,
        warmup_steps=warmup_steps,
        eval_every=eval_every,
        window=window,
    )
    if stream is not None:
        _warn_if_busy(device, stream)
        stream.write(
            f"secondorder bench: {workload_cls.name}, {num_params:,} parameters, {steps} steps "
            f"of batch {batch_size} ({steps / per_epoch:.3g} epochs), {config.dtype} on "
            f"{device}, seed {config.seed}\n"
        )
    records = [run_optimizer(plan, spec, stream) for spec in specs]
    target, target_source = _add_comparisons(records, config.target_loss)
    return {
        "workload": {
            "name": workload_cls.name,
            "description": workload_cls.description,
            "num_parameters": num_params,
            "num_train": setup.num_train,
            "num_val": setup.num_val,
            "has_validation": setup.num_val > 0,
            **setup.info,
        },
        "settings": {
            "steps": steps,
            "epochs": steps / per_epoch,
            "steps_per_epoch": per_epoch,
            "batch_size": batch_size,
            "seed": config.seed,
            "dtype": config.dtype,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "schedule": schedule,
            "warmup_steps": warmup_steps,
            "eval_every": eval_every,
            "smoothing_window": window,
            "target_loss": target,
            "target_source": target_source,
        },
        "optimizers": records,
    }
