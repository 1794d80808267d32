"""The benchmark harness behind ``secondorder bench``.

Pieces: :mod:`.workloads` (data + model + loss, by name), :mod:`.optimizers` (optimizers by
name with ``name:key=value`` specs), :mod:`.runner` (training loop and metrics),
:mod:`.report` (table, ``results.json``, plot), :mod:`.mnist` (IDX reader).
"""

from .errors import BenchUsageError
from .runner import BenchConfig, run_benchmark

__all__ = ["BenchConfig", "BenchUsageError", "run_benchmark"]
