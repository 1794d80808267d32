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

import copy
import json
import os
import sys

import torch
import torch.distributed as dist

import _fsdp  # benchmarks/ is on sys.path when a script runs
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


def _worker(rank, world, init_file, args, out_path):
    mesh = _fsdp.start(rank, world, init_file, args.threads_per_rank)
    counter = _fsdp.Counter()
    results = {}
    for name, make in CONFIGS.items():
        base = _fsdp.mlp(SIZES)
        model = _fsdp.shard(copy.deepcopy(base), mesh)
        gen = torch.Generator().manual_seed(rank)
        timed = _fsdp.time_steps(model, make(model), args, gen, counter)
        mine = dict(step_s=timed["step_s"], all_reduces=timed["calls"], bytes=timed["bytes"],
                    reduce_s=timed["collective_s"])  # fmt: skip
        results[name] = _fsdp.max_over_ranks(mine, world)
        if rank == 0:  # the same optimizer on the whole model, one process
            single = _fsdp.time_steps(base, make(base), args, torch.Generator().manual_seed(0))
            results[name]["single_step_s"] = single["step_s"]
        dist.barrier()
    _fsdp.finish(rank, results, out_path)


def main(argv=None):
    ap = _fsdp.parser(__doc__)
    args = ap.parse_args(argv)
    results = _fsdp.spawn(_worker, args.world, args)
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
