"""Run a check in real gloo processes: one helper for every multi-process test.

``run_ranks(check, world, tmp_path, *args)`` starts ``world`` processes; each one sets its
torch threads, joins a gloo process group (file rendezvous in ``tmp_path``), calls
``check(rank, world, tmp, *args)`` and writes what it returns (JSON) to ``rank<r>.json``;
the parent returns the list of those reports, rank by rank.

What every worker needs and is easy to forget, done once here:

* a deadlock guard: a collective that some rank never joins would hang, so after
  ``hang_seconds`` every stack is dumped and the process exits (the test fails);
* ``mark(stage)``: a check may record the stage it reached; when a rank dies, the
  assertion names the stages every rank reached;
* leaving with ``os._exit(0)`` once the checks passed and the process group is gone:
  interpreter teardown with gloo's C++ threads alive can abort the process ("terminate
  called without an active exception", rarely, under load), which would fail a run whose
  checks all passed. A failing check raises before that line and reaches the parent.

The check must be a module-level function (the processes are spawned, not forked).
"""

from __future__ import annotations

import datetime
import faulthandler
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HANG_SECONDS = 400  # deadlock guard only: a healthy 4-rank check takes ~1 min quiet

_STAGE_FILE: list[str] = []


def mark(stage: str) -> None:
    """Record that this rank reached ``stage`` (read back by the parent if a rank dies)."""
    if _STAGE_FILE:
        with open(_STAGE_FILE[0], "a") as f:
            f.write(stage + "\n")


def chosen(names: Any, name: str, where: str | None = None) -> bool:
    """Whether the check ``name`` is among the selected ``names``; if it is, the stage
    (``name``, or ``name:where``) is marked first, so a rank that dies in it is named."""
    if name not in names:
        return False
    mark(name if where is None else f"{name}:{where}")
    return True


def _worker(
    rank: int,
    world: int,
    tmp: str,
    check: Callable[..., Any],
    args: tuple,
    threads: int,
    hang_seconds: float,
    pg_timeout: float,
) -> None:
    torch.set_num_threads(threads)
    _STAGE_FILE[:] = [os.path.join(tmp, f"stages-{rank}.txt")]
    faulthandler.dump_traceback_later(hang_seconds, exit=True)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(tmp, 'init')}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=pg_timeout),
    )
    try:
        report = check(rank, world, tmp, *args)
        mark("barrier")
        dist.barrier()
        with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
            json.dump(report, f)
    finally:
        faulthandler.cancel_dump_traceback_later()
        dist.destroy_process_group()
    mark("done")
    os._exit(0)


def run_ranks(
    check: Callable[..., Any],
    world: int,
    tmp_path: Path,
    *args: Any,
    threads: int = 1,
    hang_seconds: float = HANG_SECONDS,
    pg_timeout: float | None = None,
) -> list[Any]:
    """Run ``check(rank, world, tmp, *args)`` on ``world`` gloo ranks; their reports.

    ``pg_timeout`` (default ``hang_seconds``) bounds each collective: a collective that one
    rank entered alone raises after it."""
    tmp_path = Path(tmp_path)
    limits = (threads, hang_seconds, pg_timeout or hang_seconds)
    try:
        mp.spawn(_worker, args=(world, str(tmp_path), check, args, *limits), nprocs=world)
    except mp.ProcessExitedException as err:
        stages = {}
        for rank in range(world):
            path = tmp_path / f"stages-{rank}.txt"
            stages[rank] = path.read_text().split() if path.exists() else []
        raise AssertionError(f"a rank died ({err}); stages reached per rank: {stages}") from err
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
