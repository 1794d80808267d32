"""Shampoo: Kronecker-factored preconditioning with grafting and delayed inverse roots.

The math is in ``kernels`` (statistics/application in ``kernels.kron``, inverse roots in
``kernels.roots``, grafting in ``kernels.grafting``) and shape handling in ``blocking``;
this class only orchestrates the order of a step and owns the state.

Step ``t`` (1-based, per parameter) does, for every parameter with a gradient:

1. ``g = grad`` (+ ``weight_decay * p`` when ``decoupled_weight_decay=False``, L2 style);
2. statistics: for every block and axis ``i``, ``S_i <- beta2 S_i + w G_(i) G_(i)^T``;
3. roots, every ``precondition_frequency`` steps from ``start_preconditioning_step`` on:
   ``P_i = (S_i / bc + eps * lambda_max I)^(-1/p)``, all due factors of the same size across
   all parameters solved in one batched call. A root that fails (non-finite, or residual
   ``>= inverse_failure_threshold``) is not used: the previous root is kept and the failure
   counted (see :meth:`Shampoo.diagnostics`);
4. momentum ``m <- beta1 m + (1 - beta1) g`` (an EMA, bias-corrected: the Adam convention;
   ``nesterov=True`` uses the NAdam look-ahead ``beta1 m_hat_{t+1} + (1 - beta1) g_hat_t``);
5. direction: the graft direction ``a`` (e.g. Adam: ``m_hat / (sqrt(v_hat) + graft_eps)``)
   and, once roots exist, the Shampoo direction ``D = m_hat x_1 P_1 ... x_k P_k`` rescaled per
   block to ``||a||`` (``graft=None``: ``D`` as is). Before ``start_preconditioning_step`` the
   update is ``a``: with ``graft="adam"`` Shampoo is then exactly AdamW;
6. ``p <- p * (1 - lr * weight_decay)`` (decoupled, the default) and ``p <- p - lr * D``.

Shapes: size-1 dims are dropped and adjacent dims merged while their product stays
``<= block_size`` (a conv kernel (64, 32, 3, 3) becomes (64, 288)); dims larger than
``block_size`` are cut into blocks. 0-d tensors and 1-d tensors (unless
``precondition_1d=True``) take the graft update alone. With ``graft=None`` the updates that
have no Shampoo direction (those tensors, and every tensor before the first root) use Adam.
All optimizer state is float32 whatever the parameter dtype; bfloat16 parameters are updated
from float32 directions.

Systems (ALGORITHMS.md 1.7): ``async_roots=True`` moves step 3 off the hot path (a snapshot
of the statistics goes to a background thread pool; the roots are installed at the start of
a later step, see :mod:`secondorder.optim.async_roots`); ``distributed=True`` gives every
block to one rank of the process group, which alone keeps its statistics and roots and
computes its direction in steps 2-5; the directions are all-gathered before step 6 (see
:mod:`secondorder.distributed`).
"""

from __future__ import annotations

from dataclasses import dataclass
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
from ..distributed import (
    COMMUNICATION_DTYPES,
    BlockLayout,
    Communicator,
    check_process_group,
    is_block_state,
    localize_state,
)
from ..kernels import kron
from ..kernels.grafting import (
    GRAFT_KINDS,
    GRAFTS_WITH_STATE,
    bias_correction,
    graft_direction,
    graft_rescale,
    update_second_moment,
)
from ..kernels.roots import RootResult, inverse_root
from .async_roots import AsyncRootWorker, snapshot
from .base import SecondOrderOptimizer

ROOT_METHODS = ("auto", "newton", "eigh")
MATMUL_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)


@dataclass
class _DueFactor:
    """One factor stack (all blocks of one size class and axis of a parameter) due a new root."""

    state: dict[str, Any]
    cls: int
    axis: int
    matrix: torch.Tensor  # (B, n, n) bias-corrected statistics
    exponent: int
    key: int = -1  # index of the parameter over all param groups
    group: dict[str, Any] | None = None  # its param group (root settings)


class _Runtime:
    """Per-process helpers, rebuilt lazily: never pickled, copied or checkpointed."""

    def __init__(self) -> None:
        self.sig: Any = None
        self.params: list[torch.Tensor] = []  # all params, in param-group order
        self.keys: dict[int, int] = {}  # id(param) -> index in ``params``
        self.comm: Communicator | None = None
        self.layout: BlockLayout | None = None  # None: every block is local
        self.worker: AsyncRootWorker | None = None


