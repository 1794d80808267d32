"""Inverse roots computed off the hot path, in a background thread pool.

The math: docs/algorithms.md#asynchronous-roots.

The optimizer hands a *job* -- a function and a snapshot of the statistics it needs -- to
:class:`AsyncRootWorker` and goes on training with the roots it has. At the start of a later
step it asks for the jobs whose results should be installed now (:meth:`~AsyncRootWorker.
collect`) and installs them itself; the worker never touches optimizer state.

Timing, counted in optimizer steps (the worker's ``clock`` is the caller's step counter):

* **bounded staleness** (default): a finished job is installed at the start of the next
  step; a job still running ``max_staleness`` steps after its submission is waited for, so
  no root is ever older than that. The step does not wait otherwise.
* **deterministic** (``delay=k``): a job submitted at step ``t`` is installed at the start
  of step ``t + k`` exactly -- waited for if it is not done, held back if it is done early.
  Training is then reproducible and equal to a synchronous optimizer that installs every
  root ``k`` steps late.

Failures: a job that raises is reported to the caller as the exception (Shampoo keeps the
previous roots, counts a failure per block, warns once per kind of exception with its text,
and applies ``on_root_failure`` after ``max_consecutive_root_failures`` in a row); counters
in :attr:`AsyncRootWorker.counters`.

Snapshots (:func:`snapshot`) are copies: on an accelerator, a non-blocking copy to pinned host
memory plus an event the worker waits on; on the CPU, a clone.

Checkpoints (``Shampoo.state_dict`` at any moment): pending jobs are **waited for, not
installed**, and their results are saved with their submission steps and the step clock
(``state_dict()["async_roots"]``); a loaded optimizer installs them at the very step the
original would have, so a resumed deterministic run is bit-identical to an uninterrupted
one. Loading into a synchronous Shampoo installs them at once; this worker's own pending
jobs are dropped on load.

Lifetime: threads are started on the first submission. The pool is shut down (pending jobs
cancelled, the running one finished, threads joined) by :meth:`~AsyncRootWorker.shutdown`,
when the worker is garbage collected, or at interpreter exit (``weakref.finalize``). Submitted
functions must not reference the optimizer, so that it can be collected while jobs run.
"""

from __future__ import annotations

import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["AsyncRootWorker", "Snapshot", "snapshot"]


@dataclass
class Snapshot:
    """A host copy of a tensor; :meth:`get` waits until the copy has landed."""

    tensor: torch.Tensor
    event: Any = None

    def get(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
        return self.tensor


def snapshot(x: torch.Tensor) -> Snapshot:
    """Copy ``x`` to host memory without blocking the caller.

    CUDA tensors are copied into pinned memory with ``non_blocking=True`` and an event is
    recorded on the current stream; other accelerators are copied synchronously; CPU
    tensors are cloned (the live statistics keep changing).
    """
    if x.device.type == "cuda":
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        host.copy_(x, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return Snapshot(host, event)
    if x.device.type != "cpu":
        return Snapshot(x.to("cpu"))
    return Snapshot(x.detach().clone())


@dataclass
class _Job:
    step: int
    future: Future
    meta: Any


def _shutdown(executor_box: list[ThreadPoolExecutor | None]) -> None:
    ex = executor_box[0]
    if ex is not None:
        executor_box[0] = None
        ex.shutdown(wait=True, cancel_futures=True)


class AsyncRootWorker:
    """A thread pool for root jobs with bounded or deterministic staleness.

    Args:
        workers: number of threads (>= 1).
        max_staleness: in steps (>= 1); a job is waited for once this old.
        delay: deterministic mode: install every job exactly this many steps (>= 1) after
            its submission; ``None`` for bounded-staleness mode.
    """

    def __init__(self, workers: int = 1, max_staleness: int = 1, delay: int | None = None):
        self.workers, self.max_staleness, self.delay = workers, max_staleness, delay
        self._jobs: deque[_Job] = deque()
        self._box: list[ThreadPoolExecutor | None] = [None]
        self._finalizer = weakref.finalize(self, _shutdown, self._box)
        self.counters = dict(
            submitted=0, installed=0, exceptions=0, waits=0, wait_seconds=0.0, max_staleness=0
        )

    # ------------------------------------------------------------------ jobs
    def submit(self, step: int, fn: Callable[..., Any], *args: Any, meta: Any = None) -> None:
        """Run ``fn(*args)`` in the pool; its result (or exception) is returned by
        :meth:`collect` together with ``meta`` at the step the mode allows."""
        if self._box[0] is None:
            self._box[0] = ThreadPoolExecutor(self.workers, thread_name_prefix="secondorder-roots")
        self._jobs.append(_Job(step, self._box[0].submit(fn, *args), meta))
        self.counters["submitted"] += 1

    def add_finished(self, step: int, result: Any, meta: Any = None) -> None:
        """Queue an already computed result (e.g. restored from a checkpoint)."""
        fut: Future = Future()
        fut.set_result(result)
        self._jobs.append(_Job(step, fut, meta))

    def collect(self, step: int) -> list[tuple[Any, Any]]:
        """``(meta, result or exception)`` of every job to install at the start of ``step``,
        in submission order; waits for the jobs the mode says must be installed now."""
        out = []
        while self._jobs:
            job = self._jobs[0]
            age = step - job.step
            if self.delay is not None:
                must = age >= self.delay
                may = must
            else:
                must = age >= self.max_staleness
                may = job.future.done()
            if not may and not must:
                break  # keep submission order: a later job never overtakes an earlier one
            if not job.future.done():
                t0 = time.perf_counter()
                self.counters["waits"] += 1
                _wait(job.future)
                self.counters["wait_seconds"] += time.perf_counter() - t0
            self._jobs.popleft()
            out.append((job.meta, _outcome(job.future)))
            self.counters["installed"] += 1
            self.counters["max_staleness"] = max(self.counters["max_staleness"], age)
        for _, res in out:
            if isinstance(res, BaseException):
                self.counters["exceptions"] += 1
        return out

    def pending(self) -> list[tuple[int, Any, Any]]:
        """Wait for every queued job; return ``(submit step, meta, result or exception)``
        without removing them (for checkpoints: they are installed later as usual)."""
        out = []
        for job in self._jobs:
            _wait(job.future)
            out.append((job.step, job.meta, _outcome(job.future)))
        return out

    def clear(self) -> None:
        """Forget queued jobs (the running one finishes in the background)."""
        for job in self._jobs:
            job.future.cancel()
        self._jobs.clear()

    def __len__(self) -> int:
        return len(self._jobs)

    @property
    def num_threads(self) -> int:
        ex = self._box[0]
        return 0 if ex is None else len(ex._threads)

    def shutdown(self) -> None:
        """Cancel queued jobs, finish the running one and join the threads (idempotent)."""
        self._jobs.clear()
        self._finalizer()


def _wait(fut: Future) -> None:
    try:
        fut.exception()  # blocks until done, never raises the job's exception
    except Exception:  # cancelled
        pass


def _outcome(fut: Future) -> Any:
    if fut.cancelled():
        return RuntimeError("root job was cancelled")
    exc = fut.exception()
    return exc if exc is not None else fut.result()
