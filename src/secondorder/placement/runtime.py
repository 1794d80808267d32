"""The system side of a block-preconditioned optimizer, in one per-process object.

:class:`Runtime` is what Shampoo asks about everything that is not its math: the index of
its parameters, which rank owns which block under DDP (:mod:`secondorder.placement.ddp`),
the root scheduler (:mod:`secondorder.placement.roots`), the all-gather of the directions,
and how state dicts are gathered, marked as shards, checked and localized on load. It is
rebuilt lazily, never pickled, copied or checkpointed.

The optimizer (``opt`` below) provides: ``param_groups``, ``state``, ``_plan(p, group)`` (a
:class:`~secondorder.blocking.BlockPlan` or ``None``), ``_plan_keys`` (the group settings
its plans depend on), the system settings ``distributed``, ``_process_group``,
``communication_dtype``, ``async_roots``, ``async_staleness``,
``async_deterministic_delay``, ``async_workers``, ``root_memory_budget``,
``shard_optimizer_state``, the step clock
``_clock``, and the hooks the schedulers call (see :mod:`secondorder.placement.roots`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from . import fsdp
from .ddp import (
    BlockLayout,
    Communicator,
    assign_blocks,
    block_cost,
    is_block_state,
    localize_state,
)
from .fsdp import ExactLayout, exact_layout
from .roots import RootFailureError, RootScheduler, Solve, make_root_scheduler

__all__ = ["Runtime"]


class Runtime:
    """Per-process helpers of one optimizer (see the module docstring).

    Attributes: ``params`` (all parameters, in param-group order) and ``keys`` (``id(p)`` ->
    index in ``params``); ``comm`` / ``layout`` (``None`` when every block is local);
    ``roots`` (the root scheduler); failure bookkeeping ``warned``, ``escalations`` and
    ``failure_counts``; ``loading_shard`` (a rank's shard is being loaded).
    """

    def __init__(self, label: str = "Shampoo") -> None:
        self.label = label
        self.sig: Any = None
        self.params: list[torch.Tensor] = []
        self.keys: dict[int, int] = {}
        self.comm: Communicator | None = None
        self.layout: BlockLayout | None = None
        self.owners: list[int] | None = None  # shard_optimizer_state: owner rank per parameter
        self.roots: RootScheduler | None = None
        self.warned: set[tuple[str, ...]] = set()  # kinds of failure already warned about
        self.escalations: list[tuple[str, int, int]] = []
        self.failure_counts: dict[str, int] = {}  # contained failures by kind
        self.loading_shard = False

    # ------------------------------------------------------------------- build
    def refresh(self, opt: Any, solve: Solve) -> Runtime:
        """Bring the index, the block layout and the root scheduler up to date."""
        sig = tuple(
            (len(g["params"]), *(g[k] for k in opt._plan_keys)) for g in opt.param_groups
        )
        if self.sig != sig:
            pairs = [(g, p) for g in opt.param_groups for p in g["params"]]
            if (self.layout is not None or self.owners is not None) and any(
                self.owners is not None or any(is_block_state(v) for v in st.values())
                for st in opt.state.values()
                if st
            ):
                raise RuntimeError(
                    f"{self.label}(distributed=True): parameters changed after the first step; "
                    "the block assignment cannot change once state exists"
                )
            self.params = [p for _, p in pairs]
            self.keys = {id(p): i for i, p in enumerate(self.params)}
            if opt.distributed and self.comm is None:
                self.comm = Communicator(opt._process_group, opt.communication_dtype)
            if self.comm is not None and self.comm.world_size > 1 and opt.shard_optimizer_state:
                costs = []  # parameter-granular: every block of a parameter on its owner
                for g, p in pairs:
                    plan = opt._plan(p, g)
                    blocks = [] if plan is None else zip(plan.block_shapes, plan.counts)
                    costs.append(p.numel() + sum(block_cost(bs) * n for bs, n in blocks))
                self.owners = assign_blocks(costs, self.comm.world_size)
            elif self.comm is not None and self.comm.world_size > 1:
                entries = []
                for i, (g, p) in enumerate(pairs):
                    plan = opt._plan(p, g)
                    if plan is not None:
                        entries.append((i, plan.block_shapes, plan.counts))
                self.layout = BlockLayout(entries, self.comm.world_size, self.comm.rank)
            elif getattr(opt, "fsdp_mode", "local") == "exact":  # owners in the shard group
                built = exact_layout(opt, pairs)
                if built is not None:
                    self.comm, self.layout = built
            self.sig = sig
        if self.roots is None:
            self.roots = make_root_scheduler(
                solve,
                opt.root_memory_budget,
                opt.async_roots,
                workers=opt.async_workers,
                delay=opt.async_deterministic_delay,
                label=self.label,
            )
        self.roots.budget = opt.root_memory_budget
        if opt.async_roots:
            staleness = opt.async_staleness or min(
                g["precondition_frequency"] for g in opt.param_groups
            )
            self.roots.start(staleness)
        return self

    # -------------------------------------------------------------- failures
    def warn_once(self, kind: tuple[str, ...], message: str, stacklevel: int = 4) -> None:
        """Warn the first time a kind of failure happens; count every time."""
        if kind not in self.warned:
            self.warned.add(kind)
            warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)
        self.failure_counts[kind[0]] = self.failure_counts.get(kind[0], 0) + 1

    @contextmanager
    def contained(self, kind: str, consequence: str) -> Iterator[None]:
        """Catch an exception after the commit point: warn once per kind, count, go on."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - contained: the step must complete
            self.warn_once(
                (kind, type(e).__name__),
                f"{self.label}: {type(e).__name__}: {e} ({kind}); {consequence}. The step "
                "itself was applied.",
            )

    def escalate(self) -> None:
        """Act on factors whose roots failed ``max_consecutive_root_failures`` times in a row
        (collected by :func:`~secondorder.placement.roots.store_root`)."""
        if not self.escalations:
            return
        found, self.escalations = self.escalations, []
        for policy, worst, limit in found:
            msg = (
                f"{self.label}: a factor's inverse root failed {worst} times in a row "
                f"(max_consecutive_root_failures={limit}); "
            )
            if policy == "raise":
                raise RootFailureError(
                    msg + "on_root_failure='raise'. The step was applied completely (with the "
                    "previous roots). Set on_root_failure='warn' or 'graft' to train on."
                )
            what = (
                "its blocks now take the graft direction until a root succeeds"
                if policy == "graft"
                else "training goes on with its last good root"
            )
            self.warn_once(("escalation", policy), msg + what + f" (on_root_failure={policy!r}).")

    # ------------------------------------------------------------- ownership
    @property
    def sharded(self) -> bool:
        """Whether this rank holds only part of the optimizer state."""
        return self.layout is not None or self.owners is not None

    def owned(self, work: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> list[Any]:
        """``work`` (groups and their parameters with gradients) cut to the parameters this
        rank owns (``shard_optimizer_state``); all of it otherwise."""
        if self.owners is None:
            return work
        rank = self.comm.rank
        return [(g, [p for p in ps if self.owners[self.keys[id(p)]] == rank]) for g, ps in work]

    def share_params(self, work: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> None:
        """``shard_optimizer_state``: every rank receives the parameters their owners just
        updated (exact copies; one all-gather per dtype). A no-op otherwise."""
        if self.owners is None:
            return
        params = [p.detach() for _, ps in work for p in ps]
        owners = [self.owners[self.keys[id(p)]] for _, ps in work for p in ps]
        self.comm.share(params, owners)

    def local_counts(self, p: torch.Tensor, counts: Sequence[int]) -> list[int]:
        """Blocks per size class of ``p`` in the state being loaded: all, or this rank's
        own while a rank's shard is loaded."""
        if self.loading_shard and self.layout is not None:
            key = self.keys[id(p)]
            return [len(self.layout.owned(key, c)) for c in range(len(counts))]
        return list(counts)

    def gather_directions(self, items: Sequence[Any], directions: list[Any]) -> list[Any]:
        """Full directions from every rank's owned blocks: one all-gather for all tensors.

        ``items[j]`` has ``key`` and ``plan``; ``directions[j]`` is a list of owned block
        stacks (one per size class) or an already full tensor (graft-only tensors)."""
        if isinstance(self.layout, ExactLayout) and fsdp.EXCHANGE == "owners":
            return self.layout.route_directions(self.comm, items, directions)
        shared = [
            isinstance(ds, list) and self.layout.shared(it.key) for it, ds in zip(items, directions)
        ]
        exchange = [
            (it.key, c, d, it.plan.counts[c])
            for it, ds, s in zip(items, directions, shared)
            if s
            for c, d in enumerate(ds)
        ]
        full = iter(self.comm.exchange(self.layout, exchange))
        return [
            it.plan.merge([next(full) for _ in ds] if s else ds) if isinstance(ds, list) else ds
            for it, ds, s in zip(items, directions, shared)
        ]

    # ------------------------------------------------------------ state dict
    def save(self, opt: Any, sd: dict[str, Any], gather: bool) -> dict[str, Any]:
        """Complete ``sd`` (from the base class): gathered blocks (``gather``, a collective)
        or this rank's shard marker, and the pending root jobs with the step clock."""
        if self.owners is not None and gather:
            sd["state"] = self._gather_owned(sd["state"])
        elif self.layout is not None and gather:
            blocked = {
                k: st
                for k, st in sd["state"].items()
                if any(is_block_state(v) for v in st.values())
            }
            sd["state"] = {**sd["state"], **self.comm.gather_state(self.layout, blocked)}
        elif self.sharded:
            sd["distributed_shard"] = dict(rank=self.comm.rank, world_size=self.comm.world_size)
        if opt.async_roots:
            pending = self.roots.pending_records(opt, self, gather)
            sd["async_roots"] = dict(clock=opt._clock, pending=pending)
        return sd

    def load(
        self, opt: Any, state_dict: dict[str, Any], load: Callable[[dict[str, Any]], None]
    ) -> None:
        """Load with the base class's ``load`` after checking a shard's rank and world size;
        then keep only owned blocks and hand the pending root jobs to the scheduler."""
        state_dict = dict(state_dict)
        saved_async = state_dict.pop("async_roots", None)
        shard = state_dict.pop("distributed_shard", None)
        if shard is not None:
            self._check_shard(shard)
        exact = isinstance(self.layout, ExactLayout)
        if exact and shard is None:  # fsdp_mode="exact" (DCP keeps no marker): by shape
            state_dict = self._localize_loaded(state_dict)
        self.loading_shard = shard is not None or exact
        try:
            load(state_dict)
        finally:
            self.loading_shard = False
        if self.owners is not None and shard is None:  # keep only this rank's parameters
            for key, p in enumerate(self.params):
                if self.owners[key] != self.comm.rank:
                    opt.state.pop(p, None)
        if self.layout is not None and shard is None and not exact:
            for key, p in enumerate(self.params):
                st = opt.state.get(p)
                if st and any(is_block_state(v) for v in st.values()):
                    opt.state[p] = localize_state(st, self.layout, key)
        self.roots.clear()
        if not saved_async:
            return
        if opt.async_roots:
            opt._clock = int(saved_async["clock"])
        self.roots.restore(opt, self, saved_async["pending"], full=shard is None)

    def _localize_loaded(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``fsdp_mode="exact"``: the loaded per-block entries cut to this rank's blocks
        (:meth:`~secondorder.placement.fsdp.ExactLayout.localize_loaded`)."""
        ids = [pid for g in state_dict.get("param_groups", []) for pid in g["params"]]
        if len(ids) != len(self.params):
            return state_dict  # the base class reports the mismatch
        state = dict(state_dict.get("state", {}))
        for key, pid in enumerate(ids):
            st = state.get(pid)
            if not st or not any(is_block_state(v) for v in st.values()):
                continue
            try:
                state[pid] = {
                    n: self.layout.localize_loaded(key, v) if is_block_state(v) else v
                    for n, v in st.items()
                }
            except (KeyError, IndexError):
                continue  # not this parameter's blocks: the shape check reports it
        return {**state_dict, "state": state}

    def _check_shard(self, shard: dict[str, Any]) -> None:
        here = (
            None if not self.sharded else dict(rank=self.comm.rank, world_size=self.comm.world_size)
        )
        if here != {k: shard[k] for k in ("rank", "world_size")}:
            where = (
                "a single process"
                if here is None
                else f"rank {here['rank']} of {here['world_size']}"
            )
            raise ValueError(
                f"this state dict is rank {shard['rank']}'s shard of a distributed {self.label} "
                f"run with {shard['world_size']} ranks (from state_dict()); it cannot be loaded "
                f"on {where}. Load it on the same rank of a run with the same world size, or "
                "save the full state with full_state_dict() (a collective: call it on every "
                "rank)"
            )

    def _gather_owned(self, state: dict[Any, Any]) -> dict[Any, Any]:
        """Every parameter's state, from its owner (a collective): the single-process
        format. The states come back on their parameters' devices."""
        mine = {k: _tree(st, lambda t: t.detach().cpu()) for k, st in state.items()}
        out = {}
        for r, theirs in enumerate(self.comm.all_gather_object(mine)):
            for k, st in theirs.items():
                if self.owners[k] == r:
                    device = self.params[k].device
                    out[k] = _tree(st, lambda t, d=device: t.to(d))
        return dict(sorted(out.items()))

    # ------------------------------------------------------------ diagnostics
    def root_memory(self) -> dict[str, int]:
        r = self.roots
        return dict(
            peak_root_workspace_bytes=r.peak_bytes if r else 0,
            last_root_workspace_bytes=r.last_bytes if r else 0,
            root_chunks=r.chunks if r else 0,
        )


def _tree(x: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``x`` (nested dicts, lists, tuples) with ``fn`` applied to every tensor."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, dict):
        return {k: _tree(v, fn) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_tree(v, fn) for v in x)
    return x