class Shampoo(SecondOrderOptimizer):
    """Shampoo (Gupta et al. 2018; Anil et al. 2020, "Scalable Second Order Optimization").

    Args:
        params: iterable of parameters or param-group dicts.
        lr: learning rate (>= 0).
        betas: ``(beta1, beta2)``: momentum EMA in [0, 1) and statistics EMA in [0, 1]
            (``beta2 = 1``: running sums, AdaGrad style). ``beta2`` also drives the graft.
        eps: ridge added to each statistic before its root, **relative** to the statistic's
            largest eigenvalue (``eps * lambda_max``, power iteration); > 0.
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
        matmul_dtype: dtype of the per-step matmuls (statistics Gram products and the
            application of the roots); ``None`` (default) is float32. ``torch.bfloat16``
            runs them on bf16 units (AMX on recent Xeons, tensor cores on GPUs) at bf16
            rounding of each product; statistics and roots themselves stay float32.
        decoupled_weight_decay: see ``weight_decay``.
        precondition_1d: also precondition 1-d tensors (one factor) instead of graft-only.
        inverse_failure_threshold: a root whose residual is at least this is rejected.
        nonfinite: ``"skip"`` or ``"raise"`` for steps with NaN/Inf gradients (see base).
        async_roots: compute the roots in a background thread pool from a snapshot of the
            statistics (a pinned host copy on accelerators; roots are then solved on the
            host) while training goes on with the current roots; finished roots are
            installed at the start of a later step. A tensor's first roots (at
            ``start_preconditioning_step``) are computed in the step. Delays count
            optimizer steps. See :mod:`secondorder.optim.async_roots`.
        async_staleness: with ``async_roots``, wait for a root job once it is this many
            steps old (>= 1); ``None``: the smallest ``precondition_frequency``, i.e. a job
            must be done when the next one is due.
        async_deterministic_delay: with ``async_roots``, install every job exactly this many
            steps (>= 1) after its submission, waiting if needed: reproducible, and equal to
            synchronous Shampoo whose roots are installed that many steps late.
        async_workers: threads of the root pool (>= 1).
        distributed: split the per-block work across the ranks of ``process_group`` (data
            parallel: every rank must see the same gradients, e.g. under DDP). Each rank
            keeps the statistics and roots of its own blocks only (assigned by cost, see
            :mod:`secondorder.distributed`), computes their preconditioned directions, and
            the directions are all-gathered every step. ``state_dict()`` gathers (call it
            on every rank) and has the single-process format. Without an initialised
            process group this is plain single-process Shampoo.
        process_group: the group for ``distributed`` (``None``: the default group).
        communication_dtype: dtype of the all-gathered directions: ``torch.float32``
            (default, exact) or ``torch.bfloat16`` (half the traffic).
    """

    _param_shaped_keys = ("exp_avg", "graft_v")
    # process groups and thread pools cannot be copied; rebuilt lazily (_after_load_state_dict)
    _transient_attrs = ("_rt", "_process_group")

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
        matmul_dtype: torch.dtype | None = None,
        decoupled_weight_decay: bool = True,
        precondition_1d: bool = False,
        inverse_failure_threshold: float = 0.1,
        nonfinite: str = "skip",
        async_roots: bool = False,
        async_staleness: int | None = None,
        async_deterministic_delay: int | None = None,
        async_workers: int = 1,
        distributed: bool = False,
        process_group: Any = None,
        communication_dtype: torch.dtype = torch.float32,
    ) -> None:
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
        self._clock = 0  # number of updating steps: the time base of async_roots
        self._rt = _Runtime()
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
            matmul_dtype=matmul_dtype,
            decoupled_weight_decay=decoupled_weight_decay,
            precondition_1d=precondition_1d,
            inverse_failure_threshold=inverse_failure_threshold,
        )
        self._plans: dict[tuple[Any, ...], BlockPlan] = {}
        super().__init__(params, defaults, nonfinite=nonfinite)

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
        check_choice("matmul_dtype", group["matmul_dtype"], MATMUL_DTYPES)
        check_bool("decoupled_weight_decay", group["decoupled_weight_decay"])
        check_bool("precondition_1d", group["precondition_1d"])
        check_float(
            "inverse_failure_threshold", group["inverse_failure_threshold"], low=0.0, low_open=True
        )

    # ------------------------------------------------------------------- shapes
    def _plan(self, p: torch.Tensor, group: dict[str, Any]) -> BlockPlan | None:
        """The block plan of ``p``, or ``None`` when ``p`` takes the graft update only."""
        key = (tuple(p.shape), group["block_size"], group["precondition_1d"])
        if key not in self._plans:
            plan = BlockPlan(p.shape, group["block_size"])
            order = len(plan.merged_shape)
            use = order >= 2 or (order == 1 and group["precondition_1d"])
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
        state = self.state[p]
        plan = self._plan(p, group)
        state["step"] = torch.tensor(0.0)
        f32 = dict(dtype=torch.float32, device=p.device)
        if group["betas"][0] > 0:
            state["exp_avg"] = torch.zeros(p.shape, **f32)
        if self._graft_kind(group, False) in GRAFTS_WITH_STATE:
            state["graft_v"] = torch.zeros(p.shape, **f32)
        if plan is not None:
            shapes = list(zip(plan.block_shapes, plan.counts))
            state["stats"] = [[torch.zeros(c, n, n, **f32) for n in bs] for bs, c in shapes]
            # Roots are only ever used in the per-step matmuls: keep them in that dtype.
            rdt = dict(dtype=group["matmul_dtype"] or torch.float32, device=p.device)
            state["roots"] = [
                [torch.eye(n, **rdt).expand(c, n, n).clone() for n in bs] for bs, c in shapes
            ]
            state["root_error"] = [[torch.zeros(c, **f32) for _ in bs] for bs, c in shapes]
            state["lambda_max"] = [[torch.zeros(c, **f32) for _ in bs] for bs, c in shapes]
            state["root_failures"] = [
                [torch.zeros(c, dtype=torch.int64, device=p.device) for _ in bs] for bs, c in shapes
            ]
        return state

    def _check_loaded_state(self, p: torch.Tensor, st: dict[str, Any]) -> None:
        super()._check_loaded_state(p, st)
        if not st:
            return
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        plan = self._plan(p, group)
        need = {"step"}
        if plan is not None:
            need |= {"stats", "roots", "root_error", "lambda_max", "root_failures"}
        missing = need - st.keys()
        if missing:
            raise ValueError(
                f"Shampoo state for a parameter of shape {tuple(p.shape)} lacks "
                f"{sorted(missing)}: not a Shampoo state dict for these parameters and settings"
            )
        if plan is None:
            return
        expected = (
            None
            if plan is None
            else [[(c, n, n) for n in bs] for bs, c in zip(plan.block_shapes, plan.counts)]
        )
        got = [[tuple(s.shape) for s in cls] for cls in st["stats"]]
        if expected != got:
            raise ValueError(
                f"Shampoo state for a parameter of shape {tuple(p.shape)} has statistics of "
                f"shapes {got}, expected {expected}: the state dict does not match these "
                "parameters or this block_size"
            )

    # ----------------------------------------------------------------- runtime
    def _runtime(self) -> _Runtime:
        """Parameter index, communicator, block layout and root worker (built lazily)."""
        rt = self._rt
        sig = tuple(
            (len(g["params"]), g["block_size"], g["precondition_1d"]) for g in self.param_groups
        )
        if rt.sig != sig:
            pairs = [(g, p) for g in self.param_groups for p in g["params"]]
            if rt.layout is not None and any(
                any(is_block_state(v) for v in st.values()) for st in self.state.values()
            ):
                raise RuntimeError(
                    "Shampoo(distributed=True): parameters changed after the first step; the "
                    "block assignment cannot change once state exists"
                )
            rt.params = [p for _, p in pairs]
            rt.keys = {id(p): i for i, p in enumerate(rt.params)}
            if self.distributed and rt.comm is None:
                rt.comm = Communicator(self._process_group, self.communication_dtype)
            if rt.comm is not None and rt.comm.world_size > 1:
                entries = []
                for i, (g, p) in enumerate(pairs):
                    plan = self._plan(p, g)
                    if plan is not None:
                        entries.append((i, plan.block_shapes, plan.counts))
                rt.layout = BlockLayout(entries, rt.comm.world_size, rt.comm.rank)
            rt.sig = sig
        if self.async_roots and rt.worker is None:
            staleness = self.async_staleness or min(
                g["precondition_frequency"] for g in self.param_groups
            )
            rt.worker = AsyncRootWorker(
                self.async_workers, staleness, self.async_deterministic_delay
            )
        return rt

    # --------------------------------------------------------------------- step
    def _update(self, work: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> None:
        rt = self._runtime()
        layout = rt.layout
        self._clock += 1
        if rt.worker is not None and len(rt.worker):
            self._install(rt.worker.collect(self._clock))
        items = []
        due: list[_DueFactor] = []
        first: list[_DueFactor] = []  # async: a tensor's first roots are computed now
        for group, params in work:
            beta2 = group["betas"][1]
            start = self._start(group)
            freq = group["precondition_frequency"]
            for p in params:
                key = rt.keys[id(p)]
                if not self.state[p]:
                    self._init_state(p, group)
                    if layout is not None:
                        self.state[p] = localize_state(self.state[p], layout, key)
                state = self.state[p]
                state["step"] += 1
                t = int(state["step"].item())
                g = p.grad.float() if p.grad.dtype != torch.float32 else p.grad
                wd = group["weight_decay"]
                if wd != 0 and not group["decoupled_weight_decay"]:
                    g = g.add(p.float() if p.dtype != torch.float32 else p, alpha=wd)
                plan = self._plan(p, group)
                if plan is not None:
                    blocks = plan.split(g)
                    for c, (stack, stats) in enumerate(zip(blocks, state["stats"])):
                        if layout is not None:
                            stack = layout.local(key, c, stack)
                        if stack.shape[0]:
                            kron.update_statistics(stats, stack, beta2, group["matmul_dtype"])
                    if t >= start and (t - start) % freq == 0:
                        factors = self._due_factors(state, plan, group, t, key)
                        (due if self.async_roots and t > start else first).extend(factors)
                items.append((group, p, g, state, plan, t, key))
        if first:
            self._refresh_roots(first)
        if due:
            self._submit_roots(due)
        directions = [self._direction(*item, layout) for item in items]
        if layout is not None:
            exchange = [
                (key, c, d, plan.counts[c])
                for (_, _, _, _, plan, _, key), ds in zip(items, directions)
                if isinstance(ds, list)
                for c, d in enumerate(ds)
            ]
            full = iter(rt.comm.exchange(layout, exchange))
            directions = [
                [next(full) for _ in ds] if isinstance(ds, list) else ds for ds in directions
            ]
        for (group, p, _, _, plan, _, _), d in zip(items, directions):
            self._apply_direction(group, p, plan.merge(d) if isinstance(d, list) else d)

    def _due_factors(
        self, state: dict[str, Any], plan: BlockPlan, group: dict[str, Any], t: int, key: int = -1
    ) -> list[_DueFactor]:
        bc = bias_correction(group["betas"][1], t)
        out = []
        for c, stats in enumerate(state["stats"]):
            order = len(stats)
            exponent = group["exponent_override"] or 2 * order
            for i, s in enumerate(stats):
                if s.shape[0]:  # distributed: classes without local blocks have nothing due
                    m = s / bc if bc != 1.0 else s
                    out.append(_DueFactor(state, c, i, m, exponent, key, group))
        return out

    def _root_buckets(
        self, due: list[_DueFactor]
    ) -> list[tuple[tuple[Any, ...], list[_DueFactor], torch.Tensor]]:
        """Group due factors of equal size, exponent and settings (one batched solve each).

        Returns ``(spec, factors, stacked)`` per bucket, ``stacked`` the factors' statistics
        concatenated into one ``(B, n, n)`` batch.
        """
        buckets: dict[tuple[Any, ...], list[_DueFactor]] = {}
        for f in due:
            group = f.group
            method = group["root_method"]
            if method == "auto":
                # async roots are computed on the host from host snapshots: eigh
                on_host = f.matrix.device.type == "cpu" or self.async_roots
                method = "eigh" if on_host else "newton"
            key = (
                f.matrix.shape[-1],
                f.exponent,
                f.matrix.device,
                method,
                group["eps"],
                group["inverse_failure_threshold"],
            )
            buckets.setdefault(key, []).append(f)
        return [
            (spec, fs, torch.cat([f.matrix for f in fs]) if len(fs) > 1 else fs[0].matrix)
            for spec, fs in buckets.items()
        ]

    def _refresh_roots(self, due: list[_DueFactor]) -> None:
        """Compute all due roots now, batching factors of equal size, exponent and settings."""
        for spec, factors, stacked in self._root_buckets(due):
            self._store_results(factors, _solve_bucket(spec[1:], stacked))

    def _submit_roots(self, due: list[_DueFactor]) -> None:
        """Snapshot the due statistics and hand them to the root worker (async_roots)."""
        payload, meta = [], []
        for spec, factors, stacked in self._root_buckets(due):
            payload.append((spec[1:], snapshot(stacked)))
            meta.append([(f.key, f.cls, f.axis, f.matrix.shape[0]) for f in factors])
        self._rt.worker.submit(self._clock, _solve_snapshots, payload, meta=meta)

    def _store_results(self, factors: list[_DueFactor], res: Any) -> None:
        sizes = [f.matrix.shape[0] for f in factors]
        for f, root, err, lam, ok in zip(
            factors,
            res.root.split(sizes),
            res.error.split(sizes),
            res.lambda_max.split(sizes),
            res.ok.split(sizes),
        ):
            self._store_root(f.state, f.cls, f.axis, root, err, lam, ok)

    def _install(self, finished: list[tuple[Any, Any]]) -> None:
        """Install finished root jobs; a job that raised counts a failure for its blocks."""
        params = self._rt.params
        for meta, result in finished:
            failed = isinstance(result, BaseException)
            for b, bucket in enumerate(meta):
                if failed:
                    for key, c, i, _ in bucket:
                        st = self.state[params[key]]
                        st["root_failures"][c][i].add_(1)
                        st["root_error"][c][i].fill_(float("inf"))
                    continue
                res = result[b]
                device = self.state[params[bucket[0][0]]]["roots"][bucket[0][1]][0].device
                res = type(res)(*(x.to(device, non_blocking=True) for x in res))
                factors = [
                    _DueFactor(self.state[params[key]], c, i, res.root[:n], 0, key)
                    for key, c, i, n in bucket
                ]
                self._store_results(factors, res)

    @staticmethod
    def _store_root(
        state: dict[str, Any],
        cls: int,
        axis: int,
        root: torch.Tensor,
        err: torch.Tensor,
        lam: torch.Tensor,
        ok: torch.Tensor,
    ) -> None:
        """Swap in new roots where ``ok``; elsewhere keep the old ones and count a failure."""
        old = state["roots"][cls][axis]
        old.copy_(torch.where(ok[:, None, None], root.to(old.dtype), old))
        state["root_error"][cls][axis].copy_(err.float())
        state["lambda_max"][cls][axis].copy_(lam.float())
        state["root_failures"][cls][axis].add_((~ok).long())

    def _direction(
        self,
        group: dict[str, Any],
        p: torch.Tensor,
        g: torch.Tensor,
        state: dict[str, Any],
        plan: BlockPlan | None,
        t: int,
        key: int,
        layout: BlockLayout | None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Momentum, graft and preconditioning: the update direction of ``p``.

        Returns a tensor of ``p``'s shape or, for a preconditioned tensor, the block stacks of
        the direction (one per size class; only the rank's own blocks when distributed).
        """
        beta1, beta2 = group["betas"]
        preconditioned = plan is not None and t >= self._start(group)
        kind = self._graft_kind(group, preconditioned)

        # Momentum (EMA of the gradient, bias-corrected). Created lazily too, so that momentum
        # can be switched on mid-run (e.g. by a scheduler cycling beta1).
        if beta1 > 0:
            m = state.get("exp_avg")
            if m is None:
                m = state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            m.lerp_(g, 1.0 - beta1)
            if group["nesterov"]:
                mhat = m * (beta1 / bias_correction(beta1, t + 1))
                mhat.add_(g, alpha=(1.0 - beta1) / bias_correction(beta1, t))
            else:
                mhat = m / bias_correction(beta1, t)
        else:
            mhat = g

        v = state.get("graft_v")
        if v is None and kind in GRAFTS_WITH_STATE:  # graft changed to a stateful one
            v = state["graft_v"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        if v is not None and kind is not None:
            update_second_moment(kind, v, g, beta2)
        a = None if kind is None else graft_direction(kind, mhat, v, t, beta2, group["graft_eps"])

        if not preconditioned:
            return a
        a_blocks = plan.split(a) if kind is not None else None
        d_blocks = []
        for c, (x, roots) in enumerate(zip(plan.split(mhat), state["roots"])):
            if layout is not None:
                x = layout.local(key, c, x)
            if x.shape[0] == 0:  # distributed: no local blocks in this class
                d_blocks.append(torch.zeros(x.shape, dtype=torch.float32, device=x.device))
                continue
            d = kron.precondition(x, roots).float()
            if kind is not None:
                ab = a_blocks[c] if layout is None else layout.local(key, c, a_blocks[c])
                graft_rescale(d, ab)
            d_blocks.append(d)
        return d_blocks

    @staticmethod
    def _apply_direction(group: dict[str, Any], p: torch.Tensor, direction: torch.Tensor) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        if wd != 0 and group["decoupled_weight_decay"]:
            p.mul_(1.0 - lr * wd)
        p.add_(direction.to(p.dtype), alpha=-lr)

    # -------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """The state dict, in the same format for single-process and distributed runs.

        Distributed: per-block state is gathered from all ranks (a collective: call it on
        every rank), so every rank returns the full single-process state dict. With
        ``async_roots`` the pending root jobs are waited for (not installed) and saved under
        ``"async_roots"`` with the step counter, so that a loaded optimizer installs them at
        the same step as the original would have.
        """
        sd = super().state_dict()
        rt = self._runtime()
        if rt.layout is not None:
            blocked = {
                k: st
                for k, st in sd["state"].items()
                if any(is_block_state(v) for v in st.values())
            }
            sd["state"] = {**sd["state"], **rt.comm.gather_state(rt.layout, blocked)}
        if self.async_roots:
            sd["async_roots"] = dict(clock=self._clock, pending=self._pending_records(rt))
        return sd

    def _pending_records(self, rt: _Runtime) -> list[dict[str, Any]]:
        """Pending root jobs, one record per factor, with full (all-rank) block stacks."""
        records = []
        for step, meta, result in rt.worker.pending() if rt.worker is not None else []:
            for b, bucket in enumerate(meta):
                offset = 0
                for key, c, i, n in bucket:
                    if isinstance(result, BaseException):
                        dim = self.state[rt.params[key]]["roots"][c][i].shape[-1]
                        part = dict(
                            root=torch.zeros(n, dim, dim),
                            error=torch.full((n,), float("inf")),
                            lambda_max=torch.zeros(n),
                            ok=torch.zeros(n, dtype=torch.bool),
                        )
                    else:
                        part = {
                            name: getattr(result[b], name)[offset : offset + n].cpu()
                            for name in ("root", "error", "lambda_max", "ok")
                        }
                    offset += n
                    blocks = list(range(n)) if rt.layout is None else rt.layout.owned(key, c)
                    records.append(dict(step=step, param=key, cls=c, axis=i, blocks=blocks, **part))
        if rt.layout is not None:  # merge the ranks' parts of each factor
            merged: dict[tuple[int, ...], dict[str, Any]] = {}
            for part in (r for rank in rt.comm.all_gather_object(records) for r in rank):
                k = (part["step"], part["param"], part["cls"], part["axis"])
                merged.setdefault(k, []).append(part)
            records = []
            for parts in merged.values():
                order = torch.tensor([j for p_ in parts for j in p_["blocks"]]).argsort()
                rec = {k: parts[0][k] for k in ("step", "param", "cls", "axis")}
                for name in ("root", "error", "lambda_max", "ok"):
                    rec[name] = torch.cat([p_[name] for p_ in parts])[order]
                records.append(rec)
        for rec in records:
            rec.pop("blocks", None)
        return records

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from a single-process or a distributed run (same format).

        Distributed: every rank keeps only its own blocks' statistics and roots. Pending
        async root jobs of the checkpoint are installed at their original step with
        ``async_roots`` (this optimizer's own pending jobs are dropped), and right away
        without it.
        """
        state_dict = dict(state_dict)
        saved_async = state_dict.pop("async_roots", None)
        super().load_state_dict(state_dict)
        rt = self._runtime()
        if rt.layout is not None:
            for key, p in enumerate(rt.params):
                st = self.state.get(p)
                if st and any(is_block_state(v) for v in st.values()):
                    self.state[p] = localize_state(st, rt.layout, key)
        if rt.worker is not None:
            rt.worker.clear()
        if not saved_async:
            return
        if self.async_roots:
            self._clock = int(saved_async["clock"])
        for rec in saved_async["pending"]:
            key, c, i = rec["param"], rec["cls"], rec["axis"]
            parts = [rec[name] for name in ("root", "error", "lambda_max", "ok")]
            if rt.layout is not None:
                parts = [rt.layout.local(key, c, x) for x in parts]
            n = parts[0].shape[0]
            if n == 0:
                continue
            res = RootResult(*parts)
            meta = [[(key, c, i, n)]]
            if self.async_roots:
                rt.worker.add_finished(int(rec["step"]), [res], meta=meta)
            else:
                self._install([(meta, [res])])

    def _after_load_state_dict(self) -> None:
        super()._after_load_state_dict()
        # after unpickling / deepcopy: no runtime (it is transient); rebuilt lazily
        for name, value in (
            ("_rt", _Runtime()),
            ("_process_group", None),
            ("_clock", 0),
            ("async_roots", False),
            ("async_staleness", None),
            ("async_deterministic_delay", None),
            ("async_workers", 1),
            ("distributed", False),
            ("communication_dtype", torch.float32),
        ):
            self.__dict__.setdefault(name, value)

    def async_diagnostics(self) -> dict[str, Any]:
        """Counters of the async root worker: ``submitted``, ``installed``, ``exceptions``
        (jobs that raised: their blocks kept their roots and count a failure), ``waits`` /
        ``wait_seconds`` (steps that had to wait for a job), ``max_staleness`` (steps) and
        ``in_flight``. Rejected (non-finite or inaccurate) roots are counted per block in
        :meth:`diagnostics`' ``failures``."""
        w = self._rt.worker
        if w is None:
            return dict(
                submitted=0,
                installed=0,
                exceptions=0,
                waits=0,
                wait_seconds=0.0,
                max_staleness=0,
                in_flight=0,
            )
        return {**w.counters, "in_flight": len(w)}

    def close(self) -> None:
        """Stop the async root worker's threads now (they also stop when the optimizer is
        garbage collected and at exit). Pending jobs are dropped; the optimizer stays usable."""
        if self._rt.worker is not None:
            self._rt.worker.shutdown()
            self._rt.worker = None

    # -------------------------------------------------------------- diagnostics
    @torch.no_grad()
    def diagnostics(self) -> list[dict[str, Any]]:
        """Per preconditioned factor: parameter index, block class, axis and root health.

        Each record has ``param`` (index over all param groups), ``shape``, ``block_shape``,
        ``axis``, ``num_blocks``, ``step``, ``root_error`` / ``lambda_max`` (lists, one
        value per block, from the last root computation) and ``failures`` (list, number of
        rejected roots per block so far; an async root job that raised counts one for each
        of its blocks). With ``distributed=True`` the lists cover this rank's blocks only,
        whose indices (within the size class) are in ``blocks``. This reads device values:
        call it off the hot path.
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
                                )
                            )
                idx += 1
        return out

    def state_bytes(self) -> int:
        """Total bytes of tensors held in the optimizer state (this rank's, when distributed)."""
        total = 0
        for st in self.state.values():
            total += _tree_bytes(st)
        return total


def _tree_bytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(_tree_bytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(_tree_bytes(v) for v in x)
    return 0


def _solve_bucket(spec: tuple[Any, ...], matrix: torch.Tensor) -> RootResult:
    exponent, _, method, eps, threshold = spec
    return inverse_root(
        matrix, exponent, method=method, ridge_epsilon=eps, failure_threshold=threshold
    )


def _solve_snapshots(payload: list[tuple[tuple[Any, ...], Any]]) -> list[RootResult]:
    """Worker side of ``async_roots``: solve each snapshotted bucket; reject non-finite roots.

    A module function that sees only the snapshots, so the optimizer can be collected while
    it runs.
    """
    out = []
    for spec, snap in payload:
        res = _solve_bucket(spec, snap.get())
        finite = torch.isfinite(res.root).flatten(1).all(1)
        out.append(res._replace(ok=res.ok & finite))
    return out
