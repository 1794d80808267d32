r"""Gradient-noise statistics and the adaptive batch-size tests, as pure tensor functions.

Notation: ``b`` per-sample gradients ``g_1..g_b`` (rows of ``G``, shape ``[b, d]``, the
model's parameters flattened and concatenated), their mean ``ḡ`` and the unbiased
per-coordinate variances ``v_j = (1/(b−1)) Σ_i (g_ij − ḡ_j)²``. Each test returns the batch
size it *requires* (a float, possibly ``inf``); the controller rounds it up, never shrinks
the batch and caps it.

* norm test: ``Σ_j v_j / (η² ‖ḡ‖²)`` -- the batch at which the variance of the mean
  gradient, ``Σ_j v_j / b``, falls to ``η² ‖ḡ‖²``;
* coordinate-wise test: ``max_j v_j / (η² ḡ_j²)`` -- the same bound for every coordinate
  on its own (a coordinate with ``ḡ_j = 0`` and noise requires ``inf``: the cap);
* inner-product test: ``Var_i(⟨g_i, ḡ⟩) / (θ² ‖ḡ‖⁴)``;
* orthogonality test: ``Σ_j Var_i(g_i − (⟨g_i, ḡ⟩/‖ḡ‖²) ḡ)_j / (ν² ‖ḡ‖²)``;
* augmented inner-product test: the larger of the last two.

The norm and coordinate-wise tests need only ``(b, ḡ, Σ_i (g_i − ḡ)²)`` per coordinate
(:class:`GradStats`), which merge exactly across micro-batches and ranks by the law of
total variance (:func:`merge_stats`). The inner-product family needs the per-sample
gradients themselves (``G``). Their *per-layer* form (``segments`` given) computes
projections and inner products layer by layer and sums numerators, ignoring cross-layer
covariance; it is offered for parity with the authors' released code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = [
    "GradStats",
    "stats_from_samples",
    "stats_from_micro_batch_means",
    "merge_stats",
    "norm_test",
    "coordinate_test",
    "inner_product_test",
    "orthogonality_test",
    "augmented_test",
]


class GradStats(NamedTuple):
    """Sufficient statistics of ``count`` per-sample gradients (all float64 on the host of
    the gradients): ``mean`` ``[d]`` and ``m2`` ``[d]`` = per-coordinate sum of squared
    deviations from the mean (so the unbiased variance is ``m2 / (count − 1)``)."""

    count: int
    mean: torch.Tensor
    m2: torch.Tensor

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased per-coordinate variance of one sample's gradient."""
        if self.count < 2:
            raise ValueError(f"a variance needs at least 2 samples, got count={self.count}")
        return self.m2 / (self.count - 1)


def stats_from_samples(samples: torch.Tensor) -> GradStats:
    """Statistics of the rows of ``samples`` (``[b, d]``, one per-sample gradient per row)."""
    if samples.dim() != 2:
        raise ValueError(f"samples must be [batch, dim], got shape {tuple(samples.shape)}")
    x = samples.double()
    mean = x.mean(0)
    return GradStats(x.shape[0], mean, (x - mean).square().sum(0))


def stats_from_micro_batch_means(means: torch.Tensor, micro_batch: int) -> GradStats:
    """Per-sample statistics estimated from ``k`` micro-batch mean gradients (``[k, d]``),
    each the mean of ``micro_batch`` independent samples: the cheap alternative to
    per-sample gradients when the batch is accumulated anyway.

    A mean of ``m`` samples has ``1/m`` of one sample's variance, so the per-sample variance
    is estimated as ``m · Var_k(means)`` (unbiased, ``k − 1`` degrees of freedom). The result
    has ``count = k·m`` and ``m2`` scaled so that ``m2 / (count − 1)`` is that estimate.
    """
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    k = means.shape[0]
    if k < 2:
        raise ValueError(f"need at least 2 micro-batch means, got {k}")
    x = means.double()
    mean = x.mean(0)
    var = (x - mean).square().sum(0) * (micro_batch / (k - 1))
    count = k * micro_batch
    return GradStats(count, mean, var * (count - 1))


