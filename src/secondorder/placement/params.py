"""Where a parameter lives: the whole tensor in this process, or a shard of a DTensor.

FSDP2 (``torch.distributed.fsdp.fully_shard``) turns every parameter into a ``DTensor``
whose placements say how it is laid out over a device mesh: ``Shard(0)`` on the mesh
dimension that shards it (each rank holds a contiguous range of rows, cut as
``torch.chunk`` cuts: ``ceil(rows / shards)`` rows per rank, the last ranks possibly
fewer or none) and ``Replicate()`` on the others (HSDP's replicate dimension). This module
describes that layout for one parameter (:class:`ParamPlacement`) and rejects layouts the
optimizers cannot handle (tensor parallelism shards another dimension: an elementwise
update would still be right, but a preconditioner that couples neighbouring entries would
silently couple the wrong ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

try:  # DTensor needs torch.distributed, absent from some builds
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - builds without distributed support
    DTensor = Replicate = Shard = None

__all__ = ["ParamPlacement", "is_dtensor", "placement_of"]

SUPPORTED = "Replicate() on any mesh dimension and Shard(0) on at most one (FSDP2 / HSDP)"


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


@dataclass(frozen=True)
class ParamPlacement:
    """Layout of one DTensor parameter (plain tensors have none).

    Attributes:
        name: how error messages name the parameter.
        global_shape / local_shape: of the whole parameter and of this rank's part.
        mesh, placements: the DTensor's device mesh and placements.
        shard_dim: the mesh dimension whose ``Shard(0)`` cuts the rows, or ``None`` when
            every rank holds the whole tensor (all ``Replicate()``).
        shard_index, shard_count: this rank's coordinate along ``shard_dim`` and its size.
        row_start: first row (index along dim 0) of this rank's part in the whole tensor.
    """

    name: str
    global_shape: torch.Size
    local_shape: torch.Size
    mesh: Any
    placements: tuple[Any, ...]
    shard_dim: int | None
    shard_index: int
    shard_count: int
    row_start: int

    @property
    def sharded(self) -> bool:
        """Whether this rank holds only part of the tensor (a shard of a larger whole)."""
        return self.shard_dim is not None and self.shard_count > 1

    @property
    def local_numel(self) -> int:
        return self.local_shape.numel()

    def group(self) -> Any:
        """The process group of the ranks holding the other shards (collectives on it)."""
        return self.mesh.get_group(self.shard_dim)

    def all_reduce_(self, t: torch.Tensor, op: str) -> torch.Tensor:
        """In place: ``t`` reduced (``"sum"`` or ``"max"``) over the shards of this tensor
        (no-op unless sharded). Replicas of a shard (HSDP) hold equal values already."""
        if self.sharded:
            ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
            dist.all_reduce(t, op=ops[op], group=self.group())
        return t

    def rows(self) -> slice:
        """This rank's rows of the whole tensor."""
        n = self.local_shape[0] if self.local_shape else 1
        return slice(self.row_start, self.row_start + n)

    def shifted(self, lead: int) -> tuple[Any, ...]:
        """Placements of a tensor with ``lead`` extra leading dims before the parameter's."""
        return tuple(
            Shard(pl.dim + lead) if isinstance(pl, Shard) else pl for pl in self.placements
        )


def placement_of(p: torch.Tensor, name: str) -> ParamPlacement | None:
    """The layout of ``p`` (``None`` for a plain tensor); ``ValueError`` if unsupported."""
    if not is_dtensor(p):
        return None
    placements = tuple(p.placements)
    shard_dims = []
    for d, pl in enumerate(placements):
        if type(pl) is Shard and pl.dim in (0, -p.dim()) and p.dim() > 0:
            shard_dims.append(d)
        elif not isinstance(pl, Replicate):
            raise ValueError(
                f"{name} (shape {tuple(p.shape)}) is a DTensor with placements {placements}: "
                f"{pl} on mesh dimension {d} is not supported. Supported: {SUPPORTED}. "
                "Tensor parallel (Shard of another dimension, or strided sharding) and "
                "Partial placements would make a preconditioner couple the wrong entries; "
                "keep such parameters out of this optimizer."
            )
    if len(shard_dims) > 1:
        raise ValueError(
            f"{name} (shape {tuple(p.shape)}) is a DTensor with placements {placements}: "
            f"Shard(0) on {len(shard_dims)} mesh dimensions is not supported. "
            f"Supported: {SUPPORTED}."
        )
    mesh = p.device_mesh
    local_shape = p.to_local().shape
    if not shard_dims:
        return ParamPlacement(name, p.shape, local_shape, mesh, placements, None, 0, 1, 0)
    sd = shard_dims[0]
    count = mesh.size(sd)
    index = mesh.get_local_rank(sd)
    rows = p.shape[0]
    chunk = -(-rows // count)  # torch.chunk: ceil(rows / count) rows per shard
    start = min(index * chunk, rows)
    expected = min(chunk, rows - start)
    if local_shape[0] != expected or local_shape[1:] != p.shape[1:]:
        raise ValueError(
            f"{name} (shape {tuple(p.shape)}, placements {placements}) has a local shard of "
            f"shape {tuple(local_shape)} on shard {index} of {count}; expected {expected} rows "
            "(torch.chunk layout, as FSDP2 cuts parameters)"
        )
    return ParamPlacement(name, p.shape, local_shape, mesh, placements, sd, index, count, start)
