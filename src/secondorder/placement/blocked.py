"""The system half of an optimizer whose preconditioner lives in per-block factor stacks.

:class:`BlockOptimizer` is the base class Shampoo builds on: the optimizer subclass is the
algorithm (its state, the order of a step, what a root is), this class is the system: the
system keywords (asynchronous roots, DDP block ownership, root memory budget), the
per-process :class:`~secondorder.placement.runtime.Runtime` (parameter index, who owns which
block, the direction all-gather, the root scheduler), the hooks the root schedulers call to
install roots and report failures, ``state_dict`` / ``full_state_dict`` /
``load_state_dict`` (shards, gathering, pending root jobs), ``async_diagnostics``,
``close``, and the per-factor root health in ``diagnostics`` / ``memory_diagnostics``.

A subclass provides:

* ``_plan(p, group)``: the :class:`~secondorder.blocking.BlockPlan` of a preconditioned
  parameter, ``None`` otherwise; ``_plan_keys``: the group settings the plans depend on;
* ``_root_solve``: a module-level function ``(spec, matrix, scale) -> RootResult`` (see
  :mod:`secondorder.placement.roots`; it runs in worker threads, so it must not reference
  the optimizer);
* per preconditioned parameter, state entries holding one stack per size class and axis
  (:func:`~secondorder.placement.ddp.is_block_state`): ``stats``, ``roots``,
  ``root_error``, ``lambda_max``, ``root_failures`` (and ``root_streak``, created on
  demand), plus ``step``; ``_memory_parts`` names the memory category of its state keys;
* in its step: ``rt = self._runtime()``; create fresh state with
  ``localize_state(state, rt.layout, key)`` when ``rt.layout`` is set and keep only owned
  blocks (``rt.layout.local``) in statistics and directions; ``self._clock += 1`` when it
  commits; ``rt.roots.collect(...)``, then ``rt.roots.solve_now(...)`` /
  ``rt.roots.submit(...)`` with the due :class:`~secondorder.placement.roots.DueFactor`;
  ``rt.gather_directions(...)`` before applying the directions; ``rt.escalate()`` last.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch

from .._validation import check_bool, check_choice, check_int
from ..optim.base import SecondOrderOptimizer, tree_bytes
from .ddp import COMMUNICATION_DTYPES, check_process_group
from .fsdp import FSDP_MODES, build_exact_view
from .roots import DEFAULT_ROOT_MEMORY_BUDGET, IDLE, store_root
from .runtime import Runtime

__all__ = ["BlockOptimizer"]


class BlockOptimizer(SecondOrderOptimizer):
    """Base class: the system side of a block-preconditioned optimizer (module docstring).

    System keywords (validated here; Shampoo documents them for its users):
    ``async_roots``, ``async_staleness``, ``async_deterministic_delay``, ``async_workers``,
    ``distributed``, ``process_group``, ``communication_dtype``, ``root_memory_budget``,
    ``shard_optimizer_state``, ``fsdp_mode``.
    """

    # process groups and thread pools cannot be copied; rebuilt lazily (_after_load_state_dict)
    _transient_attrs = ("_rt", "_process_group")
    _plan_keys: tuple[str, ...] = ()  # group settings the block plans depend on
    _memory_parts: dict[str, str] = {}  # state key -> memory_diagnostics category
    _label = "BlockOptimizer"  # prefix of warnings and errors
    _stats_settings = "settings"  # the group settings that decide the statistics' shapes

    def __init__(
        self,
        params: Any,
        defaults: dict[str, Any],
        *,
        nonfinite: str = "skip",
        async_roots: bool = False,
        async_staleness: int | None = None,
        async_deterministic_delay: int | None = None,
        async_workers: int = 1,
        distributed: bool = False,
        process_group: Any = None,
        communication_dtype: torch.dtype = torch.float32,
        root_memory_budget: int | None = DEFAULT_ROOT_MEMORY_BUDGET,
        shard_optimizer_state: bool = False,
        fsdp_mode: str = "local",
    ) -> None:
        if root_memory_budget is not None:
            check_int("root_memory_budget", root_memory_budget, low=1)
        self.root_memory_budget = root_memory_budget
        self.async_roots = check_bool("async_roots", async_roots)
        if async_staleness is not None:
            check_int("async_staleness", async_staleness, low=1)
        if async_deterministic_delay is not None:
            check_int("async_deterministic_delay", async_deterministic_delay, low=1)
        self.async_staleness = async_staleness
        self.async_deterministic_delay = async_deterministic_delay
        self.async_workers = check_int("async_workers", async_workers, low=1)
        self.distributed = check_bool("distributed", distributed)
        self.communication_dtype = check_choice(
            "communication_dtype", communication_dtype, COMMUNICATION_DTYPES
        )
        self._process_group = check_process_group(process_group)
        self.shard_optimizer_state = check_bool("shard_optimizer_state", shard_optimizer_state)
        if shard_optimizer_state and not distributed:
            raise ValueError(
                "shard_optimizer_state=True needs distributed=True (it splits the optimizer "
                "state across the ranks of process_group), got distributed=False"
            )
        self.fsdp_mode = check_choice("fsdp_mode", fsdp_mode, FSDP_MODES)
        if fsdp_mode == "exact":
            # sharded parameters' moments hold this rank's rows and owned blocks
            # (placement/fsdp.py): saved per shard like the blocks, not as DTensors
            self._param_shaped_keys = ()
        self._clock = 0  # number of updating steps: the time base of async_roots
        self._rt = Runtime(self._label)
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _runtime(self) -> Runtime:
        """Parameter index, block ownership and root scheduler (built lazily)."""
        return self._rt.refresh(self, self._root_solve)

    def _local_view(self) -> Any:
        """``fsdp_mode="exact"``: sharded parameters seen as full-size tensors
        (:class:`~secondorder.placement.fsdp.ExactView`); local shards otherwise."""
        if self.fsdp_mode != "exact":
            return super()._local_view()
        cached = self.__dict__.get("_placement_view")
        if cached is not None and cached[1] is not None and cached[1].active:
            return cached[1]
        self.__dict__["_placement_view"] = cached = build_exact_view(self, cached)
        return cached[1]

    @staticmethod
    def _reads_params(group: dict[str, Any]) -> bool:
        """Whether a step of ``group`` reads parameter values (not only gradients): coupled
        weight decay adds ``weight_decay * p`` to the gradient. In ``fsdp_mode="exact"``
        the sharded parameters of such groups are all-gathered for the step."""
        return group.get("weight_decay", 0) != 0 and not group.get("decoupled_weight_decay", True)

    def _stats_shape(self, group: dict[str, Any], n: int, count: int) -> tuple[int, ...]:
        """Shape of a factor's ``stats`` stack of ``count`` blocks of size ``n``."""
        return (count, n, n)

    def _check_loaded_state(self, p: torch.Tensor, st: dict[str, Any]) -> None:
        """A loaded state has the per-block entries and statistics of this parameter's plan
        (only this rank's blocks while a rank's shard is loaded)."""
        super()._check_loaded_state(p, st)
        if not st:
            return
        for key in type(self)._param_shaped_keys:  # exact mode: not checked by the base
            value = st.get(key)
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != p.shape:
                raise ValueError(
                    f"state {key!r} has shape {tuple(value.shape)} but its parameter has "
                    f"shape {tuple(p.shape)}: the state dict does not match these parameters"
                )
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        plan = self._plan(p, group)
        need = {"step"}
        if plan is not None:
            need |= {"stats", "roots", "root_error", "lambda_max", "root_failures"}
        missing = need - st.keys()
        name = self._label
        if missing:
            raise ValueError(
                f"{name} state for a parameter of shape {tuple(p.shape)} lacks "
                f"{sorted(missing)}: not a {name} state dict for these parameters and settings"
            )
        if plan is None:
            return
        counts = self._rt.local_counts(p, plan.counts)  # a rank's shard: its own blocks only
        expected = [
            [self._stats_shape(group, n, c) for n in bs] for bs, c in zip(plan.block_shapes, counts)
        ]
        got = [[tuple(s.shape) for s in cls] for cls in st["stats"]]
        if expected != got:
            raise ValueError(
                f"{name} state for a parameter of shape {tuple(p.shape)} has statistics of "
                f"shapes {got}, expected {expected}: the state dict does not match these "
                f"parameters or this {self._stats_settings}"
            )

    # ------------------------------------------------ hooks of the root schedulers
    def _store_root(self, state, cls, axis, root, err, lam, ok, lo=0, hi=None, group=None):
        """Swap in new roots of blocks ``lo:hi`` where ``ok``
        (:func:`~secondorder.placement.roots.store_root`)."""
        store_root(self._rt, state, cls, axis, root, err, lam, ok, lo, hi, group)

    def _contained(self, kind: str, consequence: str) -> AbstractContextManager[None]:
        """Catch an exception after the commit point: warn once per kind, count, go on."""
        return self._rt.contained(kind, consequence)

    def _warn_once(self, kind: tuple[str, ...], message: str) -> None:
        self._rt.warn_once(kind, message, stacklevel=5)

    # -------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """The state dict. Never a collective: safe to call on one rank only.

        Single process (or one rank): the full state. With ``distributed=True`` on several
        ranks every rank holds only its own blocks' statistics and roots, and that is what it
        returns: a *shard*, marked by ``"distributed_shard": {"rank", "world_size"}``, which
        loads back on the same rank of a run with the same world size and settings. So
        ``if rank == 0: torch.save(opt.state_dict(), path)`` never blocks the other ranks
        (but saves only rank 0's shard); for one file holding everything, in the
        single-process format, call :meth:`full_state_dict` on every rank. With
        ``async_roots`` the pending root jobs are waited for (not installed) and saved under
        ``"async_roots"`` with the step counter, so that a loaded optimizer installs them at
        the same step as the original would have.
        """
        return self._state_dict(gather=False)

    def full_state_dict(self) -> dict[str, Any]:
        """The complete state in the single-process format, gathered from every rank.

        A collective with ``distributed=True`` on several ranks: call it on **every** rank
        (each gets the same dict), e.g. ``sd = opt.full_state_dict(); if rank == 0:
        torch.save(sd, path)``. It loads into single-process and distributed runs of any
        world size. Without a process group it equals :meth:`state_dict`.

        Not available with ``fsdp_mode="exact"`` on sharded parameters (``ValueError``):
        there each rank's momentum is exact only on its own rows and owned blocks; save with
        :meth:`state_dict` or ``torch.distributed.checkpoint`` instead.
        """
        view = self._local_view() if self.fsdp_mode == "exact" else None
        if view is not None and view.sharded:
            raise ValueError(
                "full_state_dict() is not available with fsdp_mode='exact' on sharded "
                "(FSDP2 / HSDP) parameters: each rank keeps exact momentum only for its own "
                "rows and owned blocks. Save with state_dict() or torch.distributed.checkpoint "
                "(get_optimizer_state_dict), which load back at the same number of shards"
            )
        return self._state_dict(gather=True)

    def _state_dict(self, gather: bool) -> dict[str, Any]:
        return self._runtime().save(self, super().state_dict(), gather)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from a single-process or a distributed run (same format).

        Distributed: every rank keeps only its own blocks' statistics and roots. Pending
        async root jobs of the checkpoint are installed at their original step with
        ``async_roots`` (this optimizer's own pending jobs are dropped), and right away
        without it.
        """
        self._runtime().load(self, state_dict, super().load_state_dict)

    def _after_load_state_dict(self) -> None:
        super()._after_load_state_dict()
        # after unpickling / deepcopy: no runtime (it is transient); rebuilt lazily
        for name, value in (
            ("_rt", Runtime(self._label)),
            ("_process_group", None),
            ("_clock", 0),
            ("async_roots", False),
            ("async_staleness", None),
            ("async_deterministic_delay", None),
            ("async_workers", 1),
            ("distributed", False),
            ("communication_dtype", torch.float32),
            ("root_memory_budget", DEFAULT_ROOT_MEMORY_BUDGET),
            ("shard_optimizer_state", False),
            ("fsdp_mode", "local"),
        ):
            self.__dict__.setdefault(name, value)

    # ------------------------------------------------------------ diagnostics
    def async_diagnostics(self) -> dict[str, Any]:
        """Counters of the async root worker: ``submitted``, ``installed``, ``exceptions``
        (jobs that raised: their blocks kept their roots and count a failure), ``waits`` /
        ``wait_seconds`` (steps that had to wait for a job), ``max_staleness`` (steps) and
        ``in_flight``. Rejected (non-finite or inaccurate) roots are counted per block in
        :meth:`diagnostics`' ``failures``."""
        roots = self._rt.roots
        return roots.diagnostics() if roots is not None else dict(IDLE)

    def close(self) -> None:
        """Stop the async root worker's threads now (they also stop when the optimizer is
        garbage collected and at exit). Pending jobs are dropped; the optimizer stays usable."""
        if self._rt.roots is not None:
            self._rt.roots.close()

    @torch.no_grad()
    def diagnostics(self) -> list[dict[str, Any]]:
        """Per preconditioned factor: parameter index, block class, axis and root health.

        Each record has ``param`` (index over all param groups), ``shape``, ``block_shape``,
        ``axis``, ``num_blocks``, ``step``, ``root_error`` / ``lambda_max`` (lists, one
        value per block, from the last root computation; ``lambda_max`` is the largest
        eigenvalue of the true statistics, finite for any finite gradients), ``failures``
        (list, number of rejected roots per block so far; a root solve that raised counts
        one for each of its blocks) and ``streak`` (consecutive failures per block). With
        ``distributed=True`` the lists cover this rank's blocks only, whose indices (within
        the size class) are in ``blocks``. This reads device values: call it off the hot
        path. Memory figures are in :meth:`memory_diagnostics`.
        """
        layout = self._runtime().layout
        out = []
        idx = 0
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p, {})
                if "stats" in st:
                    plan = self._plan(p, group)
                    for c, bs in enumerate(plan.block_shapes):
                        for i, n in enumerate(bs):
                            out.append(
                                dict(
                                    param=idx,
                                    shape=tuple(p.shape),
                                    block_shape=tuple(bs),
                                    axis=i,
                                    size=n,
                                    num_blocks=plan.counts[c],
                                    blocks=(
                                        list(range(plan.counts[c]))
                                        if layout is None
                                        else layout.owned(idx, c)
                                    ),
                                    step=int(st["step"].item()),
                                    root_error=st["root_error"][c][i].tolist(),
                                    lambda_max=st["lambda_max"][c][i].tolist(),
                                    failures=st["root_failures"][c][i].tolist(),
                                    streak=(
                                        st["root_streak"][c][i].tolist()
                                        if "root_streak" in st
                                        else [0] * len(st["root_failures"][c][i])
                                    ),
                                )
                            )
                idx += 1
        return out

    def memory_diagnostics(self) -> dict[str, Any]:
        """Memory of this optimizer (this rank's, when distributed), in bytes.

        ``state_bytes`` (all state tensors) and its parts ``statistics``, ``roots``,
        ``moments`` (momentum and graft accumulator) and ``other``; ``root_memory_budget``;
        ``peak_root_workspace_bytes`` / ``last_root_workspace_bytes``: the largest (and the
        latest) solver workspace of one chunk of a synchronous root refresh, estimated from
        the chunk's size by :func:`~secondorder.kernels.roots.root_workspace_bytes`;
        ``root_chunks``: solver calls so far. Async root jobs also hold a snapshot of the
        due statistics (``statistics``-sized at most) while they run.
        ``contained_failures``: failures after the commit point of a step, by kind.
        """
        parts = dict(statistics=0, roots=0, moments=0, other=0)
        for st in self.state.values():
            for k, v in st.items():
                parts[self._memory_parts.get(k, "other")] += tree_bytes(v)
        rt = self._rt
        return dict(
            state_bytes=sum(parts.values()),
            **parts,
            root_memory_budget=self.root_memory_budget,
            **rt.root_memory(),
            contained_failures=dict(rt.failure_counts),
        )
