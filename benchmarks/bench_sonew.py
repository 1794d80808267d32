"""SONew vs AdamW (and Shampoo, when available) on the SONew paper's MNIST autoencoder.

    python benchmarks/bench_sonew.py --epochs 20                 # timing + fp32/bf16 losses
    python benchmarks/bench_sonew.py --epochs 0 --timing-rounds 30   # step-time ratios only
    python benchmarks/bench_sonew.py --epochs 5 --dtypes fp32 --configs adamw,sonew-b1

Step time is forward + backward + optimizer step on a 1000-image batch, measured
*interleaved*: every round times one step of each optimizer in turn (same data), so that load
from other processes on the machine hits all of them alike; the ratio is the mean over
rounds after warm-up (the median is reported too). Training losses come from separate
full runs (same seed, same data order) through ``_common.train``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import secondorder
from _common import DEFAULT_MNIST, autoencoder, autoencoder_loss, load_mnist_images, machine, train

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def optimizer_factories(args) -> dict:
    betas = (0.9, args.beta2)

    def sonew(band, compute_dtype=None, **kw):
        return lambda ps: secondorder.SONew(
            ps,
            lr=args.sonew_lr,
            betas=betas,
            eps=args.sonew_eps,
            band=band,
            compute_dtype=compute_dtype,
            **kw,
        )

    out = {
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=args.adamw_lr, betas=betas, weight_decay=0),
        "sonew-b0": sonew(0),
        "sonew-b1": sonew(1),
        "sonew-b4": sonew(4),
        # factorisation in bf16 (the default upcasts the statistics to fp32 for the LDLᵀ)
        "sonew-b1-fbf16": sonew(1, torch.bfloat16),
        "sonew-b4-fbf16": sonew(4, torch.bfloat16),
        # for the step-time breakdown only (graft=None needs its own learning rate)
        "sonew-b1-nograft": sonew(1, graft=None),
        "sonew-b1-1dadam": sonew(1, precondition_1d=False),
    }
    try:  # Shampoo is optional: it is being written concurrently
        probe = torch.nn.Parameter(torch.zeros(2, 2))
        probe.grad = torch.ones(2, 2)
        secondorder.Shampoo([probe], lr=1e-3).step()
        out["shampoo"] = lambda ps: secondorder.Shampoo(ps, lr=args.shampoo_lr, betas=betas)
    except Exception as exc:  # noqa: BLE001 - report and go on without it
        print(f"(Shampoo unavailable, skipped: {type(exc).__name__}: {exc})", file=sys.stderr)
    return out


def interleaved_step_times(factories: dict, data: torch.Tensor, dtype, rounds: int, warmup: int):
    """Mean/median step time per optimizer, measured round-robin on the same batches."""
    runs = {}
    for name, make in factories.items():
        torch.manual_seed(0)
        model = autoencoder().to(dtype)
        runs[name] = (model, make(list(model.parameters())), [])
    x_all = data.to(dtype)
    gen = torch.Generator().manual_seed(1)
    for r in range(warmup + rounds):
        xb = x_all[torch.randperm(x_all.shape[0], generator=gen)[:1000]]
        for model, opt, times in runs.values():
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = autoencoder_loss(model(xb), xb)
            loss.backward()
            opt.step()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times.append(dt)
    return {
        name: dict(mean_s=statistics.fmean(t), median_s=statistics.median(t))
        for name, (_, _, t) in runs.items()
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_MNIST))
    ap.add_argument("--epochs", type=int, default=20, help="training epochs (10 steps each)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--configs", default="adamw,sonew-b0,sonew-b1,sonew-b4,shampoo")
    ap.add_argument("--timing-rounds", type=int, default=20)
    ap.add_argument("--timing-warmup", type=int, default=3)
    ap.add_argument("--timing-dtypes", default="fp32")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--adamw-lr", type=float, default=1e-3)
    ap.add_argument("--sonew-lr", type=float, default=3e-3)
    ap.add_argument("--sonew-eps", type=float, default=1e-5)
    ap.add_argument("--shampoo-lr", type=float, default=3e-3)
    ap.add_argument("--beta2", type=float, default=0.99)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    data = load_mnist_images(args.data)
    factories = optimizer_factories(args)
    wanted = [c for c in args.configs.split(",") if c in factories]
    factories = {k: factories[k] for k in wanted}
    result: dict = dict(
        machine=machine(),
        argv=sys.argv[1:] if argv is None else argv,
        images=int(data.shape[0]),
        timing={},
        training={},
    )
    print(f"machine: {result['machine']}; {data.shape[0]} images")

    for dname in [d for d in args.timing_dtypes.split(",") if d] if args.timing_rounds else []:
        timing = {}
        if args.timing_rounds:
            timing = interleaved_step_times(
                factories, data, DTYPES[dname], args.timing_rounds, args.timing_warmup
            )
        base = timing.get("adamw")
        print(f"\nstep time ({dname}, fwd+bwd+step, {args.timing_rounds} interleaved rounds):")
        for name, t in timing.items():
            if base:
                t["ratio_vs_adamw_mean"] = t["mean_s"] / base["mean_s"]
                t["ratio_vs_adamw_median"] = t["median_s"] / base["median_s"]
            ratio = f"  ratio {t.get('ratio_vs_adamw_mean', float('nan')):.3f}" if base else ""
            print(
                f"  {name:10s} mean {1e3 * t['mean_s']:8.1f} ms  "
                f"median {1e3 * t['median_s']:8.1f} ms{ratio}"
            )
        result["timing"][dname] = timing

    for dname in [d for d in args.dtypes.split(",") if d] if args.epochs else []:
        print(f"\ntraining {args.epochs} epochs in {dname}:")
        result["training"][dname] = {}
        for name, make in factories.items():
            t0 = time.perf_counter()
            r = train(make, data, epochs=args.epochs, dtype=DTYPES[dname])
            r["wall_s"] = time.perf_counter() - t0
            result["training"][dname][name] = r
            print(
                f"  {name:10s} final loss {r['final_loss']:9.3f}  finite={r['all_finite']}  "
                f"({r['wall_s']:.0f} s)",
                flush=True,
            )

    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
