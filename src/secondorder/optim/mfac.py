"""M-FAC: preconditioning by the inverse of a damped empirical Fisher built from the last
``m`` gradients. The math is in :mod:`secondorder.kernels.mfac`; this module keeps the ring
buffer and orchestrates the step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .._validation import check_choice, check_float, check_int
from ..kernels import foreach as F
from ..kernels import mfac as K
from ..placement.reduce import all_reduce_over_shards
from ._shard_state import ShardStateMixin, one_copy
from .base import SecondOrderOptimizer

__all__ = ["MFAC"]

SCALES = ("m", "count")


class MFAC(ShardStateMixin, SecondOrderOptimizer):
    r"""M-FAC (Frantar, Kurtic, Alistarh, 2021), the dynamic algorithm: ``θ ← θ − lr · u``.

    With ``g_1 … g_m`` the last ``m`` gradients (a ring buffer; the newest one included),

        F = λ I + s Σ_i g_i g_iᵀ,        u = F⁻¹ g_t

    (with momentum ``μ > 0``, ``u`` is replaced by its EMA ``v ← μ v + (1 − μ) u``).
    ``F⁻¹ g`` is computed without forming ``F``: the newest gradient is a row of the window
    ``G``, so ``F⁻¹ g = Gᵀ (λ I + s G Gᵀ)⁻¹ e``; the ``m × m`` Gram matrix ``G Gᵀ`` is
    updated by one row per step and the small SPD system is solved by Cholesky in float64.
    Per step: two passes over the window (``G g`` and ``Gᵀ a``, ``4 m d`` flops) plus
    ``O(m³)``.

    **The window.** ``"dense"`` (``block_size=None``): one window over all parameters of a
    param group, as if their gradients were one flat vector (the parameters that have a
    gradient on that step; each keeps its slice of the ring buffer). ``block_size=b``: the
    flattened gradient of each parameter is cut into contiguous blocks of ``b`` elements
    (the last one zero-padded), each with its own ``m``-gradient window: a block-diagonal
    ``F``, all blocks of a parameter solved in one batched call.

    **Memory.** The ring buffer holds ``m · d`` numbers (``d`` = number of parameter
    elements; float32 for bf16/fp16 parameters, else the parameter's dtype), plus ``m²``
    float64 per parameter (dense) or per block, plus ``d`` for the momentum buffer when
    ``momentum > 0``. With ``m = 1024`` (the authors' default) and a 25M-parameter model
    the buffer alone is 100 GB: pick ``m`` for your memory.

    **Scaling.** While the buffer fills (``t < m``) its empty rows are zero. ``scale="m"``
    (default, the authors' code) uses ``s = 1/m`` throughout, so early steps are
    ``λ I + (1/m) Σ_{i ≤ t} g_i g_iᵀ``; ``scale="count"`` uses ``s = 1/min(t, m)``, the
    average over the gradients actually seen. On the first step ``u = g / (λ + s ‖g‖²)``:
    with a small ``λ`` that is a normalized step of length about ``lr / (s ‖g‖)``, so
    ``lr`` has a different scale than SGD's.

    Args:
        params: iterable of parameters or param-group dicts (each group: its own window).
        lr: learning rate (``>= 0``).
        num_grads: ``m >= 1``, gradients in the window.
        damp: ``λ > 0``, the damping (the authors' default ``1e-5``).
        momentum: ``μ ∈ [0, 1)``, EMA of the preconditioned direction (0: none).
        weight_decay: ``>= 0``; added to the gradient (L2, ``g + wd · θ``) before it enters
            the window, so it is preconditioned, as in the authors' code.
        block_size: ``None`` (dense window over the whole group) or an int ``b >= 1``.
        scale: ``"m"`` or ``"count"``, see above.
        foreach: ``None`` (default: as torch.optim, multi-tensor ``torch._foreach_*``
            updates when no parameter of the group is on the CPU; on the CPU the
            one-tensor-at-a-time loop, which reuses memory, measured faster), ``True`` or
            ``False`` to force a path; both give bit-identical results (tested).
        nonfinite: ``"skip"`` (default) or ``"raise"``, see
            :class:`~secondorder.optim.base.SecondOrderOptimizer`.

    **Any gradient scale.** A gradient row whose largest entry is so large or so small that
    float32 dot products of such rows could overflow or vanish (beyond about ``2**±50``;
    the bound depends on the row length) is stored multiplied by a power of two that brings
    its largest entry into ``[0.5, 1)``, and the exponent is kept in ``row_exp``; the Gram
    matrix is kept in true units in float64 and the coefficients of ``Gᵀ a`` absorb the
    exponents. Powers of two are exact, so gradients from ``1e-30`` to ``1e30`` give the
    same step as float64 arithmetic would (to float32 rounding), and rows in the ordinary
    range are stored and multiplied exactly as they are (exponent 0: bit-identical).

    **State** per parameter: ``step`` (0-d CPU tensor; the step's ring slot is
    ``(step − 1) mod m``), ``grads`` (its slice of the ring buffer: ``(m, n)`` dense, or
    ``(blocks, m, b)``), ``row_exp`` (int16, ``(m,)`` or ``(blocks, m)``: row ``i`` of
    ``grads`` stands for ``grads[i] · 2**row_exp[i]``; a checkpoint without it loads as
    zeros), ``gram`` (float64: its contribution ``G_p G_pᵀ`` to the dense
    Gram matrix, ``(m, m)``, or the blocks' Gram matrices ``(blocks, m, m)``) and, once
    momentum is used, ``momentum_buffer``. ``state_dict`` round-trips the ring buffer
    exactly. ``num_grads`` and ``block_size`` cannot change once a parameter has state.

    **FSDP2 / HSDP shards** (DTensor parameters, rows cut along dim 0). Dense window: the
    flat gradient of the group is the concatenation of every tensor's shards, so the only
    quantities that cross shards are the new Gram row ``G g`` (a sum of dot products over
    the shards) and each row's power-of-two exponent (from the largest entry of the whole
    tensor: a max over the shards). Both are completed by all-reduces over the shard group,
    one for the maxima and one for the ``m``-vectors of all sharded tensors of the group;
    ``gram`` and ``row_exp`` are then the whole tensor's on every shard, every rank solves
    the same ``m × m`` system, and ``Gᵀ a`` is computed from the local shard of the window.
    The ring buffer holds exactly the entries one process would store; only the Gram
    row's summation order differs (rounding). Blocked window: blocks are cut inside each
    shard (a shard is flattened and blocked as a tensor of its own, the last block
    zero-padded) and nothing is communicated: the step is single-process M-FAC applied to
    every shard as a tensor; it equals M-FAC on the whole tensor when ``block_size``
    divides the number of entries of every shard but the last (no block of the whole
    tensor then straddles a shard boundary). Parameters that are not sharded contribute
    their own gradient, as in one process (under FSDP2 a module left out of
    ``fully_shard`` must then see the same gradient on every rank, or the ranks' dense
    windows disagree).
    """

    _param_shaped_keys = ("momentum_buffer",)
    # dense windows: (m, numel), laid out along the flattened parameter (DTensors in
    # checkpoints, so they reshard); block windows (3-d) are kept per shard
    _flat_state_keys = ("grads",)
    _supports_dtensor = True  # reduces over the shards (docs/distributed.md)
    # dense windows all-reduce over the shards: every rank steps, an empty shard's included
    _steps_empty_shards = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        num_grads: int = 32,
        damp: float = 1e-5,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        block_size: int | None = None,
        scale: str = "m",
        *,
        foreach: bool | None = None,
        nonfinite: str = "skip",
    ) -> None:
        defaults = dict(
            foreach=foreach,
            lr=lr,
            num_grads=num_grads,
            damp=damp,
            momentum=momentum,
            weight_decay=weight_decay,
            block_size=block_size,
            scale=scale,
        )
        super().__init__(params, defaults, nonfinite=nonfinite)

    # ------------------------------------------------------------------ groups
    def _validate_group(self, group: dict[str, Any]) -> None:
        F.check_foreach(group.get("foreach"))
        check_float("lr", group["lr"], low=0.0)
        check_int("num_grads", group["num_grads"], low=1)
        check_float("damp", group["damp"], low=0.0, low_open=True)
        check_float("momentum", group["momentum"], low=0.0, high=1.0, high_open=True)
        check_float("weight_decay", group["weight_decay"], low=0.0)
        if group["block_size"] is not None:
            check_int("block_size", group["block_size"], low=1)
        check_choice("scale", group["scale"], SCALES)

    @staticmethod
    def _layout(group: dict[str, Any], p: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of the ring-buffer slice and of the Gram state of ``p`` in ``group``."""
        m, n, b = group["num_grads"], p.numel(), group["block_size"]
        if b is None:
            return (m, n), (m, m)
        bl = min(b, n)
        nb = -(-n // bl)
        return (nb, m, bl), (nb, m, m)

    def _check_loaded_state(self, p: torch.Tensor, st: dict[str, Any]) -> None:
        super()._check_loaded_state(p, st)
        if not st:
            return
        missing = {"step", "grads", "gram"} - st.keys()
        if missing:
            raise ValueError(
                f"MFAC state for a parameter of shape {tuple(p.shape)} lacks "
                f"{sorted(missing)}: not an MFAC state dict"
            )
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        self._check_layout(group, p, st)

    def _check_layout(self, group: dict[str, Any], p: torch.Tensor, st: dict[str, Any]) -> None:
        want_g, want_k = self._layout(group, p)
        shapes = [("grads", want_g), ("gram", want_k)]
        if "row_exp" in st:  # absent in checkpoints written before it existed
            shapes.append(("row_exp", want_g[:-1]))
        for key, want in shapes:
            t = st[key]
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            if got != want:
                raise ValueError(
                    f"MFAC state {key!r} has shape {got}, expected {want} for a parameter of "
                    f"shape {tuple(p.shape)} with num_grads={group['num_grads']} and "
                    f"block_size={group['block_size']}: the state dict does not match these "
                    "parameters, or num_grads/block_size changed after training started"
                )

    def _state_out(self, group: dict[str, Any], pl: Any, key: str, v: Any) -> Any:
        """Checkpoints of DTensor parameters: a dense window's ``gram`` and ``row_exp`` are
        the whole tensor's on every shard, saved once as plain tensors (with ``grads`` a
        DTensor, the window then loads into any number of shards); block windows are cut
        inside the shards and stay per shard."""
        if group["block_size"] is None and key in ("gram", "row_exp"):
            return one_copy(v, pl)
        return v

    # -------------------------------------------------------------------- step
    def _init_state(self, group: dict[str, Any], p: torch.Tensor, st: dict[str, Any]) -> None:
        sdt = torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype
        shape_g, shape_k = self._layout(group, p)
        st["step"] = torch.tensor(0.0)
        st["grads"] = torch.zeros(shape_g, dtype=sdt, device=p.device)
        st["gram"] = torch.zeros(shape_k, dtype=torch.float64, device=p.device)
        st["row_exp"] = torch.zeros(shape_g[:-1], dtype=torch.int16, device=p.device)

    @staticmethod
    def _row_exp(st: dict[str, Any]) -> torch.Tensor:
        """The window's row exponents (zeros for a state loaded from before they existed:
        its rows were stored unscaled)."""
        exps = st.get("row_exp")
        if exps is None:
            g = st["grads"]
            exps = st["row_exp"] = torch.zeros(g.shape[:-1], dtype=torch.int16, device=g.device)
        return exps

    @staticmethod
    def _flat_grad(group: dict[str, Any], p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        g = p.grad.detach().reshape(-1).to(dtype)
        if group["weight_decay"] != 0.0:
            g = g.add(p.detach().reshape(-1).to(dtype), alpha=group["weight_decay"])
        return g

    def _update(self, work: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> None:
        for group, params in work:
            if group["block_size"] is not None:  # blocks of an empty shard: none, no collective
                params = [p for p in params if p.numel()]
            if not params:
                continue
            for p in params:
                st = self.state[p]
                if not st:
                    self._init_state(group, p, st)
                else:
                    self._check_layout(group, p, st)
            m = group["num_grads"]
            t = max(int(self.state[p]["step"]) for p in params) + 1
            slot = (t - 1) % m
            s = 1.0 / (m if group["scale"] == "m" else min(t, m))
            if group["block_size"] is None:
                dirs = self._dense_directions(group, params, slot, s)
            else:
                dirs = [self._block_direction(group, p, slot, s) for p in params]
            for p in params:
                self.state[p]["step"].fill_(t)
            if self._use_foreach(group, params):
                self._apply_foreach(group, params, dirs)
            else:
                self._apply_per_tensor(group, params, dirs)

    _use_foreach = staticmethod(F.use_foreach_off_cpu)

    def _momentum_buffer(self, p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        st = self.state[p]
        buf = st.get("momentum_buffer")
        if buf is None:
            buf = st["momentum_buffer"] = torch.zeros_like(
                p, dtype=u.dtype, memory_format=torch.contiguous_format
            )
        return buf

    def _apply_per_tensor(
        self, group: dict[str, Any], params: list[torch.Tensor], dirs: list[torch.Tensor]
    ) -> None:
        mu, lr = group["momentum"], group["lr"]
        for p, u in zip(params, dirs):
            if mu != 0.0 or "momentum_buffer" in self.state[p]:
                buf = self._momentum_buffer(p, u)
                buf.view(-1).lerp_(u, 1.0 - mu)
                u = buf.view(-1)
            p.add_(u.view(p.shape).to(p.dtype), alpha=-lr)

    def _apply_foreach(
        self, group: dict[str, Any], params: list[torch.Tensor], dirs: list[torch.Tensor]
    ) -> None:
        mu, lr = group["momentum"], group["lr"]
        steps = [u.view(p.shape) for p, u in zip(params, dirs)]
        with_buf = [
            i for i, p in enumerate(params) if mu != 0.0 or "momentum_buffer" in self.state[p]
        ]
        if with_buf:
            bufs = [self._momentum_buffer(params[i], steps[i]) for i in with_buf]
            torch._foreach_lerp_(bufs, [steps[i] for i in with_buf], 1.0 - mu)
            for i, buf in zip(with_buf, bufs):
                steps[i] = buf
        # one multi-tensor add per parameter dtype (the direction cast to it first)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, p in enumerate(params):
            by_dtype.setdefault(p.dtype, []).append(i)
        for dtype, idx in by_dtype.items():
            torch._foreach_add_(
                [params[i] for i in idx], [steps[i].to(dtype) for i in idx], alpha=-lr
            )

    def _dense_directions(
        self, group: dict[str, Any], params: list[torch.Tensor], slot: int, s: float
    ) -> list[torch.Tensor]:
        states = [self.state[p] for p in params]
        gs = [self._flat_grad(group, p, st["grads"].dtype) for p, st in zip(params, states)]
        pls = [self._placement(p) for p in params]
        pls = [pl if pl is not None and pl.sharded else None for pl in pls]
        # A sharded tensor's row exponent is the whole row's (its largest entry: a max over
        # the shards), so every shard stores its entries as one process would.
        maxima = [K.row_max(g) if pl is not None else None for g, pl in zip(gs, pls)]
        all_reduce_over_shards(((pl, a) for pl, a in zip(pls, maxima) if pl is not None), "max")
        rows = []
        for st, g, pl, a in zip(states, gs, pls, maxima):
            exps = self._row_exp(st)
            n = None if pl is None else pl.global_shape.numel()
            stored = K.ring_write(st["grads"], slot, g, exps, row_max=a, row_len=n)
            rows.append(K.gram_row(st["grads"], stored, exps, exps[slot]))
        # a sharded tensor's dot products are sums over its shards: one all-reduce for all
        all_reduce_over_shards(zip(pls, rows), "sum")
        gram = None
        for st, row in zip(states, rows):
            K.set_gram_row(st["gram"], slot, row)
            gram = st["gram"].clone() if gram is None else gram.add_(st["gram"])
        e = torch.zeros(group["num_grads"], dtype=torch.float64, device=gram.device)
        e[slot] = 1.0
        a = K.coefficients(gram, e, group["damp"], s)
        return [K.combine(st["grads"], a, st["row_exp"]) for st in states]

    def _block_direction(
        self, group: dict[str, Any], p: torch.Tensor, slot: int, s: float
    ) -> torch.Tensor:
        st = self.state[p]
        grads, gram = st["grads"], st["gram"]
        nb, m, bl = grads.shape
        n = p.numel()
        g = self._flat_grad(group, p, grads.dtype)
        if nb * bl != n:
            g = torch.cat([g, g.new_zeros(nb * bl - n)])
        g = g.view(nb, bl)
        exps = self._row_exp(st)
        stored = K.ring_write(grads, slot, g, exps)
        K.set_gram_row(gram, slot, K.gram_row(grads, stored, exps, exps[:, slot]))
        e = torch.zeros(nb, m, dtype=torch.float64, device=gram.device)
        e[:, slot] = 1.0
        a = K.coefficients(gram, e, group["damp"], s)
        return K.combine(grads, a, exps).reshape(-1)[:n]

    # -------------------------------------------------------------- diagnostics
    @torch.no_grad()
    def diagnostics(self) -> list[dict[str, Any]]:
        """One record per window: per param group in dense mode (``params``: indices over
        all groups of the parameters with state), per parameter in block mode.

        Each has ``group``, ``params``, ``step``, ``filled`` (gradients in the window,
        ``min(step, m)``), ``num_blocks``, and for the damped Fisher restricted to the
        window's span, over its blocks: ``fisher_max`` (largest eigenvalue of
        ``λ I + s G Gᵀ``), ``cond`` (its ratio to the smallest, at most
        ``1 + s ‖G‖² / λ``: how strongly the step is reshaped) and ``rank`` (eigenvalues of
        ``s G Gᵀ`` above ``λ``: directions where curvature dominates the damping). Reads
        device values: call it off the hot path.
        """
        out = []
        idx = 0
        for gi, group in enumerate(self.param_groups):
            m, lam = group["num_grads"], group["damp"]
            members = []
            for p in group["params"]:
                if self.state.get(p):
                    members.append((idx, p))
                idx += 1
            if not members:
                continue
            windows = (
                [members] if group["block_size"] is None else [[mp] for mp in members]
            )
            for win in windows:
                grams = [self.state[p]["gram"] for _, p in win]
                gram = torch.stack(grams).sum(0) if group["block_size"] is None else grams[0]
                t = max(int(self.state[p]["step"]) for _, p in win)
                s = 1.0 / (m if group["scale"] == "m" else max(min(t, m), 1))
                w = torch.linalg.eigvalsh(gram.reshape(-1, m, m)).clamp_min(0) * s
                out.append(
                    dict(
                        group=gi,
                        params=[i for i, _ in win],
                        step=t,
                        filled=min(t, m),
                        num_blocks=gram.reshape(-1, m, m).shape[0],
                        fisher_max=float(w.max() + lam),
                        cond=float(((w.max(dim=-1).values + lam) / lam).max()),
                        rank=int((w > lam).sum(dim=-1).max()),
                    )
                )
        return out

