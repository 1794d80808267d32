"""Time inverse-root computation for the Shampoo factors of the MNIST autoencoder.

The autoencoder 784-1000-500-250-30-250-500-1000-784 with block size 1024 has one left and
one right factor per weight matrix; their sizes are ``SIZES`` below. The statistics are
synthetic Gram matrices ``G G^T`` with decaying singular values (condition number about
``--cond`` before the ridge), which is what accumulated gradient statistics look like.

Strategies, each through :func:`secondorder.kernels.roots.inverse_root` (power iteration,
relative ridge, solve, acceptance), all in fp32:

* ``newton-batched``: same-size factors stacked, one coupled-Newton solve per size;
* ``eigh-per-block``: one eigh solve per factor (a Python loop);
* ``eigh-batched``: same-size factors stacked, one batched eigh per size;
* ``newton-per-block`` (with ``--per-block-newton``): one Newton solve per factor.

The strategies are timed round-robin (one run of each per repeat) so that background load
affects them alike. Prints median and min times over ``--repeats`` and their ratios to
``eigh-per-block``;
``--json PATH`` also writes the numbers.

Example::

    python benchmarks/bench_roots.py --repeats 3 --threads 2 --json roots.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections import defaultdict

import torch

from secondorder.kernels.roots import inverse_root

SIZES = [1000, 784, 500, 1000, 250, 500, 30, 250, 250, 30, 500, 250, 1000, 500, 784, 1000]


def make_statistics(sizes: list[int], cond: float, seed: int) -> list[torch.Tensor]:
    """One fp32 PSD matrix per size: ``G G^T`` with singular values log-spaced over sqrt(cond)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        scale = torch.logspace(0, -0.5 * math.log10(cond), n, dtype=torch.float64)
        G = torch.randn(n, n, generator=g, dtype=torch.float64) * scale
        out.append((G @ G.T / n).float())
    return out


def group_by_size(mats: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    groups: dict[int, list[torch.Tensor]] = defaultdict(list)
    for m in mats:
        groups[m.shape[0]].append(m)
    return {n: torch.stack(ms) for n, ms in groups.items()}


def run_batched(groups, method, p):
    results = [inverse_root(A, p, method=method) for A in groups.values()]
    return [r.error.max().item() for r in results], sum(int(r.ok.sum()) for r in results)


def run_per_block(mats, method, p):
    results = [inverse_root(A[None], p, method=method) for A in mats]
    return [r.error.max().item() for r in results], sum(int(r.ok.sum()) for r in results)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--p", type=int, default=4, help="root order (4 for matrix factors)")
    ap.add_argument("--cond", type=float, default=1e6, help="condition number of G G^T")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-block-newton", action="store_true", help="also time Newton per block")
    ap.add_argument("--json", default=None, help="write results to this JSON file")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    mats = make_statistics(SIZES, args.cond, args.seed)
    groups = group_by_size(mats)

    cases = {
        "newton-batched": lambda: run_batched(groups, "newton", args.p),
        "eigh-per-block": lambda: run_per_block(mats, "eigh", args.p),
        "eigh-batched": lambda: run_batched(groups, "eigh", args.p),
    }
    if args.per_block_newton:
        cases["newton-per-block"] = lambda: run_per_block(mats, "newton", args.p)

    # warm-up (allocator, BLAS/LAPACK initialisation)
    smallest = min(mats, key=lambda m: m.shape[0])[None]
    inverse_root(smallest, args.p, method="newton")
    inverse_root(smallest, args.p, method="eigh")

    # Round-robin over strategies so that background load hits all of them alike.
    times: dict[str, list[float]] = {name: [] for name in cases}
    outs: dict[str, tuple] = {}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t0)
    rows = {}
    for name in cases:
        errs, n_ok = outs[name]
        rows[name] = {
            "median_s": statistics.median(times[name]),
            "min_s": min(times[name]),
            "times_s": times[name],
            "max_error": max(errs),
            "ok": n_ok,
        }

    base = rows["eigh-per-block"]["median_s"]
    print(
        f"inverse roots, p={args.p}, {len(SIZES)} factors (sizes {sorted(groups)}), "
        f"cond {args.cond:g}, fp32, threads={args.threads}, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}"
    )
    base_min = rows["eigh-per-block"]["min_s"]
    print(
        f"{'strategy':<18}{'median s':>10}{'min s':>9}{'ratio (median)':>16}{'ratio (min)':>13}"
        f"{'max err':>11}{'ok':>7}"
    )
    for name, r in rows.items():
        print(
            f"{name:<18}{r['median_s']:>10.3f}{r['min_s']:>9.3f}"
            f"{r['median_s'] / base:>15.2f}x{r['min_s'] / base_min:>12.2f}x"
            f"{r['max_error']:>11.2e}{r['ok']:>4}/{len(SIZES)}"
        )
    print("ratios are relative to eigh-per-block (> 1: slower)")
    report = {
        "args": vars(args),
        "sizes": SIZES,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "results": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
