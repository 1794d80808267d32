"""Outputs of ``secondorder bench``: terminal table, ``results.json``, ``loss.png`` and
``health.png``.

"Optimizer seconds" (the ``train s`` column and the time axis of the plots) are the summed
durations of the timed steps: ``zero_grad`` + forward + backward + ``optimizer.step``,
everything a training step costs except fetching its batch; evaluation, health sampling
and bookkeeping are outside (they are in ``wall s``).
"""

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

SCHEMA_VERSION = 2
RESULTS_FILE = "results.json"
PLOT_FILE = "loss.png"
HEALTH_FILE = "health.png"
OUTPUT_FILES = (RESULTS_FILE, PLOT_FILE, HEALTH_FILE)
TIME_AXIS = "optimizer seconds (zero_grad + forward + backward + step)"


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with every result."""
    import secondorder

    try:
        import numpy

        numpy_version: str | None = numpy.__version__
    except ImportError:
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
    """Write results.json atomically (a reader never sees half a file)."""
    path = out_dir / RESULTS_FILE
    tmp = out_dir / (RESULTS_FILE + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------- table
def plural(count: float, noun: str) -> str:
    """``1 thread``, ``2 threads``, ``1.5 epochs``."""
    return f"{count:g} {noun}" + ("" if count == 1 else "s")


def sig(value: float | None, digits: int) -> str:
    """``value`` to ``digits`` significant digits, trailing zeros kept (``124.0``,
    ``83.63``); integers too large for that many digits are written in full."""
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    if abs(value) >= 10 ** (digits - 1) and abs(value) < 10**9:
        return f"{value:.0f}"
    text = f"{value:#.{digits}g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        return mantissa.rstrip(".") + "e" + exponent
    return text.rstrip(".")


def _hp(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, (int, float)):
        return f"{value:g}"
    return str(value)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def format_table(results: dict[str, Any]) -> str:
    """The terminal summary: one row per optimizer plus a header and notes."""
    w, s = results["workload"], results["settings"]
    has_val = w.get("has_validation", False)
    sweep = s.get("sweep")
    par = s.get("parallel") or {}
    ranks = par.get("ranks") or 1
    parallel = par.get("mode", "none") != "none"
    columns = ["optimizer", "lr", "wd", "train loss"] + (["val loss"] if has_val else []) + [
        "steps", "wall s", "train s", "step ms", "median ms", "x step", "x median",
        "steps->tgt", "s->tgt", "samples/s", "state MB/rank" if parallel else "state MB",
    ]  # fmt: skip
    rows, notes = [], []
    for r in results["optimizers"]:
        if r["status"] in ("unavailable", "failed"):
            rows.append([r["label"], f"{r['status']}: {r['error']}"])
            continue
        hp = r.get("resolved_hyperparameters") or {}
        lr, wd = _hp(hp.get("lr")), _hp(hp.get("weight_decay"))
        if r.get("sweep"):
            mark = "*"
            if r["sweep"]["key"] == "lr":
                lr += mark
            elif r["sweep"]["key"] == "weight_decay":
                wd += mark
            trials = ", ".join(
                f"{t['value']:g}: "
                + (sig(t["final_val_loss"] if has_val else t["final_train_loss"], 4)
                   if t["status"] == "ok" else t["status"])
                for t in r["sweep"]["trials"]
            )  # fmt: skip
            values = [t["value"] for t in r["sweep"]["trials"]]
            edge = r["sweep"]["chosen"] in (min(values), max(values))
            notes.append(
                f"{r['label']}: {r['sweep']['key']}={r['sweep']['chosen']:g}{mark} is the best of "
                f"the sweep by {r['sweep']['criterion']} ({trials})"
                + ("; at the edge of the sweep, a wider one may find better" if edge else "")
            )
        elif sweep is not None:
            notes.append(f"{r['label']}: not swept ({sweep['key']} fixed by its --opt)")
        row = [r["label"], lr, wd, sig(r["final_train_loss"], 4)]
        if has_val:
            row.append(sig(r["final_val_loss"], 4))
        row += [
            str(r["steps_run"]),
            sig(r["wall_seconds"], 3),
            sig(r["train_seconds"], 3),
            sig(_ms(r["mean_step_seconds"]), 3),
            sig(_ms(r["median_step_seconds"]), 3),
            sig(r.get("mean_step_ratio"), 3),
            sig(r.get("median_step_ratio"), 3),
            "-" if r.get("steps_to_target") is None else str(r["steps_to_target"]),
            sig(r.get("seconds_to_target"), 3),
            sig(r.get("samples_per_second"), 3),
            sig(r["peak_state_bytes"] / 2**20, 3),
        ]
        if r["status"] == "diverged":
            notes.append(f"{r['label']}: {r['error']}")
        notes += [f"warning: {n}" for n in r.get("warnings") or []]
        rows.append(row)
    widths = [len(c) for c in columns]
    for row in rows:
        if len(row) == len(columns):
            widths = [max(a, len(b)) for a, b in zip(widths, row)]

    def line(cells: list[str]) -> str:
        if len(cells) == 2 and len(columns) > 2:  # an optimizer that did not run: one cell
            return f"{cells[0]:<{widths[0]}}  {cells[1]}"
        first = f"{cells[0]:<{widths[0]}}"
        return "  ".join([first] + [f"{c:>{n}}" for c, n in zip(cells[1:], widths[1:])])

    epochs = float(format(s["epochs"], ".3g"))
    header = (
        f"{w['name']}: {w['num_parameters']:,} params, {plural(s['steps'], 'step')} x batch "
        f"{s['batch_size']} ({plural(epochs, 'epoch')}), {s['dtype']} on "
        f"{s['device']} ({plural(s.get('threads') or 0, 'thread')}), seed {s['seed']}, "
        f"schedule {s['schedule']} (warm-up {plural(s['warmup_steps'], 'step')})"
    )
    if parallel:
        header += (
            f"\n--parallel {par['mode']}: {plural(ranks, 'rank')} ({par.get('backend')}, "
            f"{plural(par.get('threads_per_rank') or 0, 'thread')} per rank), each rank "
            f"{s['batch_size'] // ranks} examples of the global batch"
        )
    target = s.get("target_loss")
    legend = (
        f"lr, wd: the optimizer's learning rate and weight decay as resolved (defaults "
        f"included); train loss: mean of the last {plural(s['smoothing_window'], 'step')};\n"
        f"train s: optimizer seconds, the sum of the timed steps (zero_grad + forward + "
        f"backward + optimizer.step; wall s adds data, evaluation, bookkeeping);\n"
        f"step ms: mean timed step"
        + (" (the slowest rank's, step by step)" if parallel else "")
        + "; x: ratio to the first optimizer; samples/s: "
        + ("global " if parallel else "")
        + "examples per optimizer second;\nstate MB: peak optimizer state"
        + (" of the rank holding the most" if parallel else "")
        + f"; tgt: target train loss {sig(target, 4)} ({s.get('target_source')})"
    )
    body = [line(columns), "  ".join("-" * n for n in widths)] + [line(r) for r in rows]
    return "\n".join([header, *body, legend, *notes])


# -------------------------------------------------------------------------------- plots
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_y(ax: Any) -> None:
    """Log y axis with readable ticks: 1-2-5 steps labelled as plain numbers."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=12))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(LogLocator(base=10, subs=tuple(range(1, 10)), numticks=12))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _legend(label: str) -> str:
    """matplotlib hides legend entries whose label starts with an underscore."""
    return " " + label if label.startswith("_") else label


