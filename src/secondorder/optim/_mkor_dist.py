"""The communication MKOR needs on data-parallel models (DDP, FSDP2 / HSDP).

:meth:`DataParallel.sum_` sums a tensor over every data-parallel rank: all dimensions of
the DTensor parameters' device mesh (under HSDP the replicas hold other parts of the
batch too), or the process group of a ``DistributedDataParallel`` model. MKOR sums its
layer statistics with it, so that every rank sees the *global* batch's means, as one
process on the whole batch would. Deterministic and the same on every rank.

The gradient matrices of sharded layers travel with
:func:`secondorder.placement.gather.apply_whole` (to the rank that keeps the layer's
factors and back), not here.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist

__all__ = ["DataParallel"]


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
