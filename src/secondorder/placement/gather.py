"""Whole-matrix functions on FSDP2 / HSDP shards: gather to an owner, apply, send back rows.

Some updates are a function of a whole matrix that no sum over shards can express (Muon's
Newton-Schulz orthogonalisation, an SVD, a matrix inverse). On shards they can still be
computed exactly, the way distributed Muon implementations do it:

1. **owners**: every sharded matrix gets one *owner* rank in its shard group, chosen by
   greedy longest-processing-time balancing on a cost per matrix (default
   :func:`matrix_cost`, the flops of a Newton-Schulz step). The cost depends on global
   shapes only, so every rank computes the same assignment without communicating.
2. **gather**: every rank sends its rows of each matrix to the matrix's owner: one
   all-to-all with uneven splits per shard group and dtype, for all matrices at once.
   Ranks whose shard is empty take part (they send nothing for that matrix, and may own
   it).
3. **apply**: each rank calls ``fn`` once, on the whole matrices it owns and on the
   unsharded ones (plain tensors, replicated DTensors), in input order. ``fn`` sees a list
   of tensors and returns a list, so it may batch them (same-shape matrices stacked).
4. **scatter**: every owner sends each rank that rank's rows of the result (a second
   all-to-all per shard group and output dtype).

Under HSDP the exchanges run over the shard dimension of the mesh only: the replicas of a
shard hold the same rows, do the same work and never talk to each other here.

Rows follow FSDP2's layout (``torch.chunk`` along dim 0: ``ceil(rows / S)`` per rank, the
last ranks fewer or none), so a rank knows every other rank's row counts from the global
shape and no sizes are exchanged. Each sharded matrix of ``N`` entries crosses the wire
twice, minus the owner's own rows: about ``2 N (S - 1) / S`` entries per matrix over the
group; the ``fn`` work per rank is about ``1 / S`` of the whole when the costs balance.

The result is ``fn`` applied to the whole matrices, bit for bit, provided ``fn`` computes
each matrix independently of which others share its call (true for a loop, and for torch's
batched matmuls on the CPU, which multiply the matrices of a stack one by one).

Every rank of a shard group must call :func:`apply_whole` with the same parameters, in the
same order (as an optimizer step does): the exchanges are collectives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .ddp import assign_blocks
from .params import ParamPlacement

__all__ = ["WholePlan", "apply_whole", "matrix_cost", "plan_whole", "shard_rows"]


def matrix_cost(shape: Sequence[int]) -> int:
    """Cost of a whole-matrix function of an ``(rows, *rest)`` tensor seen as a
    ``rows x cols`` matrix: ``rows * cols * min(rows, cols)`` (one Newton-Schulz step's
    multiply-adds, up to a constant)."""
    rows = int(shape[0]) if len(shape) else 1
    cols = 1
    for n in shape[1:]:
        cols *= int(n)
    return rows * cols * min(rows, cols)


def shard_rows(rows: int, count: int, index: int) -> slice:
    """The rows shard ``index`` of ``count`` holds of a tensor with ``rows`` rows
    (``torch.chunk`` layout, as FSDP2 cuts: possibly empty)."""
    chunk = -(-rows // count) if rows else 0
    start = min(index * chunk, rows)
    return slice(start, min(start + chunk, rows))


@dataclass(frozen=True)
class WholePlan:
    """Who computes what in one :func:`apply_whole` call.

    Attributes:
        owners: per input, the owner's index in its shard group (``None``: not sharded,
            computed by every rank on its own tensor).
        mine: indices of the inputs this rank applies ``fn`` to, in input order.
        groups: the shard groups (one :class:`ParamPlacement` each, as a representative)
            in first-seen order; ``group_of[i]`` is input ``i``'s index in it (or ``None``).
        sent, received: entries this rank sends / receives in the gather (the scatter
            mirrors them), summed over the groups.
    """

    owners: list[int | None]
    mine: list[int]
    groups: list[ParamPlacement]
    group_of: list[int | None]
    sent: int
    received: int


def _whole_shape(local: torch.Tensor, pl: ParamPlacement) -> torch.Size:
    return torch.Size((pl.global_shape[0], *local.shape[1:]))


def _check(items: Sequence[tuple[torch.Tensor, ParamPlacement | None]]) -> None:
    for i, (local, pl) in enumerate(items):
        if not isinstance(local, torch.Tensor):
            raise TypeError(f"items[{i}]: expected (tensor, placement), got {type(local)}")
        if pl is None or not pl.sharded:
            continue
        rows = pl.global_shape[0] if pl.global_shape else 0
        if (
            local.dim() == 0
            or local.shape[0] != pl.local_shape[0]
            or _row_numel(local) * rows != pl.global_shape.numel()
        ):
            raise ValueError(
                f"items[{i}] ({pl.name}): the local tensor of shape {tuple(local.shape)} must "
                f"hold this rank's {pl.local_shape[0]} rows of the parameter (whole shape "
                f"{tuple(pl.global_shape)}) along dim 0"
            )


def plan_whole(
    items: Sequence[tuple[torch.Tensor, ParamPlacement | None]],
    cost: Callable[[Sequence[int]], int] = matrix_cost,
    owners: Sequence[int | None] | None = None,
) -> WholePlan:
    """The :class:`WholePlan` of ``items`` (see the module docstring; no communication).

    ``owners``: per item, its owner's index in its shard group, chosen by the caller
    (e.g. to keep state on one rank across calls whatever subset of matrices is passed);
    ``None`` (default): greedy on ``cost``. Entries of unsharded items are ignored.
    """
    _check(items)
    if owners is not None and len(owners) != len(items):
        raise ValueError(f"owners: {len(owners)} entries for {len(items)} items")
    chosen = owners
    keys: dict[tuple[Any, int], int] = {}
    groups: list[ParamPlacement] = []
    group_of: list[int | None] = []
    for _, pl in items:
        if pl is None or not pl.sharded:
            group_of.append(None)
            continue
        key = (pl.mesh, pl.shard_dim)
        if key not in keys:
            keys[key] = len(groups)
            groups.append(pl)
        group_of.append(keys[key])
    owners = [None] * len(items)
    for gi, rep in enumerate(groups):
        idx = [i for i, g in enumerate(group_of) if g == gi]
        if chosen is not None:
            for i in idx:
                r = chosen[i]
                if not isinstance(r, int) or not 0 <= r < rep.shard_count:
                    raise ValueError(
                        f"owners[{i}]: expected a shard index in [0, {rep.shard_count}), "
                        f"got {r!r}"
                    )
                owners[i] = r
            continue
        costs = [cost(_whole_shape(items[i][0], items[i][1])) for i in idx]
        for i, r in zip(idx, assign_blocks(costs, rep.shard_count)):
            owners[i] = r
    mine, sent, received = [], 0, 0
    for i, ((local, pl), owner) in enumerate(zip(items, owners)):
        if owner is None:
            mine.append(i)
            continue
        row = _row_numel(local)
        if owner == pl.shard_index:
            mine.append(i)
            received += (pl.global_shape[0] - local.shape[0]) * row
        else:
            sent += local.shape[0] * row
    return WholePlan(owners, mine, groups, group_of, sent, received)


def _row_numel(t: torch.Tensor) -> int:
    n = 1
    for d in t.shape[1:]:
        n *= int(d)
    return n


def _exchange(
    rep: ParamPlacement,
    idx: list[int],
    send: dict[tuple[int, int], torch.Tensor],
    recv: dict[tuple[int, int], int],
    dtype_of: dict[int, torch.dtype],
    device: torch.device,
) -> dict[tuple[int, int], torch.Tensor]:
    """All-to-alls over ``rep``'s shard group, one per dtype: for peer ``r`` and input ``i``
    (of ``idx``) this rank sends ``send[i, r]`` (flat; absent: nothing) and receives
    ``recv[i, r]`` entries (absent: none), returned as ``{(i, r): flat view}``. Every rank
    walks peers, then inputs, in the same order, so the pieces line up."""
    world = rep.shard_count
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i in idx:
        by_dtype.setdefault(dtype_of[i], []).append(i)
    got: dict[tuple[int, int], torch.Tensor] = {}
    for dtype, ids in by_dtype.items():
        parts = [[send[i, r] for i in ids if (i, r) in send] for r in range(world)]
        in_splits = [sum(t.numel() for t in row) for row in parts]
        out_splits = [sum(recv.get((i, r), 0) for i in ids) for r in range(world)]
        flat = [t for row in parts for t in row]
        buf = torch.cat(flat) if flat else torch.empty(0, dtype=dtype, device=device)
        out = torch.empty(sum(out_splits), dtype=dtype, device=device)
        dist.all_to_all_single(out, buf, out_splits, in_splits, group=rep.group())
        offset = 0
        for r in range(world):
            for i in ids:
                n = recv.get((i, r), 0)
                if n:
                    got[i, r] = out[offset : offset + n]
                offset += n
    return got


def _gather(
    items: Sequence[tuple[torch.Tensor, ParamPlacement | None]], plan: WholePlan, gi: int
) -> dict[int, torch.Tensor]:
    """Step 2 for shard group ``gi``: the whole tensors this rank owns, by input index."""
    rep = plan.groups[gi]
    idx = [i for i, g in enumerate(plan.group_of) if g == gi]
    me, world = rep.shard_index, rep.shard_count
    send, recv = {}, {}
    for i in idx:
        local, pl = items[i]
        owner = plan.owners[i]
        if owner != me and local.shape[0]:
            send[i, owner] = local.reshape(-1)
        if owner == me:  # the rows of the others (its own stay here)
            for r in range(world):
                s = shard_rows(pl.global_shape[0], world, r)
                if r != me:
                    recv[i, r] = (s.stop - s.start) * _row_numel(local)
    got = _exchange(
        rep, idx, send, recv, {i: items[i][0].dtype for i in idx}, items[idx[0]][0].device
    )
    whole = {}
    for i in idx:
        if plan.owners[i] != me:
            continue
        local, pl = items[i]
        pieces = [
            local if r == me else got[i, r].view(-1, *local.shape[1:])
            for r in range(world)
            if r == me or (i, r) in got
        ]
        whole[i] = torch.cat(pieces) if pieces else local.new_empty(_whole_shape(local, pl))
    return whole


def _scatter(
    items: Sequence[tuple[torch.Tensor, ParamPlacement | None]],
    plan: WholePlan,
    gi: int,
    results: dict[int, torch.Tensor],
    out_dtype: torch.dtype | None,
) -> dict[int, torch.Tensor]:
    """Step 4 for shard group ``gi``: this rank's rows of every result, by input index."""
    rep = plan.groups[gi]
    idx = [i for i, g in enumerate(plan.group_of) if g == gi]
    me, world = rep.shard_index, rep.shard_count
    dtypes = {i: out_dtype or items[i][0].dtype for i in idx}
    send, recv = {}, {}
    for i in idx:
        local, pl = items[i]
        owner = plan.owners[i]
        if owner == me:
            y = results[i]
            if y.dtype != dtypes[i]:
                raise ValueError(f"fn returned {y.dtype}, expected out_dtype {dtypes[i]}")
            for r in range(world):
                s = shard_rows(y.shape[0], world, r)
                if r != me and s.stop > s.start:
                    send[i, r] = y[s].reshape(-1)
        elif local.numel():
            recv[i, owner] = local.numel()
    got = _exchange(rep, idx, send, recv, dtypes, items[idx[0]][0].device)
    out = {}
    for i in idx:
        local = items[i][0]
        if plan.owners[i] == me:  # its own rows of the result stay here
            out[i] = results[i][shard_rows(results[i].shape[0], world, me)]
            continue
        flat = got.get((i, plan.owners[i]))
        out[i] = (
            flat.view(local.shape)
            if flat is not None
            else local.new_empty(local.shape, dtype=dtypes[i])
        )
    return out


