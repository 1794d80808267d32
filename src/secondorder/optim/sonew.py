"""SONew: the sparsified online Newton method with LogDet-optimal banded preconditioners.

The math is in the class docstring below; the kernels are in :mod:`secondorder.kernels.sonew`,
grafting is shared with Shampoo (:mod:`secondorder.kernels.grafting`). This module only
orchestrates: state, dtypes, the statistics scale and step order. What
:meth:`SONew.diagnostics` reports is explained in ``docs/health.md``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch

from .._validation import check_bool, check_choice, check_common_hparams, check_float, check_int
from ..kernels import foreach as F
from ..kernels import sonew as K
from ..kernels.grafting import (
    bias_correction,
    ema_weight,
    graft_direction,
    graft_norm,
    robust_norm,
)
from ..placement.reduce import all_reduce_over_shards
from .base import SecondOrderOptimizer

__all__ = ["SONew"]

GRAFTS = ("adam", None)
DAMPINGS = ("relative", "absolute")
STATE_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16, torch.float64)
COMPUTE_DTYPES = (None, torch.float32, torch.bfloat16, torch.float64)


class SONew(SecondOrderOptimizer):
    r"""SONew (Devvrit et al., NeurIPS 2023): ``θ ← θ − lr · (X m̂ + λ θ)``.

    ``X`` is the sparse (diagonal, tridiagonal or banded) matrix minimising
    ``−log det X + tr(X Ĥ)`` where ``Ĥ`` is the band of the bias-corrected EMA of ``g gᵀ``;
    it is built in closed form by an LDLᵀ factorisation, in O(n·b³) work and O(n·b) memory.

    Args:
        params: iterable of parameters or param-group dicts.
        lr: learning rate (``>= 0``).
        betas: ``(β1, β2)``: momentum EMA ``β1 ∈ [0, 1)``; statistics EMA ``β2 ∈ [0, 1]``
            (``β2 = 1``: a running sum). Both are bias-corrected (Adam style).
        eps: damping ``ε > 0`` added to the diagonal of ``Ĥ`` before factorising. With
            ``damping="relative"`` (default) the added value is ``ε · ‖Ĥ‖_∞`` (exact max
            row sum of the band, computed on device, no host sync), which bounds the
            condition number of ``Ĥ + δI`` by about ``1 + 1/ε`` independent of the gradient
            scale; with ``damping="absolute"`` it is ``ε`` itself (the reference code's
            convention). For ``band=0`` this gives ``X = diag(1 / (Ĥ_jj + δ))``.
        weight_decay: decoupled (AdamW style) weight decay ``λ >= 0``.
        band: ``0`` diagonal, ``1`` tridiagonal (elementwise closed form), ``b > 1`` banded
            (batched ``b×b`` Cholesky solves over all columns at once).
        graft: ``"adam"`` (default) rescales each tensor's direction ``u = X m̂`` to the
            norm of Adam's direction ``m̂ / (√v̂ + graft_eps)``, with ``v`` the diagonal of
            the band statistics (no extra state); ``None`` uses ``X m̂`` as is (its scale is
            that of an *inverse*, not inverse square root, so ``lr`` must be retuned).
        graft_eps: the ``ε`` of the Adam graft direction.
        damping: ``"relative"`` or ``"absolute"``, see ``eps``.
        state_dtype: dtype of ``exp_avg`` and the band statistics. ``None`` (default) uses
            each parameter's dtype, so bf16 parameters get bf16 state (half the memory of
            fp32 state), except float16 parameters, whose state is float32 (squared
            gradients overflow float16's range); ``torch.float32`` keeps fp32 state for bf16
            parameters.
        compute_dtype: dtype of the factorisation and of ``X m̂``. ``None`` (default) is
            float32, or float64 when the state is float64: bf16 statistics are upcast to
            fp32 for the LDLᵀ (cheap, elementwise). ``torch.bfloat16`` factorises in bf16
            (less memory traffic; relies on the stability guard). Measured on the MNIST
            autoencoder with bf16 model and state (benchmarks/RESULTS-sonew.md): both train
            to about the same loss, bf16 factorisation ~5% faster per step.
        guard_threshold: the stability guard. A neighbour edge of column ``j`` is
            dropped when the Schur complement ``s_j`` falls to ``guard_threshold · d_j`` or
            below (farthest edges first for ``band > 1``), so every ``D_j > 0``. ``None``
            (default) uses the machine epsilon of the less precise of the compute and state
            dtypes (fp32 1.2e-7, bf16 7.8e-3): bf16 statistics carry bf16 rounding noise
            even when factorised in fp32, and an edge whose Schur complement is below that
            noise would blow up ``D_j`` (measured: band-4 SONew with bf16 state diverges
            on the autoencoder with the fp32 threshold and trains with this one). A value
            below the compute dtype's machine epsilon is raised to it (``D_j = 1/s_j``
            must stay finite).
        precondition_1d: if ``True`` (default) every tensor, including 1-d biases and
            norm scales, gets the banded preconditioner; if ``False``, tensors with fewer
            than 2 dims take the plain Adam update (``m̂ / (√v̂ + graft_eps)``).
        nonfinite: ``"skip"`` (default) or ``"raise"``: what a step with a NaN/Inf gradient
            does (see :class:`~secondorder.optim.base.SecondOrderOptimizer`); either way
            parameters and state are left untouched.
        foreach: ``True``: the momentum EMA, the weight decay and the step counters of all
            the group's tensors run as multi-tensor ``torch._foreach_*`` calls; ``False``:
            one tensor at a time; ``None`` (default): multi-tensor when every tensor is on a
            CPU or CUDA device. Bit-identical results on the CPU. The statistics, the
            factorisation and the final update (which use reusable scratch buffers) run
            per tensor either way; a gradient whose dtype is not the state's (bf16
            parameters with ``state_dtype=torch.float32``) is converted in scratch and its
            momentum updated there, per tensor.

    **Flattening order.** Each tensor is flattened row-major (``p.reshape(-1)``, C order):
    for a linear weight ``[out, in]`` neighbours are consecutive input weights of one output
    unit; for a conv kernel ``[out, in, kh, kw]`` consecutive kernel taps. The chain runs
    on across row boundaries (the last weight of unit ``i`` neighbours the first weight of
    unit ``i + 1``); the statistics decide how much that edge matters.

    **Finite gradients give finite parameters.** Squares of gradients overflow float32 and
    bfloat16 at ``|g| > ~1.8e19`` and vanish below ``~1e-23``. The statistics are therefore
    stored relative to a per-tensor power of two: ``band_stats = H / c²``, with ``c`` the
    next power of two above a running upper bound of ``sqrt(max_j H_jj)`` (``stats_bound``,
    updated with ``hypot``, which never squares). Every stored entry is at most 1, ``c``
    follows the statistics down again after a gradient spike, and powers of two are
    exact: multiplying every gradient by ``2**k`` (and ``graft_eps`` with it) leaves the
    ``graft="adam"`` update bit-identical (tested over ``2**±90``). The momentum enters
    the preconditioner as ``m / c``; ``graft_eps`` and an absolute damping are converted to
    these units. Floors that keep every intermediate finite, each far below what float32
    resolves relative to the tensor's largest statistic: the damping and the graft ε in
    scaled units are at least ``sqrt(tiny)`` (about ``1e-19``), the guard threshold at least
    the compute dtype's epsilon, and with ``damping="absolute"`` ``c >= sqrt(ε) · 2**-30``
    (a tiny gradient under a large absolute damping keeps ``X ≈ 1/ε``). The graft ratio is
    computed so that it is finite for any finite norms. Two cases remain the method's own,
    not numerical: with ``graft=None`` and relative damping the step scales as
    ``1 / gradient`` (Newton-like), so gradients near float32's smallest numbers give
    steps near its largest; and momentum larger than the statistics allow
    (``β1² >= β2``, e.g. ``β2 = 0`` with ``β1 > 0``) has no Adam-style bound on
    ``m̂ / √v̂``. :meth:`diagnostics` shows the scale, damping, pivots and graft ratio.

    **Sharded parameters** (FSDP2 ``fully_shard``, HSDP: DTensors with ``Shard(0)``). Each
    rank keeps the statistics of its own rows: the chain (and the band) is cut where one
    shard ends and the next begins, and nothing else changes. What couples the shards is
    reduced over them: the statistics scale (the running bound and this step's ``max |g|``,
    by max: every shard stores its statistics divided by the same ``c²``, the ``c`` a single
    process would use), the damping's ``‖Ĥ‖_∞`` (by max) and the two norms of the graft (as
    a sum of their squares, accumulated in float64). That is one max over the shards per
    step and shard group, plus per tensor and step one max of a scalar (relative damping)
    and one sum of two; a rank whose shard is empty still takes part. A step thus equals
    single-process SONew whose statistics of the links (and band entries) crossing shard
    boundaries are held at zero, up to the rounding of the norms' sums. Checkpoints
    (``torch.distributed.checkpoint``) hold ``exp_avg`` and ``band_stats`` as DTensors and
    load into any number of shards (``stats_bound`` is the same on every shard); the
    entries of links cut by the old layout then start again from zero, and those cut by the
    new one are dropped.

    **State** (per parameter): ``step`` (0-d CPU tensor), ``exp_avg`` (parameter-shaped,
    unscaled), ``band_stats`` (``(b + 1, numel)``: row ``k`` holds the EMA of
    ``g_j · g_{j+k}`` divided by ``c²``, i.e. the ``n × (b + 1)`` band array stored
    diagonal-major so every diagonal is contiguous; :meth:`band_statistics` returns it
    unscaled), ``stats_bound`` (0-d float32 on the parameter's device, one per tensor, the
    same on every shard of a sharded tensor; ``c`` derives from it, :meth:`stats_scale`).
    Checkpoints without ``stats_bound`` (older versions, unscaled statistics) are converted
    on load. Besides the state, the optimizer keeps reusable scratch buffers (not
    checkpointed, :meth:`scratch_bytes`) of about 10 vectors of its largest parameter
    (``b²/2 + 4b + 10`` for ``band = b > 1``), so that the step allocates almost nothing.
    """

    _supports_dtensor = True  # local shards (see docs/distributed.md)
    _param_shaped_keys = ("exp_avg",)
    _flat_state_keys = ("band_stats",)  # (b + 1, numel): laid out along the flat parameter
    _transient_attrs = ("_scratch",)  # reusable work buffers, rebuilt lazily
    # sharded parameters take part in reductions over their shards: every rank must step
    _steps_empty_shards = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-5,
        weight_decay: float = 0.0,
        band: int = 1,
        graft: str | None = "adam",
        *,
        graft_eps: float = 1e-8,
        damping: str = "relative",
        state_dtype: torch.dtype | None = None,
        compute_dtype: torch.dtype | None = None,
        guard_threshold: float | None = None,
        precondition_1d: bool = True,
        nonfinite: str = "skip",
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            band=band,
            graft=graft,
            graft_eps=graft_eps,
            damping=damping,
            state_dtype=state_dtype,
            compute_dtype=compute_dtype,
            guard_threshold=guard_threshold,
            precondition_1d=precondition_1d,
            foreach=foreach,
        )
        super().__init__(params, defaults, nonfinite=nonfinite)

    # ------------------------------------------------------------------ groups
    def _validate_group(self, group: dict[str, Any]) -> None:
        check_common_hparams(group)
        check_int("band", group["band"], low=0)
        check_choice("graft", group["graft"], GRAFTS)
        check_choice("damping", group["damping"], DAMPINGS)
        check_choice("state_dtype", group["state_dtype"], STATE_DTYPES)
        check_choice("compute_dtype", group["compute_dtype"], COMPUTE_DTYPES)
        if group["guard_threshold"] is not None:
            check_float("guard_threshold", group["guard_threshold"], low=0.0, high=1.0)
        check_bool("precondition_1d", group["precondition_1d"])
        F.check_foreach(group["foreach"])

    @staticmethod
    def _band_for(group: dict[str, Any], p: torch.Tensor) -> int | None:
        """Half-bandwidth used for ``p``, or ``None`` for the plain Adam update."""
        if p.dim() < 2 and not group["precondition_1d"]:
            return None
        return group["band"]

    @staticmethod
    @functools.cache
    def default_guard_threshold(state_dtype: torch.dtype, compute_dtype: torch.dtype) -> float:
        """Machine epsilon of the less precise of the two dtypes.

        Statistics stored in bf16 carry bf16 rounding noise even when they are factorised
        in fp32: a Schur complement below that noise is not signal.
        """
        return max(K.guard_threshold(state_dtype), K.guard_threshold(compute_dtype))

    def _check_loaded_state(self, p: torch.Tensor, st: dict[str, Any]) -> None:
        super()._check_loaded_state(p, st)
        if not st:
            return
        missing = {"step", "exp_avg", "band_stats"} - st.keys()
        if missing:
            raise ValueError(
                f"SONew state for a parameter of shape {tuple(p.shape)} lacks "
                f"{sorted(missing)}: not a SONew state dict"
            )
        bound = st.get("stats_bound")  # absent in checkpoints of older versions: migrated
        if bound is not None and not (
            isinstance(bound, torch.Tensor) and bound.dim() == 0 and bound.is_floating_point()
        ):
            raise ValueError(
                "SONew state 'stats_bound' must be a 0-d floating-point tensor, got "
                f"{bound!r}: not a SONew state dict"
            )
        # While loading, self.param_groups holds the loaded hyperparameters.
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        band = self._band_for(group, p)
        expected = (1 if band is None else band + 1, p.numel())
        h = st["band_stats"]
        if not isinstance(h, torch.Tensor) or tuple(h.shape) != expected:
            got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
            raise ValueError(
                f"SONew state 'band_stats' has shape {got}, expected {expected} for a "
                f"parameter of shape {tuple(p.shape)} with band={group['band']}: the state "
                "dict does not match these parameters or this band"
            )

    def stats_scale(self, p: torch.Tensor) -> float:
        """The power of two ``c`` with ``state["band_stats"] = H / c²`` for parameter ``p``
        (reads a device value: not for the hot path)."""
        st = self.state.get(p, {})
        if "stats_bound" not in st:
            raise ValueError("SONew.stats_scale: this parameter has no SONew state yet")
        return 2.0 ** float(K.scale_exponent(st["stats_bound"]).item())

    def band_statistics(self, p: torch.Tensor) -> torch.Tensor:
        """The band of ``H`` (EMA of ``g gᵀ``, not bias-corrected) of parameter ``p`` in
        float64 (float32 would overflow where the scaled storage does not): row ``k`` holds
        ``H[j, j + k]``. A new tensor, for inspection and tests."""
        c = self.stats_scale(p)
        return self.state[p]["band_stats"].double() * c * c

    def _after_load_state_dict(self) -> None:
        super()._after_load_state_dict()
        # Checkpoints of versions without scale-aware statistics hold H itself: give them
        # a bound and store H / c² like every newer state. (On shards each rank derives
        # the bound from its own rows; the next step makes it common, see _advance_scales.)
        for st in self.state.values():
            if isinstance(st, dict) and "band_stats" in st and "stats_bound" not in st:
                h = st["band_stats"]
                bound = h[0].float().amax().clamp_(min=0).sqrt_() if h.numel() else None
                if bound is None:
                    bound = torch.zeros((), dtype=torch.float32, device=h.device)
                e = K.scale_exponent(bound)
                inv_c = torch.exp2(-e).to(h.dtype)
                h.mul_(inv_c).mul_(inv_c)
                st["stats_bound"] = bound
        # Band entries past a tensor's end are padding and must be zero: a state resharded
        # from another layout may carry the statistics of links that are now cut there.
        for st in self.state.values():
            h = st.get("band_stats") if isinstance(st, dict) else None
            if isinstance(h, torch.Tensor) and h.dim() == 2:
                n = h.shape[1]
                for k in range(1, h.shape[0]):
                    h[k, max(n - k, 0) :].zero_()

    # -------------------------------------------------------------------- step
    def _init_state(self, group: dict[str, Any], p: torch.Tensor, st: dict[str, Any]) -> None:
        # float16's range (max 65504) cannot hold squared gradients: keep its state in fp32.
        sdt = group["state_dtype"] or (torch.float32 if p.dtype == torch.float16 else p.dtype)
        band = self._band_for(group, p)
        width = 1 if band is None else band + 1
        st["step"] = torch.tensor(0.0)
        st["exp_avg"] = torch.zeros_like(p, dtype=sdt, memory_format=torch.contiguous_format)
        st["band_stats"] = torch.zeros((width, p.numel()), dtype=sdt, device=p.device)
        st["stats_bound"] = torch.zeros((), dtype=torch.float32, device=p.device)

    def _scratch_buffers(self) -> K.Scratch:
        """Per-optimizer reusable buffers (not state): about 10 vectors of the largest
        parameter's size in the compute dtype for ``band <= 1``, ``b²/2 + 4b + 10`` for
        ``band = b > 1``."""
        scratch = self.__dict__.get("_scratch")
        if scratch is None:
            scratch = self.__dict__["_scratch"] = K.Scratch()
        return scratch

    def _update(self, work: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> None:
        items = []
        for group, params in work:
            for p in params:
                st = self.state[p]
                if len(st) == 0:
                    self._init_state(group, p, st)
                self._check_band(group, p, st)  # before anything is modified
                items.append((group, p, st))
        foreach = {id(g): F.resolve_foreach(g["foreach"], ps) for g, ps in work if ps}
        for group, params in work:
            if params:
                F.add_steps_([self.state[p]["step"] for p in params], foreach[id(group)])
        # The scalar bookkeeping of the statistics scale (a dozen tiny operations per
        # tensor) runs once for all tensors on a device, as short vectors.
        by_device: dict[torch.device, list[int]] = {}
        for i, (_, p, _) in enumerate(items):
            by_device.setdefault(p.device, []).append(i)
        scalars: list[_Scalars | None] = [None] * len(items)
        for idx in by_device.values():
            for i, sc in zip(idx, self._advance_scales([items[i] for i in idx])):
                scalars[i] = sc
        # The elementwise work that needs no scratch buffer runs for all tensors of a group
        # at once (multi-tensor) or one at a time (``foreach``); same results either way.
        done = set()  # ids of the parameters whose momentum is already updated
        for group, params in work:
            if params:
                done |= self._momenta_and_decay(group, params, foreach[id(group)])
        for (group, p, st), sc in zip(items, scalars):
            self._step_param(group, p, st, sc, id(p) in done)

    def _momenta_and_decay(
        self, group: dict[str, Any], params: list[torch.Tensor], foreach: bool
    ) -> set[int]:
        """The momentum EMA ``m <- lerp(m, g, 1 - beta1)`` of the tensors whose gradient has
        the state's dtype (the others convert it in a scratch buffer, in ``_step_param``)
        and the decoupled weight decay ``p <- p (1 - lr wd)`` of all of ``params`` (nothing
        of the step reads ``p`` before its final update). Returns the ids of the
        parameters whose momentum was updated."""
        ms, gs, ids = [], [], set()
        for p in params:
            m = self.state[p]["exp_avg"]
            if p.grad.dtype == m.dtype:
                ms.append(m.view(-1))
                gs.append(p.grad.reshape(-1))
                ids.add(id(p))
        F.lerp_(ms, gs, 1.0 - group["betas"][0], foreach)
        lr, wd = group["lr"], group["weight_decay"]
        if wd != 0.0:
            F.mul_(params, 1.0 - lr * wd, foreach)
        return ids

    def _check_band(self, group: dict[str, Any], p: torch.Tensor, st: dict[str, Any]) -> None:
        band = self._band_for(group, p)
        width = 1 if band is None else band + 1
        rows = st["band_stats"].shape[0]
        if rows != width:
            raise ValueError(
                f"SONew: band_stats of a parameter has {rows} rows but band={band} "
                f"needs {width}; band (and precondition_1d) cannot change during training"
            )

    def _advance_scales(self, items: list[tuple[dict[str, Any], torch.Tensor, dict]]) -> list:
        """Per tensor: advance its statistics scale with this step's max |g| and return the
        0-d quantities its step needs (:class:`_Scalars`), computed for all at once."""
        dev = items[0][1].device
        gmax, beta2, weight, floor, geps, root_delta = [], [], [], [], [], []
        for group, p, st in items:
            if p.numel():
                lo, hi = torch.aminmax(p.grad)  # one pass; the only per-tensor scalar work
            else:  # an empty shard: takes part in its tensor's reductions only
                lo = hi = p.grad.new_zeros(())
            gmax += [hi.float(), lo.float()]  # no-ops for float32
            b2 = group["betas"][1]
            t = int(st["step"].item())  # CPU scalar: no device sync
            bc2 = bias_correction(b2, t)
            absolute = self._band_for(group, p) is not None and group["damping"] == "absolute"
            beta2.append(b2)
            weight.append(ema_weight(b2))
            floor.append(_absolute_scale_floor(group["eps"] * bc2) if absolute else 0.0)
            geps.append(group["graft_eps"])
            root_delta.append(math.sqrt(group["eps"] * bc2) if absolute else 0.0)

        def vec(xs: list[float]) -> torch.Tensor:
            return torch.tensor(xs, dtype=torch.float32, device=dev)

        lohi = torch.stack(gmax).abs_().view(-1, 2)
        bounds = [st["stats_bound"] for _, _, st in items]
        old, gm = torch.stack(bounds).float(), lohi.amax(1)
        common = self._common_scales(items, old, gm)
        sc = K.advance_stats_scale(
            old if common is None else common[0],
            gm if common is None else common[1],
            vec(beta2),
            vec(weight),
            vec(floor),
        )
        decay = sc.decay
        if common is not None:
            # each shard's statistics are stored in the units of its own old bound (equal to
            # the common one except after migrating an old checkpoint): rescale from those
            shift = torch.sub(K.scale_exponent(old), K.scale_exponent(common[0])).mul_(2.0)
            decay = decay * torch.exp2(shift)
        torch._foreach_copy_(bounds, list(sc.bound.unbind()))
        return _scaled_scalars(decay, sc.inv_scale, geps, root_delta)

    def _common_scales(
        self,
        items: list[tuple[dict[str, Any], torch.Tensor, dict]],
        bound: torch.Tensor,
        gmax: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For sharded tensors: the running bound and ``max |g|`` reduced by max over their
        shards (one collective per shard group), so every shard derives the same scale ``c``
        (max is exact: the one a single process holding the whole tensor derives); ``None``
        when no tensor is sharded."""
        placements = [self._placement(p) for _, p, _ in items]
        if not any(pl is not None and pl.sharded for pl in placements):
            return None
        bound, gmax = bound.clone(), gmax.clone()
        entries = [(pl, t[i : i + 1]) for t in (bound, gmax) for i, pl in enumerate(placements)]
        all_reduce_over_shards(entries, "max")
        return bound, gmax

    def _step_param(
        self,
        group: dict[str, Any],
        p: torch.Tensor,
        st: dict[str, Any],
        sc: _Scalars,
        momentum_done: bool,
    ) -> None:
        """The rest of the step of ``p``: momentum (unless ``momentum_done``), statistics,
        direction and the final update (the weight decay is already applied)."""
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        band = self._band_for(group, p)
        m, h = st["exp_avg"], st["band_stats"]
        sdt = m.dtype
        cdt = self._compute_dtype(group, sdt)
        t = int(st["step"].item())  # CPU scalar: no device sync
        bc1 = bias_correction(beta1, t)
        bc2 = bias_correction(beta2, t)

        scratch = self._scratch_buffers()
        pl = self._placement(p)
        shards = pl if pl is not None and pl.sharded else None
        n = p.numel()
        g = p.grad.reshape(-1)
        if g.dtype != sdt:
            g = scratch.take("g", n, g, sdt).copy_(g)
        mf = m.view(-1)
        if not momentum_done:
            mf.lerp_(g, 1.0 - beta1)
        # Scale-aware statistics: h holds the band of H / c² with c = 2**e a power of two
        # above a running bound of sqrt(max H_jj) (see kernels.sonew), so that squares of
        # huge gradients cannot overflow nor those of tiny ones underflow.
        K.update_band_stats_scaled(h, g, sc.decay, sc.inv_scale, ema_weight(beta2), scratch)

        d = self._direction(group, band, h, mf, sc, t, sdt, cdt, scratch, shards)
        if d.graft_norm is not None:
            # Only the graft's norm is needed; the rescale is fused into the update. Both
            # norms are of scale-free vectors (m / c), so their ratio is the true one.
            gnorm, unorm = d.graft_norm, torch.linalg.vector_norm(d.u)
            if shards is not None:  # norms of the whole tensor
                gnorm, unorm = _norms_over_shards(shards, gnorm, unorm)
            ratio = _safe_ratio(gnorm, unorm)
            p.addcmul_(d.u.view(p.shape), ratio, value=-lr / bc1)
        elif band is None:  # plain Adam update (scale free)
            p.add_(d.u.view(p.shape), alpha=-lr / bc1)
        else:
            # X m = X_c (m / c) / c, with X_c the preconditioner of the scaled statistics.
            factor = sc.inv_scale.to(cdt).mul_(-lr * bc2 / bc1)
            p.addcmul_(d.u.view(p.shape), factor.clamp_(-_floor(cdt).max, _floor(cdt).max))

    def _direction(
        self,
        group: dict[str, Any],
        band: int | None,
        h: torch.Tensor,
        mf: torch.Tensor,
        sc: _Scalars,
        t: int,
        sdt: torch.dtype,
        cdt: torch.dtype,
        scratch: K.Scratch | None,
        shards: Any = None,
    ) -> _Direction:
        """The preconditioned direction of the scaled momentum ``m / c`` (see _Direction).

        ``shards``: the placement of a sharded tensor, whose damping is then reduced over
        its shards (``None``: the local tensor alone)."""
        beta2 = group["betas"][1]
        n = mf.shape[0]
        take = scratch.take if scratch is not None else _fresh
        inv_c = sc.inv_scale  # 1 / c, exact
        hc = h
        if cdt != sdt:  # upcast (or downcast) into scratch: no per-step allocation
            hc = take("h", h.numel(), h, cdt).view(h.shape).copy_(h)
        # the momentum in the same units as the statistics: |m / c| <~ 1
        mc = torch.mul(mf, inv_c, out=take("m", n, mf, cdt))
        geps = sc.graft_eps
        if band is None:
            u = graft_direction("adam", mc, hc[0], t, beta2, geps)
            return _Direction(u, hc, mc, inv_c, None, None, None, None)
        # Factorise H + δ'I with the raw (not bias-corrected) statistics: with Ĥ = H / bc2
        # and δ' = δ · bc2, X(Ĥ + δI) = bc2 · X(H + δ'I) (same guard decisions, which are
        # scale invariant); the scalar is folded into the step.
        delta = self._damping(group, hc, sc.delta, scratch, shards)
        psi = D = None
        if n == 0:  # an empty shard: took part in the reduction only
            u = mc
        elif band == 0:
            u = K.diag_preconditioner(hc, delta, scratch).mul_(mc)
        else:
            gamma = self._effective_guard(group, sdt, cdt)
            if band == 1:
                psi, D = K.tridiag_ldl(hc, delta, gamma, scratch)
            else:
                psi, D = K.band_ldl(hc, delta, gamma, scratch)
            u = K.apply_preconditioner(psi, D, mc, scratch)
        gn = None
        if group["graft"] == "adam":
            gn = graft_norm("adam", mc, hc[0], t, beta2, geps)
        return _Direction(u, hc, mc, inv_c, delta, psi, D, gn)

    # -------------------------------------------------------------- health
    @torch.no_grad()
    def diagnostics(self) -> list[dict[str, Any]]:
        """One record per parameter with SONew state: how its preconditioner is doing.

        Recomputed from the current state (statistics and momentum after the last step),
        so ``step()`` pays nothing for it; it reads device values: call it off the hot path.
        Fields (all Python numbers; ``None`` where not applicable):

        * ``param`` (index over all param groups), ``shape``, ``band`` (``None``: the tensor
          takes the plain Adam update, ``precondition_1d=False``), ``step``;
        * ``stats_scale``: the power of two ``c`` the statistics are stored divided by
          (``c²``); ``max_stat``: the largest bias-corrected diagonal statistic
          ``max_j Ĥ_jj`` (the gradient scale squared);
        * ``damping``: ``δ`` actually added to the diagonal of ``Ĥ`` (after the floors);
        * ``min_pivot``: the smallest relative Schur complement ``s_j / d_j`` over columns
          (1: no coupling; close to the guard threshold: nearly singular neighbourhoods);
        * ``guarded_columns``: fraction of columns where the stability guard dropped at
          least one neighbour edge; ``dropped_edges``: fraction of all band edges dropped;
        * ``graft_norm`` / ``direction_norm`` / ``graft_ratio``: ``‖Adam direction‖``,
          ``‖X(Ĥ + δI) m̂‖`` and their ratio, the factor the graft rescales SONew's
          direction by (``graft="adam"`` only; ``direction_norm`` also with ``graft=None``);
        * ``finite``: every state tensor is finite (always true unless something is wrong).

        ``skipped_steps`` (non-finite gradients, optimizer-wide) is an attribute.

        For a sharded parameter (FSDP2 / HSDP) the record describes this rank's shard, with
        no collective: ``shape`` is the shard's, ``stats_scale`` is common to all shards,
        and the other fields are computed from the local rows alone (the damping here uses
        the shard's ``‖Ĥ‖_∞``, the step the whole tensor's; the norms are the shard's
        parts). An empty shard reports ``max_stat = 0`` and ``None`` for the rest.
        """
        out = []
        idx = -1
        for group in self.param_groups:
            for p in group["params"]:
                idx += 1
                st = self.state.get(p, {})
                if "band_stats" not in st or "stats_bound" not in st:
                    continue
                out.append(self._health(idx, group, p, st))
        return out

    def _health(
        self, idx: int, group: dict[str, Any], p: torch.Tensor, st: dict[str, Any]
    ) -> dict[str, Any]:
        band = self._band_for(group, p)
        h, m = st["band_stats"], st["exp_avg"]
        t = int(st["step"].item())
        bc1 = bias_correction(group["betas"][0], t)
        bc2 = bias_correction(group["betas"][1], t)
        sdt = m.dtype
        cdt = self._compute_dtype(group, sdt)
        e = K.scale_exponent(st["stats_bound"])
        c = 2.0 ** float(e.item())
        rec: dict[str, Any] = dict(
            param=idx,
            shape=tuple(p.shape),
            band=band,
            step=t,
            stats_scale=c,
            max_stat=float(h[0].double().max()) * c * c / bc2 if h.shape[1] else 0.0,
            damping=None,
            min_pivot=None,
            guarded_columns=None,
            dropped_edges=None,
            graft_norm=None,
            direction_norm=None,
            graft_ratio=None,
            finite=all(
                bool(torch.isfinite(v).all())
                for v in st.values()
                if isinstance(v, torch.Tensor) and v.is_floating_point()
            ),
        )
        if band is None or h.shape[1] == 0:  # plain Adam update, or an empty shard
            return rec
        absolute = group["damping"] == "absolute"
        (sc,) = _scaled_scalars(
            torch.ones(1, device=h.device),
            torch.exp2(-e).view(1),
            [group["graft_eps"]],
            [math.sqrt(group["eps"] * bc2) if absolute else 0.0],
        )
        d = self._direction(group, band, h, m.reshape(-1), sc, t, sdt, cdt, None)
        rec["damping"] = float(d.delta) * c * c / bc2
        # X(Ĥ + δI) m̂ = (bc2 / bc1) · X_c (m / c) / c
        unorm = float(robust_norm(d.u)) * bc2 / (bc1 * c)
        rec["direction_norm"] = unorm
        if d.graft_norm is not None:
            gnorm = float(d.graft_norm) / bc1
            rec["graft_norm"] = gnorm
            rec["graft_ratio"] = gnorm / unorm if unorm > 0 else None
        if d.D is None:  # diagonal: no edges, every pivot is its diagonal
            rec.update(min_pivot=1.0, guarded_columns=0.0, dropped_edges=0.0)
            return rec
        n = h.shape[1]
        diag = d.hc[0].double() + float(d.delta)
        rec["min_pivot"] = float((1.0 / (d.D.double() * diag)).min())
        # a dropped edge has psi = 0 although its statistic is not 0 (the guard zeroes a
        # column's farthest edges; a kept edge is 0 only for an exactly 0 statistic)
        dropped = (d.psi == 0) & (d.hc[1:] != 0)
        edges = sum(max(n - k, 0) for k in range(1, band + 1))
        rec["dropped_edges"] = float(dropped.sum()) / edges if edges else 0.0
        rec["guarded_columns"] = float(dropped.any(0).double().mean())
        return rec


    def scratch_bytes(self) -> int:
        """Bytes of the reusable work buffers (not state, not saved; see the class doc)."""
        scratch = self.__dict__.get("_scratch")
        return 0 if scratch is None else scratch.nbytes()

    # ------------------------------------------------------------- numerics
    @staticmethod
    def _compute_dtype(group: dict[str, Any], sdt: torch.dtype) -> torch.dtype:
        return group["compute_dtype"] or (torch.float64 if sdt == torch.float64 else torch.float32)

    def _effective_guard(self, group: dict[str, Any], sdt: torch.dtype, cdt: torch.dtype) -> float:
        """The guard threshold used: the group's (or the default), never below the compute
        dtype's machine epsilon (a Schur complement below rounding noise is not signal, and
        ``D = 1/s`` must stay finite)."""
        gamma = group["guard_threshold"]
        if gamma is None:
            return self.default_guard_threshold(sdt, cdt)
        return max(gamma, K.guard_threshold(cdt))

    @staticmethod
    def _damping(
        group: dict[str, Any],
        hc: torch.Tensor,
        delta_abs: torch.Tensor,
        scratch: K.Scratch | None,
        shards: Any = None,
    ) -> torch.Tensor:
        """``δ'`` in the units of the scaled statistics, a 0-d tensor (no host sync).

        Relative: ``eps · ‖H_c‖∞`` (scale invariant). Absolute: ``eps · bc2 / c²`` (from
        :meth:`_advance_scales`), at most ``2**60`` because ``c >= sqrt(eps · bc2) · 2**-30``
        (:func:`_absolute_scale_floor`). Both are at least ``sqrt(tiny)`` of the compute
        dtype (about ``1e-19`` for float32 and bfloat16), far below the stored statistics'
        scale (at most 1): pivots stay positive and ``D = 1/s`` finite.
        """
        cdt = hc.dtype
        if group["damping"] == "relative":
            if hc.shape[1]:
                delta = K.band_inf_norm(hc, scratch, nonneg_diag=True)
            else:  # an empty shard: takes part in the reduction only
                delta = hc.new_zeros(())
            if shards is not None:  # ‖H_c‖∞ of the whole tensor (all shards share c)
                shards.all_reduce_(delta, "max")
            delta.mul_(group["eps"])
        else:
            delta = delta_abs.to(cdt)
        return delta.clamp_min_(_floor(cdt).delta)


