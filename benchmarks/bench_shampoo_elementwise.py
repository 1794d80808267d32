"""Shampoo's per-step elementwise work on many small tensors: step time of two source trees.

    git archive <old-commit> src | tar -x -C /tmp/before
    OMP_NUM_THREADS=1 python benchmarks/bench_shampoo_elementwise.py --before /tmp/before/src

The model is the ``byte-lm`` workload's transformer (``secondorder bench``: 4 blocks of width
128, 52 parameter tensors, 0.8M parameters, most of them small), with fixed random
gradients. Two settings are timed, ``opt.step()`` alone, roots excluded:

* ``elementwise``: the elementwise pipeline alone (momentum, Adam graft, weight decay,
  update: AdamW's work): ``start_preconditioning_step`` is never reached and the
  statistics update (``Shampoo._accumulate``) is switched off, in both trees;
* ``graft-only``: the same with the statistics on (a real step before the first root);
* ``preconditioned``: roots computed once at step 1 and never again
  (``precondition_frequency`` huge), then the per-step path: statistics, Kronecker products
  with grafting, and the same elementwise work.

Each source tree runs in its own process, the processes alternate ``--rounds`` times, and
every process also times ``torch.optim.AdamW(foreach=True)`` on the same model. Times are
the process's CPU time per step (``time.process_time``; with ``OMP_NUM_THREADS=1`` the work
done, much less sensitive than wall time to other jobs on a shared machine; wall times are
in the JSON), medians over repeats and rounds. "Shampoo / AdamW" is a ratio measured inside
one process; "after / before" divides the two trees' medians.
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

SETTINGS = {
    "elementwise": dict(start_preconditioning_step=10**9),  # and no statistics, see below
    "graft-only": dict(start_preconditioning_step=10**9),
    "preconditioned": dict(start_preconditioning_step=1, precondition_frequency=10**9),
}


def measure(setting: str, steps: int, repeats: int) -> dict:
    import torch

    from secondorder import Shampoo
    from secondorder.bench.workloads import byte_lm as lm

    torch.manual_seed(0)
    models = [lm.ByteTransformer(lm.CONTEXT, lm.WIDTH, lm.HEADS, lm.LAYERS) for _ in range(2)]
    gen = torch.Generator().manual_seed(1)
    for p, q in zip(*(m.parameters() for m in models)):
        p.grad = torch.randn(p.shape, generator=gen).mul_(1e-2)
        q.grad = p.grad.clone()
    if setting == "elementwise":
        Shampoo._accumulate = lambda self, it, layout: None
    sh = Shampoo(models[0].parameters(), lr=1e-4, weight_decay=0.01, **SETTINGS[setting])
    ad = torch.optim.AdamW(models[1].parameters(), lr=1e-4, weight_decay=0.01, foreach=True)
    sh.step()  # state (and, preconditioned, the only roots)
    ad.step()
    times: dict[str, list[float]] = {"shampoo": [], "adamw": []}
    walls: dict[str, list[float]] = {"shampoo": [], "adamw": []}
    for _ in range(repeats):
        for name, opt in (("shampoo", sh), ("adamw", ad)):
            t0, w0 = time.process_time(), time.perf_counter()
            for _ in range(steps):
                opt.step()
            times[name].append((time.process_time() - t0) / steps)
            walls[name].append((time.perf_counter() - w0) / steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(
        setting=setting,
        tensors=len(list(models[0].parameters())),
        params=sum(p.numel() for p in models[0].parameters()),
        shampoo_step_s=med["shampoo"],
        adamw_step_s=med["adamw"],
        ratio_to_adamw=med["shampoo"] / med["adamw"],
        shampoo_wall_s=statistics.median(walls["shampoo"]),
        adamw_wall_s=statistics.median(walls["adamw"]),
        threads=torch.get_num_threads(),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="src/ of the tree to compare against")
    ap.add_argument("--after", default=str(Path(__file__).resolve().parents[1] / "src"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--json", help="write all measurements here")
    ap.add_argument("--run", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        print(json.dumps(measure(args.run, args.steps, args.repeats)))
        return
    records = []
    for setting in args.settings.split(","):
        got: dict[str, list[dict]] = {"before": [], "after": []}
        for _ in range(args.rounds):
            for tree in ("before", "after"):
                env = dict(os.environ, PYTHONPATH=getattr(args, tree))
                cmd = [sys.executable, __file__, "--before", "-", "--run", setting]
                cmd += ["--steps", str(args.steps), "--repeats", str(args.repeats)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                got[tree].append(dict(r, tree=tree))
        records += got["before"] + got["after"]
        med = {
            t: {
                k: statistics.median(r[k] for r in got[t])
                for k in ("shampoo_step_s", "adamw_step_s", "ratio_to_adamw")
            }
            for t in got
        }
        r0 = got["after"][0]
        print(f"{setting} ({r0['tensors']} tensors, {r0['params']} parameters):")
        for t in ("before", "after"):
            m = med[t]
            print(
                f"  {t:6s} Shampoo step {m['shampoo_step_s'] * 1e3:7.2f} ms   AdamW "
                f"{m['adamw_step_s'] * 1e3:6.2f} ms   Shampoo / AdamW {m['ratio_to_adamw']:5.2f}"
            )
        a, b = med["after"], med["before"]
        print(
            f"  after / before: step time {a['shampoo_step_s'] / b['shampoo_step_s']:.2f}, "
            f"Shampoo / AdamW {a['ratio_to_adamw'] / b['ratio_to_adamw']:.2f}",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
