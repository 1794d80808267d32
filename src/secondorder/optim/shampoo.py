"""Shampoo (placeholder while the implementation lands)."""

from .base import SecondOrderOptimizer


class Shampoo(SecondOrderOptimizer):
    pass