class _Floors(NamedTuple):
    delta: float  # smallest damping / graft eps in scaled units: sqrt(tiny)
    max: float  # largest finite value
    tiny: float  # smallest normal value


@functools.cache
def _floor(dtype: torch.dtype) -> _Floors:
    fi = torch.finfo(dtype)
    return _Floors(delta=math.sqrt(fi.tiny), max=float(fi.max), tiny=float(fi.tiny))


def _absolute_scale_floor(delta: float) -> float:
    """Least statistics scale for absolute damping ``delta``: ``sqrt(delta) · 2**-30``, so that
    the damping in scaled units (``delta / c²``) is at most ``2**60``; tiny gradients then
    keep a representable ``X ≈ 1/delta`` instead of an underflowing scaled one."""
    return math.sqrt(delta) * 2.0**-30


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` for the graft rescale, finite for any finite ``num``: the denominator is
    kept above ``num · 2**-100`` and float32's ``tiny`` (a zero ``den`` means a zero
    direction, whatever it is multiplied by); an overflowed (``inf``) ``den`` gives 0."""
    den = torch.maximum(den, num * 2.0**-100).clamp_min_(_floor(torch.float32).tiny)
    return num / den


def _norms_over_shards(
    shards: Any, gnorm: torch.Tensor, unorm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The graft and direction norms of the whole tensor from those of this shard: squares
    summed over the shards, in float64 where the device has it (a float32 square of a
    large direction norm could overflow)."""
    fdt = torch.float32 if gnorm.device.type == "mps" else torch.float64
    sq = torch.stack([gnorm.to(fdt), unorm.to(fdt)]).square_()
    shards.all_reduce_(sq, "sum")
    g, u = sq.sqrt_().unbind()
    return g.to(gnorm.dtype), u.to(unorm.dtype)


def _scaled_scalars(
    decay: torch.Tensor, inv: torch.Tensor, geps: list[float], root_delta: list[float]
) -> list[_Scalars]:
    """Per tensor :class:`_Scalars` from vectors of ``decay`` and ``1 / c`` and the lists of
    ``graft_eps`` and ``sqrt(eps · bc2)`` (0 for relative damping)."""
    # float64 where the device has it: the absolute damping keeps its precision for
    # float64 states; these are vectors of one number per tensor
    fdt = torch.float32 if inv.device.type == "mps" else torch.float64
    invd = inv.to(fdt)
    # graft_eps in scaled units, at least sqrt(tiny): m / (sqrt(v) + eps) stays finite
    geps_c = torch.tensor(geps, dtype=fdt, device=inv.device).mul_(invd)
    geps_c.clamp_(min=_floor(torch.float32).delta)
    # absolute damping in scaled units: (sqrt(eps · bc2) / c)² <= 2**60 (the scale floor)
    delta_c = torch.tensor(root_delta, dtype=fdt, device=inv.device).mul_(invd).square_()
    return [
        _Scalars(*x)
        for x in zip(decay.unbind(), inv.unbind(), geps_c.unbind(), delta_c.unbind())
    ]


class _Scalars(NamedTuple):
    """The 0-d per-tensor quantities of one step (:meth:`SONew._advance_scales`)."""

    decay: torch.Tensor  # multiplier of the stored statistics: beta2 · (c_old / c)²
    inv_scale: torch.Tensor  # 1 / c
    graft_eps: torch.Tensor  # graft_eps / c, at least sqrt(tiny)
    delta: torch.Tensor  # absolute damping eps · bc2 / c² (0 for relative damping)


class _Direction(NamedTuple):
    """What :meth:`SONew._direction` computed, all in the units of the scaled statistics
    (``H / c²``, ``m / c``); tensors may live in scratch buffers."""

    u: torch.Tensor  # X_c (m / c), or the Adam direction for tensors without a band
    hc: torch.Tensor  # the statistics in the compute dtype
    mc: torch.Tensor  # m / c in the compute dtype
    inv_c: torch.Tensor  # 1 / c (0-d)
    delta: torch.Tensor | None  # damping added to the diagonal (0-d)
    psi: torch.Tensor | None  # LDLᵀ off-diagonal multipliers (band >= 1)
    D: torch.Tensor | None  # LDLᵀ diagonal (band >= 1)
    graft_norm: torch.Tensor | None  # ||Adam direction|| (graft="adam")


def _fresh(slot: str, n: int, like: torch.Tensor, dtype: torch.dtype | None = None):
    return torch.empty(n, dtype=dtype or like.dtype, device=like.device)