def apply_whole(
    items: Sequence[tuple[torch.Tensor, ParamPlacement | None]],
    fn: Callable[[list[torch.Tensor]], Sequence[torch.Tensor]],
    *,
    out_dtype: torch.dtype | None = None,
    cost: Callable[[Sequence[int]], int] = matrix_cost,
    owners: Sequence[int | None] | None = None,
) -> list[torch.Tensor]:
    """``fn`` of the whole tensors of ``items``, each returned as this rank's rows.

    Args:
        items: ``(local, placement)`` per tensor: ``local`` holds this rank's rows (dim 0)
            of a tensor laid out by ``placement`` (its trailing dims may be reshaped, e.g.
            a conv kernel flattened to a matrix); ``placement`` ``None`` (a plain tensor)
            or not sharded: ``local`` is the whole tensor.
        fn: maps a list of whole tensors to a list of results of the same shapes, in
            order; called once per rank (not at all when the rank has nothing to compute),
            on the tensors this rank owns and the unsharded ones.
        out_dtype: dtype of ``fn``'s results (``None``: each input's dtype); results of
            sharded inputs travel in it.
        cost: per whole shape, the work of ``fn`` (balances the owners).
        owners: the owners chosen by the caller instead (see :func:`plan_whole`).

    Returns this rank's rows of each result, in input order (see the module docstring).
    """
    plan = plan_whole(items, cost, owners)
    whole: dict[int, torch.Tensor] = {}
    for gi in range(len(plan.groups)):
        whole.update(_gather(items, plan, gi))
    inputs = [whole.get(i, items[i][0]) for i in plan.mine]
    results = list(fn(inputs)) if plan.mine else []
    if len(results) != len(plan.mine):
        raise ValueError(f"fn returned {len(results)} results for {len(plan.mine)} inputs")
    for x, y in zip(inputs, results):
        if y.shape != x.shape:
            raise ValueError(
                f"fn must return results of its inputs' shapes: got {tuple(y.shape)} for "
                f"{tuple(x.shape)}"
            )
    by_index = dict(zip(plan.mine, results))
    out = {i: y for i, y in by_index.items() if plan.owners[i] is None}
    for gi in range(len(plan.groups)):
        out.update(_scatter(items, plan, gi, by_index, out_dtype))
    return [out[i] for i in range(len(items))]
