"""Where ``secondorder bench`` writes, checked before any training starts."""

from __future__ import annotations

import datetime as _dt
import importlib
import os
from pathlib import Path

from .errors import BenchUsageError
from .report import OUTPUT_FILES

DEFAULT_ROOT = "bench-out"
BENCH_EXTRA = "pip install 'secondorder[bench]'"


def default_out_dir(workload: str) -> Path:
    """``bench-out/<workload>-<UTC time>``: a new directory for every run."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = Path(DEFAULT_ROOT) / f"{workload}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = Path(DEFAULT_ROOT) / f"{workload}-{stamp}-{n}"
    return path


def prepare_out_dir(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """Create ``path`` (a directory) or check that it can take this run's files.

    Refuses an existing file, a directory that already holds results of another run
    (unless ``overwrite``), and a location that cannot be created or written."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise BenchUsageError(f"--out {out} is an existing file; --out names a directory")
    if out.is_dir() and not overwrite:
        present = [name for name in OUTPUT_FILES if (out / name).exists()]
        if present:
            raise BenchUsageError(
                f"--out {out} already holds {', '.join(present)} from an earlier run; choose "
                "another --out or pass --overwrite"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BenchUsageError(f"cannot create --out {out}: {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise BenchUsageError(f"--out {out} is not writable")
    return out


def missing_modules(names: tuple[str, ...]) -> list[str]:
    """The modules of ``names`` that cannot be imported."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def check_extras(progress: bool, workload_modules: tuple[str, ...]) -> None:
    """A run needs matplotlib (plots), tqdm (progress, unless quiet) and its workload's
    modules; all are in the ``[bench]`` extra. One clear line when any is missing."""
    needed = ("matplotlib",) + (("tqdm",) if progress else ()) + workload_modules
    missing = missing_modules(needed)
    if missing:
        raise BenchUsageError(
            f"this benchmark needs {', '.join(missing)}, from the [bench] extra: {BENCH_EXTRA}"
        )
