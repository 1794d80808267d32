"""SCALE: column-normalised SGD with momentum only on the output layer.

A memory-lean optimizer for language models: most weight matrices take a plain stochastic
gradient step whose every output unit (row of the torch ``(out, in)`` weight) is rescaled to
a fixed size, so no per-element statistics are kept for them. Only the output layer keeps a
momentum buffer, and only tensors with fewer than two dims (biases, norm gains) use AdamW.
State: ``|output weight| + 2 * |vector params|`` numbers in per-element buffers (AdamW's is
``2 * |all params|``), plus AdamW's scalar step counter per vector tensor.

Per parameter, by role (see :mod:`secondorder.roles`), with ``lr`` and ``wd`` of its group:

* ``"hidden"``: ``U = G``, normalised per row (``axis=1``: over all dims but the first;
  conv kernels ``(out, in, kh, kw)`` per output channel);
* ``"embedding"``: ``U = G``, normalised per column (``axis=0``: over the vocabulary axis
  of a ``(vocab, width)`` table, so rare tokens' rows are not inflated);
* ``"output"``: ``M <- momentum * M + (1 - momentum) G`` (an EMA without bias correction:
  the normalisation makes the scale irrelevant), ``U = M``, normalised per row;
* then ``W <- (1 - lr wd) W - lr U / s`` with ``s`` the RMS of each row/column
  (``norm="rms"``: every normalised row has RMS one, so each row of the update has RMS
  exactly ``lr``) or its Euclidean norm (``norm="l2"``), clamped below at ``eps``;
* ``"vector"``: AdamW with ``adamw_betas``, ``adamw_eps``, the group's ``lr`` and ``wd``
  (equal to ``torch.optim.AdamW`` for gradients below 2**63, see ``kernels.adamw``).

A plain parameter list (``role="auto"``, the default) treats every tensor with >= 2 dims as
``"hidden"`` and the rest as ``"vector"``: no output-layer momentum and no embedding axis.
Use :meth:`SCALE.from_model` (or :func:`secondorder.roles.scale_param_groups`) to get all
roles; ``adamw_lr`` then gives the AdamW tensors their own learning rate (their own group).

The update is invariant to the scale of the loss (up to the ``eps`` clamp); a normalised
step of constant size does not converge to a point with a constant ``lr``: use a decaying
schedule, as with any normalised method.

**FSDP2 / HSDP shards** (DTensor parameters, rows cut along dim 0): per-row scales, the
momentum and AdamW are local to each shard (bit for bit the single-process values of its
rows). A per-column scale (``"embedding"``) sums over all rows: each shard's column sums
of squares (float64) are added up by one all-reduce per param group and step, for all the
group's sharded embedding tables, and divided by the whole row count; a rank whose shard is
empty still takes part.
"""

from __future__ import annotations

from typing import Any

import torch

from .._validation import check_choice, check_float
from ..kernels import foreach as F
from ..kernels.normalize import (
    NORMS,
    normalization_scale,
    scale_from_sum_of_squares,
    sum_of_squares,
)
from ..placement.reduce import all_reduce_over_shards
from ..roles import ROLES, resolve_role, scale_param_groups
from ._roles_base import ADAMW_KEYS, RoleOptimizer, check_adamw_hparams, scalar, state_dtype

_AXIS = {"hidden": 1, "output": 1, "embedding": 0}


