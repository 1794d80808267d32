"""Shampoo on FSDP2 shards: local mode vs exact mode (owners routing vs all-gather).

    python benchmarks/bench_fsdp_exact.py                 # 2 gloo ranks
    python benchmarks/bench_fsdp_exact.py --world 4 --steps 20 --json out.json

Workload: an MLP 784-512-256-128 (weights and biases ``fully_shard``-ed on a 1-d mesh of
``--world`` gloo ranks), random data, Shampoo with ``block_size=--block-size``. Modes:

* ``local``: ``fsdp_mode="local"`` (blocks cut inside each shard);
* ``exact``: ``fsdp_mode="exact"``, gradient entries sent only to their block's owner and
  direction entries only to the rank holding their row (all-to-all; the default);
* ``exact-allgather``: ``fsdp_mode="exact"`` with whole gradients and directions
  all-gathered (``secondorder.placement.fsdp.EXCHANGE = "all_gather"``).

Reported per mode: the optimizer's bytes received per rank and step over its own
collectives (FSDP's reduce-scatter and all-gather are the same in every mode and not
counted; the largest rank), per-rank optimizer state bytes and, of those, the momentum and
graft moments (``memory_diagnostics()["moments"]``; each the largest rank), and the
median time of ``opt.step()`` (the largest rank; after ``--warmup`` steps). The modes run
in one process group, one after another: compare them only within one run. For scale the
summary line gives the moments of the whole model (``2 * 4 * params`` bytes: what exact
mode kept on every rank before it stored only the entries a rank uses) and the bound
``2 * 4 * 2 * params / world`` (rows plus an equal share of the blocks).
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
import secondorder.placement.ddp as ddp_placement
import secondorder.placement.fsdp as fsdp_placement

MODES = ("local", "exact", "exact-allgather")
SIZES = (784, 512, 256, 128)


class _Counter:
    """Bytes received by the optimizer's own collectives while ``on``."""

    def __init__(self) -> None:
        self.on, self.bytes = False, 0
        self._a2a = dist.all_to_all_single
        self._ag = {m: m._all_gather_single for m in (ddp_placement, fsdp_placement)}
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

        def wrap(fn):
            def ag(out, inp, *args, **kwargs):
                if counter.on:
                    counter.bytes += (out.numel() - inp.numel()) * out.element_size()
                return fn(out, inp, *args, **kwargs)

            return ag

        dist.all_to_all_single = a2a
        dist.all_reduce = ar
        for m, fn in self._ag.items():
            m._all_gather_single = wrap(fn)


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
    results = {}
    for mode in MODES:
        fsdp_placement.EXCHANGE = "all_gather" if mode == "exact-allgather" else "owners"
        model = _model(mesh)
        opt = secondorder.Shampoo(
            model.parameters(),
            lr=1e-3,
            block_size=args.block_size,
            precondition_frequency=10,
            start_preconditioning_step=1,
            fsdp_mode="local" if mode == "local" else "exact",
        )
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
        opt.close()
        mine = dict(
            step_s=statistics.median(times),
            received_bytes=max(received),
            state_bytes=opt.state_bytes(),
            moments_bytes=opt.memory_diagnostics()["moments"],
        )
        every = [None] * world
        dist.all_gather_object(every, mine)
        results[mode] = {k: max(r[k] for r in every) for k in mine}
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
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--threads-per-rank", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        init = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(args.world, init, args, out), nprocs=args.world)
        with open(out) as f:
            results = json.load(f)
    numel = sum(a * b + b for a, b in zip(SIZES[:-1], SIZES[1:]))
    mib = 2**20
    print(
        f"world={args.world} params={numel} block_size={args.block_size} (per rank: max); "
        f"moments of the whole model {2 * 4 * numel / mib:.2f} MiB, "
        f"bound 2*4*2*params/world {2 * 4 * 2 * numel / args.world / mib:.2f} MiB"
    )
    print(
        f"{'mode':<16} {'recv KiB/step':>14} {'state MiB':>10} {'moments MiB':>12} "
        f"{'step ms':>9} {'step/local':>11}"
    )
    base = results["local"]["step_s"]
    for mode, r in results.items():
        print(
            f"{mode:<16} {r['received_bytes'] / 1024:>14.1f} {r['state_bytes'] / mib:>10.2f} "
            f"{r['moments_bytes'] / mib:>12.3f} {r['step_s'] * 1e3:>9.2f} "
            f"{r['step_s'] / base:>11.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(world=args.world, params=numel, results=results), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
