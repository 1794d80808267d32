"""MKOR: Kronecker-factored preconditioning with rank-1 Sherman-Morrison factor updates.

MKOR (Mozaffari et al., NeurIPS 2023) preconditions every ``nn.Linear`` and ``nn.Conv2d``
layer of a model like K-FAC, ``G -> P_L G P_R`` with ``G = [dW | db]``, but it never forms
or inverts a covariance: it keeps the *inverse* factors ``P_L`` (outputs) and ``P_R``
(inputs, plus one for the bias) and updates them every ``inv_freq`` steps with one
Sherman-Morrison rank-1 step each, from the batch-mean output gradient ``g`` and the
batch-mean layer input ``a`` (recorded by hooks on the model). That costs ``O(d^2)`` per
factor instead of an ``O(d^3)`` inversion. The preconditioned gradient is rescaled to the
gradient's norm (``||dW|| + ||db||``) and handed to a first-order *base* optimizer (SGD with
momentum 0.9 by default, or any ``torch.optim`` optimizer class), which supplies momentum,
weight decay and the learning rate. Parameters outside a handled layer go to the base
optimizer unchanged. Whatever MKOR hands the base is saturated at ``±2**63`` (float32 /
bfloat16), so that a base that squares gradients cannot overflow (values below the bound
are untouched), and the norm-preserving rescale is computed on gradients brought into
range by an exact power of two, so that it works for gradients of any size. The math is
in :mod:`secondorder.kernels.mkor`; ``docs/mkor.md`` explains it.

Two update rules (``variant``):

* ``"official"`` (default, as the authors' released code): ``M = d P + (1 - d) I``, then
  ``P <- (M^-1 + v v^T)^-1``. If an entry of a new factor exceeds ``stabilizer_threshold``
  in magnitude, both factors of the layer are reset at their next update (instead of the
  rank-1 step) to ``(1 - s) P + s I`` with ``s = stabilizer_blend`` (default 1: the
  identity, what the released code does).
* ``"paper"``: the exact inverse of the moving average ``d P^-1 + (1 - d) v v^T``; a factor
  whose largest entry exceeds the threshold is blended towards the identity at once
  (default ``s = 0.1``).

The first factor update of a layer sets both factors to the identity (so the first step is
plain base-optimizer work). With ``hybrid_window=w > 0``, MKOR watches the loss (from
``step(closure)`` or :meth:`MKOR.record_loss`) and, once the mean loss of the last ``w``
steps improves on the ``w`` before by a relative amount below ``hybrid_tol``, switches
preconditioning off for good (the "MKOR-H" idea: finish with the first-order base).

Construction: ``MKOR(model, lr=...)``, ``MKOR.from_model(model, ...)`` or
``MKOR(params, model=model)`` (param groups; layers whose weight is in a group are
preconditioned with that group's settings). Given parameters and no model, MKOR warns and
every parameter falls back to the base optimizer.

State per preconditioned layer (on its weight): ``left`` (m x m) and ``right`` (n x n)
factors in ``factor_dtype`` (the identity from the layer's first step on), the pending-reset
flags and counters of rank-1 updates and resets; per parameter: ``step`` and ``base`` (the
base optimizer's own state).

**Data parallel: DDP, FSDP2 / HSDP.** The hooks see this rank's part of the batch, so on
every factor-update step the recorded statistics (sums of ``a`` and ``g`` and their pass
counts, all layers in one buffer) are summed over the data-parallel ranks -- the process
group of a ``DistributedDataParallel`` model, or every rank of the DTensor parameters'
device mesh (both dimensions under HSDP) -- so each rank folds the global batch's means
into the same factors, as one process on the whole batch would. On FSDP2 / HSDP a layer's
weight (and bias) holds only this rank's rows, but the left factor mixes rows. Each sharded
layer therefore has one *owner* rank in its shard group (greedy balancing of the product's
cost over the layers' global shapes: the same on every rank, fixed for the run), and only
the owner keeps and updates its factors. Every step the gradient matrices ``[dW | db]``
travel to their owners, are preconditioned whole with the same arithmetic as in one
process (``P_L G P_R`` and the norm rescale) and each rank gets its rows back
(:func:`secondorder.placement.gather.apply_whole`: two all-to-alls); each rank hands its
rows to the base optimizer, whose state is per shard. Under HSDP the replicas of a shard do
the same. Unsharded layers keep their factors on every rank. All DTensor parameters must
share one mesh; a layer whose
weight and bias are laid out differently falls back to the base optimizer. With
``hybrid_window``, the loss windows are averaged over the ranks, so all switch together.
See ``docs/distributed.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import warnings
from collections.abc import Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

try:
    from torch.nn.parallel import DistributedDataParallel
except ImportError:  # pragma: no cover - builds without distributed support
    DistributedDataParallel = ()  # type: ignore[assignment,misc]

from .._validation import (
    check_betas,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_unsupported_flags,
)
from ..kernels import mkor as K
from ..kernels import pow2
from ..kernels.adamw import saturation
from ..placement import is_dtensor
from ..placement.ddp import assign_blocks
from ..placement.gather import apply_whole
from . import _mkor_dist as D
from .base import SecondOrderOptimizer

BASES: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}
VARIANT_NAMES = ("official", "paper")
FACTOR_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
#: torch.optim flags: constructor-level for the base optimizer, never per-group values here
_TORCH_FLAGS = ("maximize", "foreach", "capturable", "differentiable", "fused")
_OWN_KEYS = ("variant", "inv_freq", "factor_decay", "stabilizer_threshold", "stabilizer_blend",
             "clip", "warmup_steps", "factor_dtype", "precondition", "base_optimizer")  # fmt: skip
_STATE_KEYS = {"step", "base", "left", "right", "reset_left", "reset_right", "counts"}
_DEFAULT_BLEND = {"official": 1.0, "paper": 0.1}
#: the per-layer state only the rank that preconditions a sharded layer keeps
_FACTOR_KEYS = ("left", "right", "reset_left", "reset_right", "counts")


@dataclass(eq=False)
class _Layer:
    """A preconditioned layer: its module, parameters and factor sizes."""

    name: str
    module: nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None
    group: int  # index of the param group holding the weight (and bias)
    geometry: K.ConvGeometry | None  # None for nn.Linear

    @property
    def out_dim(self) -> int:
        return self.weight.shape[0]

    @property
    def in_dim(self) -> int:  # columns of [W | b]
        return math.prod(self.weight.shape[1:]) + (self.bias is not None)


class _BaseState(MutableMapping):
    """The base optimizer's ``state``: a view of ``mkor.state[p]["base"]``, so that MKOR's
    state dict holds both optimizers' state and round-trips it."""

    def __init__(self, owner: MKOR) -> None:
        self.owner = owner

    def __getitem__(self, p: torch.Tensor) -> dict[str, Any]:
        return self.owner.state[p].setdefault("base", {})

    def __setitem__(self, p: torch.Tensor, value: dict[str, Any]) -> None:
        self.owner.state[p]["base"] = value

    def __delitem__(self, p: torch.Tensor) -> None:
        del self.owner.state[p]["base"]

    def __contains__(self, p: object) -> bool:
        return p in self.owner.state and "base" in self.owner.state[p]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (p for p, st in self.owner.state.items() if "base" in st)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _resolve_base(base: Any) -> type[torch.optim.Optimizer]:
    if isinstance(base, str):
        if base.lower() not in BASES:
            raise ValueError(
                f"base must be one of {', '.join(map(repr, BASES))} or a torch.optim.Optimizer "
                f"subclass; got {base!r}"
            )
        return BASES[base.lower()]
    if isinstance(base, type) and issubclass(base, torch.optim.Optimizer):
        if issubclass(base, SecondOrderOptimizer):
            raise TypeError(f"base must be a first-order torch.optim optimizer, got {base}")
        return base
    raise TypeError(
        "base must be 'sgd', 'adam', 'adamw' or a torch.optim.Optimizer subclass (the class, "
        f"with its settings as keyword arguments of MKOR), got {type(base).__name__}"
    )


