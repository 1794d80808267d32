"""Adaptive batch size vs a small constant batch, on the same examples.

Trains the same model (same seed, same initial weights) twice with the same optimizer:

* **constant**: batch ``--batch`` for ``--epochs`` epochs;
* **adaptive**: starting at ``--batch``, grown by ``secondorder.AdaptiveBatchSize``
  (``--test``, ``--eta``) over the same number of examples (per-sample gradients through
  ``torch.func``; LR schedule counted in examples).

Reports, for both: final train loss (mean of the last steps) and validation loss, optimizer
steps, steps (and examples) until the constant run's final train loss is reached, timed
seconds, and the adaptive batch-size trajectory.

    python benchmarks/bench_adaptive_batch.py                      # digits autoencoder
    python benchmarks/bench_adaptive_batch.py --workload mnist-autoencoder \\
        --data-dir ../shared/data/mnist --batch 32 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import torch

from secondorder.bench.runner import BenchConfig, run_benchmark


def _first_at_or_below(values: list[float], target: float) -> int | None:
    return next((i + 1 for i, v in enumerate(values) if v <= target), None)


def _changes(sizes: list[int], examples: list[int]) -> list[tuple[int, int, int]]:
    """(step, examples before the step, batch) wherever the batch size changes."""
    out, last = [], None
    for k, (b, ex) in enumerate(zip(sizes, examples)):
        if b != last:
            out.append((k + 1, ex - b, b))
            last = b
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="digits-autoencoder")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--opt", default="adagrad", help="optimizer spec, as in secondorder bench")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--epochs", type=float, default=20)
    p.add_argument("--test", default="norm")
    p.add_argument("--eta", type=float, default=0.2)
    p.add_argument("--extra", default="", help="more adaptive options, e.g. max_micro_batch=256")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the summary here")
    args = p.parse_args()

    from secondorder.bench.workloads import get_workload

    workload = get_workload(args.workload)(args.data_dir)
    num_train = workload.setup(torch.device("cpu"), torch.float32).num_train
    steps = max(1, round(args.epochs * (num_train // args.batch)))
    spec = f"adaptive:test={args.test},eta={args.eta}" + (f",{args.extra}" if args.extra else "")
    common = dict(workload=args.workload, data_dir=args.data_dir, optimizers=[args.opt],
                  steps=steps, batch_size=args.batch, seed=args.seed, schedule="constant",
                  threads=args.threads, device="cpu")  # fmt: skip
    runs = {}
    for name, schedule in (("constant", None), ("adaptive", spec)):
        res = run_benchmark(BenchConfig(**common, batch_schedule=schedule), stream=None)
        runs[name] = res["optimizers"][0]
        if runs[name]["status"] != "ok":
            raise SystemExit(f"{name} run {runs[name]['status']}: {runs[name].get('error')}")
    c, a = runs["constant"], runs["adaptive"]
    target = c["final_train_loss"]
    summary = {
        "workload": args.workload,
        "optimizer": args.opt,
        "batch_schedule": spec,
        "initial_batch": args.batch,
        "examples": steps * args.batch,
        "target_train_loss": target,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.1f}, {args.threads} thread(s)",
    }
    for name, r in runs.items():
        hit = _first_at_or_below(r["train_loss_smoothed"], target)
        hit2 = _first_at_or_below(r["train_loss_smoothed"], 1.02 * target)
        examples = r.get("examples") or [args.batch * (k + 1) for k in range(r["steps_run"])]
        summary[name] = {
            "final_train_loss": r["final_train_loss"],
            "final_val_loss": r["final_val_loss"],
            "steps": r["steps_run"],
            "examples": examples[-1],
            "steps_to_target": hit,
            "examples_to_target": None if hit is None else examples[hit - 1],
            "steps_to_within_2pct": hit2,
            "train_seconds": r["train_seconds"],
        }
    summary["adaptive"]["batch_trajectory"] = _changes(a["batch_sizes"], a["examples"])
    ca, cc = summary["adaptive"], summary["constant"]
    for key in ("final_train_loss", "final_val_loss"):
        if cc[key] is not None and ca[key] is not None:
            summary[f"{key}_ratio"] = ca[key] / cc[key]
    summary["steps_ratio"] = ca["steps"] / cc["steps"]
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
