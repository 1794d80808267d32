"""Muon: momentum orthogonalised by Newton-Schulz for the hidden matrices, AdamW elsewhere.

For every hidden weight matrix (conv kernels flattened to ``(out, in * kh * kw)``):

1. ``M <- momentum * M + (1 - momentum) G`` (an EMA);
   ``nesterov=True`` (default) uses ``U = (1 - momentum) G + momentum * M``, else ``U = M``;
2. ``O = NS(U)``: ``ns_steps`` quintic Newton-Schulz steps (see
   :mod:`secondorder.kernels.newton_schulz`), an approximation of the orthogonal polar
   factor of ``U`` (all singular values about one). All hidden matrices of one shape (or
   its transpose) are stacked and orthogonalised in one batched call per step;
3. ``W <- (1 - lr wd) W - lr * c(m, n) * O`` with the shape factor ``c``:

   * ``scaling="rms"`` (default): ``c = 0.2 * sqrt(max(m, n))``. An ``m x n`` matrix with
     all singular values one has RMS ``1 / sqrt(max(m, n))``, so the update's RMS is
     ``0.2 * lr``, the typical RMS of an AdamW update. The same ``lr`` and weight decay as
     AdamW then work, and the AdamW-updated tensors share them;
   * ``scaling="spectral"``: ``c = sqrt(max(1, m / n))`` (fan-out over fan-in), which keeps
     the update's spectral norm proportional to ``sqrt(fan_out / fan_in)``; its ``lr`` is
     on another scale (about 0.02);
   * ``scaling="none"``: ``c = 1``.

Embeddings, the output layer and tensors with fewer than two dims are updated with AdamW
(``adamw_betas``, ``adamw_eps``, the group's ``lr`` and weight decay), equal to
``torch.optim.AdamW`` for gradients below 2**63 (see ``kernels.adamw``). A plain parameter
list (``role="auto"``) orthogonalises every tensor with >= 2 dims; :meth:`Muon.from_model`
(or :func:`secondorder.roles.muon_param_groups`) sends embeddings and the output layer to
AdamW, as Muon is meant to be used.

State: a float32 momentum buffer per hidden matrix, AdamW's two buffers elsewhere.

FSDP2 / HSDP (DTensor parameters, ``fully_shard``): the step is single-process Muon, bit
for bit. Everything but the orthogonalisation is elementwise and runs on each rank's rows
(state per shard, resharded by ``torch.distributed.checkpoint``); each sharded matrix's
momentum is gathered whole on one owner rank of its shard group, orthogonalised there
(batched with the owner's other matrices) and its rows sent back
(:func:`secondorder.placement.gather.apply_whole`; costs in docs/distributed.md).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._validation import check_bool, check_choice, check_float, check_int
from ..kernels import foreach as F
from ..kernels.newton_schulz import NS_DTYPES, newton_schulz, orthogonalize_many
from ..placement.gather import apply_whole
from ..roles import ROLES, muon_param_groups, resolve_role
from ._roles_base import ADAMW_KEYS, RoleOptimizer, check_adamw_hparams, scalar, state_dtype

SCALINGS = ("rms", "spectral", "none")


def shape_factor(scaling: str, rows: int, cols: int) -> float:
    """The factor ``c(rows, cols)`` of ``scaling`` (module docstring)."""
    if scaling == "rms":
        return 0.2 * math.sqrt(max(rows, cols))
    if scaling == "spectral":
        return math.sqrt(max(1.0, rows / cols))
    return 1.0


class Muon(RoleOptimizer):
    """Orthogonalised momentum for hidden matrices, AdamW elsewhere (module docstring).

    Args:
        params: parameters or param groups; a group's ``role`` (``"auto"``, ``"hidden"``,
            ``"embedding"``, ``"output"``, ``"vector"``) says how its tensors are updated:
            ``"hidden"`` with Muon, the others with AdamW.
        lr: learning rate (>= 0), shared by both parts.
        momentum: EMA coefficient of the momentum, in [0, 1).
        nesterov: Nesterov look-ahead (bool).
        ns_steps: Newton-Schulz steps (int >= 1).
        scaling: ``"rms"``, ``"spectral"`` or ``"none"`` shape factor.
        weight_decay: decoupled weight decay (>= 0), all roles.
        adamw_betas, adamw_eps: AdamW's ``betas`` / ``eps``.
        ns_dtype: dtype of the Newton-Schulz iteration (float32 or bfloat16).
        role: default role of groups that give none (``"auto"``).
        nonfinite: ``"skip"`` or ``"raise"`` on NaN/Inf gradients (see the base class).
        foreach: ``True``: the elementwise work (momentum, weight decay, the step, AdamW)
            runs as multi-tensor ``torch._foreach_*`` calls; ``False``: one tensor at a
            time; ``None`` (default): multi-tensor when every tensor is on a CPU or CUDA
            device. Bit-identical results on the CPU.
    """

    _role_state_keys = {
        "hidden": frozenset({"momentum_buffer"}),
        "embedding": ADAMW_KEYS,
        "output": ADAMW_KEYS,
        "vector": ADAMW_KEYS,
    }
    _model_groups = staticmethod(muon_param_groups)
    # FSDP2 / HSDP: momentum and AdamW per shard; each sharded matrix is orthogonalised
    # whole by one rank of its shard group (placement.gather), so a rank holding an empty
    # shard still takes part in the exchanges
    _supports_dtensor = True
    _steps_empty_shards = True

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        scaling: str = "rms",
        weight_decay: float = 0.0,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        ns_dtype: torch.dtype = torch.float32,
        role: str = "auto",
        *,
        nonfinite: str = "skip",
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, scaling=scaling,
            weight_decay=weight_decay, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
            ns_dtype=ns_dtype, role=role, foreach=foreach,
        )  # fmt: skip
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_float("lr", group["lr"], low=0.0)
        check_float("momentum", group["momentum"], low=0.0, high=1.0, high_open=True)
        check_bool("nesterov", group["nesterov"])
        check_int("ns_steps", group["ns_steps"], low=1)
        check_choice("scaling", group["scaling"], SCALINGS)
        check_float("weight_decay", group["weight_decay"], low=0.0)
        check_adamw_hparams(group)
        check_choice("ns_dtype", group["ns_dtype"], NS_DTYPES)
        check_choice("role", group["role"], ROLES)

    # -------------------------------------------------------------------- step
    def _directions(
        self, group: dict[str, Any], params: list[torch.Tensor], foreach: bool
    ) -> list[torch.Tensor]:
        """Step 1 for the hidden matrices ``params`` of ``group``: their (Nesterov) momenta
        ``U`` as ``(out, -1)`` matrices, the EMAs over all tensors at once (``foreach``)."""
        beta = scalar(group["momentum"])
        us, at, bufs = [], [], []  # at: indices of the tensors with a momentum buffer
        for i, p in enumerate(params):
            sd = state_dtype(p)
            us.append(p.grad if p.grad.dtype == sd else p.grad.to(sd))
            st = self.state[p]
            if beta > 0 or "momentum_buffer" in st:
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros(p.shape, dtype=sd, device=p.device)
                at.append(i)
                bufs.append(st["momentum_buffer"])
        gs = [us[i] for i in at]
        F.lerp_(bufs, gs, 1.0 - beta, foreach)
        for i, u in zip(at, F.lerp(gs, bufs, beta, foreach) if group["nesterov"] else bufs):
            us[i] = u
        return [u.reshape(self._matrix_shape(p, local=True)) for p, u in zip(params, us)]

    def _matrix_shape(self, p: torch.Tensor, local: bool = False) -> tuple[int, int]:
        """``(rows, cols)`` of the matrix Muon orthogonalises for ``p`` (``(out, -1)``): of
        the whole parameter, or with ``local`` of this rank's rows of it (a DTensor's shard;
        possibly no rows)."""
        pl = self._placement(p)
        shape = pl.global_shape if pl is not None else p.shape
        rows = shape[0]
        cols = shape.numel() // rows if rows else 0
        return (p.shape[0] if local else rows), cols

    def _update(self, work: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> None:
        # Muon matrices of all groups, batched by (ns_steps, ns_dtype) and then by shape.
        batches: dict[tuple[int, torch.dtype], list[tuple[dict[str, Any], torch.Tensor]]] = {}
        directions: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
        for group, params in work:
            hidden, vectors = [], []
            for p in params:
                (hidden if resolve_role(group["role"], p) == "hidden" else vectors).append(p)
            if hidden:
                key = (group["ns_steps"], group["ns_dtype"])
                batches.setdefault(key, []).extend((group, p) for p in hidden)
                directions.setdefault(key, []).extend(
                    self._directions(group, hidden, self._foreach(group, hidden))
                )
            self._adamw(group, vectors)
        # Step 3: tensors that share the decay factor and the step size (same group, same
        # shape factor) take the weight decay and the step in one multi-tensor call each.
        steps: dict[tuple[int, float], tuple[dict[str, Any], list[Any]]] = {}
        for key, entries in batches.items():
            # sharded matrices: orthogonalised whole by an owner rank, this rank's rows back
            items = [(u, self._placement(p)) for (_, p), u in zip(entries, directions[key])]
            ortho = apply_whole(
                items, lambda mats, key=key: orthogonalize_many(mats, *key), out_dtype=key[1]
            )
            for (group, p), o in zip(entries, ortho):
                c = shape_factor(group["scaling"], *self._matrix_shape(p))
                steps.setdefault((id(group), c), (group, []))[1].append((p, o))
        for (_, c), (group, pairs) in steps.items():
            lr, wd = scalar(group["lr"]), scalar(group["weight_decay"])
            params = [p for p, _ in pairs]
            foreach = self._foreach(group, params)
            targets = [p if p.dtype == state_dtype(p) else p.detach().to(state_dtype(p))
                       for p in params]  # fmt: skip
            if wd != 0:
                F.mul_(targets, 1.0 - lr * wd, foreach)
            F.add_(targets, [o.reshape(p.shape) for p, o in pairs], -lr * c, foreach)
            back = [(p, t) for p, t in zip(params, targets) if t is not p]
            F.copy_([p for p, _ in back], [t for _, t in back], foreach)

    # ------------------------------------------------------------- diagnostics
    @torch.no_grad()
    def diagnostics(self) -> list[dict[str, Any]]:
        """One record per parameter: ``param`` (index over all groups), ``role``, ``shape``,
        ``update`` (``"muon"`` or ``"adamw"``).

        Muon matrices add ``matrix`` (the 2-d shape orthogonalised), ``shape_factor`` and,
        once a momentum buffer exists, ``momentum_norm`` and ``sv_min`` / ``sv_max``: the
        extreme singular values of the Newton-Schulz output for the current momentum (what
        the last step applied, up to the newest gradient). Values near one mean a well
        orthogonalised update; a small ``sv_min`` means directions with almost no momentum
        (rank deficiency) that the iteration did not lift. AdamW tensors add ``step`` and
        ``exp_avg_sq_max``. Computes an SVD per matrix: call it off the hot path.

        On FSDP2 / HSDP shards ``shape`` is this rank's shard, ``matrix`` and
        ``shape_factor`` are the whole matrix's; a sharded matrix's singular values would
        need the whole matrix (a collective), so its record has ``sharded=True`` and
        ``shard_momentum_norm`` (the norm of this rank's rows of the momentum) instead of
        ``momentum_norm`` / ``sv_min`` / ``sv_max``. No communication.
        """
        out = []
        idx = 0
        for group in self.param_groups:
            for p in group["params"]:
                role = resolve_role(group["role"], p)
                if role != "hidden":
                    out.append(self._adamw_record(idx, role, p))
                    idx += 1
                    continue
                rows, cols = self._matrix_shape(p)
                rec = dict(param=idx, role=role, shape=tuple(p.shape), update="muon",
                           matrix=(rows, cols),
                           shape_factor=shape_factor(group["scaling"], rows, cols))  # fmt: skip
                buf = self.state.get(p, {}).get("momentum_buffer")
                pl = self._placement(p)
                if pl is not None and pl.sharded:
                    rec["sharded"] = True
                    if buf is not None:
                        rec["shard_momentum_norm"] = float(buf.norm())
                elif buf is not None and buf.numel():
                    o = newton_schulz(buf.reshape(rows, -1), group["ns_steps"], group["ns_dtype"])
                    sv = torch.linalg.svdvals(o.double())
                    rec.update(momentum_norm=float(buf.norm()), sv_min=float(sv.min()),
                               sv_max=float(sv.max()))  # fmt: skip
                out.append(rec)
                idx += 1
        return out