def _probe_param() -> torch.Tensor:
    return torch.zeros(1, requires_grad=True)


class MKOR(SecondOrderOptimizer):
    """MKOR over a model's ``nn.Linear``/``nn.Conv2d`` layers; see the module docstring.

    Args:
        params: the model (an ``nn.Module``), or parameters / param groups (then pass
            ``model=`` to precondition its layers; without it everything falls back).
        lr, momentum, weight_decay: the base optimizer's (``momentum=None``: 0.9 for SGD,
            the base's own default otherwise; a base without momentum rejects a value).
        model: the model whose layers to precondition, when ``params`` are parameters.
        base: ``"sgd"`` | ``"adam"`` | ``"adamw"`` | a ``torch.optim.Optimizer`` subclass.
        variant: ``"official"`` | ``"paper"`` (factor update and stabiliser rule).
        inv_freq: factor-update period (steps); statistics are only recorded then.
        factor_decay: ``d`` of the update rules, in (0, 1).
        stabilizer_threshold: reset a factor whose largest entry exceeds this.
        stabilizer_blend: weight of the identity in a reset, in (0, 1]; ``None``: 1.0 for
            ``"official"``, 0.1 for ``"paper"``.
        clip: statistics entries are clamped to ``[-clip, clip]``.
        warmup_steps: update the factors every step during the first ``warmup_steps``.
        factor_dtype: storage dtype of the factors (computed in float32 or float64).
        precondition: ``False`` for a group sends its layers to the base optimizer.
        exclude: layer names (as in ``named_modules``) or modules to leave to the base.
        max_factor_dim: layers with a factor larger than this fall back (memory d^2).
        hybrid_window, hybrid_tol: the switch to the base optimizer (0: off).
        nonfinite: ``"skip"`` | ``"raise"`` (see :class:`SecondOrderOptimizer`).
        **base_kwargs: any other hyperparameter of the base optimizer (``betas=``,
            ``nesterov=``, ...); each becomes a per-group hyperparameter of MKOR. torch.optim
            flags (``foreach``, ``fused``) go to the base's constructor.
    """

    _transient_attrs = ("_base_opt", "_stats", "_mesh")
    _supports_dtensor = True  # see "Data parallel" in the module docstring
    _steps_empty_shards = True  # every rank joins the collectives of every layer

    def __init__(
        self,
        params: nn.Module | Iterable[Any],
        lr: float = 0.01,
        momentum: float | None = None,
        weight_decay: float = 0.0,
        *,
        model: nn.Module | None = None,
        base: str | type[torch.optim.Optimizer] = "sgd",
        variant: str = "official",
        inv_freq: int = 10,
        factor_decay: float = 0.95,
        stabilizer_threshold: float = 2.0,
        stabilizer_blend: float | None = None,
        clip: float = 100.0,
        warmup_steps: int = 0,
        factor_dtype: torch.dtype = torch.float32,
        precondition: bool = True,
        exclude: Iterable[str | nn.Module] = (),
        max_factor_dim: int = 8192,
        hybrid_window: int = 0,
        hybrid_tol: float = 1e-3,
        nonfinite: str = "skip",
        **base_kwargs: Any,
    ) -> None:
        if isinstance(params, nn.Module):
            if model is not None and model is not params:
                raise ValueError("model: given twice (as params and as model=), differently")
            model, params = params, params.parameters()
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
        self.max_factor_dim = check_int("max_factor_dim", max_factor_dim, low=1)
        self.hybrid_window = check_int("hybrid_window", hybrid_window, low=0)
        self.hybrid_tol = check_float("hybrid_tol", hybrid_tol)
        self._base_cls = _resolve_base(base)
        self._base_flags = {k: base_kwargs.pop(k) for k in _TORCH_FLAGS if k in base_kwargs}
        check_unsupported_flags(self._base_flags, (), "MKOR")
        sig = inspect.signature(self._base_cls.__init__).parameters
        self._base_bool_keys = {k for k, p in sig.items() if isinstance(p.default, bool)}
        for key, value in base_kwargs.items():
            self._check_base_value(key, value)
        base_defaults = self._base_defaults(base_kwargs)
        defaults: dict[str, Any] = {**base_defaults, "lr": lr}
        if "weight_decay" in base_defaults:
            defaults["weight_decay"] = weight_decay
        elif weight_decay != 0:
            raise ValueError(f"weight_decay: base {self._base_cls.__name__} has no weight_decay")
        if momentum is None:
            if self._base_cls is torch.optim.SGD:
                defaults["momentum"] = 0.9
        elif "momentum" in base_defaults:
            defaults["momentum"] = momentum
        else:
            raise ValueError(
                f"momentum: base {self._base_cls.__name__} has no momentum hyperparameter "
                f"(its hyperparameters: {', '.join(base_defaults)})"
            )
        self._base_keys = tuple(defaults)
        defaults.update(
            variant=variant, inv_freq=inv_freq, factor_decay=factor_decay,
            stabilizer_threshold=stabilizer_threshold, stabilizer_blend=stabilizer_blend,
            clip=clip, warmup_steps=warmup_steps, factor_dtype=factor_dtype,
            precondition=precondition, base_optimizer=self._base_cls.__name__,
        )  # fmt: skip
        exclude = self._check_exclude(exclude, model)
        self._warned: set[str] = set()
        self.model = model
        super().__init__(params, defaults, nonfinite=nonfinite)
        self.fallbacks: dict[str, str] = {}  # layer name -> why it is not preconditioned
        self._layers = self._find_layers(model, exclude) if model is not None else []
        self._layer_of = {layer.module: i for i, layer in enumerate(self._layers)}
        self._handles = [
            layer.module.register_forward_hook(self._forward_hook) for layer in self._layers
        ]
        self._hybrid = {"losses": [], "switched_at": None}
        self._after_load_state_dict()
        self._data_parallel()  # several meshes: ValueError now, not at the first step

    @classmethod
    def from_model(cls, model: nn.Module, **hparams: Any) -> MKOR:
        """``MKOR(model, **hparams)``: the construction ``secondorder bench`` uses."""
        return cls(model, **hparams)

    # ------------------------------------------------------------------ construction
    def _base_defaults(self, base_kwargs: dict[str, Any]) -> dict[str, Any]:
        try:
            probe = self._base_cls([_probe_param()], **base_kwargs, **self._base_flags)
        except TypeError as e:
            if "lr" not in str(e):
                raise TypeError(f"{self._base_cls.__name__} (the base optimizer): {e}") from e
            probe = self._base_cls([_probe_param()], lr=1e-3, **base_kwargs, **self._base_flags)
        except ValueError as e:
            raise ValueError(f"{self._base_cls.__name__} (the base optimizer): {e}") from e
        if "lr" not in probe.defaults:
            raise ValueError(f"base: {self._base_cls.__name__} has no lr hyperparameter")
        # Only what the constructor accepts (AdamW's defaults hold a fixed
        # ``decoupled_weight_decay`` that its constructor does not take).
        sig = inspect.signature(self._base_cls.__init__).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.values())
        return {
            k: v
            for k, v in probe.defaults.items()
            if k not in _TORCH_FLAGS and (takes_any or k in sig)
        }

    @staticmethod
    def _check_exclude(exclude: Any, model: nn.Module | None) -> list[Any]:
        if isinstance(exclude, (str, nn.Module)) or not isinstance(exclude, Iterable):
            raise TypeError(
                f"exclude must be a list of layer names or modules, got {type(exclude).__name__}"
            )
        exclude = list(exclude)
        if exclude and model is None:
            raise ValueError("exclude: names layers of a model, but no model was given")
        names = dict(model.named_modules()) if model is not None else {}
        for e in exclude:
            if isinstance(e, str):
                if e not in names:
                    raise ValueError(f"exclude: no layer named {e!r} in the model")
            elif not isinstance(e, nn.Module):
                raise TypeError(f"exclude: entries are layer names or modules, got {e!r:.60}")
        return exclude

    def _find_layers(self, model: nn.Module, exclude: list[Any]) -> list[_Layer]:
        where = {p: gi for gi, g in enumerate(self.param_groups) for p in g["params"]}
        excluded = {e for e in exclude if isinstance(e, nn.Module)}
        excluded |= {m for n, m in model.named_modules() if n in exclude}
        layers, seen, found = [], set(), False
        for name, mod in model.named_modules():
            if not isinstance(mod, (nn.Linear, nn.Conv2d)):
                continue
            found = True
            name = name or type(mod).__name__
            w, b = mod.weight, mod.bias
            why = None
            if mod in excluded:
                why = "excluded"
            elif w not in where or (b is not None and b not in where):
                why = "its parameters are not (all) in this optimizer"
            elif b is not None and where[w] != where[b]:
                why = "weight and bias are in different param groups"
            elif w in seen:
                why = "its weight is shared with another layer"
            elif isinstance(mod, nn.Conv2d) and (mod.groups != 1 or mod.padding_mode != "zeros"):
                why = "grouped convolution or non-zero padding mode"
            elif b is not None and _layout(w) != _layout(b):
                why = "weight and bias are laid out differently (DTensor mesh or placements)"
            elif max(w.shape[0], math.prod(w.shape[1:]) + (b is not None)) > self.max_factor_dim:
                why = f"a factor would be larger than max_factor_dim={self.max_factor_dim}"
            if why is not None:
                self.fallbacks[name] = why
                continue
            seen.add(w)
            geom = K.conv_geometry(mod) if isinstance(mod, nn.Conv2d) else None
            layers.append(_Layer(name, mod, w, b, where[w], geom))
        if not found:
            raise ValueError(
                f"model: MKOR found no nn.Linear or nn.Conv2d layer in {type(model).__name__}; "
                "it preconditions only those (use the base optimizer directly)"
            )
        surprising = {n: w for n, w in self.fallbacks.items() if w != "excluded"}
        if surprising:
            self._warn_once(
                "layers",
                "MKOR: these layers fall back to the base optimizer: "
                + "; ".join(f"{n} ({w})" for n, w in surprising.items()),
            )
        return layers

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def _after_load_state_dict(self) -> None:
        self.__dict__.setdefault("_warned", set())
        self._stats: dict[int, list[Any]] = {}
        if self.__dict__.get("model") is None and "no_model" not in self._warned:
            self._warn_once(
                "no_model",
                "MKOR got parameters but no model, so it cannot hook any layer: every "
                "parameter falls back to the base optimizer. Pass the model: MKOR(model, ...) "
                "or MKOR(params, model=model).",
            )
        groups = [
            {"params": list(g["params"]), **{k: g[k] for k in self._base_keys}}
            for g in self.param_groups
        ]
        self._base_opt = self._base_cls(groups, **self._base_flags)
        self._base_opt.state = _BaseState(self)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim``; a group added later is not preconditioned (its layers were
        not known when the hooks were placed): it goes to the base optimizer."""
        super().add_param_group(param_group)
        self.__dict__.pop("_mesh", None)
        base = self.__dict__.get("_base_opt")
        if base is not None:
            g = self.param_groups[-1]
            base.add_param_group(
                {"params": list(g["params"]), **{k: g[k] for k in self._base_keys}}
            )

    # -------------------------------------------------------------------- validation
    def _validate_group(self, group: dict[str, Any]) -> None:
        check_float("lr", group["lr"], low=0.0)
        check_choice("variant", group["variant"], VARIANT_NAMES)
        check_int("inv_freq", group["inv_freq"], low=1)
        check_float("factor_decay", group["factor_decay"], low=0.0, high=1.0,
                    low_open=True, high_open=True)  # fmt: skip
        check_float("stabilizer_threshold", group["stabilizer_threshold"], low=0.0,
                    low_open=True, allow_inf=True)  # fmt: skip
        if group["stabilizer_blend"] is not None:
            check_float("stabilizer_blend", group["stabilizer_blend"], low=0.0, high=1.0,
                        low_open=True)  # fmt: skip
        check_float("clip", group["clip"], low=0.0, low_open=True, allow_inf=True)
        check_int("warmup_steps", group["warmup_steps"], low=0)
        check_choice("factor_dtype", group["factor_dtype"], FACTOR_DTYPES)
        check_bool("precondition", group["precondition"])
        if group["base_optimizer"] != self._base_cls.__name__:
            raise ValueError(
                f"base_optimizer: this MKOR's base is {self._base_cls.__name__}, the group says "
                f"{group['base_optimizer']!r} (a checkpoint of an MKOR with another base?)"
            )
        self._validate_base_hparams(group)

    def _validate_base_hparams(self, group: dict[str, Any]) -> None:
        values = {k: group[k] for k in self._base_keys}
        for key, value in values.items():
            self._check_base_value(key, value)
        try:
            self._base_cls([_probe_param()], **values, **self._base_flags)
        except (TypeError, ValueError) as e:
            raise type(e)(
                f"{self._base_cls.__name__} (the base optimizer) rejected the group's "
                f"hyperparameters: {e}"
            ) from e

    def _check_base_value(self, key: str, value: Any) -> None:
        """Our own message for the common base hyperparameters (torch's checks are partial
        and do not always name the argument)."""
        if key in ("lr", "weight_decay"):
            check_float(key, value, low=0.0)
        elif key == "momentum":
            check_float(key, value, low=0.0, high=1.0, high_open=True)
        elif key == "dampening":
            check_float(key, value, low=0.0, high=1.0)
        elif key == "eps":
            check_float(key, value, low=0.0)
        elif key == "betas":
            check_betas(value, allow_beta2_one=False)
        elif key in self._base_bool_keys:
            check_bool(key, value)
        elif isinstance(value, (float, torch.Tensor)):
            check_float(key, value)

    # -------------------------------------------------------------------------- hooks
    def _due(self, layer: _Layer) -> bool:
        """Whether the coming step updates this layer's factors (statistics are needed)."""
        group = self.param_groups[layer.group]
        if not group["precondition"] or self._hybrid["switched_at"] is not None:
            return False
        st = self.state.get(layer.weight)
        t = int(st["step"]) if st and "step" in st else 0
        return t % group["inv_freq"] == 0 or t < group["warmup_steps"]

    def _forward_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        index = self._layer_of.get(module)
        if (
            index is None
            or not torch.is_grad_enabled()
            or not args
            or not isinstance(output, torch.Tensor)
            or not output.requires_grad
        ):
            return
        layer = self._layers[index]
        if not self._due(layer):
            return
        clip = float(self.param_groups[layer.group]["clip"])
        x = args[0].detach()
        bias = layer.bias is not None
        if layer.geometry is None:
            a = K.linear_input_stat(x, bias, clip)
        else:
            a = K.conv2d_input_stat(x, layer.geometry, bias, clip)
        output.register_hook(functools.partial(self._grad_hook, index, a, clip))

    def _grad_hook(self, index: int, a: torch.Tensor, clip: float, grad: torch.Tensor) -> None:
        if self._layers[index].geometry is None:
            g = K.linear_output_stat(grad.detach(), clip)
        else:
            g = K.conv2d_output_stat(grad.detach(), clip)
        acc = self._stats.get(index)
        if acc is None:
            self._stats[index] = [a, g, 1]
        else:  # several forward/backward passes before one step (accumulation, reuse)
            acc[0], acc[1], acc[2] = acc[0] + a, acc[1] + g, acc[2] + 1

    def remove_hooks(self) -> None:
        """Detach MKOR from the model. Factors then stay as they are (no new statistics);
        preconditioning with them continues."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim``; also drops the recorded layer statistics, which belong to the
        gradients being accumulated."""
        self._stats = {}
        super().zero_grad(set_to_none)

    # ---------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        skipped = self.skipped_steps
        try:
            loss = super().step(closure)
        finally:
            self._stats = {}
        if self.hybrid_window and loss is not None and self.skipped_steps == skipped:
            self.record_loss(loss)
        return loss

    def record_loss(self, loss: float | torch.Tensor) -> None:
        """Feed the hybrid switch one step's loss (``step(closure)`` does this itself).

        Reads the device once per ``hybrid_window`` steps, never per step.
        """
        h, w = self._hybrid, self.hybrid_window
        if not w or h["switched_at"] is not None:
            return
        value = loss.detach().float().reshape(()) if isinstance(loss, torch.Tensor) else loss
        h["losses"].append(torch.as_tensor(value, dtype=torch.float32))
        if len(h["losses"]) < 2 * w:
            return
        means = torch.stack(
            [torch.stack(h["losses"][:w]).mean(), torch.stack(h["losses"][w:]).mean()]
        )
        dp = self._data_parallel()
        if dp is not None:  # every rank decides on the same (global-batch) losses
            means = dp.sum_(means) / dp.size
        before, after = means.tolist()
        h["losses"] = h["losses"][w:]
        if math.isfinite(before) and math.isfinite(after) and before != 0:
            if (before - after) / abs(before) < self.hybrid_tol:
                h["switched_at"] = self._global_step()
                self._warn_once(
                    "hybrid",
                    f"MKOR: the loss improved by less than hybrid_tol={self.hybrid_tol:g} "
                    f"over the last {w} steps; preconditioning is off from now on "
                    "(the base optimizer continues alone)",
                )

    def _global_step(self) -> int:
        for st in self.state.values():
            if "step" in st:
                return int(st["step"])
        return 0

    def _update(self, work: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> None:
        has_grad = set()
        for _, ps in work:
            for p in ps:
                has_grad.add(p)
                st = self.state[p]
                if "step" not in st:
                    st["step"] = torch.tensor(0.0)
        replace: dict[torch.Tensor, torch.Tensor] = {}
        if self._hybrid["switched_at"] is None:
            local = self._local_params()
            live = []
            for index, layer in enumerate(self._layers):
                w, b = local(layer.weight), local(layer.bias)
                if w in has_grad and (b is None or b in has_grad):
                    if self.param_groups[layer.group]["precondition"]:
                        live.append((index, layer, w, b))
            self._precondition_layers(live, replace)
        steps = [self.state[p]["step"] for _, ps in work for p in ps]
        if steps:
            torch._foreach_add_(steps, 1.0)
        self._base_step(work, replace)

    def _local_params(self) -> Any:
        """``t -> the tensor the step sees for t``: the local-shard proxy of a DTensor
        parameter while the optimizer works on shards, else ``t`` itself."""
        view = self._placement_view_now()
        if view is None or not view.active:
            return lambda t: t
        proxies = {id(p): proxy for p, proxy, _ in view.pairs}
        return lambda t: None if t is None else proxies.get(id(t), t)

    def _placement_view_now(self) -> Any:
        cached = self.__dict__.get("_placement_view")
        return None if cached is None else cached[1]

    def _precondition_layers(
        self,
        live: list[tuple[int, _Layer, torch.Tensor, torch.Tensor | None]],
        replace: dict[torch.Tensor, torch.Tensor],
    ) -> None:
        """Update due factors, then ``G -> P_L G P_R`` for every layer with factors.

        Data parallel, the statistics of every rank are summed first (one all-reduce), so
        the factors see the global batch; on shards, only the owner of a sharded layer
        (:meth:`_owners`) keeps and updates its factors, and the layer's gradient matrix is
        preconditioned whole there (the same arithmetic as in one process) and each rank
        gets its own rows back (:func:`apply_whole`). A layer whose factors were just set
        to the identity goes through unchanged on shards (the other ranks cannot know).
        """
        due = []
        for index, layer, w, _ in live:
            group = self.param_groups[layer.group]
            t = int(self.state[w]["step"])
            if t % group["inv_freq"] == 0 or t < group["warmup_steps"]:
                due.append(index)
        stats = self._global_stats(due)
        owners = self._owners()
        items, keep, todo, mine_work = [], [], [], []
        for index, layer, w, b in live:
            st = self.state[w]
            group = self.param_groups[layer.group]
            pl = self._placement(w)
            pl = pl if pl is not None and pl.sharded else None
            mine = pl is None or owners[index] == pl.shard_index
            skip = False
            if not mine:  # another rank of the shard group keeps this layer's factors
                for key in _FACTOR_KEYS:
                    st.pop(key, None)
            elif "left" not in st:
                # A layer's first step sets its factors to the identity (instead of a
                # rank-1 update), statistics or not, so that every layer has its whole
                # state from the first step on (checkpoint loaders fill a template of it);
                # with statistics, the step is the base optimizer's alone.
                self._init_factors(st, group, layer, w.device)
                skip = index in stats and stats[index] is not None
            elif index in stats:
                if stats[index] is None:
                    self._warn_once(
                        f"nostats{index}",
                        f"MKOR: no statistics were recorded for layer {layer.name} before a "
                        "factor-update step (hooks removed, the forward ran without grad, or "
                        "the layer's module was bypassed); its factors are kept as they are",
                    )
                else:
                    self._update_factors(st, group, *stats[index], layer, w.device)
            if skip and pl is None:
                continue
            compute = torch.float64 if w.dtype == torch.float64 else torch.float32
            mat = w.grad.reshape(w.shape[0], math.prod(w.shape[1:])).to(compute)  # 0 rows: ok
            if b is not None:
                mat = torch.cat([mat, b.grad.reshape(-1, 1).to(compute)], 1)
            if pl is not None:  # the placement of [dW | db], rows as the weight's
                pl = dataclasses.replace(
                    pl,
                    global_shape=torch.Size((pl.global_shape[0], mat.shape[1])),
                    local_shape=torch.Size(mat.shape),
                )
            items.append((mat, pl))
            keep.append(owners[index] if pl is not None else None)
            todo.append((w, b))
            if mine:  # ``fn`` sees this rank's layers in this order
                mine_work.append((None if skip else st, b is not None))
        results = apply_whole(
            items, self._precondition_fn(mine_work), owners=keep, cost=_precondition_cost
        )
        for (w, b), new in zip(todo, results):
            if b is not None:
                replace[w] = new[:, :-1].reshape(w.shape).to(w.dtype)
                replace[b] = new[:, -1].to(b.dtype)
            else:
                replace[w] = new.reshape(w.shape).to(w.dtype)

    def _precondition_fn(self, work: list[tuple[dict[str, Any] | None, bool]]) -> Any:
        """``fn`` of :func:`apply_whole`: the whole ``[dW | db]`` of this rank's layers
        (given their state and whether they have a bias, in order), preconditioned; a layer
        whose factors were just set (state ``None``) keeps its gradient (the step is the
        base optimizer's alone)."""

        def fn(mats: list[torch.Tensor]) -> list[torch.Tensor]:
            return [
                mat if st is None else self._preconditioned(st, mat, bias)
                for (st, bias), mat in zip(work, mats, strict=True)
            ]

        return fn

    def _owners(self) -> list[int | None]:
        """Per layer (of ``self._layers``), the shard index of the rank that keeps its
        factors and preconditions it, ``None`` when its weight is not sharded (every rank
        does). Greedy balancing of the layers' preconditioning work over the shard group,
        from global shapes only: the same on every rank and at every step (whatever subset
        of the layers a step preconditions)."""
        local = self._local_params()
        groups: dict[Any, list[tuple[int, Any]]] = {}
        out: list[int | None] = [None] * len(self._layers)
        for index, layer in enumerate(self._layers):
            pl = self._placement(local(layer.weight))
            if pl is not None and pl.sharded:
                groups.setdefault((pl.mesh, pl.shard_dim), []).append((index, pl))
        for members in groups.values():
            costs = [
                _precondition_cost((self._layers[i].out_dim, self._layers[i].in_dim))
                for i, _ in members
            ]
            for (i, _), r in zip(members, assign_blocks(costs, members[0][1].shard_count)):
                out[i] = r
        return out

    @staticmethod
    def _preconditioned(st: dict[str, Any], mat: torch.Tensor, bias: bool) -> torch.Tensor:
        """``P_L G P_R``, rescaled to ``G``'s norm (``||dW|| + ||db||``)."""
        # The rescale is invariant to the gradient's scale: huge or tiny gradients are
        # brought into range by an exact power of two first (none in the ordinary range),
        # so that the norms neither overflow nor vanish.
        e = pow2.row_exponents(mat, pow2.safe_exponent(mat.dtype, mat.numel()), dim=(0, 1))
        mat = pow2.mul_pow2(mat, -e)
        new = K.kron_precondition(st["left"], mat, st["right"])
        scale = K.norm_preserving_scale(
            K.weight_bias_norms(mat, bias), K.weight_bias_norms(new, bias)
        )
        return pow2.mul_pow2(new * scale, e)

    def _global_stats(
        self, due: list[int]
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor] | None]:
        """Per due layer: the mean statistics ``(a, g)`` (``None``: none recorded).

        In one process they are this process's. Data parallel (DTensor parameters, or a
        ``DistributedDataParallel`` model), every rank's recorded sums and pass counts are
        summed over the data-parallel ranks first (one all-reduce for all layers), so the
        mean is over the global batch and the same on every rank.
        """
        dp = self._data_parallel()
        out: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}
        if dp is None:
            for index in due:
                acc = self._stats.get(index)
                out[index] = None if acc is None else (acc[0] / acc[2], acc[1] / acc[2])
            return out
        if not due:
            return out
        layers = [self._layers[i] for i in due]
        recorded = [self._stats.get(i) for i in due]
        wide = any(acc is not None and acc[0].dtype == torch.float64 for acc in recorded)
        dtype = torch.float64 if wide else torch.float32
        dev = self._local_params()(layers[0].weight).device
        parts = []
        for layer, acc in zip(layers, recorded):
            if acc is None:
                parts.append(torch.zeros(layer.in_dim + layer.out_dim + 1, dtype=dtype, device=dev))
            else:
                count = torch.full((1,), float(acc[2]), dtype=dtype, device=dev)
                parts += [acc[0].to(dtype), acc[1].to(dtype), count]
        buf = dp.sum_(torch.cat(parts))
        at = 0
        sizes = [(lay.in_dim, lay.out_dim) for lay in layers]
        ends = [at := at + n + m + 1 for n, m in sizes]
        counts = buf[[e - 1 for e in ends]].tolist()  # one host read per factor update
        for index, (n, m), end, count, acc in zip(due, sizes, ends, counts, recorded):
            if count == 0:
                out[index] = None
                continue
            piece = buf[end - 1 - n - m : end - 1] / count
            sdt = acc[0].dtype if acc is not None else torch.float32
            out[index] = (piece[:n].to(sdt), piece[n:].to(sdt))
        return out

    def _data_parallel(self) -> D.DataParallel | None:
        """The data-parallel ranks: the device mesh of the DTensor parameters, or the
        process group of a ``DistributedDataParallel`` model; ``None`` in one process."""
        model = self.__dict__.get("model")
        if isinstance(model, DistributedDataParallel) and dist.is_initialized():
            return D.DataParallel(group=model.process_group)
        cached = self.__dict__.get("_mesh")
        if cached is None:
            params = [p for g in self.param_groups for p in g["params"]]
            view = self._placement_view_now()  # inside a step: the real parameters
            params += [p for p, _, _ in view.pairs] if view is not None else []
            meshes = []
            for p in params:
                if is_dtensor(p) and p.device_mesh not in meshes:
                    meshes.append(p.device_mesh)
            if len(meshes) > 1:
                raise ValueError(
                    f"MKOR: the DTensor parameters live on {len(meshes)} device meshes; MKOR "
                    "averages its layer statistics over one data-parallel mesh: shard the "
                    "whole model on one mesh (fully_shard with the same mesh everywhere)"
                )
            cached = self.__dict__["_mesh"] = (meshes[0] if meshes else None,)
        return None if cached[0] is None else D.DataParallel(mesh=cached[0])

    def _update_factors(
        self,
        st: dict[str, Any],
        group: dict[str, Any],
        a: torch.Tensor,
        g: torch.Tensor,
        layer: _Layer,
        dev: torch.device,
    ) -> None:
        if "left" not in st:  # first factor update: the identity
            self._init_factors(st, group, layer, dev)
            return
        variant = group["variant"]
        decay, threshold = group["factor_decay"], group["stabilizer_threshold"]
        blend = group["stabilizer_blend"]
        blend = _DEFAULT_BLEND[variant] if blend is None else blend
        dtype = st["left"].dtype
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        left, right = st["left"].to(compute), st["right"].to(compute)
        a, g = a.to(compute), g.to(compute)
        if variant == "official":
            # Input side first, then output side; a factor with a large entry flags both
            # factors of the layer, which are reset (instead of updated) at their next update.
            r0, l0 = st["reset_right"], st["reset_left"]
            new_r = torch.where(
                r0, K.blend_identity(right, blend), K.official_update(right, a, decay)
            )
            big_r = ~r0 & K.too_large(new_r, threshold)
            l1 = l0 | big_r
            new_l = torch.where(
                l1, K.blend_identity(left, blend), K.official_update(left, g, decay)
            )
            big_l = ~l1 & K.too_large(new_l, threshold)
            st["reset_right"], st["reset_left"] = big_r | big_l, big_l
            events = torch.stack([~l1, ~r0, l1, r0])
        else:
            new_r, new_l = K.ema_update(right, a, decay), K.ema_update(left, g, decay)
            big_r, big_l = K.too_large(new_r, threshold), K.too_large(new_l, threshold)
            new_r = torch.where(big_r, K.blend_identity(new_r, blend), new_r)
            new_l = torch.where(big_l, K.blend_identity(new_l, blend), new_l)
            events = torch.stack([torch.ones_like(big_l), torch.ones_like(big_r), big_l, big_r])
        st["left"], st["right"] = new_l.to(dtype), new_r.to(dtype)
        st["counts"] = st["counts"] + events.long()

    @staticmethod
    def _init_factors(
        st: dict[str, Any], group: dict[str, Any], layer: _Layer, dev: torch.device
    ) -> None:
        dtype = group["factor_dtype"]
        st["left"] = torch.eye(layer.out_dim, dtype=dtype, device=dev)
        st["right"] = torch.eye(layer.in_dim, dtype=dtype, device=dev)
        st["reset_left"] = torch.zeros((), dtype=torch.bool, device=dev)
        st["reset_right"] = torch.zeros((), dtype=torch.bool, device=dev)
        # rank-1 updates of left, right; resets of left, right
        st["counts"] = torch.zeros(4, dtype=torch.int64, device=dev)

    def _base_step(
        self,
        work: list[tuple[dict[str, Any], list[torch.Tensor]]],
        replace: dict[torch.Tensor, torch.Tensor],
    ) -> None:
        base = self._base_opt
        grads = self._saturated_grads(work, replace)
        saved = [(p, p.grad) for p in grads]
        full = [bg["params"] for bg in base.param_groups]
        try:
            for p, new in grads.items():
                p.grad = new
            for bg, (group, ps) in zip(base.param_groups, work):
                bg["params"] = ps
                for k in self._base_keys:
                    bg[k] = group[k]
            step = type(base).step
            if getattr(step, "hooked", False):  # not torch.optim's step hooks: MKOR's ran
                step = step.__wrapped__
            step(base)
        finally:
            for p, grad in saved:
                p.grad = grad
            for bg, ps in zip(base.param_groups, full):
                bg["params"] = ps

    @staticmethod
    def _saturated_grads(
        work: list[tuple[dict[str, Any], list[torch.Tensor]]],
        replace: dict[torch.Tensor, torch.Tensor],
    ) -> dict[torch.Tensor, torch.Tensor]:
        """The gradient each parameter hands the base optimizer (preconditioned or its own),
        saturated at ``±saturation(dtype)`` (``2**63`` in float32 and bfloat16): a base
        that squares gradients (Adam's second moment) cannot overflow, whatever its own
        arithmetic. Values below the bound are untouched (the same tensors' values)."""
        out = {}
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for _, ps in work:
            for p in ps:
                g = replace.get(p, p.grad)
                if g.is_floating_point() and g.numel():
                    by_dtype.setdefault(g.dtype, []).append(p)
        for dtype, ps in by_dtype.items():
            bound = saturation(dtype)
            own = [p for p in ps if p not in replace]  # copies: p.grad stays untouched
            mine = [replace[p] for p in ps if p in replace]  # MKOR's own tensors: in place
            if own:
                clamped = torch._foreach_clamp_max([p.grad for p in own], bound)
                torch._foreach_clamp_min_(clamped, -bound)
                out.update(zip(own, clamped))
            if mine:
                torch._foreach_clamp_max_(mine, bound)
                torch._foreach_clamp_min_(mine, -bound)
        out.update(replace)
        return out

    # -------------------------------------------------------------------- state dict
    def _check_loaded_state(self, p: torch.Tensor, st: dict[str, Any]) -> None:
        super()._check_loaded_state(p, st)
        unknown = set(st) - _STATE_KEYS
        if unknown:
            raise ValueError(
                f"state keys {sorted(unknown)} are not MKOR state (a checkpoint of another "
                "optimizer?)"
            )
        if st and "step" not in st:
            raise ValueError("an MKOR state without 'step' (a checkpoint of another optimizer?)")
        base = st.get("base", {})
        if not isinstance(base, dict):
            raise ValueError("MKOR state 'base' must be a dict (the base optimizer's state)")
        for key, value in base.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != p.shape:
                raise ValueError(
                    f"base optimizer state {key!r} has shape {tuple(value.shape)}, its "
                    f"parameter {tuple(p.shape)}: the state dict does not match"
                )
        if "left" in st or "right" in st:
            local = self._local_params()
            layer = next((lay for lay in self._layers if local(lay.weight) is p), None)
            if layer is None:
                raise ValueError(
                    "loaded state has MKOR factors for a parameter this MKOR does not "
                    "precondition (another model, or built without the model?)"
                )
            want = {"left": (layer.out_dim,) * 2, "right": (layer.in_dim,) * 2}
            for key, shape in want.items():
                if key not in st or tuple(st[key].shape) != shape:
                    raise ValueError(
                        f"state {key!r} of layer {layer.name} should have shape {shape}: the "
                        "state dict does not match this model"
                    )

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        h = self._hybrid
        sd["hybrid"] = {
            "losses": [x.clone() for x in h["losses"]],
            "switched_at": h["switched_at"],
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        hybrid = state_dict.pop("hybrid", None)
        super().load_state_dict(state_dict)
        if hybrid is not None:
            self._hybrid = {
                "losses": [torch.as_tensor(x).clone() for x in hybrid.get("losses", [])],
                "switched_at": hybrid.get("switched_at"),
            }

    # ------------------------------------------------------------------- diagnostics
    def diagnostics(self) -> list[dict[str, Any]]:
        """One record per model layer MKOR knows, then one per parameter left to the base.

        Layer records: ``layer`` (module name), ``kind``, ``shape`` (of ``[W | b]``),
        ``preconditioned`` (True), ``step``, ``left``/``right`` (per factor: ``max_abs``,
        its largest entry in magnitude, the stabiliser's measure; ``cond``, the 2-norm
        condition number; ``None`` before the first factor update), ``sm_updates_left`` /
        ``sm_updates_right`` (rank-1 updates applied), ``resets_left`` / ``resets_right``,
        ``hybrid_off`` (the step preconditioning was switched off, or None),
        ``factors_on`` (on FSDP2 / HSDP shards: the shard index of the rank that keeps the
        layer's factors; ``None`` when the weight is not sharded and every rank keeps
        them). On the other ranks of the shard group the factor fields and the four
        counters are ``None`` (this rank holds no factors of the layer). Fallback
        records: ``layer`` (name or None), ``param`` (index over all groups, when known),
        ``preconditioned`` (False) and ``reason``. Reads device values: off the hot path.
        """
        out = []
        local = self._local_params()
        owners = self._owners()
        for layer, owner in zip(self._layers, owners):
            w = local(layer.weight)
            st = self.state.get(w, {})
            counts = st["counts"].tolist() if "counts" in st else [0, 0, 0, 0]
            if owner is not None and owner != self._placement(w).shard_index:
                counts = [None] * 4
            rec = dict(
                layer=layer.name,
                kind="Linear" if layer.geometry is None else "Conv2d",  # FSDP2 renames classes
                shape=(layer.out_dim, layer.in_dim),
                preconditioned=True,
                step=int(st["step"]) if "step" in st else 0,
                left=_factor_health(st.get("left")),
                right=_factor_health(st.get("right")),
                sm_updates_left=counts[0],
                sm_updates_right=counts[1],
                resets_left=counts[2],
                resets_right=counts[3],
                hybrid_off=self._hybrid["switched_at"],
                factors_on=owner,
            )
            out.append(rec)
        for name, why in self.fallbacks.items():
            out.append(dict(layer=name, preconditioned=False, reason=why))
        covered = {
            local(p) for lay in self._layers for p in (lay.weight, lay.bias) if p is not None
        }
        idx = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p not in covered:
                    reason = "no model given" if self.model is None else "not in a handled layer"
                    out.append(dict(layer=None, param=idx, preconditioned=False, reason=reason))
                idx += 1
        return out


def _precondition_cost(shape: Any) -> int:
    """Multiply-adds of ``P_L G P_R`` for an ``m x n`` gradient matrix."""
    m, n = int(shape[0]), math.prod(int(d) for d in shape[1:])
    return m * n * (m + n)


def _layout(t: torch.Tensor) -> Any:
    """How ``t`` is laid out over ranks: ``None`` for a plain tensor."""
    return (t.device_mesh, tuple(t.placements)) if is_dtensor(t) else None


def _factor_health(p: torch.Tensor | None) -> dict[str, float] | None:
    if p is None:
        return None
    f = p.detach().double()
    s = torch.linalg.svdvals(f)
    cond = float(s[0] / s[-1]) if s[-1] > 0 else math.inf
    return {"max_abs": float(f.abs().max()), "cond": cond}

