"""Per-sample gradients through ``torch.func`` and their noise statistics.

:func:`per_sample_grads` evaluates ``loss_fn`` on every example of a batch on its own
(``vmap`` over ``grad`` of a ``functional_call``), so the mean of the per-sample gradients is
the gradient of the batch-mean loss. Layers whose training-mode behaviour couples examples
(BatchNorm) see batches of one, as in any per-sample computation.

:func:`gradient_stats` turns a batch (in chunks, so memory stays bounded) into
:class:`~secondorder.kernels.batch_tests.GradStats`, merged by the law of total variance;
:func:`all_reduce_stats` combines the statistics of every data-parallel rank exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from ..kernels.batch_tests import GradStats, merge_stats, stats_from_samples

__all__ = ["per_sample_grads", "flatten_samples", "gradient_stats", "all_reduce_stats"]


class _Functional:
    """Calls ``model`` with the given parameters and buffers (what ``loss_fn`` receives)."""

    def __init__(self, model: nn.Module, params: dict, buffers: dict) -> None:
        self.model, self.params, self.buffers = model, params, buffers

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.model, (self.params, self.buffers), args, kwargs)


def _batch_len(batch: Any) -> int:
    sizes: list[int] = []
    tree_map(lambda t: sizes.append(t.shape[0]) if isinstance(t, torch.Tensor) else None, batch)
    if not sizes or len(set(sizes)) != 1:
        raise ValueError(f"batch tensors must share their first (batch) dimension, got {sizes}")
    return sizes[0]


def per_sample_grads(
    model: nn.Module,
    loss_fn: Callable[[Callable[..., Any], Any], torch.Tensor],
    batch: Any,
    *,
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Gradient of ``loss_fn`` on each example of ``batch``, per trainable parameter.

    ``loss_fn(model, batch)`` computes a scalar loss; it receives a callable standing in for
    ``model`` and ``batch`` (a tensor or a tuple/dict of tensors) reduced to one example
    (batch dimension 1). Returns ``{name: [b, *param.shape]}`` for every parameter with
    ``requires_grad``. ``chunk_size`` bounds how many examples ``vmap`` processes at once.
    The model's parameters, buffers and ``.grad`` are not modified.
    """
    _batch_len(batch)
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def one(p: dict, example: Any) -> torch.Tensor:
        single = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, example)
        return loss_fn(_Functional(model, p, buffers), single)

    return vmap(grad(one), in_dims=(None, 0), chunk_size=chunk_size)(params, batch)


def flatten_samples(grads: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """``[b, d]`` per-sample gradients (parameters concatenated in order) and the sizes of
    the parameter segments (for the per-layer tests)."""
    flat = [g.reshape(g.shape[0], -1) for g in grads.values()]
    return torch.cat(flat, dim=1), [f.shape[1] for f in flat]


def gradient_stats(
    model: nn.Module,
    loss_fn: Callable[[Callable[..., Any], Any], torch.Tensor],
    batch: Any,
    *,
    chunk_size: int = 64,
) -> GradStats:
    """Noise statistics of the per-sample gradients of ``batch``, computed ``chunk_size``
    examples at a time and merged by the law of total variance (exact)."""
    n = _batch_len(batch)
    parts = []
    for start in range(0, n, chunk_size):
        rows = slice(start, start + chunk_size)
        chunk = tree_map(lambda t, r=rows: t[r] if isinstance(t, torch.Tensor) else t, batch)
        samples, _ = flatten_samples(per_sample_grads(model, loss_fn, chunk))
        parts.append(stats_from_samples(samples))
    return merge_stats(parts)


def all_reduce_stats(stats: GradStats, group: Any = None) -> GradStats:
    """The statistics of the union of every rank's samples (exact, law of total variance).

    Two all-reduces (sums): ``(count, count·mean)`` gives the global mean, then
    ``m2_r + count_r (mean_r − mean)²`` sums to the global ``m2``. Without an initialised
    process group (or with one rank) ``stats`` is returned unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return stats
    mean = stats.mean.double()
    first = torch.cat([mean.new_tensor([float(stats.count)]), mean * stats.count])
    dist.all_reduce(first, group=group)
    count = int(round(float(first[0])))
    if count == 0:
        raise ValueError("all_reduce_stats: no samples on any rank")
    global_mean = first[1:] / count
    m2 = stats.m2.double() + stats.count * (mean - global_mean).square()
    dist.all_reduce(m2, group=group)
    return GradStats(count, global_mean, m2)
