"""Shampoo: Kronecker-factored preconditioning with grafting and delayed inverse roots.

The math is in ``kernels`` (statistics/application in ``kernels.kron``, inverse roots in
``kernels.roots``, grafting in ``kernels.grafting``) and shape handling in ``blocking``;
this class only orchestrates the order of a step and owns the state.

Step ``t`` (1-based, per parameter) does, for every parameter with a gradient:

1. ``g = grad`` (+ ``weight_decay * p`` when ``decoupled_weight_decay=False``, L2 style);
2. statistics: for every block and axis ``i``, ``S_i <- beta2 S_i + w G_(i) G_(i)^T``;
3. roots, every ``precondition_frequency`` steps from ``start_preconditioning_step`` on:
   ``P_i = (S_i / bc + eps * lambda_max I)^(-1/p)``, batched over the due factors of one size.
   A root that fails (non-finite, residual ``>= inverse_failure_threshold``, or the solver
   raised) is not used: the previous root is kept, the failure counted (:meth:`diagnostics`)
   and warned about once per kind; ``on_root_failure`` acts after
   ``max_consecutive_root_failures`` failures in a row of one factor;
4. momentum ``m <- beta1 m + (1 - beta1) g`` (an EMA, bias-corrected: the Adam convention;
   ``nesterov=True`` uses the NAdam look-ahead ``beta1 m_hat_{t+1} + (1 - beta1) g_hat_t``);
5. direction: the graft direction ``a`` (e.g. Adam: ``m_hat / (sqrt(v_hat) + graft_eps)``)
   and, once roots exist, the Shampoo direction ``D = m_hat x_1 P_1 ... x_k P_k`` rescaled per
   block to ``||a||`` (``graft=None``: ``D`` as is). Before ``start_preconditioning_step`` the
   update is ``a``: with ``graft="adam"`` Shampoo is then exactly AdamW;
6. ``p <- p * (1 - lr * weight_decay)`` (decoupled, the default) and ``p <- p - lr * D``.

Statistics are stored as ``S_i = s^2 * S_hat_i`` with a per-block scale ``s`` that follows
the gradient's largest entry (:func:`~secondorder.kernels.kron.update_scaled_statistics`):
``S_hat_i`` stays bounded for any finite gradient, so gradients of 1e20 or 1e-30 neither
overflow nor underflow float32. The roots are solved on ``S_hat_i`` and scaled back by
``s^(-2/p)``. With ``packed_statistics=True`` only the upper triangle of each ``S_hat_i``
is stored. The Kronecker product of step 5 runs in scaled units
(:func:`~secondorder.kernels.kron.precondition_scaled`: momentum and intermediate products
divided per block by powers of two), so stale roots of tiny statistics meeting huge momentum
cannot overflow; grafting folds the scale into its norm ratio (bit-identical to the unscaled
product for ordinary gradients), and with ``graft=None`` the direction saturates at 2**63.

Steps 4-6 run in pieces of bounded size (:mod:`secondorder.optim.pieces`): large tensors in
runs of block rows, small tensors of a group together with ``torch._foreach_*`` ops; pieces
hold at most ``root_memory_budget / 8`` bytes of float32 (eight temporaries of a piece fit
the budget; at least 256 KiB and one block row), and the result does not depend on the cut.

A step runs in two stages. Stage 1 does everything that can raise (gradient checks, new
state for new parameters) and modifies nothing, so an exception leaves parameters and state
bit-identical and the step can simply be retried. Stage 2 commits (step counters,
statistics, roots, moments, parameters); a failure there is contained and warned about once
per kind: a statistics update that raises leaves that gradient out of the statistics, a root
solve that raises is a rejected root, an update that cannot be preconditioned takes the
graft direction, a piece whose momentum or graft raises is not updated this step. With
``distributed=True`` the all-gather of the directions is a collective whose failure is not
contained (a broken process group cannot be recovered from inside a step).

Shapes: size-1 dims are dropped and adjacent dims merged while their product stays
``<= block_size`` (a conv kernel (64, 32, 3, 3) becomes (64, 288)); dims larger than
``block_size`` are cut into blocks. A matrix or higher-order tensor whose dims all merge
into one (a 24 x 12 weight with ``block_size >= 288``) gets one full-matrix factor of its
flattened gradient (``P = S^(-1/2)``). 0-d tensors and true vectors (unless
``precondition_1d=True``) take the graft update alone. With ``graft=None`` the updates that
have no Shampoo direction (those tensors, and every tensor before the first root) use Adam.
All optimizer state is float32 whatever the parameter dtype; bfloat16 parameters are updated
from float32 directions.

This module is the algorithm. The system -- when and where roots are solved (step 3, also
in a background pool with ``async_roots=True``), which DDP rank owns which block with
``distributed=True`` (steps 2-5 on owned blocks, directions all-gathered before step 6),
checkpoints and diagnostics -- is the placement layer it builds on
(:class:`~secondorder.placement.blocked.BlockOptimizer`; docs/distributed.md).
"""

