"""The ``secondorder`` command line. Subcommands: ``bench``.

Usage errors are one line on stderr starting ``secondorder bench: error:`` with exit
status 2, never a traceback. ``--list``, ``--version`` and ``--help`` need only torch; a
benchmark run needs the ``[bench]`` extra and says so in one line when it is missing.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

BENCH_EPILOG = """\
examples:
  secondorder bench                                  quick AdamW vs Shampoo vs SONew run
  secondorder bench mnist-autoencoder --data-dir ~/mnist --epochs 2
  secondorder bench byte-lm --opt adamw:lr=1e-3 --opt shampoo:lr=1e-3,graft=adam --steps 200
  secondorder bench --opt adamw --opt torch.optim.NAdam --sweep lr=1e-3,3e-3,1e-2
  secondorder bench --list                           workloads and optimizers
  secondorder bench byte-lm --parallel fsdp2 --nproc 2 --steps 50   data-parallel, 2 processes

--opt NAME is a name from --list or the dotted path of any importable optimizer class;
hyperparameters are Python literals: lr=3e-4, betas=(0.9,0.95), nesterov=True, graft=adam
"""


def _version() -> str:
    import torch

    from . import __version__

    return f"secondorder {__version__} (torch {torch.__version__})"


class _VersionAction(argparse.Action):
    """``--version`` that imports the package (and torch) only when asked."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(_version())
        parser.exit()


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line error format (exit status 2)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _bench_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench",
        help="compare optimizers on a workload (table, results.json, plots)",
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
    p.add_argument("--data-dir", metavar="DIR",
                   help="directory holding the workload's data (workloads that read data only)")
    p.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="NAME[:key=value,...]",
        help="optimizer to compare: a name from --list or a class path like "
        "torch.optim.NAdam (repeatable; the first one is the reference)",
    )
    p.add_argument(
        "--sweep",
        metavar="KEY=V1,V2,...",
        help="run every optimizer at each value (e.g. lr=1e-4,3e-4,1e-3) and report it at its "
        "best one (by final validation loss, else train loss); an --opt that sets KEY is "
        "run as given",
    )
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, metavar="N", help="train for N epochs")
    length.add_argument("--steps", type=int, metavar="N", help="train for N optimizer steps")
    p.add_argument("--batch-size", type=int, metavar="N")
    p.add_argument("--batch-schedule", metavar="SPEC",
                   help="constant (default) or adaptive[:test=norm,eta=0.1,max_batch=N,...]: "
                   "grow the batch from --batch-size when the gradient noise says so, over the "
                   "same number of examples (see docs/adaptive-batch.md)")
    p.add_argument("--parallel", default="none", metavar="MODE",
                   help="none (default), ddp or fsdp2: train data-parallel over --nproc local "
                   "processes (or the torchrun group this runs in); the global batch is "
                   "--batch-size, split evenly (see docs/bench.md)")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="processes of --parallel (default 2; under torchrun: its WORLD_SIZE)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed (default 0)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="model, data and optimizer dtype (default float32)",
    )
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda, cuda:N, mps, xpu (default: auto = cuda if available)")
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
        "--out",
        metavar="DIR",
        help="output directory (default: a new bench-out/<workload>-<time>); must not hold "
        "an earlier run's results unless --overwrite",
    )
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--list", action="store_true", help="list workloads and optimizers, then exit")
    return p  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="secondorder", description="Second-order optimizers for PyTorch.")
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _bench_parser(sub)
    return parser


def _list() -> None:
    from .bench.optimizers import describe
    from .bench.report import plural
    from .bench.workloads import DEFAULT_WORKLOAD, get_workload, workload_names

    print("workloads:")
    for name in workload_names():
        cls = get_workload(name)
        length = (
            plural(cls.default_steps, "step")
            if cls.default_steps
            else plural(cls.default_epochs or 1, "epoch")
        )
        mark = " (default)" if name == DEFAULT_WORKLOAD else ""
        print(f"  {name}{mark}: {cls.description}; batch {cls.default_batch_size}, {length}")
    print("optimizers:")
    for name, source, status in describe():
        print(f"  {name}: {source} [{status}]")
    print("  any importable optimizer class by its path, e.g. torch.optim.NAdam")


def _error(message: str) -> int:
    print(f"secondorder bench: error: {message}", file=sys.stderr)
    return 2


def bench(args: argparse.Namespace, argv: list[str]) -> int:
    code = _bench_reported(args, argv)
    from .bench.parallel import joined_torchrun_group

    if joined_torchrun_group():
        # A torchrun rank that used gloo: its outputs are written and its process group is
        # gone. Interpreter teardown with gloo's C++ threads alive can still abort the
        # process (rarely: "terminate called without an active exception"), which torchrun
        # would report as a failed run, so leave without it, as the spawned ranks do.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _bench_reported(args: argparse.Namespace, argv: list[str]) -> int:
    from .bench.errors import BenchUsageError
    from .bench.mnist import IDXFormatError, MNISTNotFoundError
    from .bench.parallel import RankError

    if args.list:
        _list()
        return 0
    try:
        return _bench(args, argv)
    except (BenchUsageError, MNISTNotFoundError, IDXFormatError) as exc:
        return _error(str(exc))
    except RankError as exc:  # a rank of --parallel failed: one line naming it
        print(f"secondorder bench: error: {exc}", file=sys.stderr)
        return 1


def _save(run: dict[str, Any], out: Any, argv: list[str]) -> None:
    """Write results.json after each optimizer (module level: a spawned rank 0 calls it)."""
    from .bench.report import build_results, write_json

    write_json(build_results(run, argv), out)


def _bench(args: argparse.Namespace, argv: list[str]) -> int:
    import functools

    from .bench.output import check_extras, default_out_dir, prepare_out_dir
    from .bench.parallel import under_torchrun
    from .bench.report import build_results, format_table, write_outputs
    from .bench.runner import BenchConfig, check_request, run_benchmark
    from .bench.workloads import DEFAULT_WORKLOAD

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
        sweep=args.sweep,
        batch_schedule=args.batch_schedule,
        parallel=args.parallel,
        nproc=args.nproc,
    )
    # everything that can be checked is checked before data is loaded or a step is taken
    workload_cls, _ = check_request(config)
    check_extras(progress=not args.quiet, workload_modules=workload_cls.requires)
    if config.parallel != "none" and under_torchrun() and os.environ["RANK"] != "0":
        # another rank of a torchrun group: it trains, rank 0 reports and writes
        run_benchmark(config, stream=None, on_update=None)
        return 0
    out = prepare_out_dir(args.out or default_out_dir(config.workload), args.overwrite)
    # after each optimizer: never lose a finished run
    save = functools.partial(_save, out=out, argv=argv)
    try:
        run = run_benchmark(config, stream=None if args.quiet else sys.stderr, on_update=save)
        assert run is not None  # rank 0 (or one process) always has the results
    except KeyboardInterrupt:
        kept = out / "results.json"
        where = f"the finished optimizers are in {kept}" if kept.exists() else "nothing finished"
        print(f"\nsecondorder bench: interrupted; {where}", file=sys.stderr)
        return 130
    results = build_results(run, argv)
    paths = write_outputs(results, out)
    from .bench.adaptive import summary, write_batch_plot

    paths += [p for p in [write_batch_plot(results, out)] if p is not None]
    print("\n".join([format_table(results), *summary(results)]))
    print("wrote " + ", ".join(str(p) for p in paths))
    ran = [r for r in results["optimizers"] if r["status"] in ("ok", "diverged")]
    return 0 if ran else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench(args, argv[1:])
    parser.print_help()
    return 0 if not argv else 2
