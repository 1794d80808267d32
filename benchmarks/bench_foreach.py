"""Optimizer-step time with ``foreach=True`` (multi-tensor) against ``foreach=False`` (one
tensor at a time), per optimizer, on a model of many small tensors and one of few large ones.

    OMP_NUM_THREADS=1 python benchmarks/bench_foreach.py [--device cpu] [--steps 5]
        [--repeats 9] [--workloads byte-lm mnist-autoencoder] [--optimizers SONew ...]

Models: the ``secondorder bench`` workloads ``byte-lm`` (a 4-layer byte transformer: 54
tensors, 0.9M parameters, most of them small) and ``mnist-autoencoder`` (16 tensors, 2.8M
parameters). Each optimizer is built as the bench builds it (``from_model`` where the class
has one) twice, on two copies of the model that hold the same fixed random gradients, one
with ``foreach=True`` and one with ``foreach=False``; ``torch.optim.AdamW`` (its own
foreach and for-loop paths) is the reference row. After ``--warmup`` steps (SOAP computes
its first bases there; its ``precondition_frequency`` is set beyond the run so that the
timed steps are the per-step path, rotations included, without refreshes), ``opt.step()``
alone is timed: ``--steps`` steps per sample, the two settings alternating, ``--repeats``
samples each; the table gives medians and their ratio (per-tensor / multi-tensor: above 1
means the multi-tensor path is faster).

A second table isolates the elementwise work: a decoupled weight decay and a step
(``mul_`` then ``add_``) on the tensor shapes of each model, as one ``_foreach`` call per
operation, as a loop doing one operation over all tensors and then the next (the order of
the ``foreach=False`` path), and as a loop doing both operations on one tensor before the
next (the order of ``torch.optim``'s for-loop path).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import secondorder
from secondorder.bench.workloads import get_workload

OPTIMIZERS: dict[str, dict[str, Any]] = {
    "SONew": dict(lr=1e-3),
    "SOAP": dict(lr=1e-3, precondition_frequency=10**9),
    "Muon": dict(lr=1e-3),
    "SCALE": dict(lr=1e-3),
    "AdaGradNorm": dict(lr=0.1),
}
WORKLOADS = ("byte-lm", "mnist-autoencoder")


def build(name: str, model: torch.nn.Module, foreach: bool) -> torch.optim.Optimizer:
    if name == "AdamW (torch)":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, foreach=foreach)
    cls = getattr(secondorder, name)
    kw = dict(OPTIMIZERS[name], weight_decay=0.01, foreach=foreach)
    if hasattr(cls, "from_model"):
        return cls.from_model(model, **kw)
    return cls(model.parameters(), **kw)


def with_grads(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).mul_(1e-2).to(p.device)
    return model


def timed(step: Callable[[], Any], steps: int, sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - t0) / steps


def measure(workload: str, name: str, args: argparse.Namespace) -> dict[str, float]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = get_workload(workload)(None).make_model().to(device)
    models = {flag: with_grads(copy.deepcopy(base), 1) for flag in (True, False)}
    opts = {flag: build(name, models[flag], flag) for flag in (True, False)}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for opt in opts.values():
        for _ in range(args.warmup):
            opt.step()
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(args.repeats):
        order = (True, False) if r % 2 == 0 else (False, True)
        for flag in order:
            times[flag].append(timed(opts[flag].step, args.steps, sync))
    on, off = statistics.median(times[True]), statistics.median(times[False])
    return dict(on=on, off=off, ratio=off / on, tensors=len(list(base.parameters())))


def elementwise(workload: str, args: argparse.Namespace) -> dict[str, float]:
    """Median seconds of ``mul_`` + ``add_`` over the model's tensors in three orders."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    xs = [p.detach().clone() for p in get_workload(workload)(None).make_model().parameters()]
    xs = [x.to(device) for x in xs]
    ys = [torch.randn_like(x) for x in xs]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def multi() -> None:
        torch._foreach_mul_(xs, 0.999)
        torch._foreach_add_(xs, ys, alpha=-1e-3)

    def by_operation() -> None:
        for x in xs:
            x.mul_(0.999)
        for x, y in zip(xs, ys):
            x.add_(y, alpha=-1e-3)

    def by_tensor() -> None:
        for x, y in zip(xs, ys):
            x.mul_(0.999).add_(y, alpha=-1e-3)

    fns = {"multi": multi, "by_operation": by_operation, "by_tensor": by_tensor}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn, 10 * args.steps, sync))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    ap.add_argument("--optimizers", nargs="+", default=[*OPTIMIZERS, "AdamW (torch)"])
    args = ap.parse_args()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, device "
          f"{args.device}, load average before {load}")  # fmt: skip
    print(f"steps/sample {args.steps}, samples {args.repeats}, warmup {args.warmup}")
    print()
    print("| workload | tensors | optimizer | foreach=True ms | foreach=False ms | ratio |")
    print("|---|---:|---|---:|---:|---:|")
    for workload in args.workloads:
        for name in args.optimizers:
            r = measure(workload, name, args)
            print(f"| {workload} | {r['tensors']} | {name} | {r['on'] * 1e3:.2f} | "
                  f"{r['off'] * 1e3:.2f} | {r['ratio']:.2f} |", flush=True)  # fmt: skip
    print()
    print("| workload | _foreach per op ms | loop, op by op ms | loop, tensor by tensor ms |")
    print("|---|---:|---:|---:|")
    for workload in args.workloads:
        e = elementwise(workload, args)
        print(f"| {workload} | {e['multi'] * 1e3:.3f} | {e['by_operation'] * 1e3:.3f} | "
              f"{e['by_tensor'] * 1e3:.3f} |", flush=True)  # fmt: skip
    if hasattr(os, "getloadavg"):
        print(f"\nload average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
