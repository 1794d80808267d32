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

from dataclasses import dataclass, field
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
    block_norms,
    graft_direction,
    graft_directions,
    graft_rescale,
    update_second_moment,
    update_second_moments,
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

__all__ = ["RootFailureError", "Shampoo"]
from .pieces import Piece, cut

#: gradient entries are saturated at this magnitude (see the step)
_GRAD_LIMIT = 2.0**63
#: added to the norm of the Shampoo direction before grafting divides by it
_GRAFT_TINY = 1e-16
#: elementwise work on a piece of n elements keeps at most about this many n-sized float32
#: temporaries alive (gradient, momentum, graft denominator and direction, blocks of the
#: Kronecker product and its result): pieces have ``root_memory_budget / (4 * this)``
#: elements at most
_PIECE_TEMPORARIES = 8
#: ... but not fewer elements than this (or one block row): a tiny budget must not turn a
#: large tensor into a million pieces of Python overhead
_MIN_PIECE_ELEMENTS = 2**16

ROOT_METHODS = ("auto", "newton", "eigh")
MATMUL_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)
ROOT_FAILURE_POLICIES = ("warn", "graft", "raise")


@dataclass
class _Item:
    """One parameter's share of a step, prepared before anything is modified."""

    group: dict[str, Any]
    p: torch.Tensor
    state: dict[str, Any]
    fresh: bool  # its state is new: installed in self.state when the step commits
    plan: BlockPlan | None
    t: int
    key: int
    a: torch.Tensor | None  # graft direction, set while stage 2 preconditions this tensor
    due: bool = False
    new: dict[str, Any] = field(default_factory=dict)  # state entries created by this step

    @property
    def g(self) -> torch.Tensor:
        """The gradient this step uses (see :func:`_step_gradient`), built anew at each use:
        nothing gradient-sized is kept for a parameter between the stages of a step."""
        return _step_gradient(self.group, self.p.grad, self.p)


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _add_update(p: torch.Tensor, direction: torch.Tensor, lr: Any) -> None:
    """``p <- p - lr * direction`` (direction rounded to ``p``'s dtype first).

    For bfloat16/float16 ``p`` the sum is formed in float32 and rounded once: torch's
    low-precision ``add_`` rounds the elements at the tail of a tensor differently from the
    rest, which would make the result depend on how a step cuts the tensor into pieces.
    """
    d = direction.to(p.dtype)
    if p.dtype in _LOW_PRECISION:
        p.copy_(p.float().add_(d.float(), alpha=-lr))
    else:
        p.add_(d, alpha=-lr)


def _step_gradients(
    group: dict[str, Any], grads: list[torch.Tensor], ps: list[torch.Tensor]
) -> list[torch.Tensor]:
    """:func:`_step_gradient` for lists (multi-tensor ops for float32 gradients and a plain
    number ``weight_decay``; the same values)."""
    wd = group["weight_decay"]
    if isinstance(wd, torch.Tensor) or any(g.dtype != torch.float32 for g in grads):
        return [_step_gradient(group, g, p) for g, p in zip(grads, ps)]
    gs = torch._foreach_clamp_min(grads, -_GRAD_LIMIT)
    torch._foreach_clamp_max_(gs, _GRAD_LIMIT)
    if wd != 0 and not group["decoupled_weight_decay"]:
        p32 = [p.float() if p.dtype != torch.float32 else p for p in ps]
        torch._foreach_add_(gs, p32, alpha=wd)
    return gs


