"""Shampoo: Kronecker-factored preconditioning with grafting and delayed inverse roots.

The math is in ``kernels`` (statistics/application in ``kernels.kron``, inverse roots in
``kernels.roots``, grafting in ``kernels.grafting``) and shape handling in ``blocking``;
this class only orchestrates the order of a step and owns the state.

Step ``t`` (1-based, per parameter) does, for every parameter with a gradient:

1. ``g = grad`` (+ ``weight_decay * p`` when ``decoupled_weight_decay=False``, L2 style);
2. statistics: for every block and axis ``i``, ``S_i <- beta2 S_i + w G_(i) G_(i)^T``;
3. roots, every ``precondition_frequency`` steps from ``start_preconditioning_step`` on:
   ``P_i = (S_i / bc + eps * lambda_max I)^(-1/p)``, all due factors of the same size across
   all parameters solved in batched calls, in chunks whose solver workspace fits
   ``root_memory_budget``. A root that fails (non-finite, residual
   ``>= inverse_failure_threshold``, or the solver raised) is not used: the previous root is
   kept, the failure counted (see :meth:`Shampoo.diagnostics`) and warned about once per
   kind; ``on_root_failure`` decides what happens after ``max_consecutive_root_failures``
   failures in a row of one factor;
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
``block_size`` are cut into blocks. 0-d tensors and 1-d tensors (unless
``precondition_1d=True``) take the graft update alone. With ``graft=None`` the updates that
have no Shampoo direction (those tensors, and every tensor before the first root) use Adam.
All optimizer state is float32 whatever the parameter dtype; bfloat16 parameters are updated
from float32 directions.

Systems (docs/algorithms.md#asynchronous-roots): ``async_roots=True`` moves step 3 off the
hot path (a snapshot
of the statistics goes to a background thread pool; the roots are installed at the start of
a later step, see :mod:`secondorder.optim.async_roots`); ``distributed=True`` gives every
block to one rank of the process group, which alone keeps its statistics and roots and
computes its direction in steps 2-5; the directions are all-gathered before step 6 (see
:mod:`secondorder.distributed`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
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
    block_norms,
    graft_direction,
    graft_directions,
    graft_rescale,
    update_second_moment,
    update_second_moments,
)
from ..kernels.roots import RootResult, inverse_root, root_workspace_bytes
from .async_roots import AsyncRootWorker, Snapshot, snapshot
from .base import SecondOrderOptimizer, tree_bytes
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
#: default ``root_memory_budget``: bytes of solver workspace alive at once during a refresh
DEFAULT_ROOT_MEMORY_BUDGET = 256 * 2**20


class RootFailureError(RuntimeError):
    """Raised (with ``on_root_failure="raise"``) once a factor's roots failed
    ``max_consecutive_root_failures`` times in a row. The step that raises has been applied
    completely (with the previous roots); the optimizer stays usable."""


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
    scale: torch.Tensor | None = None  # (B,) statistics scale: true statistics = scale^2 * matrix
    bc: float = 1.0  # bias correction: the root is of ``scale^2 * matrix / bc``

    @property
    def size(self) -> int:
        """``n`` of the factor's ``n x n`` matrices (``matrix`` may be packed)."""
        m = self.matrix.shape[-1]
        return m if self.matrix.dim() == 3 else kron.packed_dim(m)


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


