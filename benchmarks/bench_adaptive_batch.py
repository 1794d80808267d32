"""Adaptive batch size vs a small constant batch, on the same examples.

Trains the same model (same seed, same initial weights, same optimizer and base lr):

* **constant**: batch ``--batch`` for ``--epochs`` epochs (or ``--steps``); or read from
  ``--constant-from``, the ``results.json`` of a ``secondorder bench`` run with the same
  workload, batch, steps, seed and schedule (e.g. the lr grid that picked the base lr: its
  record is the chosen lr's run);
* **adaptive**, once per ``--adaptive SPEC`` (default: ``test=--test,eta=--eta,--extra``):
  starting at ``--batch``, grown by ``secondorder.AdaptiveBatchSize`` over the same number
  of examples (per-sample gradients through ``torch.func``; LR schedule counted in examples,
  times the batch-size factor of ``lr_scaling``).

Reports, per run: final train loss (mean of the last steps) and validation loss, optimizer
steps, examples processed, steps and examples until the constant run's final (smoothed)
train loss is first reached, and, for the adaptive runs, the batch-size and lr trajectories
(where they change). Ends with one markdown table row per adaptive run.

    python benchmarks/bench_adaptive_batch.py                      # digits autoencoder
    python benchmarks/bench_adaptive_batch.py --workload mnist-autoencoder \\
        --data-dir ../shared/data/mnist --opt adagrad:lr=0.01 --batch 16 --epochs 5 \\
        --adaptive eta=0.5,interval=5 --adaptive eta=0.5,interval=5,lr_scaling=sqrt
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from typing import Any

import torch

from secondorder.bench.runner import BenchConfig, run_benchmark


def _first_at_or_below(values: list[float], target: float) -> int | None:
    return next((i + 1 for i, v in enumerate(values) if v <= target), None)


def _changes(values: list[Any], examples: list[int], sizes: list[int]) -> list[tuple]:
    """(step, examples before the step, value) wherever ``values`` changes."""
    out, last = [], None
    for k, (v, ex, b) in enumerate(zip(values, examples, sizes)):
        if v != last:
            out.append((k + 1, ex - b, v))
            last = v
    return out


def _thin(points: list[tuple], keep: int = 12) -> list[tuple]:
    """At most ``keep`` points, evenly spread, the first and the last included."""
    if len(points) <= keep:
        return points
    idx = sorted({round(i * (len(points) - 1) / (keep - 1)) for i in range(keep)})
    return [points[i] for i in idx]


def _lr(r: dict[str, Any]) -> Any:
    return (r.get("resolved_hyperparameters") or {}).get("lr")


def _summary(r: dict[str, Any], target: float, batch: int) -> dict[str, Any]:
    hit = _first_at_or_below(r["train_loss_smoothed"], target)
    hit2 = _first_at_or_below(r["train_loss_smoothed"], 1.02 * target)
    examples = r.get("examples") or [batch * (k + 1) for k in range(r["steps_run"])]
    out = {
        "final_train_loss": r["final_train_loss"],
        "final_val_loss": r["final_val_loss"],
        "steps": r["steps_run"],
        "examples": examples[-1],
        "steps_to_target": hit,
        "examples_to_target": None if hit is None else examples[hit - 1],
        "steps_to_within_2pct": hit2,
        "train_seconds": r["train_seconds"],
        "lr": _lr(r),
    }
    if r.get("batch_sizes"):
        sizes = r["batch_sizes"]
        out["batch_trajectory"] = _changes(sizes, examples, sizes)
        out["lr_trajectory"] = _thin(
            _changes([float(f"{x:.4g}") for x in r["lrs"]], examples, sizes)
        )
    return out


def _row(opt: str, spec: str, c: dict[str, Any], a: dict[str, Any]) -> str:
    def loss(s: dict[str, Any]) -> str:
        val = s["final_val_loss"]
        return f"{s['final_train_loss']:.4g}" + ("" if val is None else f" / {val:.4g}")

    traj = a["batch_trajectory"]
    lrs = a["lr_trajectory"]
    grow = f"{traj[0][2]} → {traj[-1][2]} (from step {traj[1][0]})" if len(traj) > 1 else (
        f"{traj[0][2]} (never grows)")  # fmt: skip
    return (
        f"| {opt} | {spec} | {loss(c)} | {loss(a)} | "
        f"{a['final_train_loss'] / c['final_train_loss']:.3f} | {c['steps']} → {a['steps']} | "
        f"{c['steps_to_target'] or 'never'} / {a['steps_to_target'] or 'never'} | "
        f"{c['examples_to_target'] or '—'} / {a['examples_to_target'] or '—'} | {grow} | "
        f"{lrs[0][2]:.3g} → {lrs[-1][2]:.3g} |"
    )


def _check_same_request(results: dict[str, Any], want: dict[str, Any]) -> None:
    s = results["settings"]
    got = {"workload": results["workload"]["name"], "batch_size": s["batch_size"],
           "steps": s["steps"], "seed": s["seed"], "schedule": s["schedule"],
           "batch_schedule": s["batch_schedule"]}  # fmt: skip
    bad = {k: (got[k], v) for k, v in want.items() if got[k] != v}
    if bad:
        raise SystemExit(f"--constant-from is another request: (theirs, ours) {bad}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="digits-autoencoder")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--opt", default="adagrad", help="optimizer spec, as in secondorder bench")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--epochs", type=float, default=20)
    p.add_argument("--steps", type=int, default=None, help="instead of --epochs")
    p.add_argument("--schedule", default="constant", help="lr schedule (as in secondorder bench)")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--test", default="norm")
    p.add_argument("--eta", type=float, default=0.2)
    p.add_argument("--extra", default="", help="more adaptive options, e.g. max_micro_batch=256")
    p.add_argument("--adaptive", action="append", default=None, metavar="SPEC",
                   help="adaptive options key=value,... (repeatable); overrides --test/--eta/"
                   "--extra")  # fmt: skip
    p.add_argument("--constant-from", default=None, metavar="RESULTS_JSON",
                   help="take the constant run from this secondorder bench results.json")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the summary here")
    args = p.parse_args()

    from secondorder.bench.workloads import get_workload

    workload = get_workload(args.workload)(args.data_dir)
    num_train = workload.setup(torch.device("cpu"), torch.float32).num_train
    steps = args.steps or max(1, round(args.epochs * (num_train // args.batch)))
    specs = args.adaptive or [
        f"test={args.test},eta={args.eta}" + (f",{args.extra}" if args.extra else "")
    ]
    common = dict(workload=args.workload, data_dir=args.data_dir, optimizers=[args.opt],
                  steps=steps, batch_size=args.batch, seed=args.seed, schedule=args.schedule,
                  threads=args.threads, device="cpu", eval_every=args.eval_every)  # fmt: skip

    if args.constant_from:
        with open(args.constant_from) as f:
            results = json.load(f)
        want = {"workload": args.workload, "batch_size": args.batch, "steps": steps,
                "seed": args.seed, "schedule": args.schedule, "batch_schedule": None}  # fmt: skip
        _check_same_request(results, want)
        constant = results["optimizers"][0]
    else:
        constant = run_benchmark(BenchConfig(**common), stream=None)["optimizers"][0]
    if constant["status"] != "ok":
        raise SystemExit(f"constant run {constant['status']}: {constant.get('error')}")
    target = constant["final_train_loss"]
    cs = _summary(constant, target, args.batch)
    summary: dict[str, Any] = {
        "workload": args.workload,
        "optimizer": args.opt,
        "initial_batch": args.batch,
        "examples": steps * args.batch,
        "schedule": args.schedule,
        "target_train_loss": target,
        "constant": cs,
        "adaptive": {},
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.1f}, {args.threads} thread(s)",
    }
    rows = []
    for spec in specs:
        config = BenchConfig(**common, batch_schedule=f"adaptive:{spec}")
        r = run_benchmark(config, stream=None)["optimizers"][0]
        if r["status"] != "ok":
            summary["adaptive"][spec] = {"status": r["status"], "error": r.get("error")}
            rows.append(f"| {args.opt} | {spec} | {r['status']}: {r.get('error')} |")
            continue
        if _lr(r) != _lr(constant):
            raise SystemExit(f"base lr differs: constant {_lr(constant)}, adaptive {_lr(r)}")
        a = _summary(r, target, args.batch)
        a["final_train_loss_ratio"] = a["final_train_loss"] / cs["final_train_loss"]
        if a["final_val_loss"] is not None and cs["final_val_loss"] is not None:
            a["final_val_loss_ratio"] = a["final_val_loss"] / cs["final_val_loss"]
        a["steps_ratio"] = a["steps"] / cs["steps"]
        summary["adaptive"][spec] = a
        rows.append(_row(args.opt, spec, cs, a))
        print(json.dumps({spec: a}), flush=True)
    summary["rows"] = rows
    print(json.dumps(summary, indent=1))
    print("\n".join(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
