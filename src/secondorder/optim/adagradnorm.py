r"""AdaGradNorm: AdaGrad with one step size per gradient *norm* instead of per coordinate.

**Scalar mode** (the method analysed by Lau, Liu & Kolar for adaptive batch sizes): the
whole gradient of a param group is one vector ``g_k``, and a single scalar accumulates its
squared norm::

    b_k² = b_0² + Σ_{t≤k} ‖g_t‖²,       w_{k+1} = w_k − lr · g_k / (b_k + eps)

With one param group (the default) this is one step size for the whole model. The state is
stored per parameter as that parameter's share ``Σ_t ‖g_{t,p}‖²`` of the sum (a 0-d tensor),
so ``b_k² = b_0² + Σ_p share_p`` exactly, checkpoints are ordinary per-parameter state and a
parameter whose gradient is ``None`` simply adds nothing that step.

**Row mode** (Ward, Wu & Bottou's per-output-row variant): every row ``r`` along dim 0 of a
tensor (for a ``Linear`` weight ``[out, in]``: one output unit) has its own accumulator
``b_{k,r}² = b_0² + Σ_t ‖g_{t}[r]‖²``. A 1-d tensor's rows are its elements (elementwise
AdaGrad for biases), a 0-d tensor is one row.

``weight_decay`` is classical L2: ``g ← g + wd·w`` before the statistics (as in
``torch.optim.Adagrad``).

**FSDP2 / HSDP shards** (DTensor parameters, rows cut along dim 0): row mode is local (a
row lives on one shard), so every shard's step is the single-process step of its rows.
In scalar mode a sharded parameter's squared norm is the sum of its shards' squared norms
(float64), completed by one all-reduce per step for all sharded parameters of a param
group; its share of ``b²`` is then the same on every shard, and a rank whose shard is empty
still takes part (and keeps the share). Parameters that are not sharded contribute their
own gradient, as in one process.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from .._validation import check_choice, check_float
from ..kernels import foreach as F
from ..placement.reduce import all_reduce_over_shards
from ._shard_state import ShardStateMixin, rows_to_global, rows_to_local
from .base import SecondOrderOptimizer

__all__ = ["AdaGradNorm"]

MODES = ("scalar", "row")


def _compute_dtype(p: torch.Tensor) -> torch.dtype:
    """float32 statistics and arithmetic, float64 for float64 parameters."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _by_dtype(tensors: list[torch.Tensor]) -> dict[torch.dtype, list[int]]:
    out: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        out.setdefault(t.dtype, []).append(i)
    return out


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, cols]``: rows along dim 0; a 1-d tensor's elements are rows."""
    # the column count spelled out: an empty shard (0 rows) has no -1 to infer
    return t.reshape(t.shape[0], math.prod(t.shape[1:])) if t.dim() >= 1 else t.reshape(1, 1)


