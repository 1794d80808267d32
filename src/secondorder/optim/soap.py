"""SOAP: Adam run in the eigenbasis of Shampoo's Kronecker factors.

Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam". The math lives in
:mod:`secondorder.kernels.eigenbasis` (rotations, basis refresh) and
:mod:`secondorder.kernels.kron` (factor statistics); shapes are cut into blocks by
:class:`secondorder.blocking.BlockPlan` exactly as in Shampoo. This class orchestrates.

Step ``t`` (1-based, per parameter), for every parameter with a gradient ``g``:

1. per block, with the current bases ``Q_1..Q_k`` (identity before
   ``start_preconditioning_step``): ``g' = g x_1 Q_1^T ... x_k Q_k^T``; the momentum and
   the second moment live in these rotated coordinates:
   ``m' <- beta1 m' + (1 - beta1) g'`` and ``v <- beta2 v + (1 - beta2) g'^2``;
2. the Adam direction in the rotated coordinates, bias-corrected,
   ``n' = (m' / bc1) / (sqrt(v / bc2) + eps)``, rotated back: ``n = n' x_1 Q_1 ... x_k Q_k``;
3. ``p <- p (1 - lr weight_decay) - lr n`` (decoupled weight decay);
4. factors, with this step's gradient: ``L_i <- b L_i + (1 - b) G_(i) G_(i)^T`` per axis,
   ``b = shampoo_beta`` (``beta2`` when ``None``);
5. after step ``start_preconditioning_step - 1`` and every ``precondition_frequency`` steps
   after it, new bases: the first by a full eigendecomposition, later ones by
   ``basis_method`` (``"qr"``: one step of subspace iteration ``Q <- qr(L Q)`` from the
   previous basis; ``"eigh"``: a fresh eigendecomposition). Before either, the old columns
   are sorted by their current Rayleigh quotients ``diag(Q^T L Q)`` and ``v`` is permuted
   the same way, so each coordinate of ``v`` keeps following the same direction; ``v`` is
   not otherwise transformed. The momentum is linear in the gradients, so it is carried into
   the new basis exactly, ``m' <- m' x_i (Q_new^T Q_old)``: the same as keeping it in the
   parameter's coordinates and rotating it every step, one rotation per step cheaper.
   The bases of all due factors of one size, across all parameters, are refreshed in one
   batched call. A graded diagonal of relative size
   ``TIE_BREAK`` (``1e-4`` of the mean eigenvalue) is added to each factor for the refresh
   only: directions no gradient has reached yet have a repeated zero eigenvalue, whose
   eigenvectors rounding alone would pick; the diagonal picks them (towards the coordinate
   axes) continuously in the gradients.

The basis used at step ``t`` is built from gradients of steps ``< t`` only, never from the
gradient it rotates. There is no grafting: the step size is Adam's, in the rotated basis.

Shapes: size-1 dims are dropped and adjacent dims merged while their product stays
``<= block_size``; longer dims are cut into blocks. A tensor with two or more dims that
merges into one (a 24x12 matrix with ``block_size >= 288``) gets one factor over the merged
dim. True 1-d tensors (biases, norms) and 0-d tensors run plain Adam unless
``precondition_1d=True`` (then one factor per block of the vector). All optimizer state is
float32 whatever the parameter's dtype.

**Sharded parameters** (FSDP2 ``fully_shard``, HSDP: DTensors with ``Shard(0)``). Each rank
runs SOAP on its shard as on a tensor of its own: blocks are cut inside the shard, and the
factors, bases and rotated moments are those of the shard's blocks. Everything else SOAP
computes is per block (rotations, Adam in the rotated basis, the refresh), per tensor but
the same on every shard (the step count and so the refresh schedule: all shards step
together, a non-finite gradient anywhere skips the step everywhere), or elementwise (plain
Adam). The one quantity of the whole tensor is the scale of the stored state: ``max |g|``
is reduced by max over the shards, so every shard stores its state in the units a single
process would use (one small collective per step and shard group; a rank whose shard is
empty takes part and does nothing else). A step is thus single-process SOAP applied to each
shard as a tensor of its own, and SOAP on the whole tensor when the block boundaries
coincide (``block_size`` divides the rows of every shard). One exception: whether a
tensor is rotated or runs plain Adam is decided for the whole parameter, so that all its
shards hold the same kind of state (checkpoints save plain Adam's moments as one tensor
over all shards): a one-row shard of a matrix is rotated (as a tensor of its own it would be
a vector: that is SOAP on it with ``precondition_1d=True``), and a vector rotated with
``precondition_1d`` that has a one-entry shard runs plain Adam on every shard.
Checkpoints keep the per-block state under ``shard_<i>_of_<n>`` keys (it depends on where
the shards were cut: it loads back only at the same number of shards) and plain Adam's
moments as DTensors (they reshard); see docs/distributed.md.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch

from .._validation import check_betas, check_bool, check_choice, check_float, check_int
from ..blocking import BlockPlan
from ..kernels import foreach as F
from ..kernels import kron
from ..kernels.eigenbasis import (
    BASIS_METHODS,
    mode_product,
    orthogonality_error,
    permute_axis,
    refresh_bases,
    rotate,
    tie_break,
    unrotate,
)
from ..kernels.grafting import bias_correction
from ..placement.reduce import all_reduce_over_shards
from .base import SecondOrderOptimizer

__all__ = ["SOAP"]

#: relative size of the graded diagonal added to each factor before a basis refresh
#: (:func:`secondorder.kernels.eigenbasis.tie_break`)
TIE_BREAK = 1e-4
#: gradients up to ``2**SAFE_EXP`` in magnitude are used unscaled (see ``SOAP._rescale``)
SAFE_EXP = 24.0


class SOAP(SecondOrderOptimizer):
    """SOAP: Adam in the eigenbasis of Shampoo's Kronecker factors (see the module docstring).

    Args:
        params: iterable of parameters or param-group dicts.
        lr: learning rate (>= 0).
        betas: ``(beta1, beta2)``: momentum EMA in [0, 1) and second-moment EMA in [0, 1]
            (``1``: running sum).
        eps: Adam's epsilon, added to ``sqrt(v)`` (> 0).
        weight_decay: decoupled weight decay (AdamW style, >= 0).
        block_size: maximum size of a preconditioned dimension (>= 1).
        precondition_frequency: refresh the bases every this many steps (>= 1).
        start_preconditioning_step: first step that uses an eigenbasis (>= 2); the first
            basis is computed after step ``start_preconditioning_step - 1`` from the factors
            of the steps so far. Earlier steps are plain Adam.
        shampoo_beta: EMA coefficient of the Kronecker factors in [0, 1] (1: running sums);
            ``None``: ``beta2``.
        basis_method: how bases after the first are refreshed: ``"qr"`` (one power/QR step
            from the previous basis, as the paper does) or ``"eigh"`` (exact).
        precondition_1d: rotate true 1-d tensors too (one factor per block) instead of Adam.
        nonfinite: ``"skip"`` or ``"raise"`` for steps with NaN/Inf gradients (see base).
        foreach: ``True``: the elementwise Adam work (momentum, second moment, direction,
            weight decay, the step) of all the group's tensors and blocks runs as
            multi-tensor ``torch._foreach_*`` calls; ``False``: one tensor at a time;
            ``None`` (default): multi-tensor when every tensor is on a CPU or CUDA device.
            Bit-identical results on the CPU. Rotations and factors are batched either way.
    """

    _param_shaped_keys = ("exp_avg", "exp_avg_sq")
    _supports_dtensor = True  # local shards (module docstring, docs/distributed.md)
    # sharded parameters take part in the reduction of max |g| over their shards
    _steps_empty_shards = True

    def __init__(
        self,
        params: Any,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        block_size: int = 1024,
        precondition_frequency: int = 10,
        start_preconditioning_step: int = 2,
        shampoo_beta: float | None = None,
        basis_method: str = "qr",
        precondition_1d: bool = False,
        *,
        nonfinite: str = "skip",
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            block_size=block_size,
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step,
            shampoo_beta=shampoo_beta,
            basis_method=basis_method,
            precondition_1d=precondition_1d,
            foreach=foreach,
        )
        self._plans: dict[tuple[Any, ...], BlockPlan | None] = {}
        self._warned: set[str] = set()
        super().__init__(params, defaults, nonfinite=nonfinite)

    # --------------------------------------------------------------- validation
    def _validate_group(self, group: dict[str, Any]) -> None:
        check_float("lr", group["lr"], low=0.0)
        group["betas"] = check_betas(group["betas"], allow_beta2_one=True)
        check_float("eps", group["eps"], low=0.0, low_open=True)
        check_float("weight_decay", group["weight_decay"], low=0.0)
        check_int("block_size", group["block_size"], low=1)
        check_int("precondition_frequency", group["precondition_frequency"], low=1)
        check_int("start_preconditioning_step", group["start_preconditioning_step"], low=2)
        if group["shampoo_beta"] is not None:
            check_float("shampoo_beta", group["shampoo_beta"], low=0.0, high=1.0)
        check_choice("basis_method", group["basis_method"], BASIS_METHODS)
        check_bool("precondition_1d", group["precondition_1d"])
        F.check_foreach(group["foreach"])

    # ------------------------------------------------------------------- shapes
    def _plan(self, p: torch.Tensor, group: dict[str, Any]) -> BlockPlan | None:
        """The block plan of ``p``, or ``None`` when ``p`` runs plain Adam.

        Rotated: tensors with two or more dims of size > 1, and true vectors with
        ``precondition_1d``. For a shard of a DTensor parameter this is decided for the
        whole parameter, so that all its shards hold the same kind of state: a one-row
        shard of a matrix is rotated (one factor over its row), and a vector with a
        one-entry shard runs plain Adam on every shard (that shard has nothing to rotate).
        """
        pl = self._placement(p)
        shards = _shard_shapes(pl) if pl is not None and pl.sharded else [tuple(p.shape)]
        whole = shards[0] if pl is None else tuple(pl.global_shape)
        key = (tuple(p.shape), whole, len(shards), group["block_size"], group["precondition_1d"])
        if key not in self._plans:
            nonunit = sum(1 for d in whole if d != 1)
            use = nonunit >= 2 or (nonunit == 1 and group["precondition_1d"])
            use = use and all(any(d != 1 for d in s) for s in shards)
            self._plans[key] = BlockPlan(p.shape, group["block_size"]) if use else None
        return self._plans[key]

    # -------------------------------------------------------------------- state
    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        plan = self._plan(p, group)
        f32 = dict(dtype=torch.float32, device=p.device)
        state["step"] = torch.tensor(0.0)
        state["scale_exp"] = torch.zeros((), **f32)  # see _rescale
        momentum = group["betas"][0] > 0
        if plan is None:
            if momentum:
                state["exp_avg"] = torch.zeros(p.shape, **f32)
            state["exp_avg_sq"] = torch.zeros(p.shape, **f32)
            return state
        shapes = list(zip(plan.block_shapes, plan.counts))
        if momentum:
            state["rotated_exp_avg"] = [torch.zeros(c, *bs, **f32) for bs, c in shapes]
        state["rotated_exp_avg_sq"] = [torch.zeros(c, *bs, **f32) for bs, c in shapes]
        state["factors"] = [[torch.zeros(c, n, n, **f32) for n in bs] for bs, c in shapes]
        state["bases"] = [
            [torch.eye(n, **f32).expand(c, n, n).clone() for n in bs] for bs, c in shapes
        ]
        state["eigenvalues"] = [[torch.zeros(c, n, **f32) for n in bs] for bs, c in shapes]
        state["basis_failures"] = [
            [torch.zeros(c, dtype=torch.int64, device=p.device) for _ in bs] for bs, c in shapes
        ]
        state["basis_step"] = torch.tensor(0.0)  # step after which the bases were refreshed
        return state

    def _check_loaded_state(self, p: torch.Tensor, st: dict[str, Any]) -> None:
        super()._check_loaded_state(p, st)
        if not st:
            return
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        plan = self._plan(p, group)
        need = {"step"}
        if plan is None:
            need.add("exp_avg_sq")
        else:
            need |= {"rotated_exp_avg_sq", "factors", "bases", "eigenvalues", "basis_failures",
                     "basis_step"}  # fmt: skip
        missing = need - st.keys()
        if missing:
            raise ValueError(
                f"SOAP state for a parameter of shape {tuple(p.shape)} lacks {sorted(missing)}: "
                "not a SOAP state dict for these parameters and settings"
            )
        if plan is None:
            return
        expected = [[(c, n, n) for n in bs] for bs, c in zip(plan.block_shapes, plan.counts)]
        got = [[tuple(s.shape) for s in cls] for cls in st["factors"]]
        got_v = [tuple(v.shape) for v in st["rotated_exp_avg_sq"]]
        want_v = [(c, *bs) for bs, c in zip(plan.block_shapes, plan.counts)]
        if expected != got or got_v != want_v:
            raise ValueError(
                f"SOAP state for a parameter of shape {tuple(p.shape)} has factors of shapes "
                f"{got}, expected {expected}: the state dict does not match these parameters "
                "or this block_size"
            )

    # --------------------------------------------------------------------- step
    def _update(self, work: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> None:
        due: list[tuple[dict[str, Any], int, int, str]] = []  # (state, class, axis, method)
        maxima = self._gradient_maxima(work)
        for group, params in work:
            params = [p for p in params if p.numel()]  # empty shards: in the reduction only
            if not params:
                continue
            foreach = F.resolve_foreach(group["foreach"], params)
            for p in params:
                if not self.state[p]:
                    self._init_state(p, group)
            F.add_steps_([self.state[p]["step"] for p in params], foreach)
            units: list[_Unit] = []  # the group's elementwise Adam work, all tensors
            parts = []  # per parameter: its plan and its units (index, rotation basis)
            for p in params:
                state = self.state[p]
                t = int(state["step"].item())  # a CPU tensor: no device sync
                g = p.grad.float() if p.grad.dtype != torch.float32 else p.grad
                plan = self._plan(p, group)
                g, eps = self._rescale(group, p, g, maxima[id(p)], state, foreach)
                parts.append((plan, self._units(group, p, g, eps, state, plan, t, units)))
                if plan is not None:
                    due.extend(self._update_factors(group, g, state, plan, t))
            dirs = _adam_directions(group, units, foreach)
            directions = []
            for plan, mine in parts:
                blocks = [dirs[i] if bases is None else unrotate(dirs[i], bases)
                          for i, bases in mine]  # fmt: skip
                directions.append(blocks[0] if plan is None else plan.merge(blocks))
            self._apply(group, params, directions, foreach)
        if due:
            self._refresh(due)

    def _gradient_maxima(
        self, work: list[tuple[dict[str, Any], list[torch.Tensor]]]
    ) -> dict[int, torch.Tensor]:
        """Per parameter (by ``id``): ``max |g|`` over the whole tensor, a float32 0-d device
        tensor (exact in any dtype). For a shard of a DTensor parameter it is reduced over
        the shards (one collective per shard group and step, in which a rank holding an
        empty shard takes part), so that every shard stores its state in the units of one
        scale, the one a single process holding the whole tensor uses (:meth:`_rescale`)."""
        ps = [p for _, params in work for p in params]
        f32 = torch.float32
        maxima = [p.grad.abs().amax().to(f32) if p.numel() else p.grad.new_zeros((), dtype=f32)
                  for p in ps]  # fmt: skip
        all_reduce_over_shards(zip((self._placement(p) for p in ps), maxima), "max")
        return {id(p): m for p, m in zip(ps, maxima)}

    def _rescale(
        self,
        group: dict[str, Any],
        p: torch.Tensor,
        g: torch.Tensor,
        amax: torch.Tensor,
        state: dict[str, Any],
        foreach: bool,
    ) -> tuple[torch.Tensor, Any]:
        """Scale-aware state: the gradient divided by ``c = 2**scale_exp`` and the ``eps`` to
        use with it (``eps / c``).

        Momentum, second moments and factors are stored divided by ``c``, ``c**2`` and
        ``c**2``: Adam's direction ``m / (sqrt(v) + eps)`` is the same for the stored values
        with ``eps / c``, and eigenvectors do not see the scale. ``scale_exp`` stays 0 (no
        scaling, bit for bit) while gradients stay below ``2**SAFE_EXP``; a larger gradient
        raises it (never lowers it), and the stored values are multiplied by the exact power
        of two that keeps them consistent, so squares and their sums cannot overflow float32.
        No host sync: the exponent is a device scalar. ``amax`` is ``max |g|`` of the whole
        tensor (:meth:`_gradient_maxima`: on shards, the maximum over all of them).
        """
        e_old = state.get("scale_exp")
        if e_old is None:  # a state without one (created by an older version)
            e_old = state["scale_exp"] = torch.zeros((), dtype=torch.float32, device=p.device)
        e_new = torch.maximum(e_old, (torch.log2(amax).ceil_() - SAFE_EXP).clamp_(min=0.0))
        ratio = torch.exp2(e_old - e_new)  # <= 1, exactly a power of two
        sq = ratio * ratio
        e_old.copy_(e_new)
        inv_c = torch.exp2(-e_new)
        for key, r in (("exp_avg", ratio), ("exp_avg_sq", sq), ("rotated_exp_avg", ratio),
                       ("rotated_exp_avg_sq", sq)):  # fmt: skip
            x = state.get(key)
            if x is not None:
                F.mul_(x, r, foreach) if isinstance(x, list) else x.mul_(r)
        for stack in state.get("factors", []):
            F.mul_(stack, sq, foreach)
        return g * inv_c, inv_c * group["eps"]

    def _units(
        self,
        group: dict[str, Any],
        p: torch.Tensor,
        g: torch.Tensor,
        eps: Any,
        state: dict[str, Any],
        plan: BlockPlan | None,
        t: int,
        units: list[_Unit],
    ) -> list[tuple[int, Any]]:
        """Append to ``units`` the Adam work of ``p`` (one unit for plain Adam, one per block
        class, in the rotated coordinates, otherwise); return per unit its index and the
        bases that rotate its direction back (``None``: not rotated)."""
        beta1 = group["betas"][0]
        f32 = dict(dtype=torch.float32, device=p.device)
        if plan is None:  # plain Adam
            m = None
            if beta1 > 0:
                m = state.get("exp_avg")
                if m is None:  # momentum switched on mid-run (e.g. a cycling scheduler)
                    m = state["exp_avg"] = torch.zeros(p.shape, **f32)
            units.append(_Unit(m, state["exp_avg_sq"], g, t, eps))
            return [(len(units) - 1, None)]
        rotated = t >= group["start_preconditioning_step"]
        g_blocks = plan.split(g)
        moms: list[torch.Tensor | None] = [None] * len(g_blocks)
        if beta1 > 0:
            moms = state.get("rotated_exp_avg")
            if moms is None:  # momentum switched on mid-run
                moms = state["rotated_exp_avg"] = [torch.zeros(x.shape, **f32) for x in g_blocks]
        out = []
        for gb, mr, v, bases in zip(g_blocks, moms, state["rotated_exp_avg_sq"], state["bases"]):
            gr = rotate(gb, bases) if rotated else gb
            units.append(_Unit(mr, v, gr, t, eps))
            out.append((len(units) - 1, bases if rotated else None))
        return out

    @staticmethod
    def _update_factors(
        group: dict[str, Any], g: torch.Tensor, state: dict[str, Any], plan: BlockPlan, t: int
    ) -> list[tuple[dict[str, Any], int, int, str]]:
        """Accumulate this step's gradient into the factors; return the factors due a new
        basis after this step."""
        b = group["shampoo_beta"]
        b = group["betas"][1] if b is None else b
        for stack, factors in zip(plan.split(g), state["factors"]):
            kron.update_statistics(factors, stack, b)
        first = group["start_preconditioning_step"] - 1
        if t < first or (t - first) % group["precondition_frequency"] != 0:
            return []
        method = "eigh" if float(state["basis_step"]) == 0 else group["basis_method"]
        state["basis_step"].fill_(t)
        return [
            (state, c, i, method)
            for c, bs in enumerate(plan.block_shapes)
            for i in range(len(bs))
        ]

    def _refresh(self, due: list[tuple[dict[str, Any], int, int, str]]) -> None:
        """New bases for all due factors, one batched call per (size, device, method).

        The new bases are installed afterwards, in the order of ``due`` (per parameter, block
        class and axis): the momentum's rotations into them are applied axis by axis in the
        same order whatever other parameters share the buckets (mode products commute, but
        their rounding does not), so a parameter's step never depends on the others."""
        buckets: dict[tuple[Any, ...], list[int]] = {}
        for k, (state, c, i, method) in enumerate(due):
            f = state["factors"][c][i]
            buckets.setdefault((f.shape[-1], f.device, method), []).append(k)
        new: list[Any] = [None] * len(due)
        for (_, _, method), ks in buckets.items():
            factors = [due[k][0]["factors"][due[k][1]][due[k][2]] for k in ks]
            bases = [due[k][0]["bases"][due[k][1]][due[k][2]] for k in ks]
            cat = (lambda xs: torch.cat(xs) if len(xs) > 1 else xs[0])  # noqa: E731
            res = refresh_bases(tie_break(cat(factors), TIE_BREAK), cat(bases), method)
            sizes = [f.shape[0] for f in factors]
            for k, part in zip(ks, zip(*(x.split(sizes) for x in res))):
                new[k] = part
            self._warn_failures(res.ok)
        for (st, c, i, _), (basis, perm, eig, ok) in zip(due, new):
            old = st["bases"][c][i]
            m = st.get("rotated_exp_avg")
            if m is not None:  # re-express the momentum in the new basis (exact)
                m[c].copy_(mode_product(m[c], i, torch.bmm(basis.mT, old)))
            old.copy_(basis)
            old_eig = st["eigenvalues"][c][i]
            old_eig.copy_(torch.where(ok[:, None], eig, old_eig))
            st["basis_failures"][c][i].add_((~ok).long())
            v = st["rotated_exp_avg_sq"][c]
            v.copy_(permute_axis(v, i, perm))

    def _warn_failures(self, ok: torch.Tensor) -> None:
        """Warn once if a refresh produced a non-finite basis (kept the previous one).

        Reads one flag from the device, but only on refresh steps, not on every step."""
        if "basis" in self._warned or bool(ok.all()):
            return
        self._warned.add("basis")
        warnings.warn(
            "SOAP: a basis refresh gave non-finite values (factors out of float32 range?); "
            "the previous basis was kept for those blocks (counted in diagnostics()['failures'])",
            RuntimeWarning,
            stacklevel=4,
        )

    @staticmethod
    def _apply(
        group: dict[str, Any], params: list[torch.Tensor], dirs: list[torch.Tensor], foreach: bool
    ) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        dirs = [d.to(p.dtype) if d.dtype != p.dtype else d for p, d in zip(params, dirs)]
        if wd != 0:
            F.mul_(params, 1.0 - lr * wd, foreach)
        F.add_(params, dirs, -lr, foreach)

    def _after_load_state_dict(self) -> None:
        super()._after_load_state_dict()
        self.__dict__.setdefault("_plans", {})
        self.__dict__.setdefault("_warned", set())

    # -------------------------------------------------------------- diagnostics
    @torch.no_grad()
    def diagnostics(self) -> list[dict[str, Any]]:
        """Per rotated factor (parameter, block class, axis): the health of its eigenbasis.

        Each record has ``param`` (index over all param groups), ``shape``, ``block_shape``,
        ``axis``, ``size``, ``num_blocks``, ``step``, ``basis_age`` (steps since the bases
        were last refreshed; ``None`` before the first basis), and per block (lists):
        ``eigenvalue_min`` / ``eigenvalue_max`` (the factor's eigenvalue estimates at the
        last refresh; a ratio far beyond ``1e7`` means the smallest directions are noise at
        float32), ``orthogonality_error`` (``max |Q^T Q - I|``, which should stay near
        float32 rounding, ``~1e-6 * size``) and ``failures`` (refreshes that gave a
        non-finite basis and were not used). Reads device values: call it off the hot path.
        """
        out = []
        idx = 0
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p, {})
                if "factors" in st:
                    plan = self._plan(p, group)
                    step = int(st["step"].item())
                    refreshed = int(st["basis_step"].item())
                    unscale = 4.0 ** float(st["scale_exp"]) if "scale_exp" in st else 1.0
                    for c, bs in enumerate(plan.block_shapes):
                        for i, n in enumerate(bs):
                            eig = st["eigenvalues"][c][i]
                            out.append(
                                dict(
                                    param=idx,
                                    shape=tuple(p.shape),
                                    block_shape=tuple(bs),
                                    axis=i,
                                    size=n,
                                    num_blocks=plan.counts[c],
                                    step=step,
                                    basis_age=step - refreshed if refreshed > 0 else None,
                                    eigenvalue_min=[
                                        x * unscale for x in eig.amin(dim=1).tolist()
                                    ],
                                    eigenvalue_max=[
                                        x * unscale for x in eig.amax(dim=1).tolist()
                                    ],
                                    orthogonality_error=orthogonality_error(
                                        st["bases"][c][i]
                                    ).tolist(),
                                    failures=st["basis_failures"][c][i].tolist(),
                                )
                            )
                idx += 1
        return out



