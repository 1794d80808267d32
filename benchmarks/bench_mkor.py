"""MKOR vs AdamW on the SONew paper's MNIST autoencoder: step time and a small lr sweep.

    python benchmarks/bench_mkor.py --epochs 20                     # timing + the sweep
    python benchmarks/bench_mkor.py --epochs 0 --timing-rounds 30   # step-time ratio only
    python benchmarks/bench_mkor.py --epochs 5 --adamw-lrs 1e-3 --mkor-lrs 3e-3,1e-2

Step time is zero_grad + forward + backward + optimizer step on a 1000-image batch, timed
*interleaved* (each round times one step of every optimizer on the same batch, so load from
other processes hits all alike); MKOR's factor updates (every ``inv_freq`` steps) are
included in its mean. Training runs use ``secondorder bench``'s loop (same seeded model and
batch order, constant learning rate) with MKOR built from the model (its hooks need it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import secondorder
from _common import DEFAULT_MNIST, autoencoder, autoencoder_loss, load_mnist_images, machine
from secondorder.bench.optimizers import Built
from secondorder.bench.training import Plan, batch_order, train_run
from secondorder.bench.workloads.mnist_autoencoder import MNISTAutoencoder


def factories(args) -> dict:
    """name -> (model -> optimizer)."""
    out = {}
    for lr in _floats(args.adamw_lrs):
        out[f"adamw@{lr:g}"] = lambda m, lr=lr: torch.optim.AdamW(
            m.parameters(), lr=lr, weight_decay=0.0
        )
    for variant in args.variants.split(","):
        for lr in _floats(args.mkor_lrs):
            out[f"mkor-{variant}@{lr:g}"] = lambda m, lr=lr, v=variant: secondorder.MKOR(
                m, lr=lr, variant=v, inv_freq=args.inv_freq, momentum=args.momentum
            )
    return out


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def interleaved_step_times(makers: dict, data: torch.Tensor, rounds: int, warmup: int) -> dict:
    runs = {}
    for name, make in makers.items():
        torch.manual_seed(0)
        model = autoencoder()
        runs[name] = (model, make(model), [])
    gen = torch.Generator().manual_seed(1)
    for r in range(warmup + rounds):
        xb = data[torch.randperm(data.shape[0], generator=gen)[:1000]]
        for model, opt, times in runs.values():
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            autoencoder_loss(model(xb), xb).backward()
            opt.step()
            if r >= warmup:
                times.append(time.perf_counter() - t0)
    return {n: dict(mean_s=statistics.fmean(t), median_s=statistics.median(t))
            for n, (_, _, t) in runs.items()}  # fmt: skip


def train(make, data: torch.Tensor, epochs: int, batch_size: int = 1000, seed: int = 0) -> dict:
    """The bench's training loop (as ``_common.train``), the optimizer built from the model."""
    workload = MNISTAutoencoder(None)
    device = torch.device("cpu")
    setup = workload.use_pixels(data, device, torch.float32)
    per_epoch = setup.num_train // batch_size
    steps = epochs * per_epoch
    plan = Plan(workload, batch_order(setup.num_train, batch_size, steps, seed), device,
                torch.float32, seed, "constant", 0, per_epoch, per_epoch)  # fmt: skip
    run = train_run(plan, lambda m: Built(make(m), {}, False), "train")
    losses = [float(x) for x in run["train_loss"]]
    epoch_losses = [statistics.fmean(losses[i : i + per_epoch])
                    for i in range(0, len(losses), per_epoch)]  # fmt: skip
    return dict(
        final_loss=epoch_losses[-1] if epoch_losses else float("nan"),
        epoch_losses=epoch_losses,
        status=run["status"],
        peak_state_bytes=run["peak_state_bytes"],
    )


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_MNIST))
    ap.add_argument("--epochs", type=int, default=20, help="training epochs (10 steps each)")
    ap.add_argument("--adamw-lrs", default="3e-4,1e-3,3e-3")
    ap.add_argument("--mkor-lrs", default="1e-3,3e-3,1e-2")
    ap.add_argument("--variants", default="official")
    ap.add_argument("--inv-freq", type=int, default=10)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--timing-rounds", type=int, default=30)
    ap.add_argument("--timing-warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_mnist_images(args.data)
    makers = factories(args)
    result: dict = dict(machine=machine(), argv=sys.argv[1:] if argv is None else argv,
                        images=int(data.shape[0]), timing={}, training={})  # fmt: skip
    print(f"machine: {result['machine']}; {data.shape[0]} images", flush=True)
    if args.timing_rounds:
        first_adamw = next(n for n in makers if n.startswith("adamw"))
        first_mkor = [n for n in makers if n.startswith("mkor")]
        timed = {n: makers[n] for n in [first_adamw, *first_mkor[:1]]}
        timing = interleaved_step_times(timed, data, args.timing_rounds, args.timing_warmup)
        base = timing[first_adamw]
        print(f"\nstep time (fwd+bwd+step, {args.timing_rounds} interleaved rounds):")
        for name, t in timing.items():
            t["ratio_vs_adamw_mean"] = t["mean_s"] / base["mean_s"]
            t["ratio_vs_adamw_median"] = t["median_s"] / base["median_s"]
            print(f"  {name:22s} mean {1e3 * t['mean_s']:8.1f} ms  median "
                  f"{1e3 * t['median_s']:8.1f} ms  ratio {t['ratio_vs_adamw_mean']:.3f} (mean) "
                  f"{t['ratio_vs_adamw_median']:.3f} (median)", flush=True)  # fmt: skip
        result["timing"] = timing
    if args.epochs:
        print(f"\ntraining {args.epochs} epochs (fp32, constant lr):")
        for name, make in makers.items():
            t0 = time.perf_counter()
            r = train(make, data, args.epochs)
            r["wall_s"] = time.perf_counter() - t0
            result["training"][name] = r
            print(f"  {name:22s} final loss {r['final_loss']:9.3f}  {r['status']}  "
                  f"({r['wall_s']:.0f} s)", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
