"""SONew: the sparsified online Newton method with LogDet-optimal banded preconditioners.

Math in ``ALGORITHMS.md`` §2; the kernels are in :mod:`secondorder.kernels.sonew`, grafting
is shared with Shampoo (:mod:`secondorder.kernels.grafting`). This module only orchestrates:
state, dtypes and step order.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch

from .._validation import check_bool, check_choice, check_common_hparams, check_float, check_int
from ..kernels import sonew as K
from ..kernels.grafting import bias_correction, ema_weight, graft_direction, graft_norm
from .base import SecondOrderOptimizer

__all__ = ["SONew"]

GRAFTS = ("adam", None)
DAMPINGS = ("relative", "absolute")
STATE_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16, torch.float64)
COMPUTE_DTYPES = (None, torch.float32, torch.bfloat16, torch.float64)


@functools.cache
def _tiny(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).tiny)


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
        guard_threshold: the stability guard of §2.3. A neighbour edge of column ``j`` is
            dropped when the Schur complement ``s_j`` falls to ``guard_threshold · d_j`` or
            below (farthest edges first for ``band > 1``), so every ``D_j > 0``. ``None``
            (default) uses the machine epsilon of the less precise of the compute and state
            dtypes (fp32 1.2e-7, bf16 7.8e-3): bf16 statistics carry bf16 rounding noise
            even when factorised in fp32, and an edge whose Schur complement is below that
            noise would blow up ``D_j`` (measured: band-4 SONew with bf16 state diverges
            on the autoencoder with the fp32 threshold and trains with this one).
        precondition_1d: if ``True`` (default) every tensor, including 1-d biases and
            norm scales, gets the banded preconditioner; if ``False``, tensors with fewer
            than 2 dims take the plain Adam update (``m̂ / (√v̂ + graft_eps)``).
        nonfinite: ``"skip"`` (default) or ``"raise"``: what a step with a NaN/Inf gradient
            does (see :class:`~secondorder.optim.base.SecondOrderOptimizer`); either way
            parameters and state are left untouched.

    **Flattening order.** Each tensor is flattened row-major (``p.reshape(-1)``, C order):
    for a linear weight ``[out, in]`` neighbours are consecutive input weights of one output
    unit; for a conv kernel ``[out, in, kh, kw]`` consecutive kernel taps. The chain runs
    on across row boundaries (the last weight of unit ``i`` neighbours the first weight of
    unit ``i + 1``); the statistics decide how much that edge matters.

    **Sharded parameters** (FSDP2 ``fully_shard``, HSDP: DTensors with ``Shard(0)``). Each
    rank keeps the statistics of its own rows: the chain (and the band) is cut where one
    shard ends and the next begins, and nothing else changes. The damping's ``‖Ĥ‖_∞`` and
    the two norms of the graft are reduced over the shards (one max and one sum of two
    scalars per tensor and step), so a step equals single-process SONew whose statistics
    of the links (and band entries) crossing shard boundaries are held at zero, up to the
    rounding of the norms' sums. Checkpoints (``torch.distributed.checkpoint``) hold
    ``exp_avg`` and ``band_stats`` as DTensors and load into any number of shards; the
    entries of links cut by the old layout then start again from zero, and those cut by the
    new one are dropped.

    **State** (per parameter): ``step`` (0-d CPU tensor), ``exp_avg`` (parameter-shaped),
    ``band_stats`` (``(b + 1, numel)``: row ``k`` holds the EMA of ``g_j · g_{j+k}``, i.e.
    the ``n × (b + 1)`` band array stored diagonal-major so every diagonal is contiguous).
    Besides the state, the optimizer keeps reusable scratch buffers (not checkpointed) of
    about 10 vectors of its largest parameter (``b²/2 + 4b + 10`` for ``band = b > 1``), so
    that the step allocates almost nothing.
    """

    _param_shaped_keys = ("exp_avg",)
    _flat_state_keys = ("band_stats",)  # (b + 1, numel): laid out along the flat parameter
    _transient_attrs = ("_scratch",)  # reusable work buffers, rebuilt lazily
    # sharded parameters reduce two scalars over their shards: every rank must take part
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

    def _after_load_state_dict(self) -> None:
        super()._after_load_state_dict()
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

    def _scratch_buffers(self) -> K.Scratch:
        """Per-optimizer reusable buffers (not state): about 10 vectors of the largest
        parameter's size in the compute dtype for ``band <= 1``, ``b²/2 + 4b + 10`` for
        ``band = b > 1``."""
        scratch = self.__dict__.get("_scratch")
        if scratch is None:
            scratch = self.__dict__["_scratch"] = K.Scratch()
        return scratch

    def _update(self, work: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> None:
        for group, params in work:
            for p in params:
                st = self.state[p]
                if len(st) == 0:
                    self._init_state(group, p, st)
                self._step_param(group, p, st)

    def _step_param(self, group: dict[str, Any], p: torch.Tensor, st: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        band = self._band_for(group, p)
        m, h = st["exp_avg"], st["band_stats"]
        width = 1 if band is None else band + 1
        if h.shape[0] != width:
            raise ValueError(
                f"SONew: band_stats of a parameter has {h.shape[0]} rows but band={band} "
                f"needs {width}; band (and precondition_1d) cannot change during training"
            )
        sdt = m.dtype
        cdt = group["compute_dtype"] or (torch.float64 if sdt == torch.float64 else torch.float32)

        st["step"] += 1
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
        mf.lerp_(g, 1.0 - beta1)
        K.update_band_stats(h, g, beta2, ema_weight(beta2))

        hc, mc = h, mf
        if cdt != sdt:  # upcast (or downcast) into scratch: no per-step allocation
            hc = scratch.take("h", h.numel(), h, cdt).view(h.shape).copy_(h)
            mc = scratch.take("m", n, mf, cdt).copy_(mf)
        if band is None:
            u = graft_direction("adam", mc, hc[0], t, beta2, group["graft_eps"])
            scale = 1.0 / bc1
        else:
            # Factorise H + δ'I with the raw (not bias-corrected) statistics: with
            # Ĥ = H / bc2 and δ' = δ · bc2, X(Ĥ + δI) = bc2 · X(H + δ'I) (same guard
            # decisions, which are scale invariant); the scalar is folded into the step.
            if group["damping"] == "relative":
                if n:
                    delta = K.band_inf_norm(hc, scratch, nonneg_diag=True)
                else:  # an empty shard: takes part in the reduction only
                    delta = hc.new_zeros(())
                if shards is not None:
                    shards.all_reduce_(delta, "max")
                delta.mul_(group["eps"]).clamp_min_(_tiny(cdt))
            else:
                delta = group["eps"] * bc2
            if n == 0:
                u = mc
            elif band == 0:
                u = K.diag_preconditioner(hc, delta, scratch).mul_(mc)
            else:
                gamma = group["guard_threshold"]
                if gamma is None:
                    gamma = self.default_guard_threshold(sdt, cdt)
                if band == 1:
                    psi, D = K.tridiag_ldl(hc, delta, gamma, scratch)
                else:
                    psi, D = K.band_ldl(hc, delta, gamma, scratch)
                u = K.apply_preconditioner(psi, D, mc, scratch)
            if group["graft"] == "adam":
                # Only the graft's norm is needed; the rescale is fused into the update.
                ratio = graft_norm("adam", mc, hc[0], t, beta2, group["graft_eps"])
                unorm = torch.linalg.vector_norm(u)
                if shards is not None:  # norms of the whole tensor
                    sq = shards.all_reduce_(torch.stack([ratio, unorm]).square_(), "sum")
                    ratio, unorm = sq.sqrt_().unbind()
                ratio.div_(unorm.add_(1e-16))
                if wd != 0.0:
                    p.mul_(1.0 - lr * wd)
                p.addcmul_(u.view(p.shape), ratio, value=-lr / bc1)
                return
            scale = bc2 / bc1
        if wd != 0.0:
            p.mul_(1.0 - lr * wd)
        p.add_(u.view(p.shape), alpha=-lr * scale)
