"""One training run of ``secondorder bench``, and its building blocks.

Fairness and reproducibility: every run starts from the same initial weights (the RNG is
reseeded before the model is built) and sees the same batches in the same order (a
per-epoch permutation drawn from a generator seeded with ``seed``).

Timing ("optimizer seconds"): only ``zero_grad``, the forward pass, the backward pass and
``optimizer.step`` are timed, i.e. everything one training step costs except fetching the
batch. The LR scheduler, evaluation, health sampling, state accounting and progress output
happen outside the timed region, and the timed region itself adds no host-device sync: on
CUDA it is measured with events that are read once at the end of the run.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import health
from .optimizers import Built
from .progress import Progress
from .workloads import Workload

if TYPE_CHECKING:
    from .parallel import Ranks


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
    """Bytes of optimizer state: the optimizer's own ``state_bytes()`` where it has one (the
    optimizers of this package do, and know what they hold), else the bytes of distinct
    tensor storage reachable from ``optimizer.state`` (of a DTensor, this rank's shard)."""
    own = getattr(optimizer, "state_bytes", None)
    if callable(own):
        return int(own())
    seen: set[tuple[str, int]] = set()
    total = 0
    stack: list[Any] = list(optimizer.state.values())
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            item = item.to_local() if hasattr(item, "to_local") else item  # a DTensor: its shard
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


class _Slowest(_Timer):
    """Step durations already combined over the ranks."""

    def __init__(self, seconds: list[float]) -> None:
        self.cuda, self.spans = False, seconds


@dataclass
class Plan:
    """What is shared by every run of one benchmark."""

    workload: Workload
    order: torch.Tensor  # [steps, batch] example indices
    device: torch.device
    dtype: torch.dtype
    seed: int
    schedule: str
    warmup_steps: int
    eval_every: int
    window: int
    ranks: Ranks | None = None  # this process's rank in a --parallel benchmark


def _wants_graph(built: Built) -> bool:
    return built.create_graph and getattr(built.optimizer, "create_graph", False) is True


def forward_context(built: Built) -> Any:
    """Context for the forward pass: when the optimizer differentiates the gradients again
    (``create_graph``), ``scaled_dot_product_attention`` is restricted to its math backend,
    the one with double-backward support (the fused CPU/GPU kernels have none)."""
    if not _wants_graph(built):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _backward(loss: torch.Tensor, built: Built) -> None:
    """``loss.backward()``, building the graph of the gradients when the optimizer asks for
    it; read before every backward: an optimizer may need the graph only on some steps
    (AdaHessian with ``update_every > 1``)."""
    if not _wants_graph(built):
        loss.backward()
        return
    with warnings.catch_warnings():
        # torch warns that grads built with a graph reference their parameters (a cycle);
        # the loop sets every grad to None before the next backward, which breaks it
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        loss.backward(create_graph=True)


def _evaluate(model: nn.Module, workload: Any, val: list[dict[str, float]], step: int) -> None:
    """Append the validation loss at ``step`` to ``val`` (once per step; none if the
    workload has no validation split)."""
    if not val or val[-1]["step"] != step:
        model.eval()
        value = workload.validation_loss(model)
        model.train()
        if value is not None:
            val.append({"step": step, "loss": value})


def run_record(
    *,
    built: Built,
    status: str,
    error: str | None,
    losses: list[torch.Tensor],
    timer: _Timer,
    window: int,
    val: list[dict[str, float]],
    samples: list[dict[str, float]],
    peak: int,
    wall: float,
    warnings: list[str],
) -> dict[str, Any]:
    """The measured part of a results.json record, from what a training loop collected."""
    optimizer = built.optimizer
    step_seconds = timer.seconds()[: len(losses)]
    train_loss = [float(v) for v in torch.stack(losses).float().cpu()] if losses else []
    smoothed = smooth(train_loss, window)
    cumulative, acc = [], 0.0
    for s in step_seconds:
        acc += s
        cumulative.append(acc)
    return {
        "status": status,
        "error": error,
        "optimizer_class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
        "hyperparameters": built.kwargs,
        "resolved_hyperparameters": dict(optimizer.defaults),
        "create_graph": built.create_graph,
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
        "health": samples,
        "warnings": warnings,
    }


def _index(plan: Plan, step: int) -> torch.Tensor:
    """Example indices of 0-based ``step``: the global batch, or this rank's slice of it."""
    index = plan.order[step]
    return index if plan.ranks is None else plan.ranks.local(index)


def make_model(plan: Plan) -> nn.Module:
    torch.manual_seed(plan.seed)
    return plan.workload.make_model().to(device=plan.device, dtype=plan.dtype)


def train_run(
    plan: Plan,
    build: Callable[[nn.Module], Built],
    label: str,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train a fresh model with the optimizer that ``build`` makes for it.

    Returns the measured part of a results.json record: status (``ok`` or ``diverged``),
    losses, step times, peak state bytes, health samples and warnings.
    """
    workload, steps, ranks = plan.workload, plan.order.shape[0], plan.ranks
    model = make_model(plan)
    if ranks is not None:  # DDP / FSDP2; every rank builds, or all report why not
        model = ranks.wrap(model)
        built = ranks.build(build, model)
    else:
        built = build(model)
    optimizer = built.optimizer
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(plan.schedule, steps, plan.warmup_steps)
    )

    # one untimed forward/backward so that the first timed step is not a cold start
    with forward_context(built):
        warm = workload.loss(model, workload.train_batch(_index(plan, 0)))
    _backward(warm, built)
    optimizer.zero_grad(set_to_none=True)

    timer = _Timer(plan.device)
    check_every = 1 if plan.device.type == "cpu" else 50
    losses: list[torch.Tensor] = []
    val: list[dict[str, float]] = []
    samples: list[dict[str, float]] = []
    peak, status, error = 0, "ok", None
    if progress is not None:
        progress.start(label, steps)
    wall_start = time.perf_counter()

    _evaluate(model, workload, val, 0)
    for step in range(1, steps + 1):
        batch = workload.train_batch(_index(plan, step - 1))
        timer.start()
        optimizer.zero_grad(set_to_none=True)
        with forward_context(built):
            loss = workload.loss(model, batch)
        _backward(loss, built)
        failure = None
        try:
            optimizer.step()
        except FloatingPointError as exc:  # an optimizer told to raise on non-finite input
            failure = f"step {step}: {exc}"
        timer.stop()
        loss = loss.detach()
        if ranks is not None:  # the global batch's loss; every rank stops if any failed
            loss, failure = ranks.combine(loss, failure, step)
        if failure is not None:
            status, error = "diverged", failure
            break
        losses.append(loss)
        scheduler.step()
        peak = max(peak, state_bytes(optimizer))
        if step % plan.eval_every == 0 or step == steps:
            _evaluate(model, workload, val, step)
            health_now = health.sample(optimizer)
            if health_now is not None:
                samples.append({"step": step, **health_now})
        if progress is not None:
            progress.step()
        if step % check_every == 0 or step == steps:
            latest = float(losses[-1])
            if not math.isfinite(latest):
                status, error = "diverged", f"loss became {latest} at step {step}"
                break
            if progress is not None:
                progress.loss(latest)
    wall = time.perf_counter() - wall_start
    optimizer.zero_grad(set_to_none=True)  # drop a create_graph graph held by the grads
    if ranks is not None:  # the largest state of any rank, the slowest rank of every step
        peak = ranks.max_int(peak)
        timer = _Slowest(ranks.slowest(timer.seconds()))

    notes = [n for n in [health.warm_up_note(optimizer, len(losses), label)] if n]
    if ranks is not None:
        notes += [n for n in [ranks.drift(model, label)] if n]
    return run_record(
        built=built, status=status, error=error, losses=losses, timer=timer,
        window=plan.window, val=val, samples=samples, peak=peak, wall=wall, warnings=notes,
    )
