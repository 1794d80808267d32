"""Shampoo's ``fsdp_mode="exact"``: whole-tensor blocks on FSDP2 / HSDP shards.

In the default ``"local"`` mode every rank preconditions its own shard of a parameter as a
tensor of its own (blocks are cut inside the shard; :mod:`.view`). ``"exact"`` mode gives
the result of single-process Shampoo on the whole model instead:

1. **own** (:class:`ExactLayout`): every block of a sharded tensor belongs to one rank of
   the shard group (HSDP: the shard dimension of the mesh; replicas of a shard hold equal
   gradients and do the same work), assigned as under DDP (greedy longest-processing-time
   on ``sum n_i^3``). That rank alone keeps the block's statistics and roots and computes
   its preconditioned direction.
2. **gather to the owners** (:class:`ExactView`, on entering a step): every sharded
   parameter is presented to the optimizer as a full-size tensor. Its gradient holds this
   rank's rows and, received in one all-to-all (:func:`_route`, over the :class:`Routes`
   computed once per parameter), the entries of the blocks this rank owns; other entries
   are zero and never used. Momentum and graft moments are elementwise, so they are exact
   wherever the gradient is, and they are *kept* only there (:class:`UsedEntries`): one
   compact 1-d tensor per moment holding the rank's rows and its owned blocks' entries, in
   the order of the flattened whole tensor (about ``2 numel / S`` entries instead of
   ``numel``). The parameter's other rows are zero unless the update reads parameter values
   (coupled weight decay, :meth:`BlockOptimizer._reads_params`), in which case it is
   all-gathered.
3. **back to the rows** (:meth:`ExactLayout.route_directions`): a second all-to-all sends
   every direction entry from its block's owner to the rank holding its row; the update is
   applied to the full-size copy, and on leaving the step each rank copies its own rows
   back into its shard. Graft-only tensors need no exchange (their direction is
   elementwise, from the rank's own rows).

``EXCHANGE = "all_gather"`` replaces both all-to-alls by all-gathers of whole gradients and
directions (``S`` times the traffic on ``S`` shards; kept for comparison and tests).

Parameters that are not sharded (plain tensors, replicated DTensors) are stepped locally, as
in local mode: every block is this rank's and nothing is exchanged for them (under FSDP a
module left out of ``fully_shard`` need not have equal gradients on every rank).

All sharded parameters of one optimizer must share one shard group (the usual FSDP2 / HSDP
setup: one mesh for the model). Costs are tabulated in docs/distributed.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..blocking import BlockPlan
from .ddp import BlockLayout, Communicator, _all_gather_single
from .params import ParamPlacement
from .view import LocalView, build_view

__all__ = [
    "FSDP_MODES",
    "ExactLayout",
    "ExactView",
    "UsedEntries",
    "build_exact_view",
    "exact_layout",
    "gather_rows",
]

#: accepted values of ``fsdp_mode``
FSDP_MODES = ("local", "exact")


def gather_rows(local: torch.Tensor, pl: ParamPlacement) -> torch.Tensor:
    """The whole tensor from every shard's rows (``torch.chunk`` layout, uneven and empty
    shards included): one all-gather over the shard group, in the tensor's own dtype."""
    rows = pl.global_shape[0]
    chunk = -(-rows // pl.shard_count)
    rest = tuple(pl.global_shape[1:])
    send = local.new_zeros((chunk, *rest))
    send[: local.shape[0]] = local
    recv = local.new_empty((pl.shard_count * chunk, *rest))
    _all_gather_single(recv, send, group=pl.group())
    return recv[:rows]


class ExactView(LocalView):
    """A :class:`LocalView` whose sharded parameters are full-size tensors (module
    docstring, steps 1 and 3). Outside a step (``state_dict``, ``load_state_dict``,
    ``diagnostics``) the full-size proxy is a zero-stride placeholder of the whole shape:
    nothing is communicated or allocated."""

    def __init__(self, params: list[torch.Tensor], placements: list[ParamPlacement | None]):
        super().__init__(params, placements)
        groups = {(id(pl.mesh), pl.shard_dim) for _, _, pl in self._pairs if pl.sharded}
        if len(groups) > 1:
            names = [pl.name for _, _, pl in self._pairs if pl.sharded]
            raise ValueError(
                "fsdp_mode='exact' needs every sharded parameter on one shard group (one "
                f"device mesh and shard dimension), but {', '.join(names)} span "
                f"{len(groups)}: use fsdp_mode='local', or one optimizer per mesh"
            )
        self._stepping = False

    def seen_shape(self, pl: ParamPlacement) -> torch.Size:
        return pl.global_shape if pl.sharded else pl.local_shape

    def enter(self, opt: Any, grads: bool = True) -> None:
        super().enter(opt, grads)
        try:
            self._enter_full(opt, grads)
        except BaseException:
            self._stepping = False  # nothing was updated: put everything back, then raise
            self.exit(opt)
            raise
        self._stepping = grads

    def _enter_full(self, opt: Any, grads: bool) -> None:
        sharded = [(proxy, pl) for _, proxy, pl in self._pairs if pl.sharded]
        shards = {}
        with torch.no_grad():
            for proxy, pl in sharded:  # full shape first: the runtime plans whole tensors
                shards[id(proxy)] = proxy.detach(), proxy.grad
                proxy.grad = None
                proxy.set_(proxy.new_empty(()).expand(pl.global_shape))  # no memory
            if not grads or not sharded:
                return
            rt = opt._runtime()
            group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
            routed = []
            for proxy, pl in sharded:
                local, g = shards[id(proxy)]
                if g is None:  # not stepped; the placeholder keeps the shape
                    continue
                if opt._reads_params(group_of[id(proxy)]):
                    full = gather_rows(local, pl)
                else:  # other rows are never read, and never written back
                    full = local.new_zeros(pl.global_shape)
                    full[pl.rows()] = local
                key = rt.keys[id(proxy)]
                routes = rt.layout.routes(key) if rt.layout.routed(key) else None
                if routes is not None and EXCHANGE == "all_gather":
                    full_grad = gather_rows(g, pl)
                else:  # own rows now; the owned blocks' other entries below
                    full_grad = g.new_zeros(pl.global_shape)
                    full_grad[pl.rows()] = g
                    if routes is not None:
                        routed.append((full_grad.view(-1), routes))
                proxy.set_(full)
                proxy.grad = full_grad
            # gradient entries travel from the rank holding their row to their block's owner
            _route(rt.comm, routed, outgoing="send", incoming="recv")

    def exit(self, opt: torch.optim.Optimizer) -> None:
        try:
            if self._stepping:  # the step updated the full-size copies: keep own rows
                with torch.no_grad():
                    for p, proxy, pl in self._pairs:
                        if pl.sharded and proxy.grad is not None:
                            p.to_local().copy_(proxy[pl.rows()])
        finally:
            self._stepping = False
            super().exit(opt)


def build_exact_view(
    opt: torch.optim.Optimizer, cached: tuple[tuple[int, ...], LocalView | None] | None
) -> tuple[tuple[int, ...], LocalView | None]:
    """:func:`~secondorder.placement.view.build_view` for ``fsdp_mode="exact"``."""
    return build_view(opt, cached, ExactView)


#: how gradients and directions travel: ``"owners"`` (default; an entry goes only to the
#: rank that needs it: all-to-all) or ``"all_gather"`` (every rank receives whole gradients
#: and directions; kept for comparison, see benchmarks/bench_fsdp_exact.py)
EXCHANGE = "owners"


@dataclass(frozen=True)
class Routes:
    """Where the entries of one sharded, preconditioned parameter travel, as indices into
    the flattened whole tensor, per peer rank of the shard group (empty for this rank):
    ``send[r]``: entries of this rank's rows whose block rank ``r`` owns (their gradient
    goes to ``r``, their direction comes from ``r``); ``recv[r]``: entries of rank ``r``'s
    rows whose block this rank owns (gradient from ``r``, direction to ``r``); ``rows``:
    this rank's own rows, as a range of the flattened whole tensor."""

    send: list[torch.Tensor]
    recv: list[torch.Tensor]
    rows: slice


def _flat_rows(pl: ParamPlacement) -> slice:
    """This rank's rows of ``pl``'s parameter as a range of the flattened whole tensor."""
    cols = pl.global_shape[1:].numel()
    return slice(pl.row_start * cols, pl.row_start * cols + pl.local_numel)


@dataclass(frozen=True)
class UsedEntries:
    """The entries of one sharded parameter that this rank reads and updates in every step:
    its own rows and, for a preconditioned parameter, the entries of its owned blocks that
    lie in other ranks' rows. The momentum and graft moments of the parameter are kept for
    these entries only: one 1-d tensor of ``count`` (of ``numel``) entries, in the order of
    the flattened whole tensor (``pieces``: ranges or index tensors, ascending; the rank's
    rows are one range, each peer's part of the owned blocks one index tensor, and the
    peers' rows come in rank order, so concatenating the pieces keeps that order).
    A rank owning every entry of a tensor thus stores exactly the flattened tensor."""

    pieces: tuple[slice | torch.Tensor, ...]
    count: int
    numel: int

    @staticmethod
    def of(pieces: Sequence[slice | torch.Tensor], numel: int) -> UsedEntries:
        sizes = [_size(i) for i in pieces]
        kept = tuple(i for i, n in zip(pieces, sizes) if n)
        return UsedEntries(kept, sum(sizes), numel)

    def gather(self, full: torch.Tensor) -> torch.Tensor:
        """The used entries of a tensor of the whole shape, as a new compact 1-d tensor."""
        flat = full.reshape(-1)
        if not self.pieces:
            return flat.new_empty(0)
        return torch.cat([_take(flat, i) for i in self.pieces])

    def scatter(self, compact: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """A new tensor of the whole ``shape``: ``compact`` at the used entries, zero
        elsewhere (those entries are never read)."""
        out = compact.new_zeros(self.numel)
        offset = 0
        for i in self.pieces:
            n = _size(i)
            if isinstance(i, slice):
                out[i] = compact[offset : offset + n]
            else:
                out.index_copy_(0, i, compact[offset : offset + n])
            offset += n
        return out.view(shape)


def _size(index: slice | torch.Tensor) -> int:
    return index.stop - index.start if isinstance(index, slice) else index.numel()


def _take(flat: torch.Tensor, index: slice | torch.Tensor) -> torch.Tensor:
    return flat[index] if isinstance(index, slice) else flat.index_select(0, index)


def _route(
    comm: Communicator,
    routed: list[tuple[torch.Tensor, Routes]],
    outgoing: str,
    incoming: str,
    wire: torch.dtype | None = None,
) -> None:
    """Exchange entries of flat tensors between the ranks of ``comm``: every rank sends
    ``flat[getattr(routes, outgoing)[r]]`` to rank ``r`` and writes what rank ``r`` sent into
    ``flat[getattr(routes, incoming)[r]]``; one all-to-all per dtype, in ``wire`` (default:
    the tensors' own dtype, exact). Every rank passes the same parameters in the same order."""
    by_dtype: dict[torch.dtype, list[tuple[torch.Tensor, Routes]]] = {}
    for flat, routes in routed:
        by_dtype.setdefault(flat.dtype, []).append((flat, routes))
    world = comm.world_size
    for dtype, items in by_dtype.items():
        wt = wire or dtype
        device = items[0][0].device
        parts = [flat[getattr(rt, outgoing)[r]] for r in range(world) for flat, rt in items]
        in_splits = [sum(getattr(rt, outgoing)[r].numel() for _, rt in items) for r in range(world)]
        out_splits = [
            sum(getattr(rt, incoming)[r].numel() for _, rt in items) for r in range(world)
        ]
        send = torch.cat(parts).to(wt) if parts else torch.empty(0, dtype=wt, device=device)
        recv = torch.empty(sum(out_splits), dtype=wt, device=device)
        dist.all_to_all_single(recv, send, out_splits, in_splits, group=comm.group)
        offset = 0
        for r in range(world):
            for flat, rt in items:
                idx = getattr(rt, incoming)[r]
                flat[idx] = recv[offset : offset + idx.numel()].to(dtype)
                offset += idx.numel()


class ExactLayout(BlockLayout):
    """Block ownership over one shard group: the blocks of sharded parameters are spread
    over the group's ranks (:class:`BlockLayout`); every block of the other parameters is
    this rank's (:meth:`shared` is ``False`` for them: their directions are not exchanged).

    Args:
        shared_entries / local_entries: ``(key, block_shapes, counts)`` of sharded /
            unsharded preconditioned parameters.
        world_size, rank: of the shard group.
        sharded: ``key -> (plan, placement, device)`` of the sharded parameters (for their
            :class:`Routes` and :class:`UsedEntries`; ``plan`` is ``None`` for graft-only
            ones).
    """

    def __init__(
        self,
        shared_entries: Sequence[tuple[Any, Sequence[Sequence[int]], Sequence[int]]],
        local_entries: Sequence[tuple[Any, Sequence[Sequence[int]], Sequence[int]]],
        world_size: int,
        rank: int,
        sharded: dict[Any, tuple[BlockPlan, ParamPlacement, torch.device]] | None = None,
    ) -> None:
        super().__init__(shared_entries, world_size, rank)
        self._sharded = dict(sharded or {})
        self._routes: dict[Any, Routes] = {}
        self._used: dict[Any, UsedEntries] = {}
        self._local_keys = set()
        for key, _, counts in local_entries:
            self._local_keys.add(key)
            self._owned[key] = [
                [list(range(n)) if r == rank else [] for r in range(world_size)] for n in counts
            ]

    def shared(self, key: Any) -> bool:
        return key not in self._local_keys

    def routed(self, key: Any) -> bool:
        """Whether ``key`` is a sharded, preconditioned parameter (its entries travel)."""
        return key in self._sharded and key in self._owned

    def routes(self, key: Any) -> Routes:
        """The :class:`Routes` of a sharded, preconditioned parameter (built once, from the
        owner of every entry: the block ownership put back into the tensor's shape)."""
        if key not in self._routes:
            plan, pl, device = self._sharded[key]
            stacks = []
            for c, (bs, n) in enumerate(zip(plan.block_shapes, plan.counts)):
                owner = torch.empty(n, *bs)
                for r in range(self.world_size):
                    owner[self.owned(key, c, r)] = float(r)
                stacks.append(owner)
            owner = plan.merge(stacks).reshape(-1).long()
            rows = pl.global_shape[0]
            cols = owner.numel() // max(rows, 1)
            chunk = -(-rows // self.world_size)
            bounds = [
                (min(r * chunk, rows) * cols, min((r + 1) * chunk, rows) * cols)
                for r in range(self.world_size)
            ]
            me = self.rank
            lo, hi = bounds[me]
            empty = torch.empty(0, dtype=torch.long)

            def entries(lo: int, hi: int, r: int) -> torch.Tensor:
                return lo + torch.nonzero(owner[lo:hi] == r).view(-1)

            send = [empty if r == me else entries(lo, hi, r) for r in range(self.world_size)]
            recv = [empty if r == me else entries(*bounds[r], me) for r in range(self.world_size)]
            self._routes[key] = Routes(
                [t.to(device) for t in send], [t.to(device) for t in recv], slice(lo, hi)
            )
        return self._routes[key]

    def used(self, key: Any) -> UsedEntries | None:
        """The :class:`UsedEntries` of a sharded parameter (``None`` for an unsharded one:
        its moments are whole): its rows, and its owned blocks' entries when preconditioned
        (from its :class:`Routes`: per rank of the shard group in rank order, the entries
        received from it, and this rank's rows in its own place)."""
        if key not in self._sharded:
            return None
        if key not in self._used:
            _, pl, _ = self._sharded[key]
            if self.routed(key):
                routes = self.routes(key)
                pieces = [routes.rows if r == self.rank else i for r, i in enumerate(routes.recv)]
            else:  # graft-only: elementwise on the rank's own rows
                pieces = [_flat_rows(pl)]
            self._used[key] = UsedEntries.of(pieces, pl.global_shape.numel())
        return self._used[key]

    def route_directions(
        self, comm: Communicator, items: Sequence[Any], directions: list[Any]
    ) -> list[Any]:
        """Full-size directions whose rows of this rank are complete (the other rows are
        never applied): owned blocks computed here, the rest of this rank's rows received
        from their blocks' owners (one all-to-all, in ``comm.dtype``). ``items`` /
        ``directions`` as in :meth:`~secondorder.placement.runtime.Runtime.gather_directions`.
        """
        out, routed = [], []
        for it, ds in zip(items, directions):
            if not isinstance(ds, list):
                out.append(ds)
                continue
            if not self.routed(it.key):
                out.append(it.plan.merge(ds))
                continue
            stacks = []
            for c, d in enumerate(ds):
                n = it.plan.counts[c]
                if d.shape[0] != n:
                    full = d.new_zeros(n, *d.shape[1:])
                    full.index_copy_(0, self.index(it.key, c, d.device), d)
                    d = full
                stacks.append(d)
            full = it.plan.merge(stacks).contiguous()
            routed.append((full.view(-1), self.routes(it.key)))
            out.append(full)
        _route(comm, routed, outgoing="recv", incoming="send", wire=comm.dtype)
        return out

    def count(self, key: Any, cls: int) -> int:
        """All blocks of size class ``cls`` (every rank's)."""
        return sum(len(o) for o in self._owned[key][cls])

    def localize_loaded(self, key: Any, value: list[list[torch.Tensor]]) -> list[list[Any]]:
        """A loaded per-block entry with this rank's blocks only: stacks holding every
        block (a single-process or gathered state dict) are cut to the owned ones; stacks
        already cut (this mode's own checkpoints) are kept. The leading dimension tells
        which: an owned subset smaller than the whole can never be mistaken for it."""
        out = []
        for c, cls in enumerate(value):
            full = self.count(key, c)
            out.append([self.local(key, c, t) if t.shape[0] == full else t for t in cls])
        return out


def exact_layout(opt: Any, pairs: list[tuple[dict[str, Any], torch.Tensor]]):
    """``(Communicator, ExactLayout)`` over the shard group of ``opt``'s sharded
    parameters, or ``None`` when none is sharded (then every block is local)."""
    shared, local, group, sharded = [], [], None, {}
    for i, (g, p) in enumerate(pairs):
        plan = opt._plan(p, g)
        pl = opt._placement(p)
        if pl is not None and pl.sharded:
            group = pl
            sharded[i] = (plan, pl, p.device)
        if plan is None:
            continue
        entry = (i, plan.block_shapes, plan.counts)
        if pl is not None and pl.sharded:
            shared.append(entry)
        else:
            local.append(entry)
    if group is None:
        return None
    comm = Communicator(group.group(), opt.communication_dtype)
    if comm.rank != group.shard_index or comm.world_size != group.shard_count:
        raise RuntimeError(  # pragma: no cover - DeviceMesh orders its groups this way
            f"the shard group's rank {comm.rank} of {comm.world_size} does not match the "
            f"mesh coordinate {group.shard_index} of {group.shard_count}"
        )
    return comm, ExactLayout(shared, local, comm.world_size, comm.rank, sharded)
