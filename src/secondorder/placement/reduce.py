"""Reductions over the shards of DTensor parameters, batched into one collective per group.

An optimizer whose math sums (or maximises) over a whole tensor computes the sum of its
local shard and completes it over the shards. Doing that one parameter at a time costs one
collective per parameter and step; :func:`all_reduce_over_shards` instead packs the values
of every sharded parameter that share a shard group (the same device mesh and shard
dimension: one FSDP2 / HSDP model gives one) into a single vector and reduces it once.
Under HSDP the replicas of a shard hold equal values, so reducing over the shard dimension
only is enough.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .params import ParamPlacement

__all__ = ["all_reduce_over_shards"]


def all_reduce_over_shards(
    items: Iterable[tuple[ParamPlacement | None, torch.Tensor]], op: str
) -> None:
    """In place: each tensor of ``items`` reduced with ``op`` (``"sum"`` or ``"max"``) over
    the shards of the parameter it belongs to.

    ``items`` holds ``(placement, tensor)`` pairs, ``placement`` being that of the
    parameter (``None`` for a plain tensor). Tensors of parameters that are not sharded are
    left as they are. Tensors of one shard group, dtype and device travel in one
    all-reduce. A collective: every rank of a shard group must call it with tensors of the
    same shapes and dtypes, in the same order (those of an empty shard included).
    """
    buckets: dict[tuple[Any, ...], tuple[ParamPlacement, list[torch.Tensor]]] = {}
    for pl, t in items:
        if pl is None or not pl.sharded:
            continue
        key = (pl.mesh, pl.shard_dim, t.dtype, t.device)
        buckets.setdefault(key, (pl, []))[1].append(t)
    for pl, ts in buckets.values():
        if len(ts) == 1 and ts[0].is_contiguous():
            pl.all_reduce_(ts[0], op)
            continue
        flat = torch.cat([t.reshape(-1) for t in ts])
        pl.all_reduce_(flat, op)
        offset = 0
        for t in ts:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view(t.shape))
            offset += n
