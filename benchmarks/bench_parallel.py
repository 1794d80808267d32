"""One process vs ``--parallel ddp`` vs ``--parallel fsdp2``: a thin wrapper over
``secondorder bench`` that runs the three modes back to back and prints one Markdown table.

    python benchmarks/bench_parallel.py mnist-autoencoder --data-dir ../shared/data/mnist \\
        --steps 30
    python benchmarks/bench_parallel.py byte-lm --steps 30 --opt adamw --opt sonew
    python benchmarks/bench_parallel.py mnist-autoencoder --data-dir DIR --mode ddp \\
        --opt shampoo --opt shampoo:distributed=True

Each mode is one ``secondorder bench`` command (printed before it runs; its results.json
and plots go to ``--out/<mode>``): the training loop, the batch split, the timing and the
memory accounting are the bench's (see docs/bench.md, "Data parallel"). The one-process run
gets ``--nproc x`` the per-rank threads, so that every mode uses the same cores. Under
``fsdp2`` Shampoo also runs with ``fsdp_mode=exact``. Compare modes within one invocation
only (same machine, same load).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ("none", "ddp", "fsdp2")
DEFAULT_OPTS = ("adamw", "shampoo", "sonew")


def commands(args: argparse.Namespace, out: Path) -> list[tuple[str, list[str]]]:
    """The ``secondorder bench`` command line of every mode."""
    base = [args.workload, "--steps", str(args.steps), "--schedule", "constant", "--quiet",
            "--overwrite"]  # fmt: skip
    if args.data_dir:
        base += ["--data-dir", str(args.data_dir)]
    if args.batch_size:
        base += ["--batch-size", str(args.batch_size)]
    opts = args.opt or list(DEFAULT_OPTS)
    runs = []
    for mode in args.mode or MODES:
        mode_opts = list(opts)
        if mode == "fsdp2" and not args.opt:
            mode_opts.insert(mode_opts.index("shampoo") + 1, "shampoo:fsdp_mode=exact")
        cmd = [*base, "--out", str(out / mode)]
        for opt in mode_opts:
            cmd += ["--opt", opt]
        if mode == "none":
            cmd += ["--threads", str(args.nproc * args.threads_per_rank)]
        else:
            cmd += ["--parallel", mode, "--nproc", str(args.nproc),
                    "--threads", str(args.threads_per_rank)]  # fmt: skip
        runs.append((mode, cmd))
    return runs


def table(results: dict[str, dict]) -> str:
    """One row per (optimizer, mode), from the modes' results.json."""
    lines = [
        "| optimizer | mode | ranks | optimizer MiB per rank | step ms (mean) | step ms (median) "
        "| samples/s | final train loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    labels: list[str] = []  # every mode's optimizers, each after its predecessor there
    for res in results.values():
        previous = -1
        for r in res["optimizers"]:
            if r["label"] not in labels:
                labels.insert(previous + 1, r["label"])
            previous = labels.index(r["label"])
    rows = [(r["label"], mode, r) for mode, res in results.items() for r in res["optimizers"]]
    for label, mode, r in sorted(rows, key=lambda x: (labels.index(x[0]), MODES.index(x[1]))):
        if r["status"] not in ("ok", "diverged"):
            lines.append(f"| {label} | {mode} | - | {r['status']}: {r['error']} | | | | |")
            continue
        lines.append(
            f"| {label} | {mode} | {r['ranks']} | {r['state_bytes_per_rank'] / 2**20:.2f} | "
            f"{r['mean_step_seconds'] * 1e3:.1f} | {r['median_step_seconds'] * 1e3:.1f} | "
            f"{r['samples_per_second']:.0f} | {r['final_train_loss']:.5g} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload", nargs="?", default="mnist-autoencoder")
    ap.add_argument("--data-dir", type=Path)
    ap.add_argument("--opt", action="append", help="as for secondorder bench (repeatable)")
    ap.add_argument("--mode", action="append", choices=MODES)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--threads-per-rank", type=int, default=1)
    ap.add_argument("--out", type=Path, help="directory of the modes' outputs (default: temp)")
    args = ap.parse_args()
    loads = [_load()]
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        results = {}
        for mode, cmd in commands(args, out):
            print("secondorder bench " + " ".join(cmd), file=sys.stderr, flush=True)
            subprocess.run([sys.executable, "-m", "secondorder", "bench", *cmd], check=True)
            results[mode] = json.loads((out / mode / "results.json").read_text())
            loads.append(_load())
        modes = ", ".join(results)
        print(f"\nload average (1 min) before and after each mode ({modes}): "
              + " -> ".join(f"{v:.1f}" for v in loads) + "\n")  # fmt: skip
        print(table(results))


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


if __name__ == "__main__":
    main()
