"""How much an optimizer amplifies float32 rounding differences of the gradient.

    python benchmarks/bench_sensitivity.py                          # digits, 600 steps
    python benchmarks/bench_sensitivity.py --eps 1e-6 1e-5 --seed 1
    python benchmarks/bench_sensitivity.py --workload mnist-autoencoder --steps 100 \\
        --data-dir ../shared/data/mnist

Two runs per configuration, same initial weights, same batches, same learning-rate schedule
as ``secondorder bench``: run A takes one backward pass over the batch; run B averages the
gradients of the two half batches (what DDP with two ranks computes: the same gradient,
rounded differently, relative differences ~1e-8). Configurations: AdamW (the baseline any
nonconvex training run has) and Shampoo for each ``--eps`` (its relative ridge). Reported:
the largest parameter difference ``max|p_A - p_B|`` and the relative difference
``||p_A - p_B|| / ||p_A||`` after a few step counts, and both runs' final training loss
(mean over the last 10% of steps) and run A's validation loss (if the workload has one).
"""

from __future__ import annotations

import argparse
import json

import torch

from secondorder import Shampoo
from secondorder.bench.runner import batch_order, lr_factor
from secondorder.bench.workloads import get_workload


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def run(args, workload, eps: float | None) -> dict:
    """One pair of runs; ``eps=None`` is AdamW."""
    setup = workload.setup(torch.device("cpu"), torch.float32)
    order = batch_order(setup.num_train, args.batch_size, args.steps, args.seed)
    name = "adamw" if eps is None else "shampoo"
    lr = args.lr or workload.default_lr(name)
    factor = lr_factor(workload.default_schedule, args.steps, int(0.05 * args.steps))
    models, opts = [], []
    for _ in range(2):
        torch.manual_seed(args.seed)
        m = workload.make_model()
        models.append(m)
        if eps is None:
            opts.append(torch.optim.AdamW(m.parameters(), lr=lr))
        else:
            opts.append(
                Shampoo(
                    m.parameters(),
                    lr=lr,
                    eps=eps,
                    precondition_frequency=args.precondition_frequency,
                    block_size=args.block_size,
                )
            )
    marks = sorted({s for s in (1, 10, 20, 50, 100, 200, args.steps) if s <= args.steps})
    diffs, losses = {}, ([], [])
    for step in range(args.steps):
        batch = workload.train_batch(order[step])
        half = batch.shape[0] // 2
        for k, (m, o) in enumerate(zip(models, opts)):
            for g in o.param_groups:
                g["lr"] = lr * factor(step)
            o.zero_grad()
            if k == 0:
                loss = workload.loss(m, batch)
                loss.backward()
            else:
                parts = [0.5 * workload.loss(m, x) for x in (batch[:half], batch[half:])]
                for part in parts:
                    part.backward()
                loss = parts[0] + parts[1]
            losses[k].append(loss.item())
            o.step()
        if step + 1 in marks:
            a, b = flat(models[0]), flat(models[1])
            diffs[step + 1] = dict(
                max_abs=(a - b).abs().max().item(), rel=((a - b).norm() / a.norm()).item()
            )
    tail = max(1, args.steps // 10)
    return dict(
        optimizer=name,
        lr=lr,
        eps=eps,
        diffs=diffs,
        final_train_loss=[sum(x[-tail:]) / tail for x in losses],
        val_loss=workload.validation_loss(models[0]),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="digits-autoencoder")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None, help="default: the workload's per optimizer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eps", type=float, nargs="+", default=[1e-6, 1e-5, 1e-4, 1e-3])
    ap.add_argument("--no-adamw", action="store_true", help="skip the AdamW baseline")
    ap.add_argument("--precondition-frequency", type=int, default=10)
    ap.add_argument("--block-size", type=int, default=1024)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cls = get_workload(args.workload)
    workload = cls(args.data_dir)
    args.batch_size = args.batch_size or cls.default_batch_size
    configs = ([] if args.no_adamw else [None]) + list(args.eps)
    results = [run(args, workload, eps) for eps in configs]
    print(json.dumps(dict(workload=args.workload, steps=args.steps, results=results), indent=1))
    for r in results:
        name = r["optimizer"] + ("" if r["eps"] is None else f" eps={r['eps']:g}")
        d = " ".join(f"{s}:{v['max_abs']:.1e}/{v['rel']:.1e}" for s, v in r["diffs"].items())
        la, lb = r["final_train_loss"]
        val = "" if r["val_loss"] is None else f" val {r['val_loss']:.3f}"
        print(f"{name}: train A {la:.3f} B {lb:.3f}{val}; step:max|dp|/rel {d}")


if __name__ == "__main__":
    main()
