"""Optimizer classes (thin: param groups, state, step order). The math is in ``kernels``."""
