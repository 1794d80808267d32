"""Optimizer state of DTensor parameters in checkpoints: local shards <-> DTensors.

Inside the optimizer every state tensor of a sharded parameter belongs to the local shard
(see :mod:`.view`). A checkpoint must say how the pieces fit together, so that
``torch.distributed.checkpoint`` can save each piece once and load it into another layout:

* state with the parameter's shape (declared by the optimizer, e.g. momentum) becomes a
  DTensor with the parameter's mesh and placements;
* state laid out along the flattened parameter (declared, shape ``(k, local numel)``, e.g.
  SONew's band statistics) becomes a DTensor of shape ``(k, *parameter shape)`` sharded
  like the parameter one dimension further right;
* 0-d tensors (step counters) and non-tensor values are the same on every rank and stay
  as they are; a rank whose shard is empty lists the parameter with empty state (so that
  ``set_optimizer_state_dict`` finds every parameter on every rank);
* anything else depends on how the shard was cut (e.g. Shampoo's blocks, cut inside each
  shard) and cannot be resharded; it is saved under a key naming the shard,
  ``{"shard_<i>_of_<n>": value}``, so every shard's copy is kept (replicas of one shard
  share it) and a run with another number of shards fails to find its key instead of
  loading the wrong blocks.

The reverse (:func:`state_to_local`) also accepts plain tensors of the whole parameter's
shape (a single-process checkpoint, or a ``full_state_dict``) and slices this rank's rows.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from .params import DTensor, ParamPlacement, is_dtensor
from .view import LocalView

__all__ = ["shard_key", "state_to_global", "state_to_local"]

_SHARD_KEY = re.compile(r"shard_(\d+)_of_(\d+)$")


def shard_key(pl: ParamPlacement) -> str:
    return f"shard_{pl.shard_index}_of_{pl.shard_count}"


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(int(n), 1)
    return tuple(reversed(stride))


def _as_dtensor(local: torch.Tensor, pl: ParamPlacement, lead: tuple[int, ...]) -> Any:
    shape = (*lead, *pl.global_shape)
    return DTensor.from_local(
        local,
        pl.mesh,
        pl.shifted(len(lead)),
        run_check=False,
        shape=torch.Size(shape),
        stride=_contiguous_stride(shape),
    )


def _has_tensor(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return v.dim() > 0
    if isinstance(v, dict):
        return any(_has_tensor(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return any(_has_tensor(x) for x in v)
    return False


def _is_shard_dict(v: Any) -> bool:
    return isinstance(v, dict) and bool(v) and all(
        isinstance(k, str) and _SHARD_KEY.fullmatch(k) for k in v
    )


def _param_ids(sd: dict[str, Any], groups: list[dict[str, Any]]) -> list[tuple[Any, Any]]:
    """``(saved id, parameter)`` pairs, or ``[]`` when the groups do not line up (the
    optimizer's own checks then report the mismatch)."""
    saved = sd.get("param_groups", [])
    if len(saved) != len(groups):
        return []
    pairs = []
    for s, g in zip(saved, groups):
        if len(s["params"]) != len(g["params"]):
            return []
        pairs.extend(zip(s["params"], g["params"]))
    return pairs


def state_to_global(
    sd: dict[str, Any],
    groups: list[dict[str, Any]],
    view: LocalView,
    param_shaped: tuple[str, ...],
    flat: tuple[str, ...],
) -> dict[str, Any]:
    """A state dict whose sharded parameters' state is expressed globally (see module)."""
    state = dict(sd.get("state", {}))
    for pid, p in _param_ids(sd, groups):
        pl = view.placement(p)
        if pl is not None and pid not in state and pl.local_numel == 0:
            state[pid] = {}  # an empty shard has no state, but the parameter is listed
        if pl is None or pid not in state:
            continue
        out = {}
        for key, v in state[pid].items():
            if isinstance(v, torch.Tensor) and key in param_shaped and v.shape == pl.local_shape:
                v = _as_dtensor(v, pl, ())
            elif (
                isinstance(v, torch.Tensor)
                and key in flat
                and v.dim() == 2
                and v.shape[1] == pl.local_numel
            ):
                v = _as_dtensor(v.view(v.shape[0], *pl.local_shape), pl, (v.shape[0],))
            elif pl.sharded and _has_tensor(v):
                v = {shard_key(pl): v}
            out[key] = v
        state[pid] = out
    sd = dict(sd)
    sd["state"] = state
    if "param_shapes" in sd:
        sd["param_shapes"] = [[list(p.shape) for p in g["params"]] for g in groups]
    return sd


def state_to_local(
    sd: dict[str, Any],
    groups: list[dict[str, Any]],
    view: LocalView,
    param_shaped: tuple[str, ...],
    flat: tuple[str, ...],
) -> dict[str, Any]:
    """The inverse of :func:`state_to_global` for this rank (also slicing whole-tensor
    state); raises ``ValueError`` for state that cannot belong to this rank's shard."""
    sd = dict(sd)
    state = dict(sd.get("state", {}))
    pairs = _param_ids(sd, groups)
    for pid, p in pairs:
        pl = view.placement(p)
        if pl is None or pid not in state:
            continue
        state[pid] = {
            key: _local_entry(key, v, pl, param_shaped, flat) for key, v in state[pid].items()
        }
    sd["state"] = state
    shapes = sd.get("param_shapes")
    if shapes is not None and pairs:
        local_shapes = []
        for gi, (saved, g) in enumerate(zip(shapes, groups)):
            row = []
            for pi, (shape, p) in enumerate(zip(saved, g["params"])):
                pl = view.placement(p)
                if pl is not None:
                    if tuple(shape) != tuple(pl.global_shape):
                        raise ValueError(
                            f"loaded state dict was saved for a parameter of shape "
                            f"{tuple(shape)} at param_groups[{gi}]['params'][{pi}], but this "
                            f"optimizer's parameter there has shape {tuple(pl.global_shape)}: "
                            "the state dict does not match these parameters"
                        )
                    shape = list(view.seen_shape(pl))
                row.append(shape)
            local_shapes.append(row)
        sd["param_shapes"] = local_shapes
    return sd


def _local_entry(
    key: str, v: Any, pl: ParamPlacement, param_shaped: tuple[str, ...], flat: tuple[str, ...]
) -> Any:
    if _is_shard_dict(v):
        mine = shard_key(pl)
        if mine not in v:
            saved = ", ".join(sorted(v))
            raise ValueError(
                f"optimizer state {key!r} of {pl.name} was saved per shard ({saved}): it "
                "depends on where the shards were cut, and this run holds "
                f"{mine.replace('_', ' ')}. Load it with the same number of shards (the "
                "same FSDP mesh size), or load the model alone and start the optimizer afresh"
            )
        return v[mine]
    lead: tuple[int, ...] = ()
    if key in flat and isinstance(v, torch.Tensor) and v.dim() >= 1:
        lead = (v.shape[0],)
    elif key not in param_shaped:
        if is_dtensor(v):
            raise ValueError(
                f"optimizer state {key!r} of {pl.name} is a DTensor, but this optimizer keeps "
                "that state per rank: not a state dict of this optimizer"
            )
        return v
    expected = torch.Size((*lead, *pl.global_shape))
    if is_dtensor(v):
        if v.shape != expected:
            raise ValueError(
                f"optimizer state {key!r} of {pl.name} has shape {tuple(v.shape)}, expected "
                f"{tuple(expected)}: the state dict does not match these parameters"
            )
        target = pl.shifted(len(lead))
        if v.device_mesh != pl.mesh:
            raise ValueError(
                f"optimizer state {key!r} of {pl.name} lives on {v.device_mesh}, the parameter "
                f"on {pl.mesh}: load it through torch.distributed.checkpoint to reshard"
            )
        if tuple(v.placements) != target:
            v = v.redistribute(pl.mesh, target)
        local = v.to_local()
    elif isinstance(v, torch.Tensor) and lead and v.shape == (lead[0], pl.global_shape.numel()):
        local = v.view(expected)[:, pl.rows()] if pl.global_shape else v
    elif isinstance(v, torch.Tensor) and v.shape == expected:
        local = v[pl.rows()] if pl.global_shape else v
    else:
        return v  # the optimizer's own checks report the mismatch
    return local.reshape(lead[0], -1) if lead else local
