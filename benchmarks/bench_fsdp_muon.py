"""Muon on FSDP2 shards: gather-to-owner (exact, the default) vs two alternatives.

    python benchmarks/bench_fsdp_muon.py                  # 2 gloo ranks
    python benchmarks/bench_fsdp_muon.py --world 4 --steps 20 --json out.json

Workload: an MLP 784-512-512-512-128 (weights and biases ``fully_shard``-ed on a 1-d mesh
of ``--world`` gloo ranks), random data, ``Muon(model.parameters())`` (every weight matrix
orthogonalised). Modes, one after another in one process group:

* ``owners``: what Muon does (``secondorder.placement.gather``): each sharded matrix is
  sent to one owner rank (all-to-all), orthogonalised there, and its rows sent back;
* ``allgather``: every rank all-gathers every whole matrix and orthogonalises all of them
  itself, keeping its rows (also exact; ``S`` times the Newton-Schulz work per rank);
* ``shard-local``: Newton-Schulz of each rank's rows alone (not Muon: the shards'
  orthogonalisation differs from the matrix's; no communication; a lower bound on time).

Reported per mode: bytes received per rank and step by the optimizer's own collectives
(FSDP's own traffic is the same in every mode and not counted; the largest rank), and the
median time of ``opt.step()`` (the largest rank, after ``--warmup`` steps), also as a ratio
to ``owners``. Compare only within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import secondorder
import secondorder.optim.muon as muon_module
import secondorder.placement.fsdp as fsdp_placement
from secondorder.placement.gather import apply_whole

MODES = ("owners", "allgather", "shard-local")
SIZES = (784, 512, 512, 512, 128)


def _allgather_whole(items, fn, *, out_dtype=None, cost=None):
    """Every rank gathers every whole matrix and applies ``fn`` to all of them."""
    del cost
    wholes = [
        fsdp_placement.gather_rows(x, pl).reshape(pl.global_shape[0], *x.shape[1:])
        if pl is not None and pl.sharded
        else x
        for x, pl in items
    ]
    outs = fn(wholes)
    return [o[pl.rows()] if pl is not None and pl.sharded else o for o, (_, pl) in zip(outs, items)]


def _shard_local(items, fn, *, out_dtype=None, cost=None):
    del cost
    return list(fn([x for x, _ in items])) if items else []


class _Counter:
    """Bytes received by the collectives Muon's step runs while ``on``."""

    def __init__(self) -> None:
        self.on, self.bytes = False, 0
        self._a2a = dist.all_to_all_single
        self._ag = fsdp_placement._all_gather_single
        self._ar = dist.all_reduce
        counter = self

        def a2a(out, inp, *args, **kwargs):
            if counter.on:
                counter.bytes += out.numel() * out.element_size()
            return counter._a2a(out, inp, *args, **kwargs)

        def ar(t, *args, **kwargs):
            if counter.on:
                counter.bytes += t.numel() * t.element_size()
            return counter._ar(t, *args, **kwargs)

        def ag(out, inp, *args, **kwargs):
            if counter.on:
                counter.bytes += (out.numel() - inp.numel()) * out.element_size()
            return counter._ag(out, inp, *args, **kwargs)

        dist.all_to_all_single = a2a
        dist.all_reduce = ar
        fsdp_placement._all_gather_single = ag


def _model(mesh):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    layers = []
    for a, b in zip(SIZES[:-1], SIZES[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers[:-1])
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _worker(rank, world, init_file, args, out_path):
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(args.threads_per_rank)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    counter = _Counter()
    impl = {"owners": apply_whole, "allgather": _allgather_whole, "shard-local": _shard_local}
    results = {}
    for _ in range(args.repeats):
        for mode in MODES:
            muon_module.apply_whole = impl[mode]
            model = _model(mesh)
            opt = secondorder.Muon(model.parameters(), lr=1e-3)
            gen = torch.Generator().manual_seed(rank)
            times, received = [], []
            for step in range(args.warmup + args.steps):
                x = torch.randn(args.batch, SIZES[0], generator=gen)
                opt.zero_grad()
                model(x).square().mean().backward()
                counter.on, counter.bytes = True, 0
                t0 = time.perf_counter()
                opt.step()
                dt = time.perf_counter() - t0
                counter.on = False
                if step >= args.warmup:
                    times.append(dt)
                    received.append(counter.bytes)
            mine = dict(step_s=statistics.median(times), received_bytes=max(received))
            every = [None] * world
            dist.all_gather_object(every, mine)
            results.setdefault(mode, []).append({k: max(r[k] for r in every) for k in mine})
    muon_module.apply_whole = apply_whole
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="rounds of all modes (interleaved)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads-per-rank", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        init = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(args.world, init, args, out), nprocs=args.world)
        with open(out) as f:
            runs = json.load(f)
    # per mode: the median over repeats of each round's median step time
    results = {
        m: dict(
            step_s=statistics.median(r["step_s"] for r in rs),
            received_bytes=max(r["received_bytes"] for r in rs),
        )
        for m, rs in runs.items()
    }
    weights = sum(a * b for a, b in zip(SIZES[:-1], SIZES[1:]))
    print(f"world={args.world} weight entries N={weights} (per rank: max)")
    print(f"{'mode':<12} {'recv KiB/step':>14} {'step ms':>9} {'step/owners':>12}")
    base = results["owners"]["step_s"]
    for mode, r in results.items():
        print(
            f"{mode:<12} {r['received_bytes'] / 1024:>14.1f} {r['step_s'] * 1e3:>9.2f} "
            f"{r['step_s'] / base:>12.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(world=args.world, weights=weights, results=results, runs=runs), f)


if __name__ == "__main__":
    sys.exit(main())
