"""``secondorder bench``'s orchestration: check everything the user asked for, then train
each optimizer (each value of a ``--sweep``) in turn and compare them.

Everything that can be wrong with a request (names, values, devices, output) is found
before the first training step; a run that fails later is recorded, not fatal. Results are
reported through ``on_update`` each time an optimizer finishes, so that an interrupted
benchmark keeps what it finished. The training loop itself is in :mod:`.training`.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch

from .adaptive import add_examples_to_target, parse_batch_schedule, train_run_adaptive
from .errors import BenchUsageError
from .optimizers import (
    OptimizerSpec,
    OptimizerUnavailable,
    build_optimizer,
    parse_spec,
    parse_value,
)
from .parallel import Ranks, RunRefused, check_parallel, launch
from .progress import Progress
from .training import (  # noqa: F401  (re-exported: the runner's building blocks)
    Plan,
    batch_order,
    lr_factor,
    make_model,
    smooth,
    state_bytes,
    train_run,
)
from .workloads import DEFAULT_WORKLOAD, Workload, get_workload

SCHEDULES = ("constant", "warmup-linear")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


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
    sweep: str | None = None  # "key=v1,v2,...": each optimizer at its best value
    batch_schedule: str | None = None  # "adaptive:test=norm,eta=0.1" (see .adaptive)
    parallel: str = "none"  # "ddp" or "fsdp2": data-parallel over ``nproc`` ranks (.parallel)
    nproc: int | None = None  # ranks of --parallel (default 2; torchrun: its WORLD_SIZE)


@dataclass(frozen=True)
class Sweep:
    """A parsed ``--sweep key=v1,v2,...``."""

    key: str
    values: tuple[Any, ...]
    text: str


# ------------------------------------------------------------------------- checking
def resolve_device(name: str) -> torch.device:
    """The torch device for ``--device`` (``auto``: CUDA when available, else CPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    valid = "auto, cpu, cuda, cuda:N, mps, xpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise BenchUsageError(f"invalid --device {name!r}; valid: {valid}") from None
    if device.type not in DEVICE_TYPES:
        raise BenchUsageError(f"--device {name} cannot train a model here; valid: {valid}")
    if device.type == "cpu":
        return device
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    available = backend is not None and backend.is_available()
    if not available:
        raise BenchUsageError(f"--device {name} requested but {device.type} is not available")
    if device.type in ("cuda", "xpu") and device.index is not None:
        count = backend.device_count()  # type: ignore[union-attr]
        if device.index >= count:
            raise BenchUsageError(f"--device {name}: only {count} {device.type} device(s)")
    return device


def parse_sweep(text: str) -> Sweep:
    """``key=v1,v2,...`` with at least two finite values."""
    key, eq, rest = text.partition("=")
    key = key.strip()
    example = "e.g. --sweep lr=1e-4,3e-4,1e-3"
    if not eq or not key.isidentifier():
        raise BenchUsageError(f"cannot parse --sweep {text!r}: expected key=v1,v2,..., {example}")
    values = tuple(parse_value(v) for v in rest.split(",") if v.strip())
    if len(values) < 2:
        raise BenchUsageError(f"--sweep {text!r} needs at least two values, {example}")
    for v in values:
        if isinstance(v, str) or (isinstance(v, float) and not math.isfinite(v)):
            raise BenchUsageError(f"--sweep {text!r}: {v!r} is not a finite number, {example}")
    if len(set(values)) != len(values):
        raise BenchUsageError(f"--sweep {text!r} repeats a value")
    return Sweep(key, values, text)


def _check_config(config: BenchConfig, workload_cls: type[Workload]) -> None:
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
    for name, value in (("target-loss", config.target_loss), ("warmup", config.warmup)):
        if value is not None and not math.isfinite(value):
            raise BenchUsageError(f"--{name} must be a finite number, got {value}")
    if config.warmup is not None and config.warmup < 0:
        raise BenchUsageError(f"--warmup must be >= 0, got {config.warmup}")
    if config.data_dir is not None and not workload_cls.needs_data_dir:
        readers = ", ".join(n for n, c in _workloads().items() if c.needs_data_dir)
        raise BenchUsageError(
            f"--data-dir is not used by {workload_cls.name}, which has its data built in "
            f"(workloads that read --data-dir: {readers})"
        )


def _workloads() -> dict[str, type[Workload]]:
    from .workloads import workload_names

    return {n: get_workload(n) for n in workload_names()}


def _check_specs(specs: list[OptimizerSpec]) -> None:
    seen: dict[tuple[str, str], str] = {}
    for spec in specs:
        key = (spec.name, repr(sorted(spec.overrides.items(), key=lambda kv: kv[0])))
        if key in seen:
            raise BenchUsageError(
                f"the same optimizer is given twice (--opt {seen[key]} and --opt {spec.text}); "
                "give each one once"
            )
        seen[key] = spec.text


@dataclass
class _Run:
    """One training run to do: an optimizer spec, possibly at one value of the sweep."""

    spec: OptimizerSpec  # with the sweep value applied
    base: OptimizerSpec  # as given by --opt
    value: Any = None  # the sweep value, if swept


def _plan_runs(specs: list[OptimizerSpec], sweep: Sweep | None) -> list[list[_Run]]:
    """Runs grouped by optimizer. A spec that fixes the swept hyperparameter runs once."""
    groups = []
    for spec in specs:
        if sweep is None or sweep.key in spec.overrides:
            groups.append([_Run(spec, spec)])
        else:
            groups.append(
                [_Run(spec.with_overrides({sweep.key: v}, spec.label), spec, v)
                 for v in sweep.values]  # fmt: skip
            )
    return groups


# ----------------------------------------------------------------------- comparing
def _record(run: _Run, measured: dict[str, Any] | None, status: str, error: str | None):
    base = {"name": run.spec.name, "label": run.base.label, "spec": run.base.text,
            "status": status, "error": error}  # fmt: skip
    if measured is None:
        return {**base, "hyperparameters": dict(run.spec.overrides), "warnings": []}
    return {**base, **measured, "status": measured["status"] if status == "ok" else status}


def _score(record: dict[str, Any], use_val: bool) -> float:
    if record["status"] != "ok":
        return math.inf
    value = record["final_val_loss"] if use_val else record["final_train_loss"]
    return value if value is not None and math.isfinite(value) else math.inf


def _pick_best(trials: list[dict[str, Any]], runs: list[_Run], sweep: Sweep, use_val: bool):
    """The trial with the lowest final validation (else train) loss; ties: the first."""
    scores = [_score(t, use_val) for t in trials]
    best = min(range(len(trials)), key=lambda i: scores[i])
    chosen = dict(trials[best])
    chosen["sweep"] = {
        "key": sweep.key,
        "chosen": runs[best].value,
        "criterion": "final validation loss" if use_val else "final train loss",
        "trials": [
            {"value": r.value, "status": t["status"], "error": t.get("error"),
             "final_train_loss": t.get("final_train_loss"),
             "final_val_loss": t.get("final_val_loss")}
            for r, t in zip(runs, trials)
        ],
    }  # fmt: skip
    return chosen


def _add_comparisons(records: list[dict[str, Any]], target: float | None) -> tuple[Any, Any]:
    """Ratios to the first optimizer that ran, and steps/seconds to the target loss."""
    ran = [r for r in records if r["status"] in ("ok", "diverged") and r.get("steps_run")]
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
def _warn_if_busy(device: torch.device, progress: Progress) -> None:
    """CPU timings with several threads are badly skewed when the machine is already busy."""
    if device.type != "cpu" or not hasattr(os, "getloadavg") or torch.get_num_threads() == 1:
        return
    load = os.getloadavg()[0]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if cpus and load > cpus:
        progress.note(
            f"secondorder bench: note: the machine is busy (load {load:.1f} on {cpus} CPUs); "
            f"timings with {torch.get_num_threads()} threads will be noisy and slow, "
            "--threads 1 gives steadier ones"
        )


def check_request(config: BenchConfig) -> tuple[type[Workload], list[OptimizerSpec]]:
    """Everything about the request that can be checked without loading data."""
    workload_cls = get_workload(config.workload)
    _check_config(config, workload_cls)
    specs = [parse_spec(s) for s in (config.optimizers or workload_cls.default_optimizers)]
    _check_specs(specs)
    if config.sweep is not None:
        parse_sweep(config.sweep)
    parse_batch_schedule(config.batch_schedule)
    device = resolve_device(config.device)
    check_parallel(config.parallel, config.nproc,
                   config.batch_size or workload_cls.default_batch_size,
                   config.batch_schedule, device.type)  # fmt: skip
    return workload_cls, specs


def run_benchmark(
    config: BenchConfig,
    stream: TextIO | None = sys.stderr,
    on_update: Callable[[dict[str, Any]], None] | None = None,
    ranks: Ranks | None = None,
) -> dict[str, Any] | None:
    """Run every optimizer of ``config`` on its workload; the content of results.json.

    ``on_update`` gets the results so far each time an optimizer finishes. With
    ``config.parallel`` set, the ranks are launched here (see :mod:`.parallel`; ``on_update``
    must then be picklable) and rank 0's results are returned (``None`` on the other ranks
    of a torchrun launch); ``ranks`` is set only inside a rank."""
    workload_cls, specs = check_request(config)
    if config.parallel != "none" and ranks is None:
        return launch(config, stream, on_update)
    sweep = parse_sweep(config.sweep) if config.sweep is not None else None
    device = resolve_device(config.device)
    previous_threads = torch.get_num_threads()
    threads = config.threads
    if threads is None and device.type == "cpu":
        threads = workload_cls.default_threads
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(config, workload_cls, specs, sweep, device, stream, on_update, ranks)
    finally:
        torch.set_num_threads(previous_threads)


def _settings(config: BenchConfig, workload_cls: type[Workload], per_epoch: int, num_train: int):
    steps: int
    if config.steps is not None:
        steps = config.steps
    elif config.epochs is not None:
        steps = config.epochs * per_epoch
    elif workload_cls.default_steps is not None:
        steps = workload_cls.default_steps
    else:
        steps = (workload_cls.default_epochs or 1) * per_epoch
    schedule = config.schedule or workload_cls.default_schedule
    warmup = workload_cls.default_warmup if config.warmup is None else config.warmup
    warmup_steps = round(warmup * steps) if warmup < 1 else int(warmup)
    warmup_steps = min(warmup_steps, steps) if schedule == "warmup-linear" else 0
    return steps, schedule, warmup_steps


def _run(
    config: BenchConfig,
    workload_cls: type[Workload],
    specs: list[OptimizerSpec],
    sweep: Sweep | None,
    device: torch.device,
    stream: TextIO | None,
    on_update: Callable[[dict[str, Any]], None] | None,
    ranks: Ranks | None = None,
) -> dict[str, Any]:
    workload = workload_cls(config.data_dir)
    dtype = DTYPES[config.dtype]
    setup = workload.setup(device, dtype)
    batch_size = config.batch_size or workload_cls.default_batch_size
    if batch_size > setup.num_train:
        raise BenchUsageError(
            f"--batch-size {batch_size} exceeds the {setup.num_train} training examples"
        )
    per_epoch = setup.num_train // batch_size
    batch_schedule = parse_batch_schedule(config.batch_schedule)
    trainer = train_run
    if batch_schedule is not None:  # same examples as the constant run, growing batches
        batch_schedule.controller(batch_size, setup.num_train)  # e.g. a cap below the batch
        trainer = functools.partial(train_run_adaptive, schedule=batch_schedule,
                                    batch_size=batch_size, num_train=setup.num_train)
    steps, schedule, warmup_steps = _settings(config, workload_cls, per_epoch, setup.num_train)
    eval_every = config.eval_every or max(1, steps // 20)
    window = max(1, min(per_epoch, steps // 20))
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
        ranks=ranks,
    )
    probe = make_model(plan)
    num_params = sum(p.numel() for p in probe.parameters())
    groups = _plan_runs(specs, sweep)

    def builder(run: _Run):
        return lambda model: build_optimizer(run.spec, model, workload.default_lr(run.spec.name))

    # every optimizer is constructed once before any training: bad hyperparameters fail now
    unavailable: dict[int, str] = {}
    for g, runs in enumerate(groups):
        for run in runs:
            try:
                builder(run)(make_model(plan))
            except OptimizerUnavailable as exc:
                unavailable[g] = str(exc)
            except NotImplementedError as exc:
                unavailable[g] = f"not implemented yet ({exc})"

    result: dict[str, Any] = {
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
            "sweep": None if sweep is None else {"key": sweep.key, "values": list(sweep.values)},
            "target_loss": None,
            "target_source": None,
            "batch_schedule": None if batch_schedule is None else batch_schedule.text,
            "parallel": _parallel_settings(ranks),
        },
        "optimizers": [],
    }
    progress = Progress(stream, sum(len(r) for g, r in enumerate(groups) if g not in unavailable))
    _warn_if_busy(device, progress)
    if ranks is not None:
        progress.note(ranks.describe())
    progress.note(
        f"secondorder bench: {workload_cls.name}, {num_params:,} parameters, "
        f"{plural(steps, 'step')} of batch {batch_size} ({steps / per_epoch:.3g} epochs), "
        f"{config.dtype} on {device}, seed {config.seed}"
    )
    records: list[dict[str, Any]] = result["optimizers"]
    try:
        for g, runs in enumerate(groups):
            if g in unavailable:
                records.append(_record(runs[0], None, "unavailable", unavailable[g]))
            else:
                trials = [_train(plan, run, builder(run), progress, trainer) for run in runs]
                use_val = setup.num_val > 0
                records.append(trials[0] if len(runs) == 1 else
                               _pick_best(trials, runs, sweep, use_val))  # type: ignore[arg-type]
            target, source = _add_comparisons(records, config.target_loss)
            add_examples_to_target(records)
            _add_throughput(records, batch_size, ranks)
            result["settings"]["target_loss"] = target
            result["settings"]["target_source"] = source
            if on_update is not None:
                on_update(result)
    finally:
        progress.close()
    return result


def _train(plan: Plan, run: _Run, build, progress: Progress, trainer=train_run) -> dict[str, Any]:
    """One training run; a run that raises is recorded as ``failed`` and the bench goes on."""
    label = run.base.label
    if run.value is not None:
        label = f"{label} @ {_sweep_key(run)}={run.value}"
    try:
        measured = trainer(plan, build, label, progress)
    except (KeyboardInterrupt, BenchUsageError):
        raise
    except RunRefused as exc:  # every rank failed to build it: an error row, the bench goes on
        progress.finish(f"{label}: failed ({exc}); the other optimizers go on")
        return _record(run, None, "failed", str(exc))
    except Exception as exc:  # noqa: BLE001 - a third-party optimizer may fail in any way
        if plan.ranks is not None:  # the other ranks may wait in a collective: stop them all
            raise
        message = f"{type(exc).__name__}: {exc}"
        progress.finish(f"{label}: failed ({message}); the other optimizers go on")
        return _record(run, None, "failed", message)
    record = _record(run, measured, "ok", None)
    summary = (
        f"{label}: {plural(measured['steps_run'], 'step')}, final train loss "
        f"{_fmt(measured['final_train_loss'])}, {measured['train_seconds']:.3g} s in timed steps"
    )
    if measured["status"] == "diverged":
        summary += f"; diverged ({measured['error']})"
    progress.finish(summary)
    for note in measured["warnings"]:
        progress.note(f"secondorder bench: warning: {note}")
    return record


def _parallel_settings(ranks: Ranks | None) -> dict[str, Any]:
    if ranks is None:
        return {"mode": "none", "ranks": 1, "backend": None, "threads_per_rank": None}
    return ranks.settings()


def _add_throughput(records: list[dict[str, Any]], batch_size: int, ranks: Ranks | None) -> None:
    """Per record: mode, ranks, optimizer bytes per rank (the peak, largest over ranks) and
    global examples per optimizer second."""
    for r in records:
        r["mode"] = "none" if ranks is None else ranks.mode
        r["ranks"] = 1 if ranks is None else ranks.world
        if r["status"] not in ("ok", "diverged") or not r.get("steps_run"):
            r.setdefault("state_bytes_per_rank", None)
            r.setdefault("samples_per_second", None)
            continue
        r["state_bytes_per_rank"] = r["peak_state_bytes"]
        examples = r.get("examples_processed", r["steps_run"] * batch_size)
        seconds = r["train_seconds"]
        r["samples_per_second"] = examples / seconds if seconds else None


def _sweep_key(run: _Run) -> str:
    extra = [k for k in run.spec.overrides if k not in run.base.overrides]
    return extra[0] if extra else "?"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def plural(count: int, noun: str) -> str:
    """``1 step``, ``2 steps``."""
    return f"{count} {noun}" + ("" if count == 1 else "s")
