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

import json
import statistics
import sys

import torch

import _fsdp  # benchmarks/ is on sys.path when a script runs
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


def _worker(rank, world, init_file, args, out_path):
    mesh = _fsdp.start(rank, world, init_file, args.threads_per_rank)
    counter = _fsdp.Counter(gathers=(fsdp_placement,))
    impl = {"owners": apply_whole, "allgather": _allgather_whole, "shard-local": _shard_local}
    results = {}
    for _ in range(args.repeats):
        for mode in MODES:
            muon_module.apply_whole = impl[mode]
            model = _fsdp.sharded_mlp(mesh, SIZES)
            opt = secondorder.Muon(model.parameters(), lr=1e-3)
            gen = torch.Generator().manual_seed(rank)
            timed = _fsdp.time_steps(model, opt, args, gen, counter)
            mine = dict(step_s=timed["step_s"], received_bytes=timed["bytes"])
            results.setdefault(mode, []).append(_fsdp.max_over_ranks(mine, world))
    muon_module.apply_whole = apply_whole
    _fsdp.finish(rank, results, out_path)


def main(argv=None):
    ap = _fsdp.parser(__doc__)
    ap.add_argument("--repeats", type=int, default=2, help="rounds of all modes (interleaved)")
    args = ap.parse_args(argv)
    runs = _fsdp.spawn(_worker, args.world, args)
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
