"""The communication MKOR needs on FSDP2 / HSDP models (DTensor parameters).

Two collectives, both deterministic and the same on every rank:

* :meth:`DataParallel.sum_` sums a tensor over every data-parallel rank: all dimensions of
  the DTensor parameters' device mesh (under HSDP the replicas hold other parts of the
  batch too), or the process group of a ``DistributedDataParallel`` model. MKOR sums its
  layer statistics with it, so that every rank folds the *global* batch's vectors into its
  factors, as one process on the whole batch would.
* :func:`gather_rows` all-gathers row-sharded matrices over the shard group: the whole
  gradient matrix ``[dW | db]`` of every sharded layer, in one collective for all of them.
  The left factor mixes rows, so a shard alone cannot be preconditioned.

Shards are cut as FSDP2 cuts them (``torch.chunk``: ``ceil(rows / shards)`` rows per rank,
the last ranks fewer or none); every piece is padded to that size for the all-gather.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from ..placement import ParamPlacement

__all__ = ["DataParallel", "gather_rows"]


class DataParallel(NamedTuple):
    """The data-parallel ranks: a device mesh (FSDP2 / HSDP) or a process group (DDP)."""

    mesh: Any = None
    group: Any = None

    @property
    def size(self) -> int:
        return self.mesh.size() if self.mesh is not None else dist.get_world_size(self.group)

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In place: ``t`` summed over all the ranks (one all-reduce per mesh dimension)."""
        if self.mesh is None:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
            return t
        for d in range(self.mesh.ndim):
            if self.mesh.size(d) > 1:
                dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.mesh.get_group(d))
        return t


def gather_rows(
    pieces: Sequence[torch.Tensor], placements: Sequence[ParamPlacement]
) -> list[torch.Tensor]:
    """The whole matrices of which ``pieces[i]`` holds this rank's rows, laid out as
    ``placements[i]`` says (all sharded on one shard group, all of one dtype and device).

    ``pieces[i]`` is ``(local rows, n_i)``; the result ``(rows_i, n_i)`` with
    ``rows_i = placements[i].global_shape[0]``. One all-gather for all of them.
    """
    if not pieces:
        return []
    pl0 = placements[0]
    shards, group = pl0.shard_count, pl0.group()
    chunks = [-(-pl.global_shape[0] // shards) for pl in placements]
    sizes = [c * p.shape[1] for c, p in zip(chunks, pieces)]
    buf = pieces[0].new_zeros(sum(sizes))
    at = 0
    for piece, size in zip(pieces, sizes):
        buf[at : at + piece.numel()].copy_(piece.reshape(-1))
        at += size
    out = [torch.empty_like(buf) for _ in range(shards)]
    dist.all_gather(out, buf, group=group)
    whole = []
    at = 0
    for piece, chunk, size, pl in zip(pieces, chunks, sizes, placements):
        n = piece.shape[1]
        parts = [o[at : at + size].view(chunk, n) for o in out]
        whole.append(torch.cat(parts)[: pl.global_shape[0]])
        at += size
    return whole
