"""Optimizer-step time of Shampoo relative to AdamW, roots excluded (the per-step path only).

    OMP_NUM_THREADS=1 python benchmarks/bench_step_overhead.py [--src OTHER/src]

The MNIST autoencoder's shapes (2.8M parameters) get fixed random gradients; Shampoo's roots
are computed once (step 1) and never again (``precondition_frequency`` huge), then
``opt.step()`` alone is timed for Shampoo and AdamW, interleaved, median over repeats.
Use ``--src`` to compare two checkouts (each in its own process, same machine, same run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def measure(steps: int, repeats: int) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import autoencoder
    from secondorder import Shampoo

    torch.manual_seed(0)
    models = [autoencoder(), autoencoder()]
    gen = torch.Generator().manual_seed(1)
    for p, q in zip(*(m.parameters() for m in models)):
        p.grad = torch.randn(p.shape, generator=gen).mul_(1e-2)
        q.grad = p.grad.clone()
    sh = Shampoo(
        models[0].parameters(),
        lr=1e-4,
        precondition_frequency=10**9,
        start_preconditioning_step=1,
    )
    ad = torch.optim.AdamW(models[1].parameters(), lr=1e-4)
    sh.step()
    ad.step()
    times = {"shampoo": [], "adamw": []}
    for _ in range(repeats):
        for name, opt in (("shampoo", sh), ("adamw", ad)):
            t0 = time.perf_counter()
            for _ in range(steps):
                opt.step()
            times[name].append((time.perf_counter() - t0) / steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(**{f"{k}_step_s": v for k, v in med.items()}, ratio=med["shampoo"] / med["adamw"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", action="append", help="source trees to compare (default: this)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--run", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        print(json.dumps(measure(args.steps, args.repeats)))
        return
    srcs = args.src or [str(Path(__file__).resolve().parents[1] / "src")]
    for src in srcs:
        env = dict(os.environ, PYTHONPATH=src)
        cmd = [sys.executable, __file__, "--run", "--steps", str(args.steps)]
        cmd += ["--repeats", str(args.repeats)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{src}: Shampoo step {r['shampoo_step_s'] * 1e3:.1f} ms, AdamW step "
            f"{r['adamw_step_s'] * 1e3:.1f} ms, ratio {r['ratio']:.2f}"
        )


if __name__ == "__main__":
    main()
