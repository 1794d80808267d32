"""Shampoo vs AdamW on the SONew paper's MNIST autoencoder: step time and training loss.

    python benchmarks/bench_shampoo.py --epochs 20            # the README's setting
    python benchmarks/bench_shampoo.py --epochs 2 --json out.json

Both optimizers train the same model from the same seed in the same process. The step time
is forward + backward + optimizer step, averaged over all steps after a short warm-up, so
the occasional root computations (every ``precondition_frequency`` steps) are included.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import secondorder
from _common import DEFAULT_MNIST, busy_note, load_mnist_images, machine, train
from bench_roots import SIZES, group_by_size, make_statistics, run_batched, run_per_block


def root_timings(repeats: int = 3) -> dict:
    """Time one refresh of every root of the autoencoder: batched Newton vs per-block eigh."""
    mats = make_statistics(SIZES, cond=1e6, seed=0)
    groups = group_by_size(mats)
    out = {}
    for name, fn in [
        ("batched_newton", lambda: run_batched(groups, "newton", 4)),
        ("batched_eigh", lambda: run_batched(groups, "eigh", 4)),
        ("per_block_eigh", lambda: run_per_block(mats, "eigh", 4)),
    ]:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name + "_s"] = statistics.median(times)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(DEFAULT_MNIST))
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    ap.add_argument("--root-method", default="auto", choices=["auto", "newton", "eigh"])
    ap.add_argument(
        "--matmul-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="dtype of Shampoo's per-step matmuls (statistics, application)",
    )
    ap.add_argument("--eps", type=float, default=1e-6, help="Shampoo's relative ridge")
    ap.add_argument("--beta2", type=float, default=0.999, help="beta2 of both optimizers")
    ap.add_argument("--only", choices=["adamw", "shampoo"], help="train just one optimizer")
    ap.add_argument("--skip-roots", action="store_true", help="skip the root timing table")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_mnist_images(args.data_dir)
    busy_note()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    configs = {
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=args.lr, betas=(0.9, args.beta2)),
        "shampoo": lambda ps: secondorder.Shampoo(
            ps,
            lr=args.lr,
            block_size=1024,
            precondition_frequency=10,
            graft="adam",
            root_method=args.root_method,
            eps=args.eps,
            betas=(0.9, args.beta2),
            matmul_dtype=None if args.matmul_dtype == "float32" else torch.bfloat16,
        ),
    }
    if args.only:
        configs = {args.only: configs[args.only]}
    results = {}
    for name, make in configs.items():
        log(f"{name}:")
        results[name] = train(make, data, epochs=args.epochs, seed=args.seed, log=log)
    base = results.get("adamw") or next(iter(results.values()))
    print(f"\nMNIST autoencoder, batch 1000, {args.epochs} epochs, lr {args.lr}, seed {args.seed}")
    print(f"machine: {machine()}")
    print(
        f"{'optimizer':<10} {'final loss':>11} {'loss/AdamW':>11} {'mean step s':>12} "
        f"{'median s':>9} {'step ratio':>11}"
    )
    for name, r in results.items():
        print(
            f"{name:<10} {r['final_loss']:>11.3f} {r['final_loss'] / base['final_loss']:>11.3f} "
            f"{r['mean_step_s']:>12.4f} {r['median_step_s']:>9.4f} "
            f"{r['mean_step_s'] / base['mean_step_s']:>11.3f}"
        )
    out = {"args": vars(args), "machine": machine(), "results": results}
    if not args.skip_roots:
        roots = root_timings()
        print("\nroot refresh of all 16 autoencoder factors (p = 4):")
        for k, v in roots.items():
            print(f"  {k:<18} {v:8.3f} s  ({v / roots['per_block_eigh_s']:.2f}x per-block eigh)")
        out["roots"] = roots
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
