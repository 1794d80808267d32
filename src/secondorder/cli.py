"""The ``secondorder`` command line. Subcommands: ``bench``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

BENCH_EPILOG = """\
examples:
  secondorder bench                                  quick AdamW vs Shampoo vs SONew run
  secondorder bench mnist-autoencoder --data-dir ~/mnist --epochs 2
  secondorder bench byte-lm --opt adamw:lr=1e-3 --opt shampoo:lr=1e-3,graft=adam --steps 200
  secondorder bench --list                           workloads and optimizers

hyperparameters are Python literals: lr=3e-4, betas=(0.9,0.95), nesterov=True, graft=adam
"""


def _bench_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench",
        help="compare optimizers on a workload (table, results.json, plot)",
        description="Train the same model with each optimizer (same seed, same batches) "
        "and compare loss, step time and optimizer-state memory.",
        epilog=BENCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "workload",
        nargs="?",
        default=None,
        help="workload name (default: digits-autoencoder; see --list)",
    )
    p.add_argument("--data-dir", metavar="DIR", help="directory holding the workload's data")
    p.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="NAME[:key=value,...]",
        help="optimizer to compare (repeatable; the first one is the reference)",
    )
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, metavar="N", help="train for N epochs")
    length.add_argument("--steps", type=int, metavar="N", help="train for N optimizer steps")
    p.add_argument("--batch-size", type=int, metavar="N")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed (default 0)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="model, data and optimizer dtype (default float32)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch CPU threads (default: the workload's, else torch's); --threads 1 gives "
        "steadier timings on a busy machine",
    )
    p.add_argument(
        "--schedule",
        choices=["constant", "warmup-linear"],
        help="learning-rate schedule (default: the workload's)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        metavar="W",
        help="warm-up length: a fraction of the run if < 1, else steps",
    )
    p.add_argument(
        "--target-loss",
        type=float,
        metavar="X",
        help="loss for steps/seconds-to-target (default: first optimizer's final)",
    )
    p.add_argument("--eval-every", type=int, metavar="N", help="validation interval in steps")
    p.add_argument(
        "--out", default="bench-out", metavar="DIR", help="output directory (default: bench-out)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--list", action="store_true", help="list workloads and optimizers, then exit")
    return p  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="secondorder", description="Second-order optimizers for PyTorch."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _bench_parser(sub)
    return parser


def _list() -> None:
    from .bench.optimizers import describe
    from .bench.workloads import DEFAULT_WORKLOAD, get_workload, workload_names

    print("workloads:")
    for name in workload_names():
        cls = get_workload(name)
        length = (
            f"{cls.default_steps} steps" if cls.default_steps else f"{cls.default_epochs} epochs"
        )
        mark = " (default)" if name == DEFAULT_WORKLOAD else ""
        print(f"  {name}{mark}: {cls.description}; batch {cls.default_batch_size}, {length}")
    print("optimizers:")
    for name, source, status in describe():
        print(f"  {name}: {source} [{status}]")


def bench(args: argparse.Namespace, argv: list[str]) -> int:
    from .bench.errors import BenchUsageError
    from .bench.mnist import IDXFormatError, MNISTNotFoundError
    from .bench.report import format_table, write_outputs
    from .bench.runner import BenchConfig, run_benchmark
    from .bench.workloads import DEFAULT_WORKLOAD

    if args.list:
        _list()
        return 0
    config = BenchConfig(
        workload=args.workload or DEFAULT_WORKLOAD,
        data_dir=args.data_dir,
        optimizers=args.opt,
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        dtype=args.dtype,
        device=args.device,
        schedule=args.schedule,
        warmup=args.warmup,
        target_loss=args.target_loss,
        eval_every=args.eval_every,
        threads=args.threads,
    )
    from .bench.report import build_results

    try:
        run = run_benchmark(config, stream=None if args.quiet else sys.stderr)
    except (BenchUsageError, MNISTNotFoundError, IDXFormatError) as exc:
        print(f"secondorder bench: error: {exc}", file=sys.stderr)
        return 2
    results = build_results(run, argv)
    paths = write_outputs(results, args.out)
    print(format_table(results))
    print("wrote " + ", ".join(str(p) for p in paths))
    ran = [r for r in results["optimizers"] if r["status"] != "unavailable"]
    return 0 if ran else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench(args, argv[1:])
    parser.print_help()
    return 0 if not argv else 2
