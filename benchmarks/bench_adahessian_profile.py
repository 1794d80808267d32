"""Where an AdaHessian step's time goes, next to AdamW's, on the MNIST autoencoder.

    python benchmarks/bench_adahessian_profile.py --rounds 8
    python benchmarks/bench_adahessian_profile.py --rounds 8 --profile   # + torch.profiler

Each round times, interleaved (so that load from other processes hits both alike), ten
AdamW steps (forward, ``backward()``, ``step``) and ten AdaHessian ``update_every=1`` steps
split into phases: forward, ``backward(create_graph=True)``, and ``step`` (probes,
Hessian-vector product, moments, update; the step's own parts are timed by wrapping the
kernel functions it calls). Ratios are medians over rounds. With ``--profile`` one extra
AdaHessian step runs under ``torch.profiler`` and the top operators by self CPU time are
printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict

import torch

import secondorder
import secondorder.optim.adahessian as ada_mod
from _common import DEFAULT_MNIST, autoencoder, autoencoder_loss, load_mnist_images, machine


class PhaseTimer:
    """Accumulates wall time per phase name."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.total[name] += time.perf_counter() - t0

        return timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data-dir", default=str(DEFAULT_MNIST))
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--per", type=int, default=10, help="steps per round and optimizer")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--micro", action="store_true",
                    help="also time the step's own parts, old and new form interleaved")
    ap.add_argument("--micro-repeats", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_mnist_images(args.data_dir)
    print(f"# {machine()}", flush=True)

    torch.manual_seed(0)
    m_adam = autoencoder()
    torch.manual_seed(0)
    m_ada = autoencoder()
    adamw = torch.optim.AdamW(m_adam.parameters(), lr=1e-3, weight_decay=0.0)
    ada = secondorder.AdaHessian(m_ada.parameters(), lr=0.03, update_every=1)

    timer = PhaseTimer()
    H = ada_mod.H  # the kernel module the optimizer calls
    originals = {n: getattr(H, n) for n in ("rademacher", "hessian_vector_products",
                                           "spatial_average")}
    for name, fn in originals.items():
        setattr(H, name, timer.wrap(name, fn))
    finite = type(ada)._all_finite
    type(ada)._all_finite = staticmethod(timer.wrap("finite checks", finite))

    gen = torch.Generator().manual_seed(1)
    rows: dict[str, list[float]] = defaultdict(list)
    for r in range(args.rounds + 1):
        idx = torch.randint(0, data.shape[0], (args.per, args.batch_size), generator=gen)
        # AdamW
        parts = defaultdict(float)
        for i in range(args.per):
            xb = data[idx[i]]
            t0 = time.perf_counter()
            adamw.zero_grad(set_to_none=True)
            loss = autoencoder_loss(m_adam(xb), xb)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            adamw.step()
            t3 = time.perf_counter()
            parts["adamw forward"] += t1 - t0
            parts["adamw backward"] += t2 - t1
            parts["adamw step"] += t3 - t2
        # AdaHessian
        timer.total.clear()
        for i in range(args.per):
            xb = data[idx[i]]
            t0 = time.perf_counter()
            ada.zero_grad(set_to_none=True)
            loss = autoencoder_loss(m_ada(xb), xb)
            t1 = time.perf_counter()
            loss.backward(create_graph=ada.create_graph)
            t2 = time.perf_counter()
            ada.step()
            t3 = time.perf_counter()
            parts["ada forward"] += t1 - t0
            parts["ada backward(create_graph)"] += t2 - t1
            parts["ada step"] += t3 - t2
        ada.zero_grad(set_to_none=True)
        for k, v in timer.total.items():
            parts[f"ada step: {k}"] += v
        if r == 0:
            continue  # warm-up round
        for k, v in parts.items():
            rows[k].append(v / args.per)
        adam_t = sum(parts[k] for k in parts if k.startswith("adamw"))
        ada_t = sum(parts[k] for k in ("ada forward", "ada backward(create_graph)", "ada step"))
        rows["ratio"].append(ada_t / adam_t)
        print(f"  round {r}: AdamW {adam_t / args.per:.4f} s/step, AdaHessian "
              f"{ada_t / args.per:.4f} s/step, ratio {ada_t / adam_t:.2f}", file=sys.stderr,
              flush=True)

    adam_step = sum(statistics.median(rows[k]) for k in rows if k.startswith("adamw"))
    print(f"\n| phase | median s/step | / AdamW step |  ({args.rounds} rounds x {args.per})")
    print("|---|---:|---:|")
    for k, v in rows.items():
        if k == "ratio":
            continue
        med = statistics.median(v)
        print(f"| {k} | {med:.4f} | {med / adam_step:.2f} |")
    print(f"| **AdaHessian step / AdamW step** (median of rounds) | | "
          f"**{statistics.median(rows['ratio']):.2f}** |")

    if args.micro:
        micro(m_ada, ada, data, args)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        xb = data[idx[0]]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            ada.zero_grad(set_to_none=True)
            loss = autoencoder_loss(m_ada(xb), xb)
            loss.backward(create_graph=True)
            ada.step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def micro(model, opt, data, args) -> None:
    """The parts of the step that changed, old and new form interleaved in one process:
    the estimate ``|z ⊙ Hz|`` (product, then absolute value) vs ``|Hz|``, and the update
    one tensor at a time vs multi-tensor. Medians over ``--micro-repeats`` repeats."""
    params = list(model.parameters())
    xb = data[:args.batch_size]
    opt.zero_grad(set_to_none=True)
    autoencoder_loss(model(xb), xb).backward(create_graph=True)  # state exists already
    grads = [p.grad for p in params]
    gen = torch.Generator().manual_seed(0)
    zs = [ada_mod.H.rademacher(p, gen) for p in params]
    hz = ada_mod.H.hessian_vector_products(params, grads, zs, retain_graph=True)
    group = opt.param_groups[0]
    forms = {
        "estimate: z*Hz then abs (before)": lambda: [(z * h).abs() for z, h in zip(zs, hz)],
        "estimate: abs(Hz) (after)": lambda: [h.abs() for h in hz],
        "update: per tensor (before; CPU default after)": (
            lambda: opt._apply_per_tensor(group, params, 1.0)
        ),
        "update: foreach (after, off the CPU)": lambda: opt._apply_foreach(group, params, 1.0),
    }
    times: dict[str, list[float]] = defaultdict(list)
    with torch.no_grad():
        for _ in range(args.micro_repeats):
            for name, fn in forms.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    opt.zero_grad(set_to_none=True)
    print("\n| part (interleaved) | median ms |\n|---|---:|")
    for name, t in times.items():
        print(f"| {name} | {1e3 * statistics.median(t):.2f} |")


if __name__ == "__main__":
    main()
