"""SCALE and Muon vs AdamW on the bench's byte-level language model (``byte-lm``).

    python benchmarks/bench_scale_muon.py                        # 300 steps, all three
    python benchmarks/bench_scale_muon.py --steps 100 --timing-rounds 10 --json out.json

One run reports, for each optimizer built with ``from_model`` (parameter roles from the
model) where it has one:

* training: the same model init, batch order and warm-up/linear-decay schedule as
  ``secondorder bench --workload byte-lm``; mean training loss of the last 20 steps and
  the validation loss after ``--steps`` steps;
* optimizer state bytes (tensors reachable from ``optimizer.state``) and the ratio to AdamW;
* step time, measured *interleaved*: every round times one step of each optimizer in turn on
  the same batch, so that load from other processes hits all of them alike. Two numbers:
  the whole training step (zero_grad + forward + backward + step) and ``optimizer.step()``
  alone; ratios to AdamW of the means over rounds (medians reported too).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import secondorder
from _common import machine
from secondorder.bench.runner import lr_factor, state_bytes
from secondorder.bench.workloads.byte_lm import ByteLM


def factories(args) -> dict:
    return {
        "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=args.adamw_lr, weight_decay=0.0),
        "scale": lambda m: secondorder.SCALE.from_model(
            m, lr=args.scale_lr, adamw_lr=args.scale_adamw_lr
        ),
        "muon": lambda m: secondorder.Muon.from_model(m, lr=args.muon_lr),
    }


def batches(workload: ByteLM, num_train: int, steps: int, batch_size: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randperm(num_train, generator=gen)[:batch_size] for _ in range(steps)]


def train_one(workload, make, order, args) -> dict:
    torch.manual_seed(args.seed)
    model = workload.make_model()
    opt = make(model)
    factor = lr_factor("warmup-linear", len(order), round(0.05 * len(order)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    losses = []
    t0 = time.perf_counter()
    for idx in order:
        batch = workload.train_batch(idx)
        opt.zero_grad(set_to_none=True)
        loss = workload.loss(model, batch)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.detach())
    losses = torch.stack(losses).tolist()
    return dict(
        train_loss_last20=statistics.fmean(losses[-20:]),
        val_loss=workload.validation_loss(model),
        state_bytes=state_bytes(opt),
        state_bytes_method=getattr(opt, "state_bytes", lambda: None)(),
        wall_s=time.perf_counter() - t0,
        finite=all(v == v and abs(v) != float("inf") for v in losses),
        losses_every_10=losses[::10],
    )


def interleaved_times(workload, makers, order, warmup: int) -> dict:
    runs = {}
    for name, make in makers.items():
        torch.manual_seed(0)
        model = workload.make_model()
        runs[name] = (model, make(model), [], [])
    for r, idx in enumerate(order):
        batch = workload.train_batch(idx)
        for model, opt, step_t, opt_t in runs.values():
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            workload.loss(model, batch).backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            if r >= warmup:
                step_t.append(t2 - t0)
                opt_t.append(t2 - t1)
    out = {}
    for name, (_, _, step_t, opt_t) in runs.items():
        out[name] = dict(
            step_mean_s=statistics.fmean(step_t),
            step_median_s=statistics.median(step_t),
            opt_mean_s=statistics.fmean(opt_t),
            opt_median_s=statistics.median(opt_t),
        )
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", default="adamw,scale,muon")
    ap.add_argument("--timing-rounds", type=int, default=20)
    ap.add_argument("--timing-warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--adamw-lr", type=float, default=1e-3)
    ap.add_argument("--scale-lr", type=float, default=1e-3)
    ap.add_argument("--scale-adamw-lr", type=float, default=1e-3)
    ap.add_argument("--muon-lr", type=float, default=1e-3)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    workload = ByteLM()
    setup = workload.setup(torch.device("cpu"), torch.float32)
    makers = {k: v for k, v in factories(args).items() if k in args.configs.split(",")}
    result: dict = dict(machine=machine(), argv=sys.argv[1:] if argv is None else argv,
                        workload=setup.info | {"num_train": setup.num_train}, timing={},
                        training={})  # fmt: skip
    print(f"machine: {result['machine']}; byte-lm, {setup.num_train} training windows")

    if args.timing_rounds:
        order = batches(workload, setup.num_train, args.timing_warmup + args.timing_rounds,
                        args.batch_size, seed=1)  # fmt: skip
        timing = interleaved_times(workload, makers, order, args.timing_warmup)
        base = timing.get("adamw")
        print(f"\nstep time ({args.timing_rounds} interleaved rounds after "
              f"{args.timing_warmup} warm-up):")  # fmt: skip
        for name, t in timing.items():
            if base:
                for k in ("step", "opt"):
                    t[f"{k}_ratio_mean"] = t[f"{k}_mean_s"] / base[f"{k}_mean_s"]
                    t[f"{k}_ratio_median"] = t[f"{k}_median_s"] / base[f"{k}_median_s"]
            print(
                f"  {name:6s} step mean {1e3 * t['step_mean_s']:7.1f} ms "
                f"(x{t.get('step_ratio_mean', float('nan')):.3f} AdamW, median "
                f"x{t.get('step_ratio_median', float('nan')):.3f})  optimizer.step mean "
                f"{1e3 * t['opt_mean_s']:6.2f} ms (x{t.get('opt_ratio_mean', float('nan')):.3f},"
                f" median x{t.get('opt_ratio_median', float('nan')):.3f})"
            )
        result["timing"] = timing

    if args.steps:
        order = batches(workload, setup.num_train, args.steps, args.batch_size, seed=args.seed)
        print(f"\ntraining {args.steps} steps (warm-up 5%, then linear decay):")
        for name, make in makers.items():
            r = train_one(workload, make, order, args)
            result["training"][name] = r
            base = result["training"].get("adamw")  # adamw runs first: ratios as we go
            if base:
                r["state_ratio"] = r["state_bytes"] / base["state_bytes"]
            print(
                f"  {name:6s} train loss (last 20) {r['train_loss_last20']:.4f}  val loss "
                f"{r['val_loss']:.4f}  state {r['state_bytes'] / 2**20:7.3f} MiB "
                f"(x{r.get('state_ratio', float('nan')):.3f} AdamW)  finite={r['finite']}  "
                f"({r['wall_s']:.0f} s)",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
