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

import json
import sys

import torch

import _fsdp  # benchmarks/ is on sys.path when a script runs
import secondorder
import secondorder.placement.ddp as ddp_placement
import secondorder.placement.fsdp as fsdp_placement

MODES = ("local", "exact", "exact-allgather")
SIZES = (784, 512, 256, 128)


def _worker(rank, world, init_file, args, out_path):
    mesh = _fsdp.start(rank, world, init_file, args.threads_per_rank)
    counter = _fsdp.Counter(gathers=(ddp_placement, fsdp_placement))
    results = {}
    for mode in MODES:
        fsdp_placement.EXCHANGE = "all_gather" if mode == "exact-allgather" else "owners"
        model = _fsdp.sharded_mlp(mesh, SIZES)
        opt = secondorder.Shampoo(
            model.parameters(),
            lr=1e-3,
            block_size=args.block_size,
            precondition_frequency=10,
            start_preconditioning_step=1,
            fsdp_mode="local" if mode == "local" else "exact",
        )
        timed = _fsdp.time_steps(model, opt, args, torch.Generator().manual_seed(rank), counter)
        opt.close()
        mine = dict(
            step_s=timed["step_s"],
            received_bytes=timed["bytes"],
            state_bytes=opt.state_bytes(),
            moments_bytes=opt.memory_diagnostics()["moments"],
        )
        results[mode] = _fsdp.max_over_ranks(mine, world)
    _fsdp.finish(rank, results, out_path)


def main(argv=None):
    ap = _fsdp.parser(__doc__)
    ap.add_argument("--block-size", type=int, default=128)
    args = ap.parse_args(argv)
    results = _fsdp.spawn(_worker, args.world, args)
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
