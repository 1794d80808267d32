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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .._validation import (
    check_betas,
    check_bool,
    check_choice,
    check_float,
    check_int,
)
from ..blocking import BlockPlan
from ..kernels import kron
from ..kernels.grafting import (
    GRAFT_KINDS,
    GRAFTS_WITH_STATE,
    bias_correction,
    graft_direction,
    graft_rescale,
    update_second_moment,
)
from ..kernels.roots import inverse_root
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
    """

    _param_shaped_keys = ("exp_avg", "graft_v")

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
            matmul_dtype=matmul_dtype,
            decoupled_weight_decay=decoupled_weight_decay,
            precondition_1d=precondition_1d,
            inverse_failure_threshold=inverse_failure_threshold,
        )
        self._plans: dict[tuple[Any, ...], BlockPlan] = {}
        super().__init__(params, defaults, nonfinite=nonfinite)

    # --------------------------------------------------------------- validation
    def _validate_group(self, group: dict[str, Any]) -> None:
        check_float("lr", group["lr"], low=0.0)
        group["betas"] = check_betas(group["betas"], allow_beta2_one=True)
        check_float("eps", group["eps"], low=0.0, low_open=True)
        check_float("weight_decay", group["weight_decay"], low=0.0)
        check_int("block_size", group["block_size"], low=1)
        check_int("precondition_frequency", group["precondition_frequency"], low=1)
        if group["start_preconditioning_step"] is not None:
            check_int("start_preconditioning_step", group["start_preconditioning_step"], low=1)
        check_choice("graft", group["graft"], GRAFT_KINDS)
        check_float("graft_eps", group["graft_eps"], low=0.0, low_open=True)
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

    # --------------------------------------------------------------------- step
    def _update(self, work: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> None:
        items = []
        due: list[_DueFactor] = []
        for group, params in work:
            beta2 = group["betas"][1]
            start = self._start(group)
            freq = group["precondition_frequency"]
            for p in params:
                state = self.state[p] if self.state[p] else self._init_state(p, group)
                state["step"] += 1
                t = int(state["step"].item())
                g = p.grad.float() if p.grad.dtype != torch.float32 else p.grad
                wd = group["weight_decay"]
                if wd != 0 and not group["decoupled_weight_decay"]:
                    g = g.add(p.float() if p.dtype != torch.float32 else p, alpha=wd)
                plan = self._plan(p, group)
                if plan is not None:
                    blocks = plan.split(g)
                    for stack, stats in zip(blocks, state["stats"]):
                        kron.update_statistics(stats, stack, beta2, group["matmul_dtype"])
                    if t >= start and (t - start) % freq == 0:
                        due.extend(self._due_factors(state, plan, group, t))
                items.append((group, p, g, state, plan, t))
        if due:
            self._refresh_roots(due, work)
        for group, p, g, state, plan, t in items:
            self._apply(group, p, g, state, plan, t)

    def _due_factors(
        self, state: dict[str, Any], plan: BlockPlan, group: dict[str, Any], t: int
    ) -> list[_DueFactor]:
        bc = bias_correction(group["betas"][1], t)
        out = []
        for c, stats in enumerate(state["stats"]):
            order = len(stats)
            exponent = group["exponent_override"] or 2 * order
            for i, s in enumerate(stats):
                out.append(_DueFactor(state, c, i, s / bc if bc != 1.0 else s, exponent))
        return out

    def _refresh_roots(self, due: list[_DueFactor], work: list[Any]) -> None:
        """Compute all due roots, batching factors of equal size, exponent and settings."""
        settings = {}
        for group, params in work:
            for p in params:
                settings[id(self.state[p])] = group
        buckets: dict[tuple[Any, ...], list[_DueFactor]] = {}
        for f in due:
            group = settings[id(f.state)]
            method = group["root_method"]
            if method == "auto":
                method = "eigh" if f.matrix.device.type == "cpu" else "newton"
            key = (
                f.matrix.shape[-1],
                f.exponent,
                f.matrix.device,
                method,
                group["eps"],
                group["inverse_failure_threshold"],
            )
            buckets.setdefault(key, []).append(f)
        for (_, exponent, _, method, eps, threshold), factors in buckets.items():
            stacked = (
                torch.cat([f.matrix for f in factors]) if len(factors) > 1 else (factors[0].matrix)
            )
            res = inverse_root(
                stacked,
                exponent,
                method=method,
                ridge_epsilon=eps,
                failure_threshold=threshold,
            )
            sizes = [f.matrix.shape[0] for f in factors]
            for f, root, err, lam, ok in zip(
                factors,
                res.root.split(sizes),
                res.error.split(sizes),
                res.lambda_max.split(sizes),
                res.ok.split(sizes),
            ):
                self._store_root(f.state, f.cls, f.axis, root, err, lam, ok)

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

    def _apply(
        self,
        group: dict[str, Any],
        p: torch.Tensor,
        g: torch.Tensor,
        state: dict[str, Any],
        plan: BlockPlan | None,
        t: int,
    ) -> None:
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
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

        if preconditioned:
            d_blocks = [
                kron.precondition(x, roots).float()
                for x, roots in zip(plan.split(mhat), state["roots"])
            ]
            if kind is not None:
                for d, ab in zip(d_blocks, plan.split(a)):
                    graft_rescale(d, ab)
            direction = plan.merge(d_blocks)
        else:
            direction = a

        if wd != 0 and group["decoupled_weight_decay"]:
            p.mul_(1.0 - lr * wd)
        p.add_(direction.to(p.dtype), alpha=-lr)

    # -------------------------------------------------------------- diagnostics
    @torch.no_grad()
    def diagnostics(self) -> list[dict[str, Any]]:
        """Per preconditioned factor: parameter index, block class, axis and root health.

        Each record has ``param`` (index over all param groups), ``shape``, ``block_shape``,
        ``axis``, ``num_blocks``, ``step``, ``root_error`` / ``lambda_max`` (lists, one
        value per block, from the last root computation) and ``failures`` (list, number of
        rejected roots per block so far). This reads device values: call it off the hot path.
        """
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
                                    step=int(st["step"].item()),
                                    root_error=st["root_error"][c][i].tolist(),
                                    lambda_max=st["lambda_max"][c][i].tolist(),
                                    failures=st["root_failures"][c][i].tolist(),
                                )
                            )
                idx += 1
        return out

    def state_bytes(self) -> int:
        """Total bytes of tensors held in the optimizer state."""
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
