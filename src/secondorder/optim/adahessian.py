"""AdaHessian: Adam with the squared gradient replaced by a Hutchinson Hessian-diagonal
estimate. The estimator is :func:`secondorder.kernels.hutchinson.hutchinson_diag`; this
module orchestrates state, the refresh schedule and the training-loop protocol.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

from .._validation import check_betas, check_bool, check_float, check_int
from ..kernels import foreach as F
from ..kernels import hutchinson as H
from ..kernels.grafting import bias_correction
from .base import SecondOrderOptimizer

__all__ = ["AdaHessian"]


#: a Hessian-vector product that reaches weights whose storage was freed: in practice the
#: gathered weights of a module sharded by FSDP2 (freed after its backward)
_FREED_WEIGHTS = (
    "AdaHessian: the Hessian-vector product needs the weights of a module on the path from "
    "these parameters to the loss, but their storage was freed after backward (size 0): "
    "that module is sharded with fully_shard (FSDP2 frees its gathered weights after "
    "backward, and its gradients carry no graph). Keep every module between AdaHessian's "
    "parameters and the loss out of fully_shard. Parameters and state were left unchanged."
)


class AdaHessian(SecondOrderOptimizer):
    r"""AdaHessian (Yao et al., 2021): ``θ ← θ − lr · (m̂ / ((√v̂)^k + ε) + λ θ)``.

    ``m`` is the EMA of the gradient; ``v`` is the EMA of ``D̃²``, where ``D̃`` is a
    Hutchinson estimate ``z ⊙ Hz`` of the Hessian diagonal (Rademacher ``z``), made
    non-negative and averaged over groups of entries (``spatial_average``). Both EMAs are
    bias-corrected, the correction of ``v`` inside the power ``k``.

    **What it estimates.** For one probe, ``E[(z ⊙ Hz)_i²] = Σ_j H_ij²``: the RMS average
    ``√v̂`` converges to the *row norms* of the Hessian, not to ``|H_ii|`` (they agree
    only for a diagonal Hessian). This is what the authors' code computes; with
    ``n_probes = n`` the signed estimates are averaged first, so ``v̂`` tends to
    ``H_ii² + (Σ_{j≠i} H_ij²) / n``.

    **Training loop.** Hessian-vector products need the graph of the gradients: call
    ``loss.backward(create_graph=True)`` before ``step()``. The instance attribute
    ``create_graph`` says whether the *next* step needs it (``True`` on every refresh
    step: always with ``update_every=1``; with ``update_every=k`` only every k-th step,
    so the other steps can use a plain, cheaper ``backward()``)::

        loss.backward(create_graph=opt.create_graph)
        opt.step()
        opt.zero_grad(set_to_none=True)   # frees the graph the gradients hold

    ``step(closure)`` works too: the closure may call
    ``loss.backward(create_graph=opt.create_graph)`` itself, or only compute and return
    the loss (leaving every gradient ``None``), in which case ``step`` runs that backward.
    A refresh step whose gradients carry no graph raises ``RuntimeError`` naming the fix
    (nothing is modified); it never silently takes a wrong step. Every operation of the
    model must support double backward (e.g. use the math backend of
    ``scaled_dot_product_attention``); ``torch.compile``'d models cannot be differentiated
    twice. A gradient that carries no graph while others do means the loss is linear in
    that parameter: its Hessian rows are zero. Calling ``step()`` again on the gradients of
    the previous refresh (no new backward) does not refresh again (a warning).

    Args:
        params: iterable of parameters or param-group dicts.
        lr: learning rate (``>= 0``); the authors' default 0.15.
        betas: ``(β1, β2)``: EMA coefficients of the gradient and of ``D̃²``, in ``[0, 1)``.
        eps: ``ε > 0`` added to the denominator (default ``1e-4``, larger than Adam's).
        weight_decay: decoupled (AdamW-style) weight decay ``λ >= 0``: ``θ ← θ(1 − lr λ)``.
        hessian_power: ``k ∈ (0, 1]``; 1 is a Newton-like step, 1/2 an Adam-like one.
        spatial_average: ``"conv"`` (default: average over each ``kh × kw`` window of 4-d
            conv kernels, nothing for other tensors), ``"none"``, ``"row"`` (one value per
            output unit: average over all dims but the first) or an int ``b`` (contiguous
            blocks of ``b`` elements of the flattened tensor).
        abs_before_average: ``True`` (default) averages ``|z ⊙ Hz|``; ``False`` averages the
            signed estimate and takes ``|.|`` afterwards.
        update_every: refresh the Hessian estimate (and ``v``) every this many steps
            (``>= 1``); in between, ``v`` is reused unchanged and no Hessian-vector product
            is computed. ``v``'s bias correction counts refreshes.
        n_probes: Rademacher probes per refresh (``>= 1``), each one backward pass.
        seed: probes are drawn from generators seeded with ``(seed, step, parameter
            index, probe)``, so every process of a data-parallel job draws the same ``z``
            without communicating.
        foreach: ``None`` (default: as torch.optim, multi-tensor ``torch._foreach_*``
            updates when no parameter of the group is on the CPU; on the CPU the
            one-tensor-at-a-time loop, which reuses memory, measured faster), ``True`` or
            ``False`` to force a path; both give bit-identical results (tested).
        nonfinite: ``"skip"`` (default) or ``"raise"``, see
            :class:`~secondorder.optim.base.SecondOrderOptimizer`. A refresh step whose
            Hessian estimate is non-finite is skipped the same way (with a warning).
        process_group: ``None`` (default: one process, no communication) or a
            ``torch.distributed`` process group (e.g. ``torch.distributed.group.WORLD``)
            over which to run data parallel; see below.

    **Data parallel.** Hessian-vector products need the gradients' graph, which the usual
    wrappers do not keep: DDP fails on ``backward(create_graph=True)``, and FSDP2 makes a
    sharded parameter's gradient by a reduce-scatter outside autograd (no graph; it also
    frees the gathered weights after backward), so DTensor parameters are refused with a
    ``ValueError`` at construction. Instead, keep a whole copy of the model on every rank
    (same initial values, no wrapper), feed each rank its part of the batch and pass
    ``process_group``: each rank differentiates its own loss twice, then AdaHessian averages
    over the group the gradients (for ``m``; ``p.grad`` is left as it is) and the signed
    estimates ``z ⊙ Hz`` (the probes are the same on every rank), before ``|.|`` and the
    spatial averaging. With equal parts and a mean-reduced loss that is the global batch's
    gradient and estimate: every rank takes the step one process would take on the whole
    batch (up to the rounding of the sums), with one all-reduce of the gradients per step,
    one of the estimates per refresh and one of the non-finite flag (every rank skips, or
    none). Parameters of modules left out of ``fully_shard`` work when no sharded module
    lies between them and the loss; otherwise the Hessian-vector product reaches freed
    weights and the step raises ``RuntimeError`` saying so, changing nothing.

    **State** per parameter: ``step``, ``hessian_step`` (0-d CPU tensors: steps taken and
    refreshes done), ``exp_avg`` and ``exp_hessian_diag_sq`` (parameter-shaped, float32
    for bf16/fp16 parameters): 2 floats per parameter element, as Adam.
    """

    _param_shaped_keys = ("exp_avg", "exp_hessian_diag_sq")
    # weak references and a process group: not picklable, not state
    _transient_attrs = ("_used_grads", "process_group")

    def _dtensor_refusal(self, name: str) -> str:
        return (
            f"AdaHessian does not support DTensor (FSDP2 / HSDP) parameters, but {name} is "
            "one: its Hessian-vector products differentiate the gradients a second time, and "
            "FSDP2 produces a sharded parameter's gradient by a reduce-scatter outside autograd "
            "(it carries no graph, even after loss.backward(create_graph=True)) and frees the "
            "gathered weights after backward. Data parallel instead: keep a whole copy of the "
            "model on every rank, without a wrapper (DDP fails on "
            "backward(create_graph=True)), and pass AdaHessian(..., process_group=...), which "
            "averages gradients and Hessian estimates over the ranks; or keep the modules "
            "whose parameters AdaHessian steps, and every module between them and the loss, "
            "out of fully_shard (the sharded parameters then need another optimizer)"
        )

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.15,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        spatial_average: str | int = "conv",
        abs_before_average: bool = True,
        update_every: int = 1,
        n_probes: int = 1,
        seed: int = 0,
        *,
        foreach: bool | None = None,
        nonfinite: str = "skip",
        process_group: Any = None,
    ) -> None:
        if process_group is not None:
            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError(
                    "process_group: torch.distributed is not initialized; pass None (one "
                    "process) or a process group (e.g. torch.distributed.group.WORLD)"
                )
            if not isinstance(process_group, dist.ProcessGroup):
                raise TypeError(
                    "process_group must be None or a torch.distributed.ProcessGroup (e.g. "
                    f"torch.distributed.group.WORLD), got {type(process_group).__name__}"
                )
        self.process_group = process_group
        defaults = dict(
            foreach=foreach,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            hessian_power=hessian_power,
            spatial_average=spatial_average,
            abs_before_average=abs_before_average,
            update_every=update_every,
            n_probes=n_probes,
            seed=seed,
        )
        super().__init__(params, defaults, nonfinite=nonfinite)
        self._nonfinite_warned = False
        self._late_warned = False
        self._reuse_warned = False

    # ------------------------------------------------------------------ groups
    def _validate_group(self, group: dict[str, Any]) -> None:
        F.check_foreach(group.get("foreach"))
        check_float("lr", group["lr"], low=0.0)
        group["betas"] = check_betas(group["betas"], allow_beta2_one=False)
        check_float("eps", group["eps"], low=0.0, low_open=True)
        check_float("weight_decay", group["weight_decay"], low=0.0)
        check_float("hessian_power", group["hessian_power"], low=0.0, high=1.0, low_open=True)
        mode = group["spatial_average"]
        if isinstance(mode, bool) or not (
            (isinstance(mode, str) and mode in H.AVERAGE_MODES)
            or (isinstance(mode, int) and mode >= 1)
        ):
            raise ValueError(
                "spatial_average must be one of "
                f"{', '.join(map(repr, H.AVERAGE_MODES))} or an int block length >= 1; "
                f"got {mode!r}"
            )
        check_bool("abs_before_average", group["abs_before_average"])
        check_int("update_every", group["update_every"], low=1)
        check_int("n_probes", group["n_probes"], low=1)
        check_int("seed", group["seed"], low=0)

    def _check_loaded_state(self, p: torch.Tensor, st: dict[str, Any]) -> None:
        super()._check_loaded_state(p, st)
        missing = {"step", "hessian_step", "exp_avg", "exp_hessian_diag_sq"} - st.keys()
        if st and missing:
            raise ValueError(
                f"AdaHessian state for a parameter of shape {tuple(p.shape)} lacks "
                f"{sorted(missing)}: not an AdaHessian state dict"
            )

    # --------------------------------------------------------------- protocol
    def _group_step(self, group: dict[str, Any]) -> int:
        """Steps this group has taken (its parameters step together; the max guards
        against parameters that missed steps while their grad was None)."""
        steps = [int(self.state[p]["step"]) for p in group["params"] if self.state.get(p)]
        return max(steps, default=0)

    def _due(self, group: dict[str, Any]) -> bool:
        return self._group_step(group) % group["update_every"] == 0

    @property
    def create_graph(self) -> bool:
        """Whether the next ``step()`` refreshes the Hessian estimate, i.e. needs
        ``loss.backward(create_graph=True)``."""
        return any(self._due(g) for g in self.param_groups if g["params"])

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step; returns the closure's loss. See the class docstring for the protocol."""
        if closure is None:
            return super().step()

        def run() -> Any:
            loss = closure()
            if (
                isinstance(loss, torch.Tensor)
                and loss.requires_grad
                and all(p.grad is None for g in self.param_groups for p in g["params"])
            ):
                loss.backward(create_graph=self.create_graph)
            return loss

        return super().step(run)

    # -------------------------------------------------------------------- step
    def _init_state(self, p: torch.Tensor, st: dict[str, Any]) -> None:
        sdt = torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype
        st["step"] = torch.tensor(0.0)
        st["hessian_step"] = torch.tensor(0.0)
        st["exp_avg"] = torch.zeros_like(p, dtype=sdt, memory_format=torch.contiguous_format)
        st["exp_hessian_diag_sq"] = torch.zeros_like(
            p, dtype=sdt, memory_format=torch.contiguous_format
        )

    def _plan(
        self, work: list[tuple[dict[str, Any], list[torch.Tensor]]]
    ) -> list[tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor]]]:
        """Per group: the parameters to update and those whose estimate is refreshed.

        A group due for a refresh refreshes all its parameters. In a group that is not due,
        a parameter without any estimate yet (it joined the group late) is refreshed if its
        gradient carries a graph, else it waits for the group's next refresh (a warning).
        """
        plan = []
        for group, params in work:
            if not params:
                continue
            if self._due(group):
                plan.append((group, params, params))
                continue
            update, fresh = [], []
            for p in params:
                st = self.state.get(p)
                if st and int(st["hessian_step"]) > 0:
                    update.append(p)
                elif p.grad.requires_grad:
                    update.append(p)
                    fresh.append(p)
                elif not self._late_warned:
                    warnings.warn(
                        "AdaHessian: a parameter without a Hessian estimate yet got a gradient "
                        "without graph on a step that does not refresh its group; it is not "
                        "updated until the group's next refresh",
                        RuntimeWarning,
                        stacklevel=4,
                    )
                    self._late_warned = True
            if update:
                plan.append((group, update, fresh))
        return plan

    def _hessian_estimates(
        self, plan: list[tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor]]]
    ) -> dict[torch.Tensor, torch.Tensor] | None:
        """``D̃`` for every parameter to refresh (one set of backward passes for all of
        them); ``None`` if an estimate is non-finite. Raises before modifying anything
        when a refresh is due but the gradients carry no graph."""
        due = [(g, fresh) for g, _, fresh in plan if fresh]
        if not due:
            return {}
        grads = [p.grad for _, ps in due for p in ps]
        used = self.__dict__.get("_used_grads") or []
        if len(used) == len(grads) and all(r() is g for r, g in zip(used, grads)):
            # The very gradients of the last refresh (step() called again without a new
            # backward): their graph is spent and they carry no new curvature.
            if not self._reuse_warned:
                warnings.warn(
                    "AdaHessian: step() was called again on the gradients of the previous "
                    "Hessian refresh; the estimate is not refreshed (run a new "
                    "loss.backward(create_graph=True) before each refresh step)",
                    RuntimeWarning,
                    stacklevel=4,
                )
                self._reuse_warned = True
            return {}
        if not any(p.grad.requires_grad for _, ps in due for p in ps):
            raise RuntimeError(
                "AdaHessian needs the graph of the gradients on this step (a Hessian "
                "refresh), but the gradients have none: call "
                "loss.backward(create_graph=True) before step() (or "
                "loss.backward(create_graph=optimizer.create_graph)), or pass step() a "
                "closure that returns the loss. Parameters and state were left unchanged."
            )
        # Parameters are indexed over the whole optimizer (stable across steps/processes).
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        # Groups with the same seed, step and probe count share one set of backward passes.
        batches: dict[tuple[int, int, int], list[tuple[dict[str, Any], torch.Tensor]]] = {}
        for g, ps in due:
            key = (g["seed"], self._group_step(g), g["n_probes"])
            batches.setdefault(key, []).extend((g, p) for p in ps)
        out: dict[torch.Tensor, torch.Tensor] = {}
        keys = list(batches)
        for seed, step, n_probes in keys:
            members = batches[(seed, step, n_probes)]
            ps = [p for _, p in members]
            gens: dict[torch.device, torch.Generator] = {}
            probes = []
            for k in range(n_probes):
                zs = []
                for p in ps:
                    gen = gens.get(p.device)
                    if gen is None:
                        gen = gens[p.device] = torch.Generator(device=p.device)
                    gen.manual_seed(H.probe_seed(seed, step, index[p], k))
                    zs.append(H.rademacher(p, gen))
                probes.append(zs)
            # |z ⊙ Hz| straight from |Hz| when every member averages absolute values of
            # one probe (the default): the same numbers, one pass fewer
            absolute = n_probes == 1 and all(g["abs_before_average"] for g, _ in members)
            # (data parallel: signed, averaged over the ranks first, then |.|)
            absolute = absolute and self.__dict__.get("process_group") is None
            try:
                ests = H.hutchinson_diag(
                    ps, [p.grad for p in ps], probes=probes, retain_graph=True, absolute=absolute
                )
            except RuntimeError as err:
                if "storage of size 0" not in str(err):
                    raise
                raise RuntimeError(_FREED_WEIGHTS) from err
            ests = self._rank_mean(ests)  # data parallel: the global batch's estimate
            for (g, p), d in zip(members, ests):
                out[p] = H.spatial_average(
                    d, g["spatial_average"], g["abs_before_average"], nonnegative=absolute
                )
        self._used_grads = [weakref.ref(g) for g in grads]
        if not self._all_finite(list(out.values())):
            return None
        return out

    def _update(self, work: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> None:
        plan = self._plan(work)
        hess = self._hessian_estimates(plan)  # raises before anything is modified
        if hess is None:
            if self.nonfinite == "raise":
                raise FloatingPointError(
                    "AdaHessian: non-finite Hessian estimate (NaN or Inf); parameters and "
                    "optimizer state were left unchanged (nonfinite='raise')"
                )
            if not self._nonfinite_warned:
                warnings.warn(
                    "AdaHessian: non-finite Hessian estimate; the step was skipped "
                    "(counted in skipped_steps)",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._nonfinite_warned = True
            self.skipped_steps += 1
            return
        mine = [p for _, params, _ in plan for p in params]
        grads = dict(zip(mine, self._rank_mean([p.grad.detach() for p in mine])))
        for group, params, _ in plan:
            beta1, beta2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            step = self._group_step(group) + 1
            bc1 = bias_correction(beta1, step)
            ms, vs, gs, ds = [], [], [], []
            for p in params:
                st = self.state[p]
                if not st:
                    self._init_state(p, st)
                st["step"].fill_(step)
                ms.append(st["exp_avg"])
                gs.append(grads[p].to(st["exp_avg"].dtype))
                if p in hess:
                    st["hessian_step"] += 1
                    vs.append(st["exp_hessian_diag_sq"])
                    ds.append(hess[p].to(vs[-1].dtype))
            torch._foreach_lerp_(ms, gs, 1.0 - beta1)
            if vs:
                torch._foreach_mul_(vs, beta2)
                torch._foreach_addcmul_(vs, ds, ds, value=1.0 - beta2)
            if wd != 0.0:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            if self._use_foreach(group, params):
                self._apply_foreach(group, params, bc1)
            else:
                self._apply_per_tensor(group, params, bc1)

    _use_foreach = staticmethod(F.use_foreach_off_cpu)

    # ------------------------------------------------------------ data parallel
    def _rank_mean(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """With a ``process_group``: the mean of each tensor over its ranks (one all-reduce
        per dtype and device, new tensors); without: ``tensors`` themselves."""
        pg = self.__dict__.get("process_group")
        if pg is None or not tensors:
            return tensors
        world = dist.get_world_size(pg)
        out = list(tensors)
        by_kind: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i, t in enumerate(tensors):
            by_kind.setdefault((t.dtype, t.device), []).append(i)
        for idx in by_kind.values():
            flat = torch.cat([tensors[i].reshape(-1) for i in idx])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=pg)
            flat.div_(world)
            for i, piece in zip(idx, flat.split([tensors[i].numel() for i in idx])):
                out[i] = piece.view(tensors[i].shape)
        return out

    def _ranks_agree(self, finite: bool) -> bool:
        pg = self.__dict__.get("process_group")
        if pg is None:
            return finite
        dev = "cuda" if dist.get_backend(pg) == "nccl" else "cpu"
        flag = torch.tensor([1 if finite else 0], dtype=torch.int32, device=dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=pg)
        return bool(flag.item())

    def _apply_per_tensor(
        self, group: dict[str, Any], params: list[torch.Tensor], bc1: float
    ) -> None:
        """``p -= lr / bc1 · m / ((√(v / bc2))^k + ε)``, one tensor at a time."""
        beta2, k, eps, lr = group["betas"][1], group["hessian_power"], group["eps"], group["lr"]
        for p in params:
            st = self.state[p]
            bc2 = bias_correction(beta2, int(st["hessian_step"]))
            denom = st["exp_hessian_diag_sq"].div(bc2).sqrt_()
            if k != 1.0:
                denom.pow_(k)
            upd = st["exp_avg"].div(denom.add_(eps))
            p.add_(upd.to(p.dtype).view(p.shape), alpha=-lr / bc1)

    def _apply_foreach(self, group: dict[str, Any], params: list[torch.Tensor], bc1: float):
        """The same update as :meth:`_apply_per_tensor`, as multi-tensor operations."""
        beta2, k, eps, lr = group["betas"][1], group["hessian_power"], group["eps"], group["lr"]
        sts = [self.state[p] for p in params]
        bc2 = [bias_correction(beta2, int(st["hessian_step"])) for st in sts]
        denoms = torch._foreach_div([st["exp_hessian_diag_sq"] for st in sts], bc2)
        torch._foreach_sqrt_(denoms)
        if k != 1.0:
            torch._foreach_pow_(denoms, k)
        torch._foreach_add_(denoms, eps)
        upds = torch._foreach_div([st["exp_avg"] for st in sts], denoms)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, p in enumerate(params):
            by_dtype.setdefault(p.dtype, []).append(i)
        for dtype, idx in by_dtype.items():
            torch._foreach_add_(
                [params[i] for i in idx],
                [upds[i].to(dtype).view(params[i].shape) for i in idx],
                alpha=-lr / bc1,
            )

    # -------------------------------------------------------------- diagnostics
    @torch.no_grad()
    def diagnostics(self) -> list[dict[str, Any]]:
        """One record per parameter with state: ``param`` (index over all groups),
        ``shape``, ``step``, ``hessian_step`` (refreshes so far), ``hessian_rms_mean`` /
        ``hessian_rms_max`` (mean and max of the bias-corrected ``√v̂``, the curvature
        scale the step divides by) and ``update_rms`` (RMS of the last step's direction
        ``m̂ / ((√v̂)^k + ε)``, before ``lr``). Reads device values: call it off the hot
        path."""
        out = []
        idx = 0
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                st = self.state.get(p)
                if st:
                    t, th = int(st["step"]), int(st["hessian_step"])
                    rms = st["exp_hessian_diag_sq"].div(bias_correction(beta2, max(th, 1)))
                    rms = rms.sqrt_()
                    denom = rms.pow(group["hessian_power"]).add_(group["eps"])
                    direction = st["exp_avg"].div(bias_correction(beta1, max(t, 1))).div_(denom)
                    out.append(
                        dict(
                            param=idx,
                            shape=tuple(p.shape),
                            step=t,
                            hessian_step=th,
                            hessian_rms_mean=float(rms.mean()) if rms.numel() else 0.0,
                            hessian_rms_max=float(rms.max()) if rms.numel() else 0.0,
                            update_rms=float(direction.pow(2).mean().sqrt())
                            if direction.numel()
                            else 0.0,
                        )
                    )
                idx += 1
        return out