def _ran(results: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    return [(i, r) for i, r in enumerate(results["optimizers"]) if r.get("steps_run")]


def write_plot(results: dict[str, Any], out_dir: Path) -> Path:
    """Loss against steps and against optimizer seconds, one line per optimizer."""
    plt = _pyplot()
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    positive = True
    for i, r in _ran(results):
        color = f"C{i % 10}"
        y = r["train_loss_smoothed"]
        steps = list(range(1, len(y) + 1))
        positive &= all(v is not None and v > 0 for v in y)
        name = _legend(r["label"])
        by_step.plot(steps, y, color=color, label=f"{name} train")
        by_time.plot(r["cumulative_seconds"], y, color=color, label=f"{name} train")
        if r["val_loss"]:
            vs = [p["step"] for p in r["val_loss"]]
            vy = [p["loss"] for p in r["val_loss"]]
            clock = [0.0] + r["cumulative_seconds"]
            by_step.plot(vs, vy, "o--", color=color, ms=3, label=f"{name} val")
            by_time.plot([clock[min(k, len(clock) - 1)] for k in vs], vy, "o--", color=color,
                         ms=3)  # fmt: skip
    w, s = results["workload"], results["settings"]
    for ax, xlabel in ((by_step, "step"), (by_time, TIME_AXIS)):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss")
        ax.grid(True, which="major", alpha=0.3)
        if positive:
            _log_y(ax)
    by_step.legend(fontsize=8)
    fig.suptitle(
        f"{w['name']} — {s['dtype']}, batch {s['batch_size']}, seed {s['seed']} "
        f"(train: mean of last {plural(s['smoothing_window'], 'step')})",
        fontsize=10,
    )
    fig.tight_layout()
    path = out_dir / PLOT_FILE
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def health_metrics(results: dict[str, Any]) -> list[str]:
    """Names of the health fields any optimizer reported, in first-seen order."""
    names: dict[str, None] = {}
    for _, r in _ran(results):
        for sample in r.get("health") or []:
            for key in sample:
                if key != "step":
                    names.setdefault(key)
    return list(names)


def write_health_plot(results: dict[str, Any], out_dir: Path) -> Path | None:
    """One panel per health field (see :mod:`.health`), one line per optimizer that
    reports it; ``None`` (no file) when no optimizer has diagnostics."""
    metrics = health_metrics(results)
    if not metrics:
        return None
    plt = _pyplot()
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for k, name in enumerate(metrics):
        ax = axes[k // cols][k % cols]
        values_all: list[float] = []
        for i, r in _ran(results):
            points = [(p["step"], p[name]) for p in r.get("health") or []
                      if p.get(name) is not None]  # fmt: skip
            if points:
                xs, ys = zip(*points)
                values_all += ys
                ax.plot(xs, ys, "o-", ms=2, color=f"C{i % 10}", label=_legend(r["label"]))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if values_all and min(values_all) > 0 and max(values_all) / min(values_all) > 20:
            _log_y(ax)
        ax.legend(fontsize=7)
    for k in range(len(metrics), rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle(f"{results['workload']['name']}: optimizer health from diagnostics()",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    path = out_dir / HEALTH_FILE
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(results: dict[str, Any], out_dir: str | os.PathLike[str]) -> list[Path]:
    """results.json, loss.png and (when any optimizer has diagnostics) health.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [write_json(results, out)]
    try:
        paths.append(write_plot(results, out))
        health = write_health_plot(results, out)
        if health is not None:
            paths.append(health)
    except ImportError:
        print(
            "secondorder bench: matplotlib is not installed, no plot written "
            "(pip install 'secondorder[bench]')",
            file=sys.stderr,
        )
    return paths
