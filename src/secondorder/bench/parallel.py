"""``secondorder bench --parallel ddp|fsdp2 --nproc N``: the same benchmark, data-parallel.

Launch. The bench starts ``N`` local processes itself (``torch.multiprocessing``; gloo on
CPU, NCCL with one GPU per rank on CUDA), or, when it already runs under ``torchrun``
(``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set), joins that process group. Every rank runs the
whole benchmark (same checks, same data, same seeded initial weights, same batch order);
rank 0 alone prints, reports progress and writes the results.

Semantics. The global batch is ``--batch-size``: the same examples in the same order as in
the one-process run. It must be divisible by the number of ranks; rank ``r`` takes the
``r``-th of the equal contiguous slices. The workload's loss is a mean over the batch's
examples (true of every built-in workload), so the mean of the ranks' losses is the global
batch's loss, and the mean of their gradients (what DDP's all-reduce and FSDP2's
reduce-scatter compute) is its gradient: the runs differ from one process only in the order
in which the gradient's terms are summed. The reported loss of every step is that mean
(all-reduced, outside the timed step). Validation: every rank evaluates the whole held-out
split (identical parameters, identical numbers); rank 0 reports it.

``ddp`` wraps the model in ``DistributedDataParallel``. ``fsdp2`` applies
``torch.distributed.fsdp.fully_shard`` to every submodule that directly owns parameters,
innermost first, then to the model (a 1-d mesh over the ranks); the optimizer then sees
DTensor shards. An optimizer that refuses them (raises at construction) gives an error row
for that optimizer and the benchmark goes on.

Measured per rank and combined: the peak optimizer state (``state_bytes()`` where the
optimizer has it, which counts this rank's shards, else the walk of its local tensors), the
maximum over ranks is reported; step times are the slowest rank's for each step; throughput
is global examples per optimizer second.

Failures. Ranks agree (one tiny all-reduce per step, outside the timed region) on the loss
and on a ``FloatingPointError`` raised by an optimizer, so a diverged run stops on every rank
at the same step. Any other exception on a rank ends the benchmark with one line naming
the rank (the other processes are stopped); the process group has a timeout, so a rank
waiting for a dead peer never hangs forever.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import pickle
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist
from torch import nn

from .errors import BenchUsageError

MODES = ("none", "ddp", "fsdp2")
TIMEOUT_SECONDS = 900  # a collective that waits this long for a peer fails instead of hanging
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class RankError(RuntimeError):
    """A rank of a ``--parallel`` benchmark failed; the message names the rank."""


class RunRefused(Exception):
    """Every rank failed to build the optimizer (e.g. it refuses DTensor parameters); the
    run becomes an error row and the benchmark goes on."""


# ------------------------------------------------------------------------- checking
def under_torchrun() -> bool:
    """True when this process was started by ``torchrun`` (its rank variables are set)."""
    return all(name in os.environ for name in _TORCHRUN_VARS)


def usable_cores() -> int:
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else (os.cpu_count() or 1)


def world_size(mode: str, nproc: int | None) -> int:
    """Number of ranks: ``WORLD_SIZE`` under torchrun, else ``--nproc`` (default 2)."""
    if mode == "none":
        return 1
    if under_torchrun():
        return int(os.environ["WORLD_SIZE"])
    return 2 if nproc is None else nproc


def threads_per_rank(threads: int | None, world: int) -> int:
    """``--threads`` if given, else the usable cores shared evenly (at least 1)."""
    return threads if threads is not None else max(1, usable_cores() // world)


def check_parallel(
    mode: str, nproc: int | None, batch_size: int, batch_schedule: str | None, device_type: str
) -> None:
    """Reject every ``--parallel``/``--nproc`` combination the bench cannot run."""
    if mode not in MODES:
        raise BenchUsageError(f"unknown --parallel {mode!r}; valid: {', '.join(MODES)}")
    if nproc is not None and nproc < 1:
        raise BenchUsageError(f"--nproc must be a positive integer, got {nproc}")
    if mode == "none":
        if nproc is not None:
            raise BenchUsageError("--nproc needs --parallel ddp or --parallel fsdp2")
        return
    if under_torchrun():
        size = int(os.environ["WORLD_SIZE"])
        if nproc is not None and nproc != size:
            raise BenchUsageError(
                f"--nproc {nproc} does not match torchrun's WORLD_SIZE {size}; omit --nproc "
                "under torchrun"
            )
    world = world_size(mode, nproc)
    if batch_schedule is not None and batch_schedule.split(":")[0].strip() != "constant":
        raise BenchUsageError(
            f"--parallel {mode} cannot run --batch-schedule {batch_schedule} yet (the adaptive "
            "batch controller is single-process); drop one of the two"
        )
    if batch_size % world:
        raise BenchUsageError(
            f"--batch-size {batch_size} is not divisible by the {world} ranks of --parallel "
            f"{mode}: every rank takes an equal contiguous slice of the global batch"
        )
    if device_type not in ("cpu", "cuda"):
        raise BenchUsageError(f"--parallel {mode} runs on cpu or cuda, not on {device_type}")
    if device_type == "cuda" and not under_torchrun() and world > torch.cuda.device_count():
        raise BenchUsageError(
            f"--parallel {mode} --nproc {world} on cuda needs one GPU per rank; "
            f"{torch.cuda.device_count()} visible"
        )


# ------------------------------------------------------------------------ one rank
@dataclass
class Ranks:
    """This process's place in a ``--parallel`` benchmark, and the few collectives the
    training loop needs (all outside the timed step)."""

    mode: str
    rank: int
    world: int
    device: torch.device
    backend: str
    threads: int

    def describe(self) -> str:
        return (
            f"secondorder bench: --parallel {self.mode} over {self.world} processes "
            f"({self.backend}), {self.threads} torch thread(s) per rank, global batch split "
            "into equal contiguous slices"
        )

    def settings(self) -> dict[str, Any]:
        return {"mode": self.mode, "ranks": self.world, "backend": self.backend,
                "threads_per_rank": self.threads}  # fmt: skip

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model as this mode trains it (DDP wrapper, or FSDP2-sharded in place)."""
        if self.mode == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(model, device_ids=ids)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        for module in reversed(list(model.modules())):  # children before their parents
            if module is not model and next(module.parameters(recurse=False), None) is not None:
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def local(self, index: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of the global batch ``index``."""
        per = index.shape[0] // self.world
        return index[self.rank * per : (self.rank + 1) * per]

    def build(self, build: Callable[[nn.Module], Any], model: nn.Module) -> Any:
        """``build(model)`` on every rank; if it fails on any rank, every rank raises
        :class:`RunRefused` with that rank's message (so that no rank trains alone)."""
        message = ""
        built = None
        try:
            built = build(model)
        except Exception as exc:  # noqa: BLE001 - reported, on every rank, as an error row
            cause = exc.__cause__ if isinstance(exc, BenchUsageError) and exc.__cause__ else exc
            message = f"{type(cause).__name__}: {cause}"
        messages: list[str] = [""] * self.world
        dist.all_gather_object(messages, message)
        failed = [(r, m) for r, m in enumerate(messages) if m]
        if failed:
            rank, text = failed[0]
            raise RunRefused(f"under --parallel {self.mode}, rank {rank}: {text}")
        if getattr(built, "create_graph", False):
            raise RunRefused(
                f"--parallel {self.mode} does not support optimizers that differentiate the "
                "gradients again (create_graph) yet"
            )
        return built

    def combine(
        self, loss: torch.Tensor, error: str | None, step: int
    ) -> tuple[torch.Tensor, str | None]:
        """The global batch's loss (mean of the ranks' equal-slice losses) and the error of
        this step if any rank had one (one all-reduce of two numbers)."""
        flag = torch.ones((), device=loss.device) if error else torch.zeros((), device=loss.device)
        both = torch.stack([loss.detach().to(torch.float64), flag.to(torch.float64)])
        dist.all_reduce(both)
        mean = (both[0] / self.world).to(loss.dtype)
        if error is None and bool(both[1] > 0):
            error = f"step {step}: an optimizer raised FloatingPointError on another rank"
        return mean, error

    def drift(self, model: nn.Module, label: str) -> str | None:
        """Under DDP every rank holds the whole model and must keep it identical to the
        others'; a note when the replicas differ at the end of the run (the optimizer's
        update then depended on rank-local data, e.g. activations captured by hooks)."""
        if self.mode != "ddp":
            return None
        with torch.no_grad():
            sums = torch.stack([p.detach().double().sum() for p in model.parameters()])
        high, low = sums.clone(), -sums
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MAX)
        spread = high + low  # max - min over ranks, per parameter
        if not bool((spread != 0).any()):
            return None
        worst = int(spread.argmax())
        return (
            f"{label}: under --parallel ddp the ranks' copies of the model differ at the end "
            f"(parameter {worst}: sums differ by {float(spread[worst]):.3g}); its update used "
            "data that DDP does not synchronise, so this run is not a data-parallel copy of "
            "the one-process run"
        )

    def max_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def slowest(self, seconds: list[float]) -> list[float]:
        """Per step, the slowest rank's duration (every rank ran the same steps)."""
        if not seconds:
            return []
        t = torch.tensor(seconds, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.cpu().tolist()


# ------------------------------------------------------------------------ launching
def _rank_config(config: Any, device: torch.device, threads: int) -> Any:
    return dataclasses.replace(config, device=str(device), threads=threads)


def _init_group(backend: str, rank: int, world: int, init_method: str) -> None:
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=TIMEOUT_SECONDS),
    )  # fmt: skip


