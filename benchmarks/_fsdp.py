"""What the FSDP2 benchmark scripts share: the sharded MLP, the ranks, timing, counting.

``bench_fsdp_exact.py``, ``bench_fsdp_muon.py`` and ``bench_fsdp_reduce.py`` each time an
optimizer's ``opt.step()`` on an MLP ``fully_shard``-ed over ``--world`` gloo ranks and
count what its own collectives move. This module holds the parts that are the same:

* :func:`mlp` / :func:`shard` / :func:`sharded_mlp`: the model (Linear + Tanh layers of
  the given widths, seeded) and its sharding (every Linear, then the root);
* :func:`parser`: the command-line options they share;
* :func:`spawn` starts the ranks and returns rank 0's results; a worker calls
  :func:`start` first and :func:`finish` last;
* :class:`Counter`: calls, bytes received and seconds of the collectives an optimizer step
  runs (``all_reduce``, ``all_to_all_single`` and the placement modules' all-gathers),
  while ``on``; FSDP's own collectives are not counted;
* :func:`time_steps`: the median ``opt.step()`` over timed steps after warm-up, and the
  counter's figures per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def parser(doc: str) -> argparse.ArgumentParser:
    """The options every FSDP script takes: ranks, steps, warm-up, batch, threads, JSON."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads-per-rank", type=int, default=1)
    ap.add_argument("--json", default=None)
    return ap


def mlp(sizes: Sequence[int]) -> torch.nn.Sequential:
    """Linear layers of widths ``sizes`` with Tanh between them (seed 0)."""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1])


def shard(model: torch.nn.Sequential, mesh: Any) -> torch.nn.Sequential:
    """``fully_shard`` every Linear of ``model`` on ``mesh``, then the model itself."""
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def sharded_mlp(mesh: Any, sizes: Sequence[int]) -> torch.nn.Sequential:
    return shard(mlp(sizes), mesh)


def start(rank: int, world: int, init_file: str, threads: int) -> Any:
    """In a worker: threads, the gloo group and the 1-d mesh over the ``world`` ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    return init_device_mesh("cpu", (world,))


def finish(rank: int, results: Any, out_path: str) -> None:
    """In a worker: rank 0 writes ``results``; the group goes and the process leaves
    without interpreter teardown (gloo's threads alive can abort it)."""
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def spawn(worker: Callable[..., None], world: int, args: Any) -> Any:
    """Run ``worker(rank, world, init_file, args, out_path)`` on ``world`` ranks; the
    results rank 0 passed to :func:`finish`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        mp.spawn(worker, args=(world, os.path.join(tmp, "init"), args, out), nprocs=world)
        with open(out) as f:
            return json.load(f)


def max_over_ranks(mine: dict[str, Any], world: int) -> dict[str, Any]:
    """Each figure of ``mine``, the largest over the ranks (a collective)."""
    every: list[Any] = [None] * world
    dist.all_gather_object(every, mine)
    return {k: max(r[k] for r in every) for k in mine}


class Counter:
    """Calls, bytes received and seconds of the collectives an optimizer step runs while
    ``on``: ``dist.all_reduce`` (the tensor's bytes), ``dist.all_to_all_single`` (the output's
    bytes) and the ``_all_gather_single`` of each module in ``gathers`` (the output's bytes
    less this rank's own input). Installed for the life of the process."""

    def __init__(self, gathers: Sequence[ModuleType] = ()) -> None:
        self.on = False
        self.reset()
        counter = self

        def counted(fn: Callable[..., Any], received: Callable[..., int]) -> Callable[..., Any]:
            def call(out: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                if not counter.on:
                    return fn(out, *args, **kwargs)
                t0 = time.perf_counter()
                result = fn(out, *args, **kwargs)
                counter.seconds += time.perf_counter() - t0
                counter.calls += 1
                counter.bytes += received(out, *args)
                return result

            return call

        def size(t: torch.Tensor) -> int:
            return t.numel() * t.element_size()

        dist.all_reduce = counted(dist.all_reduce, lambda t, *a: size(t))
        dist.all_to_all_single = counted(dist.all_to_all_single, lambda out, *a: size(out))
        for module in gathers:
            module._all_gather_single = counted(
                module._all_gather_single, lambda out, inp, *a: size(out) - size(inp)
            )

    def reset(self) -> None:
        self.calls, self.bytes, self.seconds = 0, 0, 0.0


def time_steps(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    args: Any,
    gen: torch.Generator,
    counter: Counter | None = None,
) -> dict[str, Any]:
    """``args.warmup`` untimed then ``args.steps`` timed steps on random batches of
    ``args.batch``: the median ``opt.step()`` seconds (``step_s``) and, with a counter, the
    most collectives (``calls``) and bytes (``bytes``) of a step and the median seconds
    spent in them (``collective_s``)."""
    times, calls, received, seconds = [], [], [], []
    width = next(m for m in model.modules() if isinstance(m, torch.nn.Linear)).in_features
    for step in range(args.warmup + args.steps):
        x = torch.randn(args.batch, width, generator=gen)
        opt.zero_grad()
        model(x).square().mean().backward()
        if counter is not None:
            counter.reset()
            counter.on = True
        t0 = time.perf_counter()
        opt.step()
        dt = time.perf_counter() - t0
        if counter is not None:
            counter.on = False
        if step >= args.warmup:
            times.append(dt)
            if counter is not None:
                calls.append(counter.calls)
                received.append(counter.bytes)
                seconds.append(counter.seconds)
    out: dict[str, Any] = dict(step_s=statistics.median(times))
    if counter is not None:
        out.update(calls=max(calls), bytes=max(received), collective_s=statistics.median(seconds))
    return out
