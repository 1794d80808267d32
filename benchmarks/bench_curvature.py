"""AdaHessian and M-FAC vs AdamW on the SONew paper's MNIST autoencoder.

    python benchmarks/bench_curvature.py --epochs 20                    # timing + lr sweeps
    python benchmarks/bench_curvature.py --epochs 0 --timing-rounds 30  # step-time ratios only
    python benchmarks/bench_curvature.py --epochs 5 --configs adamw,mfac-32

Step time is forward + backward (with ``create_graph=True`` where the optimizer asks for
it, the protocol of ``secondorder bench``) + optimizer step on a 1000-image batch, measured
*interleaved*: every round times one step of each optimizer in turn (same data), so that
load from other processes hits all of them alike; ratios to AdamW are means (and medians)
over rounds after warm-up. ``update_every=10`` is timed over whole rounds of 10 steps so
that its average includes the refresh steps. Training losses come from separate runs (same
seed, same data order, constant lr) for each lr of a small sweep.
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


def configs(args) -> dict:
    """name -> (factory(params, lr), default lr sweep)."""
    m = args.num_grads
    return {
        "adamw": (
            lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.0),
            [3e-4, 1e-3, 3e-3],
        ),
        "adahessian-1": (
            lambda ps, lr: secondorder.AdaHessian(ps, lr=lr, update_every=1),
            [0.01, 0.03, 0.1],
        ),
        "adahessian-10": (
            lambda ps, lr: secondorder.AdaHessian(ps, lr=lr, update_every=10),
            [0.01, 0.03, 0.1],
        ),
        "adahessian-10-row": (
            lambda ps, lr: secondorder.AdaHessian(
                ps, lr=lr, update_every=10, spatial_average="row"
            ),
            [0.01, 0.03, 0.1],
        ),
        "adahessian-10-eps": (  # a larger eps bounds the step of near-zero estimates
            lambda ps, lr: secondorder.AdaHessian(ps, lr=lr, update_every=10, eps=1e-2),
            [0.01, 0.03, 0.1],
        ),
        f"mfac-{m}": (
            lambda ps, lr: secondorder.MFAC(ps, lr=lr, num_grads=m, damp=args.damp),
            [1e-4, 3e-4, 1e-3],
        ),
    }


def one_step(model, opt, xb) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    loss = autoencoder_loss(model(xb), xb)
    loss.backward(create_graph=bool(getattr(opt, "create_graph", False)))
    opt.step()
    return loss.detach()


def timing(args, data, names, table) -> dict:
    """Interleaved step times; returns per-name lists of seconds per step."""
    models, opts = {}, {}
    for name in names:
        torch.manual_seed(0)
        models[name] = autoencoder()
        opts[name] = table[name][0](list(models[name].parameters()), table[name][1][1])
    gen = torch.Generator().manual_seed(1)
    per = 10  # steps per round: a whole refresh cycle of update_every=10
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.warmup_rounds + args.timing_rounds):
        idx = torch.randint(0, data.shape[0], (per, args.batch_size), generator=gen)
        for name in names:
            t0 = time.perf_counter()
            for i in range(per):
                one_step(models[name], opts[name], data[idx[i]])
            dt = (time.perf_counter() - t0) / per
            if r >= args.warmup_rounds:
                times[name].append(dt)
        if r >= args.warmup_rounds:
            done = ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names)
            print(f"  round {r + 1 - args.warmup_rounds}: {done}", file=sys.stderr, flush=True)
    state = {}
    for name in names:
        opt = opts[name]
        state[name] = opt.state_bytes() if hasattr(opt, "state_bytes") else sum(
            t.numel() * t.element_size()
            for st in opt.state.values()
            for t in st.values()
            if isinstance(t, torch.Tensor)
        )
    nparams = sum(p.numel() for p in models[names[0]].parameters())
    return {"times": times, "state_bytes": state, "num_params": nparams}


def train(factory, lr, data, *, epochs, batch_size, seed=0) -> dict:
    torch.manual_seed(seed)
    model = autoencoder()
    opt = factory(list(model.parameters()), lr)
    gen = torch.Generator().manual_seed(seed)
    n = data.shape[0]
    epoch_losses = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        losses = [
            one_step(model, opt, data[perm[i : i + batch_size]])
            for i in range(0, n - batch_size + 1, batch_size)
        ]
        epoch_losses.append(torch.stack(losses).mean().item())
        if epoch_losses[-1] != epoch_losses[-1]:
            break
    return {"lr": lr, "final_loss": epoch_losses[-1], "epoch_losses": epoch_losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data-dir", default=str(DEFAULT_MNIST))
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--timing-rounds", type=int, default=6)
    ap.add_argument("--warmup-rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--num-grads", type=int, default=32)
    ap.add_argument("--damp", type=float, default=1e-5)
    ap.add_argument("--configs", default=None, help="comma list (default: all)")
    ap.add_argument("--lrs", default=None, help="name=lr1/lr2,... overrides of the sweeps")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_mnist_images(args.data_dir)
    table = configs(args)
    names = args.configs.split(",") if args.configs else list(table)
    if args.lrs:
        for item in args.lrs.split(","):
            k, v = item.split("=")
            table[k] = (table[k][0], [float(x) for x in v.split("/")])
    out = {"machine": machine(), "args": vars(args)}
    print(f"# {out['machine']}", flush=True)
    if args.timing_rounds > 0:
        tim = timing(args, data, names, table)
        base = tim["times"].get("adamw")
        rows = {}
        for n in names:
            t = tim["times"][n]
            row = {"mean_s": statistics.fmean(t), "median_s": statistics.median(t),
                   "state_bytes": tim["state_bytes"][n],
                   "state_per_param": tim["state_bytes"][n] / (4 * tim["num_params"])}
            if base:
                ratios = [a / b for a, b in zip(t, base)]
                row["ratio_mean"] = statistics.fmean(t) / statistics.fmean(base)
                row["ratio_median_of_rounds"] = statistics.median(ratios)
            rows[n] = row
        out["timing"] = rows
        print(f"\n## step time ({args.timing_rounds} rounds x 10 steps, batch {args.batch_size})")
        print("| optimizer | mean s/step | / AdamW (mean) | / AdamW (median round) | "
              "state / (4 B x params) |")
        print("|---|---|---|---|---|")
        for n, r in rows.items():
            print(f"| {n} | {r['mean_s']:.3f} | {r.get('ratio_mean', float('nan')):.2f} | "
                  f"{r.get('ratio_median_of_rounds', float('nan')):.2f} | "
                  f"{r['state_per_param']:.2f} |", flush=True)
    if args.epochs > 0:
        sweeps = {}
        print(f"\n## final train loss after {args.epochs} epochs (constant lr)")
        for n in names:
            factory, lrs = table[n]
            sweeps[n] = []
            for lr in lrs:
                res = train(factory, lr, data, epochs=args.epochs, batch_size=args.batch_size)
                sweeps[n].append(res)
                print(f"| {n} | lr={lr:g} | {res['final_loss']:.2f} |", flush=True)
        out["sweeps"] = sweeps
        best = {n: min(r["final_loss"] for r in rs) for n, rs in sweeps.items()}
        out["best"] = best
        print("\nbest: " + ", ".join(f"{n} {v:.2f}" for n, v in best.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