from __future__ import annotations

from typing import Any

import torch

from .._validation import (
    check_bool,
    check_choice,
    check_common_hparams,
    check_float,
    check_int,
)
from ..blocking import BlockPlan
from ..kernels import kron
from ..kernels.grafting import (
    GRAFT_KINDS,
    GRAFTS_WITH_STATE,
    bias_correction,
)
from ..kernels.roots import RIDGES, RootResult, inverse_root
from ..placement.blocked import BlockOptimizer
from ..placement.ddp import BlockLayout, localize_state
from ..placement.roots import (
    DEFAULT_ROOT_MEMORY_BUDGET,
    DueFactor,
    RootFailureError,
    scaled_root,
)
from ..placement.runtime import Runtime
from .shampoo_steps import ShampooSteps, _Item

__all__ = ["RootFailureError", "Shampoo"]

ROOT_METHODS = ("auto", "newton", "eigh")
MATMUL_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)
ROOT_FAILURE_POLICIES = ("warn", "graft", "raise")


def _solve_bucket(
    spec: tuple[Any, ...], matrix: torch.Tensor, scale: torch.Tensor | None = None
) -> RootResult:
    """The root function of the schedulers: :func:`inverse_root` of the scaled statistics
    ``scale^2 * matrix``, in true units (:func:`~secondorder.placement.roots.scaled_root`)."""
    return scaled_root(inverse_root, spec, matrix, scale)


