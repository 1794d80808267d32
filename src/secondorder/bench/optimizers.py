"""Optimizers by name, with ``name:key=value,...`` hyperparameter specs.

A name is either a short name of the registry below (baselines from ``torch.optim``;
``shampoo`` and ``sonew`` looked up on the ``secondorder`` package when first used, so the
harness keeps working, and says so in its table, while a class is missing) or the dotted
path of any importable optimizer class, e.g. ``torch.optim.NAdam`` or ``heavyball.SOAP``.

Construction protocol (the same for every optimizer):

* a class that defines a classmethod ``from_model(cls, model, **hyperparameters)`` is built
  with it (for optimizers that need the model: hooks, parameter roles); any other class as
  ``cls(model.parameters(), **hyperparameters)``;
* an optimizer instance whose attribute ``create_graph`` is ``True`` gets its gradients from
  ``loss.backward(create_graph=True)`` (Hessian-vector products from the graph).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import BenchUsageError


class OptimizerUnavailable(Exception):
    """The optimizer's class does not exist (yet) in this version of the package."""


@dataclass(frozen=True)
class _Entry:
    resolve: Callable[[], type]
    defaults: dict[str, Any] = field(default_factory=dict)
    doc: str = ""


def _torch(name: str) -> Callable[[], type]:
    return lambda: getattr(torch.optim, name)


def _secondorder(name: str) -> Callable[[], type]:
    def resolve() -> type:
        package = importlib.import_module("secondorder")
        cls = getattr(package, name, None)
        if cls is None:
            raise OptimizerUnavailable(f"secondorder.{name} does not exist in this version")
        base = importlib.import_module("secondorder.optim.base").SecondOrderOptimizer
        if cls.__init__ is base.__init__:  # the class is still a stub without hyperparameters
            raise OptimizerUnavailable(f"secondorder.{name} is not implemented yet")
        return cls

    return resolve


OPTIMIZERS: dict[str, _Entry] = {
    "adamw": _Entry(_torch("AdamW"), doc="torch.optim.AdamW"),
    "adam": _Entry(_torch("Adam"), doc="torch.optim.Adam"),
    "sgd": _Entry(
        _torch("SGD"), {"momentum": 0.9, "nesterov": True}, "torch.optim.SGD, Nesterov 0.9"
    ),
    "momentum": _Entry(_torch("SGD"), {"momentum": 0.9}, "torch.optim.SGD, heavy ball 0.9"),
    "adagrad": _Entry(_torch("Adagrad"), doc="torch.optim.Adagrad"),
    "rmsprop": _Entry(_torch("RMSprop"), doc="torch.optim.RMSprop"),
    "shampoo": _Entry(_secondorder("Shampoo"), doc="secondorder.Shampoo"),
    "sonew": _Entry(_secondorder("SONew"), doc="secondorder.SONew"),
    "adahessian": _Entry(_secondorder("AdaHessian"), doc="secondorder.AdaHessian (create_graph)"),
    "mfac": _Entry(_secondorder("MFAC"), doc="secondorder.MFAC"),
    "scale": _Entry(_secondorder("SCALE"), doc="secondorder.SCALE"),
    "muon": _Entry(_secondorder("Muon"), doc="secondorder.Muon"),
    "mkor": _Entry(_secondorder("MKOR"), doc="secondorder.MKOR (SGD momentum 0.9 base)"),
    "adagradnorm": _Entry(_secondorder("AdaGradNorm"), doc="secondorder.AdaGradNorm (scalar)"),
    "soap": _Entry(_secondorder("SOAP"), doc="secondorder.SOAP"),
}


# ----------------------------------------------------------------------------- parsing
def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets or quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


_WORDS = {"true": True, "false": False, "none": None, "null": None}
_NONFINITE_WORDS = {"nan": math.nan, "inf": math.inf, "+inf": math.inf, "-inf": -math.inf}


def parse_value(text: str) -> Any:
    """A Python literal (number, bool, None, tuple, list, quoted string), a torch dtype
    written ``torch.bfloat16``, ``nan``/``inf`` as floats, or else the bare string."""
    text = text.strip()
    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    if text.lower() in _NONFINITE_WORDS:
        return _NONFINITE_WORDS[text.lower()]
    if text.startswith("torch.") and isinstance(getattr(torch, text[6:], None), torch.dtype):
        return getattr(torch, text[6:])
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text
    return tuple(value) if isinstance(value, list) else value


def _is_class_path(name: str) -> bool:
    return "." in name


@dataclass(frozen=True)
class OptimizerSpec:
    """One ``--opt`` argument, parsed (``name``: a registry name or a dotted class path)."""

    name: str
    overrides: dict[str, Any]
    text: str

    @property
    def label(self) -> str:
        return self.text if self.overrides else self.name

    def with_overrides(self, extra: dict[str, Any], label: str) -> OptimizerSpec:
        return OptimizerSpec(self.name, {**self.overrides, **extra}, label)


