"""Checkpoint forms of sharded state that is neither parameter-shaped nor cut per shard.

The base class expresses the state of a DTensor parameter in checkpoints as DTensors when it
has the parameter's shape (or lies along the flattened parameter) and otherwise keeps one
copy per shard (``{"shard_<i>_of_<n>": value}``), which cannot be loaded into another
number of shards. Two more kinds of state can be resharded, and optimizers that hold them
mix in :class:`ShardStateMixin` to say so:

* **one value per row** (dim 0, the dimension FSDP2 shards), e.g. AdaGradNorm's row
  accumulators: a DTensor of shape ``(rows,)`` laid out like the parameter's rows
  (:func:`rows_to_global`, :func:`rows_to_local`; a single-process checkpoint's whole
  ``(rows,)`` tensor is sliced to this rank's rows);
* **equal on every shard** (reduced over the shards), e.g. M-FAC's dense Gram matrix: a
  plain tensor, like a step counter (:func:`one_copy`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..placement import ParamPlacement, is_dtensor, shard_key
from ..placement.params import DTensor

__all__ = ["ShardStateMixin", "one_copy", "rows_to_global", "rows_to_local"]

Convert = Callable[[dict[str, Any], ParamPlacement, str, Any], Any]


def rows_to_global(v: Any, pl: ParamPlacement) -> Any:
    """This shard's per-row state (saved per shard by the base class) as a DTensor of
    shape ``(rows,)`` laid out like the parameter's rows; other values unchanged."""
    local = one_copy(v, pl)
    if not isinstance(local, torch.Tensor) or is_dtensor(local):
        return v
    if local.shape != (pl.local_shape[0],):
        return v
    rows = pl.global_shape[0]
    return DTensor.from_local(
        local, pl.mesh, pl.placements, run_check=False, shape=torch.Size((rows,)), stride=(1,)
    )


def rows_to_local(v: Any, pl: ParamPlacement, key: str) -> Any:
    """The inverse of :func:`rows_to_global` for this rank (any number of shards); a plain
    ``(rows,)`` tensor (a single-process checkpoint) is sliced to this rank's rows."""
    rows = pl.global_shape[0]
    if is_dtensor(v):
        if tuple(v.shape) != (rows,):
            raise ValueError(
                f"optimizer state {key!r} of {pl.name} has shape {tuple(v.shape)}, expected "
                f"({rows},) (one value per row): the state dict does not match these parameters"
            )
        if v.device_mesh != pl.mesh:
            raise ValueError(
                f"optimizer state {key!r} of {pl.name} lives on {v.device_mesh}, the parameter "
                f"on {pl.mesh}: load it through torch.distributed.checkpoint to reshard"
            )
        if tuple(v.placements) != pl.placements:
            v = v.redistribute(pl.mesh, pl.placements)
        return v.to_local()
    if isinstance(v, torch.Tensor) and tuple(v.shape) == (rows,):
        return v[pl.rows()]
    return v


def one_copy(v: Any, pl: ParamPlacement) -> Any:
    """``v``'s value for this shard when the base class saved it per shard, else ``v``."""
    if isinstance(v, dict) and len(v) == 1 and shard_key(pl) in v:
        return v[shard_key(pl)]
    return v


class ShardStateMixin:
    """Mix into a :class:`~secondorder.optim.base.SecondOrderOptimizer` subclass (before
    it) and override :meth:`_state_out` / :meth:`_state_in` for the state keys to convert.
    Both see only sharded parameters' entries, with the param group (the saved one on
    load) and the placement; ``state_dict`` converts after the base class's conversion,
    ``load_state_dict`` before it."""

    def _state_out(self, group: dict[str, Any], pl: ParamPlacement, key: str, v: Any) -> Any:
        return v

    def _state_in(self, group: dict[str, Any], pl: ParamPlacement, key: str, v: Any) -> Any:
        return v

    def _convert_sharded(self, sd: dict[str, Any], fn: Convert) -> dict[str, Any]:
        view = self._local_view()  # type: ignore[attr-defined]
        saved_groups = sd.get("param_groups", [])
        if view is None or len(saved_groups) != len(self.param_groups):  # type: ignore[attr-defined]
            return sd  # nothing sharded, or a mismatch the base class reports
        state = dict(sd.get("state", {}))
        for saved, ours in zip(saved_groups, self.param_groups):  # type: ignore[attr-defined]
            for pid, p in zip(saved["params"], ours["params"]):
                pl = view.placement(p)
                st = state.get(pid)
                if pl is None or not pl.sharded or not isinstance(st, dict):
                    continue
                state[pid] = {k: fn(saved, pl, k, v) for k, v in st.items()}
        return {**sd, "state": state}

    def state_dict(self) -> dict[str, Any]:
        return self._convert_sharded(super().state_dict(), self._state_out)  # type: ignore[misc]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(  # type: ignore[misc]
            self._convert_sharded(dict(state_dict), self._state_in)
        )

    # both wrap the base class's versions, which already run on local shards
    state_dict._on_shards = True  # type: ignore[attr-defined]
    load_state_dict._on_shards = True  # type: ignore[attr-defined]