class Shampoo(ShampooSteps, BlockOptimizer):
    """Shampoo (Gupta et al. 2018; Anil et al. 2020, "Scalable Second Order Optimization").

    Args:
        params: iterable of parameters or param-group dicts.
        lr: learning rate (>= 0).
        betas: ``(beta1, beta2)``: momentum EMA in [0, 1) and statistics EMA in [0, 1]
            (``beta2 = 1``: running sums, AdaGrad style). ``beta2`` also drives the graft.
        eps: ridge added to each statistic before its root; > 0. With ``ridge="relative"``
            (default) it is relative to the statistic's largest eigenvalue
            (``eps * lambda_max``), with ``ridge="absolute"`` it is ``eps * I``.
        weight_decay: >= 0; decoupled (AdamW style) unless ``decoupled_weight_decay=False``.
        block_size: maximum size of a preconditioned dimension (>= 1).
        precondition_frequency: recompute roots every this many steps (>= 1).
        start_preconditioning_step: first step that uses (and computes) roots; graft-only
            before. ``None``: equal to ``precondition_frequency``.
        graft: ``"adam" | "rmsprop" | "adagrad" | "sgd" | None``.
        graft_eps: epsilon of the graft's denominator (> 0).
        nesterov: use the Nesterov (NAdam) look-ahead momentum.
        exponent_override: use ``P = S^(-1/exponent_override)`` for every factor instead of
            ``-1/(2k)`` for an order-``k`` block.
        root_method: ``"newton"`` (coupled Newton iteration, batched matmuls), ``"eigh"``
            (eigendecomposition), or ``"auto"`` (default): eigh for statistics on the CPU,
            where LAPACK's eigh is several times cheaper than ~20 Newton iterations of
            matmuls, and Newton on accelerators.
        ridge: ``"relative"`` (default: ``eps * lambda_max(S)``, independent of the
            gradients' scale; the condition number of ``S + ridge`` is at most ``1 + 1/eps``)
            or ``"absolute"`` (``eps * I`` on the bias-corrected statistics, the convention
            of Meta's DistributedShampoo ``epsilon``; depends on the gradients' scale).
        statistics_frequency: update the Kronecker statistics every this many steps
            (>= 1; default 1): at steps ``t`` with ``(t - 1) % statistics_frequency == 0``,
            i.e. 1, 1 + k, 1 + 2k, ... (as Google's ``statistics_compute_steps``). The
            statistics' bias correction counts those updates. Momentum, graft and roots
            are unaffected (roots still follow ``precondition_frequency``).
        matmul_dtype: dtype of the per-step matmuls (statistics Gram products and the
            application of the roots); ``None`` (default) is float32. ``torch.bfloat16``
            runs them on bf16 units (AMX on recent Xeons, tensor cores on GPUs) at bf16
            rounding of each product; statistics and roots themselves stay float32.
        decoupled_weight_decay: see ``weight_decay``.
        precondition_1d: also precondition true vectors (tensors with one dim of size > 1,
            e.g. biases; one factor) instead of graft-only. Tensors with two or more such
            dims are always preconditioned, also when they merge into one dim.
        inverse_failure_threshold: a root whose residual is at least this is rejected.
        packed_statistics: store each factor's statistics as its upper triangle
            (``n (n + 1) / 2`` numbers instead of ``n^2``: about half the statistics'
            memory, identical values). Each step then forms the Gram products a few blocks
            at a time and packs them; a refresh unpacks one chunk at a time.
        max_consecutive_root_failures: after this many consecutive failed root computations
            of the same factor (rejected roots or solver exceptions; >= 1) apply
            ``on_root_failure``. Every kind of failure is also warned about once.
        on_root_failure: ``"warn"`` (default: warn once and go on with the last good root),
            ``"graft"`` (the blocks of such a factor take the graft direction until one of
            its roots succeeds again) or ``"raise"`` (raise :class:`RootFailureError` at the
            end of the step, which has been applied completely).
        nonfinite: ``"skip"`` or ``"raise"`` for steps with NaN/Inf gradients (see base).
        async_roots: solve the roots in a background thread pool from a snapshot of the
            statistics; finished roots are installed at the start of a later step (a
            tensor's first roots are solved in the step).
        async_staleness: wait for a root job once it is this many steps old (>= 1; ``None``:
            the smallest ``precondition_frequency``).
        async_deterministic_delay: install every job exactly this many steps (>= 1) after
            its submission: reproducible, equal to sync Shampoo with roots that many steps late.
        async_workers: threads of the root pool (>= 1).
        distributed: each rank of ``process_group`` keeps the statistics and roots of its own
            blocks only (data parallel: same gradients on every rank, e.g. DDP); directions
            are all-gathered every step. No initialised process group: single process.
        process_group: the group for ``distributed`` (``None``: the default group).
        communication_dtype: of the all-gathered directions: ``torch.float32`` (default,
            exact) or ``torch.bfloat16`` (half the traffic).
        root_memory_budget: bytes of transient memory allowed at once (>= 1; default
            256 MiB): while roots are refreshed, due factors are solved in chunks whose
            estimated solver workspace fits (at least one matrix per chunk; peaks are
            reported by :meth:`memory_diagnostics`), and each step's elementwise work runs
            in pieces of at most ``root_memory_budget / 8`` bytes of float32 (but at least
            256 KiB and one block row), whose eight temporaries fit it. ``None``: one
            chunk per bucket and whole tensors (fastest, unbounded).
        shard_optimizer_state: with ``distributed``, each parameter (all its blocks, its
            momentum and graft state) belongs to one rank, which alone updates it and then
            sends it to the others (ZeRO-1): per-rank state ~ 1/world.
        fsdp_mode: on FSDP2 / HSDP (DTensor) parameters, ``"local"`` (default: blocks cut
            inside each rank's shard) or ``"exact"`` (gradients gathered over the shards, each
            block of the whole tensor preconditioned by one owner rank: the result of
            single-process Shampoo on the whole model). Plain tensors: no effect.

    The system keywords (``async_*`` to ``fsdp_mode``) configure the placement
    layer; docs/distributed.md describes each in full.
    """

    _supports_dtensor = True  # local shards (see docs/distributed.md)
    _param_shaped_keys = ("exp_avg", "graft_v")
    _plan_keys = ("block_size", "precondition_1d")  # group settings the block plans depend on
    _memory_parts = dict(stats="statistics", roots="roots", exp_avg="moments", graft_v="moments")
    _root_solve = staticmethod(_solve_bucket)
    _label = "Shampoo"
    _stats_settings = "block_size / packed_statistics"  # what decides the statistics' shapes

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        block_size: int = 1024,
        precondition_frequency: int = 10,
        start_preconditioning_step: int | None = None,
        graft: str | None = "adam",
        graft_eps: float = 1e-8,
        nesterov: bool = False,
        exponent_override: int | None = None,
        root_method: str = "auto",
        *,
        ridge: str = "relative",
        statistics_frequency: int = 1,
        matmul_dtype: torch.dtype | None = None,
        decoupled_weight_decay: bool = True,
        precondition_1d: bool = False,
        inverse_failure_threshold: float = 0.1,
        packed_statistics: bool = False,
        max_consecutive_root_failures: int = 10,
        on_root_failure: str = "warn",
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
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            block_size=block_size,
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step,
            graft=graft,
            graft_eps=graft_eps,
            nesterov=nesterov,
            exponent_override=exponent_override,
            root_method=root_method,
            ridge=ridge,
            statistics_frequency=statistics_frequency,
            matmul_dtype=matmul_dtype,
            decoupled_weight_decay=decoupled_weight_decay,
            precondition_1d=precondition_1d,
            inverse_failure_threshold=inverse_failure_threshold,
            packed_statistics=packed_statistics,
            max_consecutive_root_failures=max_consecutive_root_failures,
            on_root_failure=on_root_failure,
        )
        self._plans: dict[tuple[Any, ...], BlockPlan] = {}
        system = dict(
            async_roots=async_roots,
            async_staleness=async_staleness,
            async_deterministic_delay=async_deterministic_delay,
            async_workers=async_workers,
            distributed=distributed,
            process_group=process_group,
            communication_dtype=communication_dtype,
            root_memory_budget=root_memory_budget,
            shard_optimizer_state=shard_optimizer_state,
            fsdp_mode=fsdp_mode,
        )  # validated and kept by the placement layer (BlockOptimizer)
        super().__init__(params, defaults, nonfinite=nonfinite, **system)

    # --------------------------------------------------------------- validation
    def _validate_group(self, group: dict[str, Any]) -> None:
        check_common_hparams(group)
        check_int("block_size", group["block_size"], low=1)
        check_int("precondition_frequency", group["precondition_frequency"], low=1)
        if group["start_preconditioning_step"] is not None:
            check_int("start_preconditioning_step", group["start_preconditioning_step"], low=1)
        check_choice("graft", group["graft"], GRAFT_KINDS)
        check_bool("nesterov", group["nesterov"])
        if group["exponent_override"] is not None:
            check_int("exponent_override", group["exponent_override"], low=1)
        check_choice("root_method", group["root_method"], ROOT_METHODS)
        check_choice("ridge", group["ridge"], RIDGES)
        check_int("statistics_frequency", group["statistics_frequency"], low=1)
        check_choice("matmul_dtype", group["matmul_dtype"], MATMUL_DTYPES)
        check_bool("decoupled_weight_decay", group["decoupled_weight_decay"])
        check_bool("precondition_1d", group["precondition_1d"])
        check_float(
            "inverse_failure_threshold", group["inverse_failure_threshold"], low=0.0, low_open=True
        )
        check_bool("packed_statistics", group["packed_statistics"])
        check_int("max_consecutive_root_failures", group["max_consecutive_root_failures"], low=1)
        check_choice("on_root_failure", group["on_root_failure"], ROOT_FAILURE_POLICIES)

    # ------------------------------------------------------------------- shapes
    def _plan(self, p: torch.Tensor, group: dict[str, Any]) -> BlockPlan | None:
        """The block plan of ``p``, or ``None`` when ``p`` takes the graft update only.

        Preconditioned: every tensor whose merged shape has two or more dims; a tensor with
        two or more dims of size > 1 whose dims all merge into one (a ``24 x 12`` weight
        with ``block_size >= 288``) as one full-matrix factor of the flattened tensor;
        true vectors (one dim of size > 1, e.g. biases) only with ``precondition_1d``.
        Scalars and all-ones shapes never.
        """
        key = (tuple(p.shape), group["block_size"], group["precondition_1d"])
        if key not in self._plans:
            plan = BlockPlan(p.shape, group["block_size"])
            order = len(plan.merged_shape)
            vector = sum(d != 1 for d in p.shape) < 2
            use = order >= 2 or (order == 1 and (not vector or group["precondition_1d"]))
            self._plans[key] = plan if use else None
        return self._plans[key]

    @staticmethod
    def _start(group: dict[str, Any]) -> int:
        s = group["start_preconditioning_step"]
        return group["precondition_frequency"] if s is None else s

    @staticmethod
    def _graft_kind(group: dict[str, Any], preconditioned: bool) -> str | None:
        """The diagonal method whose direction (and norm) this update uses.

        With ``graft=None`` there is no step size to borrow, so updates that have no
        Shampoo direction (graft-only tensors, steps before the first root) use Adam.
        """
        kind = group["graft"]
        if not preconditioned and kind is None:
            return "adam"
        return kind

    # -------------------------------------------------------------------- state
    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """A new state for ``p`` (not installed in ``self.state``).

        ``stats`` hold ``S_hat = S / scale^2`` with ``stat_scale`` the per-block scale
        (``0`` until the first nonzero gradient); ``lambda_max`` is in true units (float64,
        finite for any finite gradient); ``root_streak`` counts consecutive failed roots.
        """
        state: dict[str, Any] = {}
        plan = self._plan(p, group)
        state["step"] = torch.tensor(0.0)
        f32 = dict(dtype=torch.float32, device=p.device)
        moments = self._moment_shape(p)  # fsdp_mode="exact": this rank's entries only
        if group["betas"][0] > 0:
            state["exp_avg"] = torch.zeros(moments, **f32)
        if self._graft_kind(group, False) in GRAFTS_WITH_STATE:
            state["graft_v"] = torch.zeros(moments, **f32)
        if plan is not None:
            shapes = list(zip(plan.block_shapes, plan.counts))
            if group["packed_statistics"]:
                state["stats"] = [
                    [torch.zeros(c, kron.packed_size(n), **f32) for n in bs] for bs, c in shapes
                ]
            else:
                state["stats"] = [[torch.zeros(c, n, n, **f32) for n in bs] for bs, c in shapes]
            # Roots are only ever used in the per-step matmuls: keep them in that dtype.
            rdt = dict(dtype=group["matmul_dtype"] or torch.float32, device=p.device)
            state["roots"] = [
                [torch.eye(n, **rdt).expand(c, n, n).clone() for n in bs] for bs, c in shapes
            ]
            state["root_error"] = [[torch.zeros(c, **f32) for _ in bs] for bs, c in shapes]
            f64 = dict(dtype=torch.float64, device=p.device)
            state["lambda_max"] = [[torch.zeros(c, **f64) for _ in bs] for bs, c in shapes]
            state["root_failures"] = [
                [torch.zeros(c, dtype=torch.int64, device=p.device) for _ in bs] for bs, c in shapes
            ]
            state["root_streak"] = [
                [torch.zeros(c, dtype=torch.int64, device=p.device) for _ in bs] for bs, c in shapes
            ]
            state["stat_scale"] = [[torch.zeros(c, **f32) for _ in bs] for bs, c in shapes]
        return state

    @staticmethod
    def _stats_shape(group: dict[str, Any], n: int, count: int) -> tuple[int, ...]:
        """Shape of a factor's statistics stack: ``count`` blocks of size ``n`` (checked on
        load by the placement layer)."""
        return (count, kron.packed_size(n)) if group["packed_statistics"] else (count, n, n)

    def _check_loaded_state(self, p: torch.Tensor, st: dict[str, Any]) -> None:
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        st = self._loaded_moments(p, st)  # exact mode: compact moments checked here
        if st and self._merged_without_factors(p, group, st):
            # saved when such tensors were graft-only: factors are added after loading
            super(BlockOptimizer, self)._check_loaded_state(p, st)
            return
        super()._check_loaded_state(p, st)

    def _after_load_state_dict(self) -> None:
        super()._after_load_state_dict()
        self._compact_moments()
        self._add_missing_factors()

    def _merged_without_factors(
        self, p: torch.Tensor, group: dict[str, Any], st: dict[str, Any]
    ) -> bool:
        """``st`` is from a version that left tensors merging into one dim graft-only."""
        plan = self._plan(p, group)
        return (
            plan is not None
            and plan.order == 1
            and sum(d != 1 for d in p.shape) >= 2
            and "step" in st
            and not any(k in st for k in ("stats", "roots", "root_error", "lambda_max"))
        )

    def _add_missing_factors(self) -> None:
        """Give loaded states of tensors that merge into one dim (graft-only in older versions)
        fresh factors: zero statistics and identity roots, so from the load on they collect
        statistics and get their first root at the next refresh."""
        rt = self.__dict__.get("_rt")
        pairs = [(g, q) for g in self.param_groups for q in g["params"]]
        for key, (group, p) in enumerate(pairs):
            st = self.state.get(p)
            if not st or not self._merged_without_factors(p, group, st):
                continue
            fresh = self._init_state(p, group)
            if rt is not None and rt.layout is not None and rt.loading_shard:
                fresh = localize_state(fresh, rt.layout, key)
            for k, v in fresh.items():
                st.setdefault(k, v)

    # --------------------------------------------------------------------- step
    def _update(self, work: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> None:
        rt = self._runtime()
        layout = rt.layout
        everything, work = work, rt.owned(work)  # shard_optimizer_state: own parameters only
        # Stage 1: everything that can raise. Nothing persistent is modified before it ends.
        items = [self._prepare(rt, group, p) for group, params in work for p in params]
        # Stage 2: commit. From here on failures are contained (warned once, counted): the
        # step completes with the failed part degraded (see the class docstring).
        self._clock += 1
        for it in items:
            if it.fresh:
                self.state[it.p] = it.state
            it.state.update(it.new)
            it.state["step"] += 1
            if it.plan is not None:
                self._accumulate(it, layout)
        rt.roots.collect(self, rt, self._clock)
        due: list[DueFactor] = []
        for it in items:
            if it.due:
                with self._contained("roots", "a tensor's roots were not refreshed this step"):
                    due.extend(self._due_factors(it.state, it.plan, it.group, it.t, it.key))
        rt.roots.submit(self, rt, due, self._clock)
        if layout is None:  # apply piece by piece: no direction is held longer than needed
            self._update_local(items)
        else:  # a collective: a failure here is not contained
            directions = [self._direction(it, layout) for it in items]
            for it, d in zip(items, rt.gather_directions(items, directions)):
                self._apply_direction(it.group, it.p, d)
        rt.share_params(everything)  # shard_optimizer_state: owners send updated parameters
        rt.escalate()

    def _prepare(self, rt: Runtime, group: dict[str, Any], p: torch.Tensor) -> _Item:
        """Stage 1 for one parameter: new state, step number, whether roots are due.
        Modifies nothing.

        Nothing parameter-sized is computed or kept here: the gradient is read again where
        it is used (:attr:`_Item.g`, and piece by piece in :meth:`_update_local`).
        """
        key = rt.keys[id(p)]
        state = self.state[p]
        fresh = not state
        if fresh:
            state = self._init_state(p, group)
            if rt.layout is not None:
                state = localize_state(state, rt.layout, key)
        t = int(state["step"].item()) + 1
        plan = self._plan(p, group)
        start, freq = self._start(group), group["precondition_frequency"]
        preconditioned = plan is not None and t >= start
        kind = self._graft_kind(group, preconditioned)
        beta1 = group["betas"][0]
        new: dict[str, Any] = {}
        # Created lazily too, so that momentum (or a stateful graft) can be switched on mid-run.
        f32 = dict(dtype=torch.float32, device=p.device)
        if beta1 > 0 and "exp_avg" not in state:
            new["exp_avg"] = torch.zeros(self._moment_shape(p), **f32)
        if kind in GRAFTS_WITH_STATE and "graft_v" not in state:
            new["graft_v"] = torch.zeros(self._moment_shape(p), **f32)
        due = plan is not None and t >= start and (t - start) % freq == 0
        return _Item(group, p, state, fresh, plan, t, key, None, due, new=new)

    def _accumulate(self, it: _Item, layout: BlockLayout | None) -> None:
        """Add the gradient to the (scaled) statistics; a failure skips this update, warned.

        Only at steps ``t`` with ``(t - 1) % statistics_frequency == 0`` (every step by
        default)."""
        if (it.t - 1) % it.group["statistics_frequency"]:
            return
        state = it.state
        scales = state.get("stat_scale")
        if scales is None:  # checkpoint from before scaled statistics: scale 1 is exact
            scales = state["stat_scale"] = [
                [torch.ones(s.shape[0], dtype=torch.float32, device=s.device) for s in cls]
                for cls in state["stats"]
            ]
        try:
            for c, (stack, stats) in enumerate(zip(it.plan.split(it.g), state["stats"])):
                if layout is not None:
                    stack = layout.local(it.key, c, stack)
                if stack.shape[0]:
                    kron.update_scaled_statistics(
                        stats, scales[c], stack, it.group["betas"][1], it.group["matmul_dtype"]
                    )
        except Exception as e:  # noqa: BLE001 - contained: the step must complete
            self._warn_once(
                ("statistics", type(e).__name__),
                f"Shampoo: the statistics update raised {type(e).__name__}: {e}. This step's "
                "gradient was left out of the statistics of the affected tensor (the step "
                "itself was applied).",
            )

    def _due_factors(
        self, state: dict[str, Any], plan: BlockPlan, group: dict[str, Any], t: int, key: int = -1
    ) -> list[DueFactor]:
        # bias correction by the number of statistics updates so far (steps 1, 1 + k, ...)
        updates = (t - 1) // group["statistics_frequency"] + 1
        bc = bias_correction(group["betas"][1], updates)
        first = t == self._start(group)  # a tensor's first roots: solved in the step
        out = []
        for c, stats in enumerate(state["stats"]):
            order = len(stats)
            exponent = group["exponent_override"] or 2 * order
            for i, s in enumerate(stats):
                if s.shape[0]:  # distributed: classes without local blocks have nothing due
                    scale = state["stat_scale"][c][i].clone()
                    out.append(DueFactor(state, c, i, s, exponent, key, group, scale, bc, first))
        return out
