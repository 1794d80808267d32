"""Adaptive batch sizes: grow the batch when the gradient noise says so.

* :mod:`.controller` -- the tests' decision rule (a pure function) and
  :class:`AdaptiveBatchSize`, which holds the settings, the current batch size and how it
  is realised (micro-batch × ranks × gradient accumulation);
* :mod:`.persample` -- per-sample gradients through ``torch.func`` and their statistics,
  merged across micro-batches and ranks by the law of total variance;
* :mod:`.loop` -- the data loader that follows the controller and a sample-counted LR
  schedule;
* :mod:`.lr` -- the learning rate's factor of the batch size (none, linear, sqrt; capped,
  ramped over examples).

The statistics and tests themselves are pure tensor functions in
:mod:`secondorder.kernels.batch_tests`. See ``docs/adaptive-batch.md``.
"""

from ..kernels.batch_tests import GradStats, merge_stats, stats_from_micro_batch_means
from .controller import (
    TESTS,
    AccumulationPlan,
    AdaptiveBatchSize,
    Decision,
    accumulation_plan,
    next_batch_size,
    required_batch_size,
)
from .loop import AdaptiveBatchLoop, IndexStream, SampleCountedLR, linear_warmup_decay
from .lr import LR_SCALINGS, BatchLRScaling, batch_lr_scale, ramp
from .persample import all_reduce_stats, flatten_samples, gradient_stats, per_sample_grads

__all__ = [
    "LR_SCALINGS",
    "TESTS",
    "AccumulationPlan",
    "AdaptiveBatchLoop",
    "AdaptiveBatchSize",
    "BatchLRScaling",
    "Decision",
    "GradStats",
    "IndexStream",
    "SampleCountedLR",
    "accumulation_plan",
    "all_reduce_stats",
    "batch_lr_scale",
    "flatten_samples",
    "gradient_stats",
    "linear_warmup_decay",
    "merge_stats",
    "next_batch_size",
    "per_sample_grads",
    "ramp",
    "required_batch_size",
    "stats_from_micro_batch_means",
]
