"""Optimizers by name, with ``name:key=value,...`` hyperparameter specs.

Baselines come from ``torch.optim``; ``shampoo`` and ``sonew`` are looked up on the
``secondorder`` package when first used, so the harness keeps working (and says so in its
table) while a class is missing or still a placeholder.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

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
    "scale": _Entry(_secondorder("SCALE"), doc="secondorder.SCALE"),
    "muon": _Entry(_secondorder("Muon"), doc="secondorder.Muon"),
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


def parse_value(text: str) -> Any:
    """A Python literal (number, bool, None, tuple, list, quoted string), a torch dtype
    written ``torch.bfloat16``, or else the bare string."""
    text = text.strip()
    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    if text.startswith("torch.") and isinstance(getattr(torch, text[6:], None), torch.dtype):
        return getattr(torch, text[6:])
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class OptimizerSpec:
    """One ``--opt`` argument, parsed."""

    name: str
    overrides: dict[str, Any]
    text: str

    @property
    def label(self) -> str:
        return self.text if self.overrides else self.name


def parse_spec(text: str) -> OptimizerSpec:
    """Parse ``name`` or ``name:key=value,key=value`` (values are Python literals)."""
    name, _, rest = text.partition(":")
    name = name.strip().lower()
    if name not in OPTIMIZERS:
        raise BenchUsageError(
            f"unknown optimizer {name!r} in --opt {text!r}; valid optimizers: "
            + ", ".join(OPTIMIZERS)
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
def hyperparameter_names(cls: type) -> list[str] | None:
    """Keyword arguments the constructor accepts (``None``: it takes ``**kwargs``)."""
    names = []
    for p in list(inspect.signature(cls).parameters.values())[1:]:  # skip params
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if p.kind is not inspect.Parameter.VAR_POSITIONAL:
            names.append(p.name)
    return names


def resolve(name: str) -> type:
    """The optimizer class for ``name``; raises :class:`OptimizerUnavailable`."""
    return OPTIMIZERS[name].resolve()


def build_optimizer(
    spec: OptimizerSpec, params: Iterable[torch.Tensor], default_lr: float | None = None
) -> tuple[torch.optim.Optimizer, dict[str, Any]]:
    """Construct the optimizer; returns it and the keyword arguments it was given.

    Unknown hyperparameter names raise :class:`BenchUsageError` listing the valid ones;
    a ``ValueError`` from the constructor (a bad value) is re-raised as one too.
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
    kwargs = dict(OPTIMIZERS[spec.name].defaults)
    if default_lr is not None and (valid is None or "lr" in valid):
        kwargs["lr"] = default_lr
    kwargs.update(spec.overrides)
    try:
        optimizer = cls(params, **kwargs)
    except ValueError as exc:
        raise BenchUsageError(f"invalid hyperparameters for {spec.label!r}: {exc}") from exc
    return optimizer, kwargs


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
