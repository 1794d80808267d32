"""AdaGradNorm, SCALE and M-FAC on FSDP2 shards: what their reductions over the shards cost.

    python benchmarks/bench_fsdp_reduce.py                 # 2 gloo ranks
    python benchmarks/bench_fsdp_reduce.py --world 4 --steps 20 --json out.json

Workload: an MLP 784-512-256-128 (weights and biases ``fully_shard``-ed on a 1-d mesh of
``--world`` gloo ranks), random data. For each optimizer (and ``torch.optim.AdamW`` for
scale) it reports, on the shards: the all-reduces per step and their bytes (the shared
non-finite flag included; FSDP's own collectives are not counted), the median time of
``opt.step()`` and of the all-reduces inside it (the largest rank); and, measured on rank 0
alone in the same run, the median ``opt.step()`` of the same optimizer on the whole,
unsharded model. SCALE treats the first layer's weight as an embedding table (its
per-column scale is the one reduced over the shards). Compare numbers only within one run.
"""

from __future__ import annotations

import argparse
import copy
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

SIZES = (784, 512, 256, 128)

CONFIGS = {
    "AdamW (torch)": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
    "AdaGradNorm scalar": lambda m: secondorder.AdaGradNorm(m.parameters(), lr=0.1),
    "AdaGradNorm row": lambda m: secondorder.AdaGradNorm(m.parameters(), lr=0.1, mode="row"),
    "SCALE": lambda m: secondorder.SCALE.from_model(m, embeddings="0", lr=1e-3),
    "M-FAC dense m=8": lambda m: secondorder.MFAC(m.parameters(), num_grads=8),
    "M-FAC blocks 4096 m=8": lambda m: secondorder.MFAC(
        m.parameters(), num_grads=8, block_size=4096
    ),
}


class _Counter:
    """Calls, bytes and seconds of ``dist.all_reduce`` while ``on``."""

    def __init__(self) -> None:
        self.on, self.calls, self.bytes, self.seconds = False, 0, 0, 0.0
        self._ar = dist.all_reduce
        counter = self

        def ar(t, *args, **kwargs):
            if not counter.on:
                return counter._ar(t, *args, **kwargs)
            t0 = time.perf_counter()
            out = counter._ar(t, *args, **kwargs)
            counter.seconds += time.perf_counter() - t0
            counter.calls += 1
            counter.bytes += t.numel() * t.element_size()
            return out

        dist.all_reduce = ar

    def reset(self) -> None:
        self.calls, self.bytes, self.seconds = 0, 0, 0.0


def _mlp():
    torch.manual_seed(0)
    layers = []
    for a, b in zip(SIZES[:-1], SIZES[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1])


def _shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _time_steps(model, opt, args, gen, counter=None):
    times, calls, sent, reduce_s = [], [], [], []
    for step in range(args.warmup + args.steps):
        x = torch.randn(args.batch, SIZES[0], generator=gen)
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
                sent.append(counter.bytes)
                reduce_s.append(counter.seconds)
    out = dict(step_s=statistics.median(times))
    if counter is not None:
        out.update(
            all_reduces=max(calls), bytes=max(sent), reduce_s=statistics.median(reduce_s)
        )
    return out


def _worker(rank, world, init_file, args, out_path):
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(args.threads_per_rank)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    counter = _Counter()
    results = {}
    for name, make in CONFIGS.items():
        base = _mlp()
        model = _shard(copy.deepcopy(base), mesh)
        mine = _time_steps(model, make(model), args, torch.Generator().manual_seed(rank), counter)
        every = [None] * world
        dist.all_gather_object(every, mine)
        results[name] = {k: max(r[k] for r in every) for k in mine}
        if rank == 0:  # the same optimizer on the whole model, one process
            single = _time_steps(base, make(base), args, torch.Generator().manual_seed(0))
            results[name]["single_step_s"] = single["step_s"]
        dist.barrier()
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
    print(f"world={args.world} params={numel} (sharded: the largest rank; load: "
          f"{os.getloadavg()[0]:.1f})")  # fmt: skip
    print(f"{'optimizer':<22} {'all-reduces':>11} {'bytes':>7} {'step ms':>8} "
          f"{'reduce ms':>9} {'1-proc ms':>9} {'shards/1-proc':>13}")  # fmt: skip
    for name, r in results.items():
        print(
            f"{name:<22} {r['all_reduces']:>11} {r['bytes']:>7} {r['step_s'] * 1e3:>8.2f} "
            f"{r['reduce_s'] * 1e3:>9.2f} {r['single_step_s'] * 1e3:>9.2f} "
            f"{r['step_s'] / r['single_step_s']:>13.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(world=args.world, params=numel, results=results), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
