"""Benchmark workloads, looked up by name.

Adding one: write a module with a :class:`Workload` subclass decorated with
:func:`register`, and import it at the bottom of this file.
"""

from __future__ import annotations

from ..errors import BenchUsageError
from .base import Setup, Workload

_REGISTRY: dict[str, type[Workload]] = {}

DEFAULT_WORKLOAD = "digits-autoencoder"


def register(cls: type[Workload]) -> type[Workload]:
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"workload name {cls.name!r} is empty or already registered")
    _REGISTRY[cls.name] = cls
    return cls


def workload_names() -> list[str]:
    return list(_REGISTRY)


def get_workload(name: str) -> type[Workload]:
    """The workload class registered as ``name``; a clear ``ValueError`` otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        valid = ", ".join(_REGISTRY)
        raise BenchUsageError(f"unknown workload {name!r}; valid workloads: {valid}") from None


# Registration happens on import; the order here is the order `--list` shows.
from . import byte_lm, digits, mnist_autoencoder  # noqa: E402,F401

__all__ = [
    "DEFAULT_WORKLOAD",
    "Setup",
    "Workload",
    "get_workload",
    "register",
    "workload_names",
]
