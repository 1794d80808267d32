"""Outputs of ``secondorder bench``: terminal table, ``results.json``, ``loss.png``."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
PLOT_FILE = "loss.png"


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with every result."""
    import secondorder

    try:
        import numpy

        numpy_version: str | None = numpy.__version__
    except ImportError:  # pragma: no cover
        numpy_version = None
    affinity = getattr(os, "sched_getaffinity", None)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy_version,
        "secondorder": getattr(secondorder, "__version__", None),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(affinity(0)) if affinity else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cuda_available": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _jsonable(value: Any) -> Any:
    """Plain JSON: tuples become lists, non-finite floats become null, others strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def build_results(run: dict[str, Any], argv: list[str]) -> dict[str, Any]:
    """Add the command line, time stamp and environment to a runner result."""
    return _jsonable(
        {
            "schema_version": SCHEMA_VERSION,
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "secondorder bench " + shlex.join(argv),
            "argv": list(argv),
            "environment": environment(),
            **run,
        }
    )


def write_json(results: dict[str, Any], out_dir: Path) -> Path:
    path = out_dir / RESULTS_FILE
    path.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    return path


# ------------------------------------------------------------------------------- table
def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(results: dict[str, Any]) -> str:
    """The terminal summary: one row per optimizer plus a header and notes."""
    w, s = results["workload"], results["settings"]
    has_val = w.get("has_validation", False)
    columns = ["optimizer", "train loss"] + (["val loss"] if has_val else []) + [
        "steps", "wall s", "train s", "step ms", "median ms", "x step", "x median",
        "steps->tgt", "s->tgt", "state MB",
    ]  # fmt: skip
    rows, notes = [], []
    for r in results["optimizers"]:
        if r["status"] == "unavailable":
            rows.append([r["label"], f"unavailable: {r['error']}"])
            continue
        row = [r["label"], _num(r["final_train_loss"], ".4g")]
        if has_val:
            row.append(_num(r["final_val_loss"], ".4g"))
        row += [
            str(r["steps_run"]),
            _num(r["wall_seconds"], ".2f"),
            _num(r["train_seconds"], ".2f"),
            _num(r["mean_step_seconds"] and r["mean_step_seconds"] * 1e3, ".2f"),
            _num(r["median_step_seconds"] and r["median_step_seconds"] * 1e3, ".2f"),
            _num(r.get("mean_step_ratio"), ".2f"),
            _num(r.get("median_step_ratio"), ".2f"),
            _num(r.get("steps_to_target"), "d"),
            _num(r.get("seconds_to_target"), ".2f"),
            _num(r["peak_state_bytes"] / 2**20, ".3f"),
        ]
        if r["status"] == "diverged":
            notes.append(f"{r['label']}: {r['error']}")
        rows.append(row)
    widths = [len(c) for c in columns]
    for row in rows:
        if len(row) == len(columns):
            widths = [max(a, len(b)) for a, b in zip(widths, row)]

    def line(cells: list[str]) -> str:
        if len(cells) == 2 and len(columns) > 2:  # an unavailable optimizer: one wide cell
            return f"{cells[0]:<{widths[0]}}  {cells[1]}"
        first = f"{cells[0]:<{widths[0]}}"
        return "  ".join([first] + [f"{c:>{n}}" for c, n in zip(cells[1:], widths[1:])])

    header = (
        f"{w['name']}: {w['num_parameters']:,} params, {s['steps']} steps x batch "
        f"{s['batch_size']} ({s['epochs']:.3g} epochs), {s['dtype']} on {s['device']} "
        f"({s.get('threads')} threads), "
        f"seed {s['seed']}, schedule {s['schedule']} (warm-up {s['warmup_steps']} steps)"
    )
    target = s.get("target_loss")
    legend = (
        f"train loss: mean of the last {s['smoothing_window']} steps; train s: timed steps "
        f"only (wall s adds data, evaluation, bookkeeping); x: ratio to the first optimizer;\n"
        f"tgt: target train loss {_num(target, '.4g')} ({s.get('target_source')})"
    )
    body = [line(columns), "  ".join("-" * n for n in widths)] + [line(r) for r in rows]
    return "\n".join([header, *body, legend, *notes])


# -------------------------------------------------------------------------------- plot
def write_plot(results: dict[str, Any], out_dir: Path) -> Path:
    """Loss against steps and against optimizer seconds, one line per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    positive = True
    for i, r in enumerate(results["optimizers"]):
        if r["status"] == "unavailable" or not r.get("steps_run"):
            continue
        color = f"C{i % 10}"
        y = r["train_loss_smoothed"]
        steps = list(range(1, len(y) + 1))
        positive &= all(v is not None and v > 0 for v in y)
        by_step.plot(steps, y, color=color, label=f"{r['label']} train")
        by_time.plot(r["cumulative_seconds"], y, color=color, label=f"{r['label']} train")
        if r["val_loss"]:
            vs = [p["step"] for p in r["val_loss"]]
            vy = [p["loss"] for p in r["val_loss"]]
            clock = [0.0] + r["cumulative_seconds"]
            by_step.plot(vs, vy, "o--", color=color, ms=3, label=f"{r['label']} val")
            by_time.plot([clock[k] for k in vs], vy, "o--", color=color, ms=3)
    w, s = results["workload"], results["settings"]
    for ax, xlabel in ((by_step, "step"), (by_time, "optimizer seconds (timed steps)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
        if positive:
            ax.set_yscale("log")
    by_step.legend(fontsize=8)
    fig.suptitle(
        f"{w['name']} — {s['dtype']}, batch {s['batch_size']}, seed {s['seed']} "
        f"(train: mean of last {s['smoothing_window']} steps)",
        fontsize=10,
    )
    fig.tight_layout()
    path = out_dir / PLOT_FILE
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(results: dict[str, Any], out_dir: str | os.PathLike[str]) -> list[Path]:
    """results.json and the plot (skipped with a warning when matplotlib is missing)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [write_json(results, out)]
    try:
        paths.append(write_plot(results, out))
    except ImportError:  # pragma: no cover - depends on the environment
        print(
            "secondorder bench: matplotlib is not installed, no plot written "
            "(pip install 'secondorder[bench]')",
            file=sys.stderr,
        )
    return paths