class SCALE(RoleOptimizer):
    """Column-normalised SGD, last-layer momentum, AdamW for vectors (module docstring).

    Args:
        params: parameters or param groups; a group's ``role`` (``"auto"``, ``"hidden"``,
            ``"embedding"``, ``"output"``, ``"vector"``) says how its tensors are updated.
        lr: learning rate (>= 0): the RMS of every row of a normalised update.
        momentum: EMA coefficient of the output layer's momentum, in [0, 1).
        weight_decay: decoupled weight decay (>= 0), ``W <- (1 - lr wd) W``, all roles.
        norm: ``"rms"`` (default) or ``"l2"`` row normalisation.
        eps: lower clamp of the row scale (> 0).
        adamw_betas, adamw_eps: AdamW's ``betas`` / ``eps`` for ``"vector"`` tensors.
        role: default role of groups that give none (``"auto"``).
        nonfinite: ``"skip"`` or ``"raise"`` on NaN/Inf gradients (see the base class).
        foreach: ``True``: the elementwise work (momentum, weight decay, the step, AdamW)
            runs as multi-tensor ``torch._foreach_*`` calls over the group's tensors;
            ``False``: one tensor at a time; ``None`` (default): multi-tensor when every
            tensor is on a CPU or CUDA device. Bit-identical results on the CPU.
    """

    _role_state_keys = {
        "hidden": frozenset(),
        "embedding": frozenset(),
        "output": frozenset({"momentum_buffer"}),
        "vector": ADAMW_KEYS,
    }
    _model_groups = staticmethod(scale_param_groups)
    _supports_dtensor = True  # per-column scales reduce over the shards (docs/distributed.md)
    # the column scales' all-reduce needs every rank of a shard group, empty shards included
    _steps_empty_shards = True

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        norm: str = "rms",
        eps: float = 1e-8,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        role: str = "auto",
        *,
        nonfinite: str = "skip",
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, norm=norm, eps=eps,
            adamw_betas=adamw_betas, adamw_eps=adamw_eps, role=role, foreach=foreach,
        )  # fmt: skip
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_float("lr", group["lr"], low=0.0)
        check_float("momentum", group["momentum"], low=0.0, high=1.0, high_open=True)
        check_float("weight_decay", group["weight_decay"], low=0.0)
        check_choice("norm", group["norm"], NORMS)
        check_float("eps", group["eps"], low=0.0, low_open=True)
        check_adamw_hparams(group)
        check_choice("role", group["role"], ROLES)

    # -------------------------------------------------------------------- step
    def _update(self, work: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> None:
        for group, params in work:
            normalised, vectors = [], []
            for p in params:
                role = resolve_role(group["role"], p)
                (vectors if role == "vector" else normalised).append((p, role))
            self._normalised(group, normalised)
            self._adamw(group, [p for p, _ in vectors])

    def _normalised(self, group: dict[str, Any], items: list[tuple[torch.Tensor, str]]) -> None:
        """The normalised update of ``items`` (``(param, role)``, none a vector) of ``group``:
        the momentum EMAs, the weight decay and the final step run over all tensors at once
        (multi-tensor) or one at a time (``foreach``); the row scales per tensor."""
        if not items:
            return
        lr, wd = scalar(group["lr"]), scalar(group["weight_decay"])
        beta, eps = scalar(group["momentum"]), scalar(group["eps"])
        foreach = self._foreach(group, [p for p, _ in items])
        us, bufs, buf_grads, targets, back = [], [], [], [], []
        for p, role in items:
            sd = state_dtype(p)
            u = p.grad if p.grad.dtype == sd else p.grad.to(sd)
            # every stepped tensor gets a state entry, empty unless it is the output layer:
            # checkpoints then list it, as torch.distributed.checkpoint's loader requires
            st = self.state[p]
            if role == "output" and (beta > 0 or "momentum_buffer" in st):
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros(p.shape, dtype=sd, device=p.device)
                bufs.append(st["momentum_buffer"])
                buf_grads.append(u)
                u = st["momentum_buffer"]
            us.append(u)
            target = p if p.dtype == sd else p.detach().to(sd)
            if target is not p:
                back.append((p, target))
            targets.append(target)
        F.lerp_(bufs, buf_grads, 1.0 - beta, foreach)
        scales = self._scales(group, items, us, eps)
        if wd != 0:
            F.mul_(targets, 1.0 - lr * wd, foreach)
        F.addcdiv_(targets, us, scales, -lr, foreach)
        F.copy_([p for p, _ in back], [t for _, t in back], foreach)

    def _scales(
        self,
        group: dict[str, Any],
        items: list[tuple[torch.Tensor, str]],
        us: list[torch.Tensor],
        eps: float,
    ) -> list[torch.Tensor]:
        """The row / column scales of the directions ``us``. Columns of sharded tensors sum
        over the shards: one all-reduce for all of them (module docstring)."""
        scales: list[Any] = []
        partial = []
        for u, (p, role) in zip(us, items):
            axis = _AXIS[role]
            pl = self._placement(p) if axis == 0 else None
            if pl is not None and pl.sharded:
                sq = sum_of_squares(u, axis)
                partial.append((pl, sq))
                scales.append((sq, pl.global_shape[0], u.dtype))
            else:
                scales.append(normalization_scale(u, axis, group["norm"], eps))
        if not partial:
            return scales
        all_reduce_over_shards(partial, "sum")
        return [
            scale_from_sum_of_squares(*s[:2], group["norm"], eps, s[2])
            if isinstance(s, tuple)
            else s
            for s in scales
        ]

    # ------------------------------------------------------------- diagnostics
    @torch.no_grad()
    def diagnostics(self) -> list[dict[str, Any]]:
        """One record per parameter: ``param`` (index over all groups), ``role``, ``shape``,
        ``update`` (``"normalised"`` or ``"adamw"``), ``state_numel``.

        Normalised tensors add ``axis`` (1: per row, 0: per column) and, when a gradient is
        present, ``scale_min`` / ``scale_max`` (smallest and largest row scale ``s`` of the
        direction the next step would normalise) and ``clamped`` (rows whose scale is at
        the ``eps`` clamp: they receive a scaled-down or no update; many of them mean dead
        units or an ``eps`` too large). AdamW tensors add ``step`` and ``exp_avg_sq_max``.
        On FSDP2 / HSDP shards every record describes this rank's shard, without
        communicating (a per-column scale then covers this shard's rows only).
        Reads device values: call it off the hot path.
        """
        out = []
        idx = 0
        for group in self.param_groups:
            for p in group["params"]:
                role = resolve_role(group["role"], p)
                st = self.state.get(p, {})
                numel = sum(v.numel() for v in st.values() if isinstance(v, torch.Tensor))
                if role == "vector":
                    rec = self._adamw_record(idx, role, p)
                else:
                    rec = dict(param=idx, role=role, shape=tuple(p.shape), update="normalised",
                               axis=_AXIS[role])  # fmt: skip
                    u = st.get("momentum_buffer", p.grad)
                    if u is not None and u.numel():
                        s = normalization_scale(u.float(), _AXIS[role], group["norm"], 1e-30)
                        rec.update(
                            scale_min=float(s.min()), scale_max=float(s.max()),
                            clamped=int((s <= scalar(group["eps"])).sum()),
                        )  # fmt: skip
                rec["state_numel"] = numel
                out.append(rec)
                idx += 1
        return out
