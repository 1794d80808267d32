"""What SCALE and Muon share: parameter roles per param group, an AdamW part for the
tensors they do not treat as matrices, ``from_model``, state checks and ``state_bytes``.

State dtype: float32 for bfloat16/float16 parameters (their updates are computed in
float32 and rounded once into the parameter), the parameter's dtype otherwise.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
from torch import nn

from .._validation import check_float
from ..kernels import foreach as F
from ..kernels.adamw import adamw_foreach
from ..roles import ROLES, check_group_roles, resolve_role
from .base import SecondOrderOptimizer

ADAMW_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq"})


def state_dtype(p: torch.Tensor) -> torch.dtype:
    """float32 for low-precision parameters, else the parameter's own dtype."""
    return p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32


def scalar(x: Any) -> float:
    """A hyperparameter as a Python number: 1-element tensors (allowed for every real-valued
    hyperparameter, as torch.optim allows them for ``lr``) are read once per step."""
    return float(x) if isinstance(x, torch.Tensor) else x


def check_adamw_hparams(group: dict[str, Any]) -> None:
    betas = group["adamw_betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"adamw_betas must be a pair (beta1, beta2), got {betas!r}")
    check_float("adamw_betas[0]", betas[0], low=0.0, high=1.0, high_open=True)
    check_float("adamw_betas[1]", betas[1], low=0.0, high=1.0, high_open=True)
    check_float("adamw_eps", group["adamw_eps"], low=0.0, low_open=True)
    F.check_foreach(group["foreach"])


class RoleOptimizer(SecondOrderOptimizer):
    """Base of SCALE and Muon (see the module docstring)."""

    _param_shaped_keys = ("exp_avg", "exp_avg_sq", "momentum_buffer")
    #: per concrete role, the state keys a parameter may hold (an empty state is always ok)
    _role_state_keys: ClassVar[dict[str, frozenset[str]]] = {}

    @staticmethod
    def _model_groups(
        model: nn.Module, output: Any, embeddings: Any, adamw_lr: Any
    ) -> list[dict[str, Any]]:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---------------------------------------------------------------- building
    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        output: Any = None,
        embeddings: Any = (),
        adamw_lr: Any = None,
        **hparams: Any,
    ) -> RoleOptimizer:
        """Build the optimizer for ``model`` with its parameters split by role (see
        :mod:`secondorder.roles`). ``adamw_lr`` sets the lr of the groups updated by AdamW;
        the other keyword arguments go to the constructor."""
        return cls(cls._model_groups(model, output, embeddings, adamw_lr), **hparams)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Give each optimizer a ``from_model`` whose signature lists the constructor's
        hyperparameters (for ``help()`` and for tools, such as the bench, that check
        keyword arguments against it)."""
        super().__init_subclass__(**kwargs)
        base = RoleOptimizer.__dict__["from_model"].__func__

        def from_model(klass: type, model: nn.Module, *args: Any, **kw: Any) -> RoleOptimizer:
            return base(klass, model, *args, **kw)

        own = list(inspect.signature(base).parameters.values())[:-1]  # without **hparams
        init = list(inspect.signature(cls.__init__).parameters.values())[2:]  # self, params
        from_model.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            own + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in init]
        )
        from_model.__doc__ = base.__doc__
        from_model.__qualname__ = f"{cls.__qualname__}.from_model"
        cls.from_model = classmethod(from_model)  # type: ignore[method-assign,assignment]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_group_roles(group["role"], group["params"], type(self).__name__)
        except ValueError:
            self.param_groups.pop()
            raise

    # ------------------------------------------------------------------- AdamW
    def _foreach(self, group: dict[str, Any], tensors: list[torch.Tensor]) -> bool:
        """Whether ``group``'s elementwise work on ``tensors`` takes the multi-tensor path."""
        return F.resolve_foreach(group["foreach"], tensors)

    def _adamw(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """AdamW on ``params`` (all of ``group``), exactly as ``torch.optim.AdamW``."""
        if not params:
            return
        foreach = self._foreach(group, params)
        ps, gs, ms, vs, back = [], [], [], [], []
        for p in params:
            st = self.state[p]
            sd = state_dtype(p)
            if not st:
                st["step"] = torch.tensor(0.0)  # a CPU tensor, as torch.optim.AdamW keeps it
                st["exp_avg"] = torch.zeros(p.shape, dtype=sd, device=p.device)
                st["exp_avg_sq"] = torch.zeros(p.shape, dtype=sd, device=p.device)
            target = p if p.dtype == sd else p.detach().to(sd)
            if target is not p:
                back.append((p, target))
            ps.append(target)
            gs.append(p.grad if p.grad.dtype == sd else p.grad.to(sd))
            ms.append(st["exp_avg"])
            vs.append(st["exp_avg_sq"])
        steps = [self.state[p]["step"] for p in params]
        F.add_steps_(steps, foreach)
        ts = [float(t) for t in steps]  # CPU scalars: no device sync
        b1, b2 = (scalar(b) for b in group["adamw_betas"])
        adamw_foreach(
            ps, gs, ms, vs, ts, lr=scalar(group["lr"]), beta1=b1, beta2=b2,
            eps=scalar(group["adamw_eps"]), weight_decay=scalar(group["weight_decay"]),
            foreach=foreach,
        )  # fmt: skip
        F.copy_([p for p, _ in back], [t for _, t in back], foreach)

    # -------------------------------------------------------------- state dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As the base class; also rejects (``ValueError``, nothing changed) a checkpoint
        whose group roles do not fit this optimizer's parameters (e.g. ``"output"`` for a
        group of vectors)."""
        for saved, ours in zip(state_dict.get("param_groups", []), self.param_groups):
            role = saved.get("role", ours["role"])
            if role in ROLES and len(saved.get("params", [])) == len(ours["params"]):
                check_group_roles(role, ours["params"], type(self).__name__)
        super().load_state_dict(state_dict)

    def _role_of(self, p: torch.Tensor) -> str:
        for group in self.param_groups:
            if any(p is q for q in group["params"]):
                return resolve_role(group["role"], p)
        raise ValueError("state for a parameter that is in no param group")  # pragma: no cover

    def _check_loaded_state(self, p: torch.Tensor, st: dict[str, Any]) -> None:
        super()._check_loaded_state(p, st)
        if not st:
            return
        role = self._role_of(p)
        allowed = self._role_state_keys[role]
        if set(st) != allowed:
            raise ValueError(
                f"state {sorted(st)} of a parameter with role {role!r} is not a "
                f"{type(self).__name__} state (expected {sorted(allowed) or 'no state'})"
            )
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            if key in st and not (
                isinstance(st[key], torch.Tensor) and st[key].is_floating_point()
            ):
                raise ValueError(f"state {key!r} must be a floating-point tensor")

    # ------------------------------------------------------------- accounting

    def state_numel(self, per_element_only: bool = False) -> int:
        """Number of values held in state tensors; ``per_element_only=True`` counts only
        the buffers shaped like their parameter (not the AdamW step counters)."""
        return sum(
            v.numel() for st in self.state.values() for k, v in st.items()
            if isinstance(v, torch.Tensor) and (not per_element_only or k != "step")
        )  # fmt: skip

    def _adamw_record(self, idx: int, role: str, p: torch.Tensor) -> dict[str, Any]:
        st = self.state.get(p, {})
        v = st.get("exp_avg_sq")
        return dict(
            param=idx,
            role=role,
            shape=tuple(p.shape),
            update="adamw",
            step=int(st["step"]) if "step" in st else 0,
            exp_avg_sq_max=float(v.max()) if v is not None and v.numel() else None,
        )
