"""The benchmark harness behind ``secondorder bench``.

Pieces: :mod:`.workloads` (data + model + loss, by name), :mod:`.optimizers` (optimizers by
name or class path with ``name:key=value`` specs, and how they are built), :mod:`.runner`
(request checking, sweeps, comparisons), :mod:`.training` (the training loop and its
timing), :mod:`.health` (``diagnostics()`` over training), :mod:`.report` (table,
``results.json``, plots), :mod:`.output` (output directory, extras), :mod:`.progress`
(progress bars), :mod:`.mnist` (IDX reader). ``docs/bench.md`` describes what is measured.
"""

from .errors import BenchUsageError
from .runner import BenchConfig, run_benchmark

__all__ = ["BenchConfig", "BenchUsageError", "run_benchmark"]