class AdaGradNorm(ShardStateMixin, SecondOrderOptimizer):
    r"""AdaGrad-Norm: ``w ← w − lr · g / (√(b_0² + Σ_t ‖g_t‖²) + eps)``.

    Args:
        params: iterable of parameters or param-group dicts.
        lr: learning rate ``>= 0`` (the paper's ``α``). The step norm is at most ``lr`` in
            scalar mode, so ``lr`` is a length in parameter space (default 1.0).
        initial_accumulator: ``b_0² > 0``, the starting value of every accumulator.
        eps: added to ``b_k`` after the square root (``>= 0``).
        weight_decay: L2 coefficient ``>= 0`` added to the gradient.
        mode: ``"scalar"`` (one accumulator per param group) or ``"row"`` (one per row along
            dim 0 of each tensor).
        nonfinite: ``"skip"`` (default) or ``"raise"``; see
            :class:`~secondorder.optim.base.SecondOrderOptimizer`.
        foreach: ``True``: the elementwise work (weight decay, accumulators, the step) of
            all the group's tensors runs as multi-tensor ``torch._foreach_*`` calls;
            ``False``: one tensor at a time; ``None`` (default): multi-tensor when every
            tensor is on a CPU or CUDA device. Bit-identical results on the CPU. The
            squared norms are one reduction per tensor either way.

    **State** per parameter: ``step`` (0-d CPU tensor) and ``sum_sq`` (float32; float64 for
    float64 parameters): a 0-d tensor
    in scalar mode (this parameter's share of the group's sum), ``[rows]`` in row mode.
    For DTensor parameters ``state_dict`` saves row accumulators as DTensors of shape
    ``[rows]`` sharded like the rows (they load into any number of shards) and shares as
    plain numbers (the same on every shard).
    """

    _supports_dtensor = True  # scalar mode reduces over the shards (docs/distributed.md)
    # scalar mode's all-reduce needs every rank of a shard group, an empty shard's included
    _steps_empty_shards = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        initial_accumulator: float = 1e-2,
        eps: float = 1e-10,
        weight_decay: float = 0.0,
        mode: str = "scalar",
        *,
        nonfinite: str = "skip",
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            initial_accumulator=initial_accumulator,
            eps=eps,
            weight_decay=weight_decay,
            mode=mode,
            foreach=foreach,
        )
        super().__init__(params, defaults, nonfinite=nonfinite)

    # checkpoints of DTensor parameters: row accumulators as DTensors of shape (rows,),
    # laid out like the rows, so that they reshard
    def _state_out(self, group: dict[str, Any], pl: Any, key: str, v: Any) -> Any:
        return rows_to_global(v, pl) if key == "sum_sq" and group["mode"] == "row" else v

    def _state_in(self, group: dict[str, Any], pl: Any, key: str, v: Any) -> Any:
        return rows_to_local(v, pl, key) if key == "sum_sq" else v

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_float("lr", group["lr"], low=0.0)
        check_float("initial_accumulator", group["initial_accumulator"], low=0.0, low_open=True)
        check_float("eps", group["eps"], low=0.0)
        check_float("weight_decay", group["weight_decay"], low=0.0)
        check_choice("mode", group["mode"], MODES)
        F.check_foreach(group["foreach"])

    @staticmethod
    def _acc_shape(mode: str, p: torch.Tensor) -> tuple[int, ...]:
        return () if mode == "scalar" else (_rows(p).shape[0],)

    def _check_loaded_state(self, p: torch.Tensor, st: dict[str, Any]) -> None:
        super()._check_loaded_state(p, st)
        if not st:
            return
        if "sum_sq" not in st or "step" not in st:
            raise ValueError(
                f"AdaGradNorm state for a parameter of shape {tuple(p.shape)} lacks "
                f"{sorted({'sum_sq', 'step'} - st.keys())}: not an AdaGradNorm state dict"
            )
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        want = self._acc_shape(group["mode"], p)
        got = st["sum_sq"]
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != want:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise ValueError(
                f"AdaGradNorm state 'sum_sq' has shape {shape}, expected {want} for a parameter "
                f"of shape {tuple(p.shape)} with mode={group['mode']!r}: the state dict does "
                "not match these parameters or this mode"
            )

    def _update(self, work: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> None:
        for group, _ in work:  # checked before anything changes
            for p in group["params"]:
                st = self.state.get(p)
                if st and tuple(st["sum_sq"].shape) != self._acc_shape(group["mode"], p):
                    raise ValueError(
                        f"AdaGradNorm: a parameter has statistics of shape "
                        f"{tuple(st['sum_sq'].shape)} but mode={group['mode']!r} needs "
                        f"{self._acc_shape(group['mode'], p)}; mode cannot change during "
                        "training"
                    )
        for group, params in work:
            if not params:
                continue
            mode, lr, wd = group["mode"], group["lr"], group["weight_decay"]
            foreach = F.resolve_foreach(group["foreach"], params)
            for p in params:
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["sum_sq"] = torch.zeros(
                        self._acc_shape(mode, p), dtype=_compute_dtype(p), device=p.device
                    )
            states = [self.state[p] for p in params]
            F.add_steps_([st["step"] for st in states], foreach)
            accs = [st["sum_sq"] for st in states]
            grads = [p.grad.to(acc.dtype) for p, acc in zip(params, accs)]  # may be p.grad
            if wd != 0.0:
                grads = F.add(grads, [p.float() for p in params], wd, foreach)
            # squared norms in float64 (a float32 square overflows above ~1.8e19) and sums
            # saturated at the state dtype's largest value: finite gradients never make the
            # accumulator inf
            sqs = []
            for g in grads:
                if mode == "scalar":
                    sq = torch.linalg.vector_norm(g, dtype=torch.float64).square()
                else:
                    sq = torch.linalg.vector_norm(_rows(g), dim=1, dtype=torch.float64).square()
                sqs.append(sq)
            if mode == "scalar":  # a sharded tensor's norm: the sum over its shards
                all_reduce_over_shards(((self._placement(p), sq) for p, sq in zip(params, sqs)),
                                       "sum")  # fmt: skip
            sqs = [
                sq.clamp_(max=torch.finfo(acc.dtype).max).to(acc.dtype)
                for sq, acc in zip(sqs, accs)
            ]
            F.add_tensors_(accs, sqs, foreach)
            for dtype, idx in _by_dtype(accs).items():
                F.clamp_max_([accs[i] for i in idx], torch.finfo(dtype).max, foreach)
            if mode == "scalar":
                self._scalar_step(group, params, grads, lr, foreach)
            else:
                denoms = F.add_scalar(accs, group["initial_accumulator"], foreach)
                F.sqrt_(denoms, foreach)
                F.add_scalar_(denoms, group["eps"], foreach)
                rows = F.div_tensors([_rows(g) for g in grads],
                                     [d.unsqueeze(1) for d in denoms], foreach)  # fmt: skip
                steps = [r.view(p.shape).to(p.dtype) for p, r in zip(params, rows)]
                F.add_(params, steps, -lr, foreach)

    def _scalar_step(self, group, params, grads, lr, foreach) -> None:
        # b² over every parameter of the group that has state (also those without a
        # gradient this step: their past gradients count in the paper's sum).
        total = torch.zeros((), dtype=torch.float64, device=params[0].device)
        for q in group["params"]:
            st = self.state.get(q)
            if st:
                total = total + st["sum_sq"].to(total.device)
        scale = (total + group["initial_accumulator"]).sqrt_().add_(group["eps"]).reciprocal_()
        scaled = F.mul_tensors(grads, [scale.to(g.device, g.dtype) for g in grads], foreach)
        F.add_(params, [s.to(p.dtype) for p, s in zip(params, scaled)], -lr, foreach)

    # ------------------------------------------------------------- reporting
    @torch.no_grad()
    def diagnostics(self) -> list[dict[str, Any]]:
        """One record per param group: ``group``, ``mode``, ``step`` (largest step count),
        ``accumulator`` (``b_k²``; in row mode the smallest and largest over all rows as
        ``accumulator_min`` / ``accumulator_max``) and ``effective_lr`` (``lr / (b_k + eps)``;
        in row mode ``effective_lr_min`` / ``effective_lr_max``). A healthy run has an
        accumulator that grows ever more slowly; an effective lr collapsing towards 0 early
        means a few huge gradients dominate the sum. Reads device values: off the hot path."""
        out = []
        for i, group in enumerate(self.param_groups):
            states = [self.state[p] for p in group["params"] if self.state.get(p)]
            b0, eps, lr = group["initial_accumulator"], group["eps"], float(group["lr"])
            rec: dict[str, Any] = {"group": i, "mode": group["mode"]}
            rec["step"] = max((int(s["step"].item()) for s in states), default=0)
            if group["mode"] == "scalar":
                acc = b0 + sum(float(s["sum_sq"]) for s in states)
                rec["accumulator"] = acc
                rec["effective_lr"] = lr / (acc**0.5 + eps)
            else:
                rows = [s["sum_sq"].double() + b0 for s in states if s["sum_sq"].numel()]
                lo = min((float(r.min()) for r in rows), default=b0)
                hi = max((float(r.max()) for r in rows), default=b0)
                rec.update(accumulator_min=lo, accumulator_max=hi)
                rec["effective_lr_min"] = lr / (hi**0.5 + eps)
                rec["effective_lr_max"] = lr / (lo**0.5 + eps)
            out.append(rec)
        return out