def _shard_shapes(pl: Any) -> list[tuple[int, ...]]:
    """The shapes of the non-empty shards of a sharded parameter (``torch.chunk`` rows)."""
    rows, rest = pl.global_shape[0], tuple(pl.global_shape[1:])
    chunk = -(-rows // pl.shard_count)
    sizes = [min(chunk, rows - i * chunk) for i in range(pl.shard_count) if i * chunk < rows]
    return [(n, *rest) for n in sizes]


class _Unit(NamedTuple):
    """One tensor's (or one block class's) elementwise Adam work in a step."""

    m: torch.Tensor | None  # momentum, updated in place (None: beta1 = 0, use g)
    v: torch.Tensor  # second moment, updated in place
    g: torch.Tensor  # the (scaled, possibly rotated) gradient
    t: int  # the step count
    eps: Any  # Adam's eps in the scaled units (a 0-d tensor)


def _adam_directions(group: dict[str, Any], units: list[_Unit], foreach: bool) -> list[Any]:
    """Adam's bias-corrected direction ``(m / bc1) / (sqrt(v / bc2) + eps)`` of every unit,
    after updating its moments: ``m <- lerp(m, g, 1 - beta1)``,
    ``v <- beta2 v + (1 - beta2) g**2`` (``beta2 = 1``: a running sum, saturated at
    float32's largest value). Each operation runs over all units at once (``foreach``)."""
    beta1, beta2 = group["betas"]
    if not units:
        return []
    with_m = [u for u in units if u.m is not None]
    F.lerp_([u.m for u in with_m], [u.g for u in with_m], 1.0 - beta1, foreach)
    vs, gs = [u.v for u in units], [u.g for u in units]
    if beta2 == 1.0:
        F.addcmul_(vs, gs, gs, 1.0, foreach)
        F.clamp_max_(vs, torch.finfo(torch.float32).max, foreach)
    else:
        F.mul_(vs, beta2, foreach)
        F.addcmul_(vs, gs, gs, 1.0 - beta2, foreach)
    bc2 = [bias_correction(beta2, u.t) for u in units]
    denoms: list[Any] = [None] * len(units)
    corrected = [i for i, b in enumerate(bc2) if b != 1.0]
    plain = [i for i, b in enumerate(bc2) if b == 1.0]
    for i, d in zip(corrected, F.div([vs[i] for i in corrected], [bc2[i] for i in corrected],
                                     foreach)):  # fmt: skip
        denoms[i] = d
    F.sqrt_([denoms[i] for i in corrected], foreach)
    for i, d in zip(plain, F.sqrt([vs[i] for i in plain], foreach)):
        denoms[i] = d
    F.add_tensors_(denoms, [u.eps for u in units], foreach)
    dirs = F.div_tensors([u.g if u.m is None else u.m for u in units], denoms, foreach)
    if beta1 > 0:
        scaled = [(d, 1.0 / bias_correction(beta1, u.t)) for d, u in zip(dirs, units)]
        scaled = [(d, s) for d, s in scaled if s != 1.0]
        F.mul_([d for d, _ in scaled], [s for _, s in scaled], foreach)
    return dirs