def _plan_ranks(config: Any, world: int, rank: int, local_rank: int) -> Ranks:
    from .runner import resolve_device

    device = resolve_device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    threads = threads_per_rank(config.threads, world)
    return Ranks(config.parallel, rank, world, device, backend, threads)


def launch(
    config: Any,
    stream: TextIO | None,
    on_update: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any] | None:
    """Run ``config`` data-parallel; rank 0's results (``None`` on the other torchrun ranks).

    Spawned ranks need ``on_update`` to be picklable (a module-level function or a
    ``functools.partial`` of one); it is called on rank 0 only."""
    if under_torchrun():
        return _torchrun(config, stream, on_update)
    world = world_size(config.parallel, config.nproc)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="secondorder-bench-") as tmp:
        args = (world, tmp, config, stream is not None, on_update)
        try:
            mp.spawn(_spawned, args=args, nprocs=world, join=True)
        except mp.ProcessRaisedException as exc:
            raise _failure(Path(tmp), exc.error_index, str(exc)) from None
        except mp.ProcessExitedException as exc:
            raise _failure(Path(tmp), exc.error_index, str(exc)) from None
        with open(os.path.join(tmp, "result.pkl"), "rb") as f:
            return pickle.load(f)


def _failure(tmp: Path, index: int, fallback: str) -> Exception:
    """The one-line error of the failed rank (its own report, else spawn's)."""
    report = tmp / f"error-{index}.pkl"
    if report.exists():
        kind, text = pickle.loads(report.read_bytes())
        return BenchUsageError(text) if kind == "usage" else RankError(text)
    last = fallback.strip().splitlines()[-1] if fallback.strip() else "exited"
    return RankError(f"rank {index}: {last}")