def merge_stats(parts: Sequence[GradStats]) -> GradStats:
    """Combine statistics of disjoint sample sets (law of total variance, exact):
    ``m2 = Σ_p m2_p + Σ_p n_p (mean_p − mean)²``."""
    parts = [p for p in parts if p.count > 0]
    if not parts:
        raise ValueError("merge_stats needs at least one non-empty GradStats")
    n = sum(p.count for p in parts)
    mean = sum(p.mean * (p.count / n) for p in parts)
    m2 = sum(p.m2 + p.count * (p.mean - mean).square() for p in parts)
    return GradStats(n, mean, m2)  # type: ignore[arg-type]


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        raise TypeError(f"{name} must be a real number > 0, got {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float:
    """``num / den`` as a Python float: ``inf`` when ``den == 0 < num``, 0 when both are 0."""
    num, den = float(num), float(den)
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def norm_test(stats: GradStats, eta: float) -> float:
    """Required batch size of the norm test: ``Σ_j v_j / (η² ‖ḡ‖²)``."""
    _check_positive("eta", eta)
    return _ratio(stats.variance.sum(), eta**2 * stats.mean.square().sum())


def coordinate_test(stats: GradStats, eta: float) -> float:
    """Required batch size of the coordinate-wise test: ``max_j v_j / (η² ḡ_j²)``
    (coordinates with zero variance require nothing, whatever their mean)."""
    _check_positive("eta", eta)
    v = stats.variance
    den = eta**2 * stats.mean.square()
    noisy = v > 0
    if not bool(noisy.any()):
        return 0.0
    if bool((den[noisy] == 0).any()):
        return math.inf
    return float((v[noisy] / den[noisy]).max())


def _split(samples: torch.Tensor, segments: Sequence[int] | None) -> list[torch.Tensor]:
    if segments is None:
        return [samples]
    if sum(segments) != samples.shape[1]:
        raise ValueError(
            f"segments sum to {sum(segments)} but the gradients have {samples.shape[1]} entries"
        )
    return list(torch.split(samples, list(segments), dim=1))


def _check_samples(samples: torch.Tensor) -> torch.Tensor:
    if samples.dim() != 2 or samples.shape[0] < 2:
        raise ValueError(
            f"per-sample gradients must be [batch >= 2, dim], got shape {tuple(samples.shape)}"
        )
    return samples.double()


def inner_product_test(
    samples: torch.Tensor, theta: float, segments: Sequence[int] | None = None
) -> float:
    """Required batch size of the inner-product test, ``Var_i(⟨g_i, ḡ⟩) / (θ² ‖ḡ‖⁴)``.

    ``segments`` (sizes of consecutive blocks of coordinates, e.g. one per layer): the
    per-layer form ``Σ_l Var_i(⟨g_i^l, ḡ^l⟩) / (θ² (Σ_l ‖ḡ^l‖²)²)``.
    """
    _check_positive("theta", theta)
    x = _check_samples(samples)
    num = x.new_zeros(())
    sq = x.new_zeros(())
    for block in _split(x, segments):
        mean = block.mean(0)
        num = num + (block @ mean).var(correction=1)
        sq = sq + mean.square().sum()
    return _ratio(num, theta**2 * sq.square())


def orthogonality_test(
    samples: torch.Tensor, nu: float, segments: Sequence[int] | None = None
) -> float:
    """Required batch size of the orthogonality test,
    ``Σ_j Var_i(g_i − (⟨g_i, ḡ⟩/‖ḡ‖²) ḡ)_j / (ν² ‖ḡ‖²)``; ``segments``: per-layer
    projections, as :func:`inner_product_test`."""
    _check_positive("nu", nu)
    x = _check_samples(samples)
    num = x.new_zeros(())
    sq = x.new_zeros(())
    for block in _split(x, segments):
        mean = block.mean(0)
        msq = mean.square().sum()
        sq = sq + msq
        if float(msq) == 0.0:
            num = num + block.var(0, correction=1).sum()
            continue
        residual = block - torch.outer(block @ mean / msq, mean)
        num = num + residual.var(0, correction=1).sum()
    return _ratio(num, nu**2 * sq)


def augmented_test(
    samples: torch.Tensor, theta: float, nu: float, segments: Sequence[int] | None = None
) -> float:
    """The augmented inner-product test: the larger of the inner-product and orthogonality
    requirements."""
    return max(
        inner_product_test(samples, theta, segments), orthogonality_test(samples, nu, segments)
    )