class _Runtime:
    """Per-process helpers, rebuilt lazily: never pickled, copied or checkpointed."""

    def __init__(self) -> None:
        self.sig: Any = None
        self.params: list[torch.Tensor] = []  # all params, in param-group order
        self.keys: dict[int, int] = {}  # id(param) -> index in ``params``
        self.comm: Communicator | None = None
        self.layout: BlockLayout | None = None  # None: every block is local
        self.worker: AsyncRootWorker | None = None
        self.warned: set[tuple[str, ...]] = set()  # kinds of failure already warned about
        self.peak_root_bytes = 0  # largest solver workspace of one chunk (estimate)
        self.last_root_bytes = 0
        self.root_chunks = 0
        self.escalations: list[tuple[str, int, int]] = []
        self.failure_counts: dict[str, int] = {}  # contained failures by kind
        self.loading_shard = False  # load_state_dict of a distributed_shard is in progress


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
        root_memory_budget: bytes of transient memory allowed at once (>= 1; default
            256 MiB): while roots are refreshed, due factors are solved in chunks whose
            estimated solver workspace fits (at least one matrix per chunk; peaks are
            reported by :meth:`memory_diagnostics`), and each step's elementwise work runs
            in pieces of at most ``root_memory_budget / 8`` bytes of float32 (but at least
            256 KiB and one block row), whose eight temporaries fit it. ``None``: one
            chunk per bucket and whole tensors (fastest, unbounded).

    Failures never leave a half-done step: everything that can raise (gradient checks, new
    state) runs before anything is modified; after that point failures
    are contained and warned about once per kind (a root solve that raises is a rejected
    root; a failed statistics update skips that update; a failed preconditioning takes the
    graft direction), so a step either happens or leaves parameters and state untouched.
    Statistics are kept as ``scale^2 * S_hat`` with a per-block scale, so huge but finite
    gradients cannot overflow them (see :meth:`diagnostics`).
    """

    _supports_dtensor = True  # local shards (see docs/distributed.md)
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
            packed_statistics=packed_statistics,
            max_consecutive_root_failures=max_consecutive_root_failures,
            on_root_failure=on_root_failure,
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
        check_bool("packed_statistics", group["packed_statistics"])
        check_int("max_consecutive_root_failures", group["max_consecutive_root_failures"], low=1)
        check_choice("on_root_failure", group["on_root_failure"], ROOT_FAILURE_POLICIES)

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
        counts = plan.counts
        rt = self._rt
        if rt.loading_shard and rt.layout is not None:  # a rank's shard: its own blocks only
            key = rt.keys[id(p)]
            counts = [len(rt.layout.owned(key, c)) for c in range(len(counts))]
        if group["packed_statistics"]:
            expected = [
                [(c, kron.packed_size(n)) for n in bs] for bs, c in zip(plan.block_shapes, counts)
            ]
        else:
            expected = [[(c, n, n) for n in bs] for bs, c in zip(plan.block_shapes, counts)]
        got = [[tuple(s.shape) for s in cls] for cls in st["stats"]]
        if expected != got:
            raise ValueError(
                f"Shampoo state for a parameter of shape {tuple(p.shape)} has statistics of "
                f"shapes {got}, expected {expected}: the state dict does not match these "
                "parameters or this block_size / packed_statistics"
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
        if rt.worker is not None and len(rt.worker):
            with self._contained("install", "finished async roots were not installed"):
                self._install(rt.worker.collect(self._clock))
        due: list[_DueFactor] = []
        first: list[_DueFactor] = []  # async: a tensor's first roots are computed now
        for it in items:
            if it.due:
                with self._contained("roots", "a tensor's roots were not refreshed this step"):
                    factors = self._due_factors(it.state, it.plan, it.group, it.t, it.key)
                    late = self.async_roots and it.t > self._start(it.group)
                    (due if late else first).extend(factors)
        if first:
            self._refresh_roots(first)
        if due:
            with self._contained("async-submit", "this step's async root job was not started"):
                self._submit_roots(due)
        if layout is None:  # apply piece by piece: no direction is held longer than needed
            self._update_local(items)
        else:  # a collective: a failure here is not contained
            directions = [self._direction(it, layout) for it in items]
            exchange = [
                (it.key, c, d, it.plan.counts[c])
                for it, ds in zip(items, directions)
                if isinstance(ds, list)
                for c, d in enumerate(ds)
            ]
            full = iter(rt.comm.exchange(layout, exchange))
            directions = [
                it.plan.merge([next(full) for _ in ds]) if isinstance(ds, list) else ds
                for it, ds in zip(items, directions)
            ]
            for it, d in zip(items, directions):
                self._apply_direction(it.group, it.p, d)
        self._escalate()

    @contextmanager
    def _contained(self, kind: str, consequence: str) -> Iterator[None]:
        """Catch an exception after the commit point: warn once per kind, count, go on."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - contained: the step must complete
            self._warn_once(
                (kind, type(e).__name__),
                f"Shampoo: {type(e).__name__}: {e} ({kind}); {consequence}. The step itself "
                "was applied.",
            )

    def _prepare(self, rt: _Runtime, group: dict[str, Any], p: torch.Tensor) -> _Item:
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
        """Add the gradient to the (scaled) statistics; a failure skips this update, warned."""
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
    ) -> list[_DueFactor]:
        bc = bias_correction(group["betas"][1], t)
        out = []
        for c, stats in enumerate(state["stats"]):
            order = len(stats)
            exponent = group["exponent_override"] or 2 * order
            for i, s in enumerate(stats):
                if s.shape[0]:  # distributed: classes without local blocks have nothing due
                    scale = state["stat_scale"][c][i].clone()
                    out.append(_DueFactor(state, c, i, s, exponent, key, group, scale, bc))
        return out

    def _root_buckets(
        self, due: list[_DueFactor]
    ) -> list[tuple[tuple[Any, ...], list[_DueFactor]]]:
        """Group due factors of equal size, exponent and settings (one batched solve each)."""
        buckets: dict[tuple[Any, ...], list[_DueFactor]] = {}
        for f in due:
            group = f.group
            method = group["root_method"]
            if method == "auto":
                # async roots are computed on the host from host snapshots: eigh
                on_host = f.matrix.device.type == "cpu" or self.async_roots
                method = "eigh" if on_host else "newton"
            key = (
                f.size,
                f.exponent,
                f.matrix.device,
                method,
                group["eps"],
                group["inverse_failure_threshold"],
            )
            buckets.setdefault(key, []).append(f)
        return list(buckets.items())

    def _chunk_rows(self, spec: tuple[Any, ...]) -> int | None:
        """Matrices per solver call under ``root_memory_budget`` (None: unbounded)."""
        if self.root_memory_budget is None:
            return None
        n, method = spec[0], spec[3]
        return max(1, self.root_memory_budget // root_workspace_bytes(n, method))

    def _refresh_roots(self, due: list[_DueFactor]) -> None:
        """Compute all due roots now, batching factors of equal size, exponent and settings.

        Each bucket is solved in chunks that fit ``root_memory_budget``; a chunk's
        workspace is freed before the next one starts. A solver exception rejects the
        chunk's roots (previous roots kept, warned once, counted) instead of propagating.
        """
        rt = self._rt
        for spec, factors in self._root_buckets(due):
            rows = self._chunk_rows(spec)
            for pieces in _chunks(factors, rows):
                rows_here = sum(hi - lo for _, lo, hi in pieces)
                ws = root_workspace_bytes(spec[0], spec[3], rows_here)
                rt.peak_root_bytes = max(rt.peak_root_bytes, ws)
                rt.last_root_bytes = ws
                rt.root_chunks += 1
                try:
                    stacked = _stack_pieces(pieces)
                    scale = torch.cat([f.scale[lo:hi] for f, lo, hi in pieces])
                    res = _solve_bucket(spec[1:], stacked, scale)
                    del stacked
                except Exception as e:  # noqa: BLE001 - contained: a rejected root
                    self._warn_once(
                        ("root-exception", type(e).__name__),
                        f"Shampoo: a root computation raised {type(e).__name__}: {e}. The "
                        "affected factors keep their previous roots (counted as failures).",
                    )
                    res = None
                with self._contained("roots", "new roots were not stored"):
                    self._store_pieces(pieces, res)

    def _submit_roots(self, due: list[_DueFactor]) -> None:
        """Snapshot the due statistics and hand them to the root worker (async_roots)."""
        payload, meta = [], []
        for spec, factors in self._root_buckets(due):
            pieces = [(f, 0, f.matrix.shape[0]) for f in factors]
            stacked = _stack_pieces(pieces)  # a fresh copy: the live statistics go on changing
            scale = torch.cat([f.scale for f in factors])
            snap = Snapshot(stacked) if stacked.device.type == "cpu" else snapshot(stacked)
            payload.append((spec[1:], snap, scale.cpu(), self._chunk_rows(spec)))
            meta.append([(f.key, f.cls, f.axis, f.matrix.shape[0]) for f in factors])
        self._rt.worker.submit(self._clock, _solve_snapshots, payload, meta=meta)

    def _store_results(self, factors: list[_DueFactor], res: Any) -> None:
        self._store_pieces([(f, 0, f.matrix.shape[0]) for f in factors], res)

    def _store_pieces(self, pieces: list[tuple[_DueFactor, int, int]], res: Any) -> None:
        """Install a solved chunk; ``res=None`` (the solver raised) rejects all its roots."""
        offset = 0
        for f, lo, hi in pieces:
            n = hi - lo
            if res is None:
                ok = torch.zeros(n, dtype=torch.bool, device=f.matrix.device)
                self._store_root(f.state, f.cls, f.axis, None, None, None, ok, lo, hi, f.group)
            else:
                part = [x[offset : offset + n] for x in res]
                self._store_root(f.state, f.cls, f.axis, *part, lo, hi, f.group)
            offset += n

    def _install(self, finished: list[tuple[Any, Any]]) -> None:
        """Install finished root jobs; a job that raised counts a failure for its blocks."""
        params = self._rt.params
        for meta, result in finished:
            failed = isinstance(result, BaseException)
            if failed:
                self._warn_once(
                    ("async-exception", type(result).__name__),
                    f"Shampoo: an async root job raised {type(result).__name__}: {result}. "
                    "The affected factors keep their previous roots (counted as failures).",
                )
            for b, bucket in enumerate(meta):
                if failed:
                    for key, c, i, n in bucket:
                        st = self.state[params[key]]
                        device = st["roots"][c][i].device
                        ok = torch.zeros(n, dtype=torch.bool, device=device)
                        group = self._group_of(params[key])
                        self._store_root(st, c, i, None, None, None, ok, 0, n, group)
                    continue
                res = result[b]
                device = self.state[params[bucket[0][0]]]["roots"][bucket[0][1]][0].device
                res = type(res)(*(x.to(device, non_blocking=True) for x in res))
                offset = 0
                for key, c, i, n in bucket:
                    st = self.state[params[key]]
                    part = [x[offset : offset + n] for x in res]
                    offset += n
                    self._store_root(st, c, i, *part, 0, n, self._group_of(params[key]))

    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        return next(g for g in self.param_groups if any(q is p for q in g["params"]))

    def _store_root(
        self,
        state: dict[str, Any],
        cls: int,
        axis: int,
        root: torch.Tensor | None,
        err: torch.Tensor | None,
        lam: torch.Tensor | None,
        ok: torch.Tensor,
        lo: int = 0,
        hi: int | None = None,
        group: dict[str, Any] | None = None,
    ) -> None:
        """Swap in new roots of blocks ``lo:hi`` where ``ok``; elsewhere keep the old ones,
        count a failure, and warn once per kind of failure (one host read per call)."""
        sl = slice(lo, hi)
        old = state["roots"][cls][axis][sl]
        if root is not None:
            finite_root = torch.isfinite(root).flatten(1).all(1)
            ok = ok & finite_root
            old.copy_(torch.where(ok[:, None, None], root.to(old.dtype), old))
            state["root_error"][cls][axis][sl].copy_(err.float())
            lam_old = state["lambda_max"][cls][axis][sl]
            lam = lam.to(lam_old.dtype)
            lam_old.copy_(torch.where(torch.isfinite(lam), lam, lam_old))
        else:
            state["root_error"][cls][axis][sl].fill_(float("inf"))
        state["root_failures"][cls][axis][sl].add_((~ok).long())
        streaks = state.get("root_streak")
        if streaks is None:  # checkpoint from before streaks were kept
            streaks = state["root_streak"] = [
                [torch.zeros_like(f) for f in cls_] for cls_ in state["root_failures"]
            ]
        streak = streaks[cls][axis][sl]
        streak.copy_(torch.where(ok, torch.zeros_like(streak), streak + 1))
        if bool(ok.all()):
            return
        if root is not None:  # (a solver exception was warned about where it was caught)
            if not bool(finite_root.all()):
                kind, why = "non-finite", "is not finite"
            else:
                kind = "residual"
                threshold = group["inverse_failure_threshold"] if group else "?"
                why = (
                    f"has a residual of {err.float().max().item():.3g} >= "
                    f"inverse_failure_threshold ({threshold})"
                )
            self._warn_once(
                ("root-rejected", kind),
                f"Shampoo: a computed inverse root {why}; it was rejected and the previous "
                "root kept (counted in diagnostics()['failures']).",
            )
        if group is not None:
            limit = group["max_consecutive_root_failures"]
            worst = int(streak.max().item())
            if worst >= limit:
                self._rt.escalations.append((group["on_root_failure"], worst, limit))

    def _escalate(self) -> None:
        """Act on factors whose roots failed ``max_consecutive_root_failures`` times in a row."""
        rt = self._rt
        if not rt.escalations:
            return
        found, rt.escalations = rt.escalations, []
        for policy, worst, limit in found:
            msg = (
                f"Shampoo: a factor's inverse root failed {worst} times in a row "
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
            self._warn_once(("escalation", policy), msg + what + f" (on_root_failure={policy!r}).")

    def _warn_once(self, kind: tuple[str, ...], message: str) -> None:
        rt = self._rt
        if kind not in rt.warned:
            rt.warned.add(kind)
            warnings.warn(message, RuntimeWarning, stacklevel=4)
        rt.failure_counts[kind[0]] = rt.failure_counts.get(kind[0], 0) + 1

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
        """
        return self._state_dict(gather=True)

    def _state_dict(self, gather: bool) -> dict[str, Any]:
        sd = super().state_dict()
        rt = self._runtime()
        if rt.layout is not None and gather:
            blocked = {
                k: st
                for k, st in sd["state"].items()
                if any(is_block_state(v) for v in st.values())
            }
            sd["state"] = {**sd["state"], **rt.comm.gather_state(rt.layout, blocked)}
        elif rt.layout is not None:
            sd["distributed_shard"] = dict(rank=rt.comm.rank, world_size=rt.comm.world_size)
        if self.async_roots:
            pending = self._pending_records(rt, gather)
            sd["async_roots"] = dict(clock=self._clock, pending=pending)
        return sd

    def _pending_records(self, rt: _Runtime, gather: bool = True) -> list[dict[str, Any]]:
        """Pending root jobs, one record per factor, with full (all-rank) block stacks
        (``gather``, a collective when distributed) or this rank's blocks only."""
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
        if rt.layout is not None and gather:  # merge the ranks' parts of each factor
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
        shard = state_dict.pop("distributed_shard", None)
        rt = self._runtime()
        if shard is not None:
            here = (
                None
                if rt.layout is None
                else dict(rank=rt.comm.rank, world_size=rt.comm.world_size)
            )
            if here != {k: shard[k] for k in ("rank", "world_size")}:
                where = (
                    "a single process"
                    if here is None
                    else f"rank {here['rank']} of {here['world_size']}"
                )
                raise ValueError(
                    f"this state dict is rank {shard['rank']}'s shard of a distributed Shampoo run "
                    f"with {shard['world_size']} ranks (from state_dict()); it cannot be loaded on "
                    f"{where}. Load it on the same rank of a run with the same world size, or save "
                    "the full state with full_state_dict() (a collective: call it on every rank)"
                )
        rt.loading_shard = shard is not None
        try:
            super().load_state_dict(state_dict)
        finally:
            rt.loading_shard = False
        if rt.layout is not None and shard is None:
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
            if rt.layout is not None and shard is None:
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
            ("root_memory_budget", DEFAULT_ROOT_MEMORY_BUDGET),
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
        names = dict(stats="statistics", roots="roots", exp_avg="moments", graft_v="moments")
        for st in self.state.values():
            for k, v in st.items():
                parts[names.get(k, "other")] += tree_bytes(v)
        rt = self._rt
        return dict(
            state_bytes=sum(parts.values()),
            **parts,
            root_memory_budget=self.root_memory_budget,
            peak_root_workspace_bytes=rt.peak_root_bytes,
            last_root_workspace_bytes=rt.last_root_bytes,
            root_chunks=rt.root_chunks,
            contained_failures=dict(rt.failure_counts),
        )



def _chunks(factors: list[_DueFactor], rows: int | None) -> list[list[tuple[_DueFactor, int, int]]]:
    """Cut the blocks of ``factors`` into chunks of at most ``rows`` matrices (None: one
    chunk): each chunk is a list of ``(factor, lo, hi)`` block ranges."""
    out: list[list[tuple[_DueFactor, int, int]]] = [[]]
    room = rows
    for f in factors:
        lo, n = 0, f.matrix.shape[0]
        while lo < n:
            if room == 0:
                out.append([])
                room = rows
            hi = n if room is None else min(n, lo + room)
            out[-1].append((f, lo, hi))
            if room is not None:
                room -= hi - lo
            lo = hi
    return [c for c in out if c]


def _stack_pieces(pieces: list[tuple[_DueFactor, int, int]]) -> torch.Tensor:
    """The bias-corrected (scaled) statistics of a chunk, as one new ``(B, n, n)`` tensor."""
    f0 = pieces[0][0]
    rows = sum(hi - lo for _, lo, hi in pieces)
    n = f0.size
    out = torch.empty(rows, n, n, dtype=f0.matrix.dtype, device=f0.matrix.device)
    offset = 0
    for f, lo, hi in pieces:
        part = out[offset : offset + hi - lo]
        if f.matrix.dim() == 2:  # packed statistics
            kron.unpack_symmetric(f.matrix[lo:hi], out=part)
            if f.bc != 1.0:
                part.div_(f.bc)
        else:
            torch.div(f.matrix[lo:hi], f.bc, out=part)
        offset += hi - lo
    return out


def _solve_bucket(
    spec: tuple[Any, ...], matrix: torch.Tensor, scale: torch.Tensor | None = None
) -> RootResult:
    """Roots of ``scale^2 * matrix`` (``matrix``: statistics divided by their block scale^2).

    The solve sees the scaled matrix, whose entries are bounded whatever the gradients'
    magnitude; the root and ``lambda_max`` are brought back to true units
    (``root * scale^(-2/p)``, ``lambda_max * scale^2`` in float64) where the scale is > 0.
    """
    exponent, _, method, eps, threshold = spec
    res = inverse_root(
        matrix, exponent, method=method, ridge_epsilon=eps, failure_threshold=threshold
    )
    if scale is None:
        return res
    s = scale.to(device=res.root.device, dtype=torch.float64)
    s = torch.where(s > 0, s, torch.ones_like(s))
    root = res.root * s.pow(-2.0 / exponent).to(res.root.dtype)[:, None, None]
    lam = res.lambda_max.double() * s.square()
    return res._replace(root=root, lambda_max=lam)


def _solve_snapshots(payload: list[tuple[Any, ...]]) -> list[RootResult]:
    """Worker side of ``async_roots``: solve each snapshotted bucket (in chunks of at most
    ``rows`` matrices); reject non-finite roots.

    A module function that sees only the snapshots, so the optimizer can be collected while
    it runs.
    """
    out = []
    for spec, snap, scale, rows in payload:
        matrix = snap.get()
        step = matrix.shape[0] if rows is None else rows
        parts = [
            _solve_bucket(spec, matrix[lo : lo + step], scale[lo : lo + step])
            for lo in range(0, matrix.shape[0], step)
        ]
        res = RootResult(*(torch.cat(x) for x in zip(*parts))) if len(parts) > 1 else parts[0]
        finite = torch.isfinite(res.root).flatten(1).all(1)
        out.append(res._replace(ok=res.ok & finite))
    return out