def _spawned(
    rank: int,
    world: int,
    tmp: str,
    config: Any,
    progress: bool,
    on_update: Callable[[dict[str, Any]], None] | None,
) -> None:
    code = 0
    try:
        if progress and rank == 0:
            _thread_lock_for_tqdm()
        ranks = _plan_ranks(config, world, rank, rank)
        _init_group(ranks.backend, rank, world, f"file://{os.path.join(tmp, 'init')}")
        try:
            result = _run_rank(config, ranks, progress, on_update)
            if rank == 0:
                with open(os.path.join(tmp, "result.pkl"), "wb") as f:
                    pickle.dump(result, f)
            dist.barrier()
        finally:
            dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent in one line
        kind = "usage" if isinstance(exc, BenchUsageError) else "error"
        text = str(exc) if kind == "usage" else _one_line(rank, exc)
        with open(os.path.join(tmp, f"error-{rank}.pkl"), "wb") as f:
            pickle.dump((kind, text), f)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # leave without interpreter teardown: with gloo's threads alive it can abort a process
    # whose work is done
    os._exit(code)


def _one_line(rank: int, exc: BaseException) -> str:
    """``rank R: Type: message (at file:line in function)``, the innermost frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name})"
    message = " ".join(str(exc).split())
    return f"rank {rank}: {type(exc).__name__}: {message}" + (where if frames else "")


def _thread_lock_for_tqdm() -> None:
    """tqdm's default lock is a multiprocessing semaphore, which a rank leaving with
    ``os._exit`` would leak (and Python warns about); a rank has one thread of bars."""
    try:
        from tqdm import tqdm
    except ImportError:  # progress then fails with the usual message
        return
    tqdm.set_lock(threading.RLock())


_JOINED: list[bool] = []  # set once this process joined a torchrun group


def joined_torchrun_group() -> bool:
    """Whether this process joined a torchrun process group (``--parallel`` under torchrun)."""
    return bool(_JOINED)


def _torchrun(config: Any, stream: TextIO | None, on_update: Any) -> dict[str, Any] | None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    ranks = _plan_ranks(config, world, rank, int(os.environ["LOCAL_RANK"]))
    _init_group(ranks.backend, rank, world, "env://")
    _JOINED[:] = [True]
    try:
        try:
            result = _run_rank(config, ranks, stream is not None, on_update)
        except Exception as exc:
            if isinstance(exc, BenchUsageError):
                raise
            raise RankError(_one_line(rank, exc)) from exc
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return result if rank == 0 else None


def _run_rank(
    config: Any, ranks: Ranks, progress: bool, on_update: Callable[[dict[str, Any]], None] | None
) -> dict[str, Any]:
    from .runner import run_benchmark

    lead = ranks.rank == 0
    return run_benchmark(
        _rank_config(config, ranks.device, ranks.threads),
        stream=sys.stderr if progress and lead else None,
        on_update=on_update if lead else None,
        ranks=ranks,
    )
