"""SOAP vs Shampoo vs AdamW on the MNIST autoencoder: training loss and step time.

    python benchmarks/bench_soap.py --epochs 10
    python benchmarks/bench_soap.py --epochs 2 --json out.json

All three optimizers train the same model from the same seed, with the same batch order, in
the same process (so the step-time ratios compare like with like). The step time is
zero_grad + forward + backward + optimizer step, averaged over all steps after a short
warm-up, so the periodic basis / root refreshes are included. Every optimizer gets the same
learning rate and betas and no weight decay unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import secondorder
from _common import DEFAULT_MNIST, load_mnist_images, machine, train


def configs(args) -> dict:
    betas = (args.beta1, args.beta2)
    return {
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=args.lr, betas=betas, weight_decay=0.0),
        "shampoo": lambda ps: secondorder.Shampoo(
            ps, lr=args.lr, betas=betas, block_size=args.block_size,
            precondition_frequency=args.precondition_frequency, graft="adam",
        ),  # fmt: skip
        "soap": lambda ps: secondorder.SOAP(
            ps, lr=args.soap_lr or args.lr, betas=betas, weight_decay=0.0,
            block_size=args.block_size, precondition_frequency=args.precondition_frequency,
            basis_method=args.basis_method,
        ),  # fmt: skip
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(DEFAULT_MNIST))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--soap-lr", type=float, default=None, help="SOAP's lr (default: --lr)")
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--beta2", type=float, default=0.999)
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--precondition-frequency", type=int, default=10)
    ap.add_argument("--basis-method", default="qr", choices=["qr", "eigh"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    ap.add_argument("--only", nargs="+", choices=["adamw", "shampoo", "soap"])
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_mnist_images(args.data_dir)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    todo = configs(args)
    if args.only:
        todo = {k: v for k, v in todo.items() if k in args.only}
    results = {}
    for name, make in todo.items():
        log(f"{name}:")
        results[name] = train(make, data, epochs=args.epochs, seed=args.seed, log=log)
    base = results.get("adamw") or next(iter(results.values()))
    print(f"\nMNIST autoencoder, batch 1000, {args.epochs} epochs, lr {args.lr}, seed {args.seed}")
    print(f"machine: {machine()}")
    print(f"{'optimizer':<10} {'final loss':>11} {'loss/AdamW':>11} {'mean step s':>12} "
          f"{'median s':>9} {'step ratio':>11} {'state MiB':>10}")  # fmt: skip
    for name, r in results.items():
        print(
            f"{name:<10} {r['final_loss']:>11.3f} {r['final_loss'] / base['final_loss']:>11.3f} "
            f"{r['mean_step_s']:>12.4f} {r['median_step_s']:>9.4f} "
            f"{r['mean_step_s'] / base['mean_step_s']:>11.3f} "
            f"{r['peak_state_bytes'] / 2**20:>10.1f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "machine": machine(), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