def _step_gradient(group: dict[str, Any], grad: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """float32 ``grad`` (a new tensor) with entries saturated at ``2**63`` and, for
    ``decoupled_weight_decay=False``, the L2 term ``weight_decay * p`` added.

    Entries beyond 2**63 (~9.2e18) saturate: their squares (graft second moment) would
    overflow float32, and momentum and graft must see the same gradient so that the graft's
    ratio m / sqrt(v) stays bounded. Finite gradients never make inf state. ``grad`` and
    ``p`` may be pieces (views) of the parameter's gradient and of the parameter.
    """
    g = grad.float() if grad.dtype != torch.float32 else grad
    g = g.clamp(-_GRAD_LIMIT, _GRAD_LIMIT)
    wd = group["weight_decay"]
    if wd != 0 and not group["decoupled_weight_decay"]:
        g = g.add(p.float() if p.dtype != torch.float32 else p, alpha=wd)
    return g


def _solve_bucket(
    spec: tuple[Any, ...], matrix: torch.Tensor, scale: torch.Tensor | None = None
) -> RootResult:
    """The root function of the schedulers: :func:`inverse_root` of the scaled statistics
    ``scale^2 * matrix``, in true units (:func:`~secondorder.placement.roots.scaled_root`)."""
    return scaled_root(inverse_root, spec, matrix, scale)


class Shampoo(BlockOptimizer):
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
        if group["betas"][0] > 0:
            state["exp_avg"] = torch.zeros(p.shape, **f32)
        if self._graft_kind(group, False) in GRAFTS_WITH_STATE:
            state["graft_v"] = torch.zeros(p.shape, **f32)
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
        if st and self._merged_without_factors(p, group, st):
            # saved when such tensors were graft-only: factors are added after loading
            super(BlockOptimizer, self)._check_loaded_state(p, st)
            return
        super()._check_loaded_state(p, st)

    def _after_load_state_dict(self) -> None:
        super()._after_load_state_dict()
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
        if beta1 > 0 and "exp_avg" not in state:
            new["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        if kind in GRAFTS_WITH_STATE and "graft_v" not in state:
            new["graft_v"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        due = plan is not None and t >= start and (t - start) % freq == 0
        return _Item(group, p, state, fresh, plan, t, key, None, due, new=new)

    @staticmethod
    def _momentum_hat(group: dict[str, Any], m: torch.Tensor, g: torch.Tensor, t: int):
        """Bias-corrected momentum (Nesterov look-ahead with ``nesterov``) from the new EMA."""
        beta1 = group["betas"][0]
        if group["nesterov"]:
            mhat = m * (beta1 / bias_correction(beta1, t + 1))
            return mhat.add_(g, alpha=(1.0 - beta1) / bias_correction(beta1, t))
        return m / bias_correction(beta1, t)

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

    def _direction(
        self, it: _Item, layout: BlockLayout | None
    ) -> torch.Tensor | list[torch.Tensor]:
        """Commit momentum and graft accumulator; return the update direction of ``it.p``.

        Returns a tensor of ``p``'s shape or, for a preconditioned tensor, the block stacks of
        the direction (one per size class; only the rank's own blocks when distributed).
        A preconditioning failure falls back to the graft direction (warned once).
        """
        group, state, g, plan, t = it.group, it.state, it.g, it.plan, it.t
        beta1, beta2 = group["betas"]
        preconditioned = plan is not None and t >= self._start(group)
        kind = self._graft_kind(group, preconditioned)
        try:
            if beta1 > 0:
                m = state["exp_avg"]
                m.lerp_(g, 1.0 - beta1)
                mhat = self._momentum_hat(group, m, g, t)
            else:
                mhat = g
            v = state.get("graft_v")
            if v is not None and kind is not None:
                update_second_moment(kind, v, g, beta2)
            a = (
                None
                if kind is None
                else graft_direction(kind, mhat, v, t, beta2, group["graft_eps"])
            )
            if not preconditioned:
                return a
            it.a = a
            d = self._precondition(it, mhat, kind, layout)
            it.a = None
            return d if layout is not None else plan.merge(d)
        except Exception as e:  # noqa: BLE001 - contained: the graft direction is used
            self._warn_once(
                ("direction", type(e).__name__),
                f"Shampoo: computing a tensor's update raised {type(e).__name__}: {e}. It took "
                "the graft direction for this step (the step itself was applied).",
            )
            fallback, it.a = it.a, None
            if fallback is None and kind is None:  # no graft: the momentum, or the gradient
                fallback = state["exp_avg"] if beta1 > 0 else g
            elif fallback is None:  # the graft direction itself failed: no update this step
                fallback = torch.zeros(it.p.shape, dtype=torch.float32, device=it.p.device)
            if layout is None or not preconditioned:
                return fallback
            return [layout.local(it.key, c, x).float() for c, x in enumerate(plan.split(fallback))]

    def _precondition(
        self, it: _Item, mhat: torch.Tensor, kind: str | None, layout: BlockLayout | None
    ) -> list[torch.Tensor]:
        """The Shampoo direction of this rank's blocks of ``it.p`` (distributed path)."""
        group, state, plan, key = it.group, it.state, it.plan, it.key
        a_blocks = plan.split(it.a) if kind is not None else None
        d_blocks = []
        for c, (x, roots) in enumerate(zip(plan.split(mhat), state["roots"])):
            if layout is not None:
                x = layout.local(key, c, x)
            if x.shape[0] == 0:  # distributed: no local blocks in this class
                d_blocks.append(torch.zeros(x.shape, dtype=torch.float32, device=x.device))
                continue
            ab = None
            if kind is not None:
                ab = a_blocks[c] if layout is None else layout.local(key, c, a_blocks[c])
            streaks = state.get("root_streak")
            d_blocks.append(
                self._precondition_blocks(group, x, roots, kind, ab, streaks and streaks[c])
            )
        return d_blocks

    @staticmethod
    def _precondition_blocks(
        group: dict[str, Any],
        x: torch.Tensor,
        roots: list[torch.Tensor],
        kind: str | None,
        ab: torch.Tensor | None,
        streaks: list[torch.Tensor] | None,
    ) -> torch.Tensor:
        """Shampoo direction of a stack of blocks ``x`` (momentum), grafted to ``ab``.

        The Kronecker product runs in scaled units (:func:`kron.precondition_scaled`): its
        result ``d`` is ``D / 2**e`` per block, with entries below 2, so neither the product
        nor its norm overflows even when huge momentum meets the roots of tiny statistics.
        Grafting only needs ``D``'s direction: ``D * ||a|| / (||D|| + tiny)`` equals
        ``d * ||a|| / (||d|| + tiny / 2**e)``, and in the normal range (powers of two scale
        exactly) bit for bit. Without a graft ``D`` itself is used, saturated at ``2**63``.
        """
        d, scale = kron.precondition_scaled(x, roots)
        if kind is None:
            d = kron.unscale(d, scale)
        else:
            # (D + tiny) / scale, exactly where it matters (a zero block stays zero anyway)
            tiny = (_GRAFT_TINY / scale).float().view(-1, *([1] * (d.dim() - 1)))
            a_norms = None
            if kind == "sgd":  # a is the momentum itself: its squares may overflow float32
                sa = kron.pow2_floor(kron.block_amax(ab)).view(-1, *([1] * (ab.dim() - 1)))
                a_norms = block_norms(ab / sa).mul_(sa)
            graft_rescale(d, ab, tiny, a_norms=a_norms)
        if group["on_root_failure"] == "graft" and streaks is not None:
            # blocks whose roots keep failing take the graft direction
            limit = group["max_consecutive_root_failures"]
            bad = torch.stack([s >= limit for s in streaks]).any(0)
            fallback = ab if ab is not None else x.float()
            d = torch.where(bad.view(-1, *([1] * (d.dim() - 1))), fallback, d)
        return d

    @staticmethod
    def _apply_direction(group: dict[str, Any], p: torch.Tensor, direction: torch.Tensor) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        if wd != 0 and group["decoupled_weight_decay"]:
            p.mul_(1.0 - lr * wd)
        _add_update(p, direction, lr)

    # ------------------------------------------------- elementwise work, in pieces
    def _piece_elements(self) -> int | None:
        """Elements of a piece of elementwise work (None: whole tensors, unbounded)."""
        if self.root_memory_budget is None:
            return None
        return max(_MIN_PIECE_ELEMENTS, self.root_memory_budget // (4 * _PIECE_TEMPORARIES))

    def _update_local(self, items: list[_Item]) -> None:
        """Steps 4-6 for every item (single process): momentum, graft, direction, update.

        The work is done in pieces (:mod:`secondorder.optim.pieces`): a tensor larger than
        :meth:`_piece_elements` in runs of whole block rows, and runs of small tensors of the
        same group, step and kind together, up to the same size, with one multi-tensor
        (``torch._foreach_*``) call per operation. Every operation is elementwise or per
        block, so the result does not depend on the cut; the temporaries of the step are
        those of one piece.
        """
        cap = self._piece_elements()
        chunk: list[Piece] = []
        size, key = 0, None
        for it in items:
            pre = it.plan is not None and it.t >= self._start(it.group)
            k = (id(it.group), it.t, pre, it.p.device)
            st = it.state
            own = [it.p, it.p.grad] + [st[n] for n in ("exp_avg", "graft_v") if n in st]
            try:
                cuts = cut(it, own, cap)
            except Exception as e:  # noqa: BLE001 - contained: the whole tensor at once
                self._warn_once(
                    ("pieces", type(e).__name__),
                    f"Shampoo: cutting a tensor's update into pieces raised "
                    f"{type(e).__name__}: {e}; it was updated whole (the step was applied).",
                )
                cuts = [Piece(it, None, it.p.numel())]
            for pc in cuts:
                if chunk and (k != key or (cap is not None and size + pc.numel > cap)):
                    self._update_pieces(chunk)
                    chunk, size = [], 0
                chunk.append(pc)
                size += pc.numel
                key = k
        if chunk:
            self._update_pieces(chunk)

    def _update_pieces(self, chunk: list[Piece]) -> None:
        """Momentum, graft, direction and update of pieces of the same group, step and kind.

        Failures are contained (warned once, counted): when the momentum or graft stage
        raises, these pieces are not updated this step; when a Kronecker product raises, its
        piece takes the graft direction.
        """
        it0 = chunk[0].item
        group, t = it0.group, it0.t
        beta1, beta2 = group["betas"]
        preconditioned = it0.plan is not None and t >= self._start(group)
        kind = self._graft_kind(group, preconditioned)
        try:
            ps = [pc.view(pc.item.p) for pc in chunk]
            gs = _step_gradients(group, [pc.view(pc.item.p.grad) for pc in chunk], ps)
            if beta1 > 0:
                ms = [pc.view(pc.item.state["exp_avg"]) for pc in chunk]
                if isinstance(beta1, torch.Tensor):
                    for m, g in zip(ms, gs):
                        m.lerp_(g, 1.0 - beta1)
                else:
                    torch._foreach_lerp_(ms, gs, 1.0 - beta1)
                mh = self._momentum_hats(group, ms, gs, t)
                del ms
            else:
                mh = gs
            vs = None
            if kind is not None and "graft_v" in it0.state:
                vs = [pc.view(pc.item.state["graft_v"]) for pc in chunk]
                update_second_moments(kind, vs, gs, beta2)
            eps = group["graft_eps"]
            # mh (a new tensor, or gs: this step's own copy) is needed later only when it is
            # to be preconditioned
            inplace = not preconditioned
            a = None if kind is None else graft_directions(kind, mh, vs, t, beta2, eps, inplace)
            del gs, vs
        except Exception as e:  # noqa: BLE001 - contained: the step must complete
            self._warn_once(
                ("direction", type(e).__name__),
                f"Shampoo: computing a tensor's update raised {type(e).__name__}: {e}. It was "
                "not updated this step (the step itself was applied).",
            )
            return
        if preconditioned:
            ds = [
                self._precondition_piece(pc, x, None if a is None else a[i], kind)
                for i, (pc, x) in enumerate(zip(chunk, mh))
            ]
        else:
            ds = a
        del mh, a
        with self._contained("update", "some parameters were not updated this step"):
            self._apply_directions(group, ps, ds)

    @staticmethod
    def _momentum_hats(
        group: dict[str, Any], ms: list[torch.Tensor], gs: list[torch.Tensor], t: int
    ) -> list[torch.Tensor]:
        """:meth:`_momentum_hat` for lists (one multi-tensor call per operation)."""
        beta1 = group["betas"][0]
        if isinstance(beta1, torch.Tensor):
            return [Shampoo._momentum_hat(group, m, g, t) for m, g in zip(ms, gs)]
        if group["nesterov"]:
            mh = torch._foreach_mul(ms, beta1 / bias_correction(beta1, t + 1))
            torch._foreach_add_(mh, gs, alpha=(1.0 - beta1) / bias_correction(beta1, t))
            return mh
        return torch._foreach_div(ms, bias_correction(beta1, t))

    def _precondition_piece(
        self, pc: Piece, x: torch.Tensor, a: torch.Tensor | None, kind: str | None
    ) -> torch.Tensor:
        """The grafted Shampoo direction of one piece (``x``: its momentum, ``a``: its graft
        direction), of the piece's shape. A failure here takes the graft direction (warned)."""
        it = pc.item
        state = it.state
        try:
            rb = pc.blocks()
            xb = rb.split(x)
            ab = rb.split(a) if a is not None else [None] * len(xb)
            streaks = state.get("root_streak")
            out = []
            for j, (c, lo, hi) in enumerate(rb.classes):
                roots = [r[lo:hi] for r in state["roots"][c]]
                sj = None if streaks is None else [s[lo:hi] for s in streaks[c]]
                out.append(self._precondition_blocks(it.group, xb[j], roots, kind, ab[j], sj))
            del xb, ab
            return rb.merge(out)
        except Exception as e:  # noqa: BLE001 - contained: the graft direction is used
            self._warn_once(
                ("direction", type(e).__name__),
                f"Shampoo: computing a tensor's update raised {type(e).__name__}: {e}. It took "
                "the graft direction for this step (the step itself was applied).",
            )
            return a if a is not None else x

    @staticmethod
    def _apply_directions(
        group: dict[str, Any], ps: list[torch.Tensor], ds: list[torch.Tensor]
    ) -> None:
        """:meth:`_apply_direction` for lists (one multi-tensor call per operation)."""
        lr, wd = group["lr"], group["weight_decay"]
        if isinstance(lr, torch.Tensor) or isinstance(wd, torch.Tensor):
            for p, d in zip(ps, ds):
                Shampoo._apply_direction(group, p, d)
            return
        if wd != 0 and group["decoupled_weight_decay"]:
            torch._foreach_mul_(ps, 1.0 - lr * wd)
        wide = [(p, d.to(p.dtype)) for p, d in zip(ps, ds) if p.dtype not in _LOW_PRECISION]
        if wide:
            torch._foreach_add_([p for p, _ in wide], [d for _, d in wide], alpha=-lr)
        for p, d in zip(ps, ds):
            if p.dtype in _LOW_PRECISION:
                _add_update(p, d, lr)
