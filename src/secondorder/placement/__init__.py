"""Placement: where parameters, gradients and optimizer state live across processes.

The optimizers are written for plain tensors in one process; this layer maps the
parallelism people train with onto that view, so an optimizer never branches on it:

* **single process** and **DDP** (every rank holds whole, identical parameters and
  gradients): parameters are used as they are. Splitting work across DDP ranks (Shampoo's
  ``distributed=True`` block ownership) lives in :mod:`secondorder.placement.ddp`.
* **block preconditioners** (Shampoo): :class:`~secondorder.placement.blocked.BlockOptimizer`
  is the system half of such an optimizer -- its per-process
  :class:`~secondorder.placement.runtime.Runtime` (parameter index, DDP block ownership,
  direction all-gather, state-dict gathering), the root schedulers of
  :mod:`secondorder.placement.roots` (synchronous, or a background pool from
  :mod:`secondorder.placement.async_roots`), checkpoints and diagnostics. Import those
  modules directly (they are not re-exported here: they build on the optimizer base class).
* **FSDP2 / HSDP** (``fully_shard``: DTensor parameters, ``Shard(0)`` over the shard
  dimension of the mesh, ``Replicate()`` over HSDP's replicate dimension):
  :func:`placement_of` describes each parameter (:class:`ParamPlacement`) and rejects
  layouts that cannot be handled (tensor-parallel ``Shard(1)``, ``Partial``), naming the
  parameter; :class:`LocalView` presents every shard to the optimizer as a plain tensor
  for the span of each call, with its state; :func:`state_to_global` /
  :func:`state_to_local` express state as DTensors (or per-shard entries) in checkpoints so
  that ``torch.distributed.checkpoint`` saves and reshards it. An optimizer whose math
  couples entries across a whole tensor asks :meth:`LocalView.placement` for a proxy's
  placement and reduces over :meth:`ParamPlacement.all_reduce_`.
  Shampoo's ``fsdp_mode="exact"`` (:mod:`secondorder.placement.fsdp`) instead shows sharded
  parameters whole during a step and sends gradient and direction entries between the
  shards and the owners of the blocks of the whole tensors.

See ``docs/distributed.md`` for the modes, what each costs and what it guarantees.
"""

from .params import ParamPlacement, is_dtensor, placement_of
from .state import shard_key, state_to_global, state_to_local
from .view import LocalView, build_view, param_name

__all__ = [
    "LocalView",
    "ParamPlacement",
    "build_view",
    "is_dtensor",
    "param_name",
    "placement_of",
    "shard_key",
    "state_to_global",
    "state_to_local",
]