def parse_spec(text: str) -> OptimizerSpec:
    """Parse ``name`` or ``name:key=value,key=value`` (values are Python literals).

    ``name`` is a registry name (case-insensitive) or a dotted class path such as
    ``torch.optim.NAdam`` (imported when the optimizer is built).
    """
    name, _, rest = text.partition(":")
    name = name.strip()
    if _is_class_path(name):
        if not all(part.isidentifier() for part in name.split(".")):
            raise BenchUsageError(
                f"cannot parse optimizer {name!r} in --opt {text!r}: expected a registry name "
                f"({', '.join(OPTIMIZERS)}) or a dotted class path like torch.optim.NAdam"
            )
    else:
        name = name.lower()
        if name not in OPTIMIZERS:
            raise BenchUsageError(
                f"unknown optimizer {name!r} in --opt {text!r}; valid optimizers: "
                + ", ".join(OPTIMIZERS)
                + ", or a dotted class path like torch.optim.NAdam"
            )
    overrides: dict[str, Any] = {}
    for item in _split_top_level(rest):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise BenchUsageError(
                f"cannot parse {item!r} in --opt {text!r}: expected key=value, "
                "e.g. adamw:lr=1e-3,betas=(0.9,0.95)"
            )
        if key in overrides:
            raise BenchUsageError(f"hyperparameter {key!r} given twice in --opt {text!r}")
        overrides[key] = parse_value(value)
    return OptimizerSpec(name, overrides, text.strip())


# ---------------------------------------------------------------------------- building
def _import_class(path: str) -> type:
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BenchUsageError(f"cannot import {module_name!r} for --opt {path}: {exc}") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise BenchUsageError(f"module {module_name!r} has no attribute {attr!r} (--opt {path})")
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise BenchUsageError(f"--opt {path} is not a torch.optim.Optimizer subclass")
    return cls


def resolve(name: str) -> type:
    """The optimizer class for ``name``; raises :class:`OptimizerUnavailable` for a
    registry class missing from this version, :class:`BenchUsageError` for a bad path."""
    if _is_class_path(name):
        return _import_class(name)
    return OPTIMIZERS[name].resolve()


def registry_defaults(name: str) -> dict[str, Any]:
    """The harness's own defaults for a registry name (e.g. SGD's Nesterov momentum)."""
    entry = OPTIMIZERS.get(name)
    return dict(entry.defaults) if entry is not None else {}


def _signature_parameters(cls: type) -> list[inspect.Parameter]:
    """Hyperparameters of the constructor (or of ``from_model``), model/params excluded."""
    target = cls.from_model if _has_from_model(cls) else cls
    params = list(inspect.signature(target).parameters.values())[1:]  # skip params / model
    if _has_from_model(cls) and any(p.kind is p.VAR_KEYWORD for p in params):
        # ``from_model(model, **hparams)`` forwards to the constructor: its signature counts
        params = list(inspect.signature(cls).parameters.values())[1:]
    return params


def hyperparameter_names(cls: type) -> list[str] | None:
    """Keyword arguments the optimizer accepts (``None``: it takes ``**kwargs``)."""
    names = []
    for p in _signature_parameters(cls):
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if p.kind is not inspect.Parameter.VAR_POSITIONAL:
            names.append(p.name)
    return names


def _has_from_model(cls: type) -> bool:
    return isinstance(inspect.getattr_static(cls, "from_model", None), classmethod)


def _check_values(cls: type, spec: OptimizerSpec, kwargs: dict[str, Any]) -> None:
    """Catch values that the constructor might take silently: NaN/Inf numbers, and words
    where the constructor's default is a number (``lr=abc``)."""
    defaults = {p.name: p.default for p in _signature_parameters(cls)}
    for key, value in kwargs.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise BenchUsageError(
                f"{key}={value} in --opt {spec.text!r} is not a finite number"
            )
        default = defaults.get(key, inspect.Parameter.empty)
        if key == "lr" and default is inspect.Parameter.empty:
            default = 1e-3  # learning rates are numbers even where the signature hides it
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        if isinstance(value, str) and numeric:
            raise BenchUsageError(
                f"{key}={value!r} in --opt {spec.text!r} is not a number "
                f"(the default of {key} is {default!r})"
            )


@dataclass
class Built:
    """An optimizer made for one model, and how it wants to be driven."""

    optimizer: torch.optim.Optimizer
    kwargs: dict[str, Any]  # the hyperparameters it was given (defaults + overrides)
    create_graph: bool  # the loss's backward must build a graph (second derivatives)


def build_optimizer(
    spec: OptimizerSpec, model: nn.Module, default_lr: float | None = None
) -> Built:
    """Construct the optimizer for ``model`` following the construction protocol (module
    docstring).

    Unknown hyperparameter names raise :class:`BenchUsageError` listing the valid ones;
    a ``ValueError``/``TypeError`` from the constructor (a bad value) is re-raised as one.
    """
    cls = resolve(spec.name)
    valid = hyperparameter_names(cls)
    if valid is not None:
        unknown = [k for k in spec.overrides if k not in valid]
        if unknown:
            raise BenchUsageError(
                f"unknown hyperparameter {unknown[0]!r} for {spec.name} "
                f"({cls.__module__}.{cls.__qualname__}); valid hyperparameters: " + ", ".join(valid)
            )
    kwargs = registry_defaults(spec.name)
    if default_lr is not None and (valid is None or "lr" in valid):
        kwargs["lr"] = default_lr
    kwargs.update(spec.overrides)
    _check_values(cls, spec, kwargs)
    try:
        if _has_from_model(cls):
            optimizer = cls.from_model(model, **kwargs)
        else:
            optimizer = cls(model.parameters(), **kwargs)
    except (ValueError, TypeError) as exc:
        raise BenchUsageError(f"invalid hyperparameters for {spec.label!r}: {exc}") from exc
    return Built(optimizer, kwargs, getattr(optimizer, "create_graph", False) is True)


def describe() -> list[tuple[str, str, str]]:
    """(name, source, availability) for ``--list``."""
    rows = []
    for name, entry in OPTIMIZERS.items():
        try:
            entry.resolve()
            status = "available"
        except OptimizerUnavailable as exc:
            status = f"unavailable: {exc}"
        rows.append((name, entry.doc, status))
    return rows
