"""MKOR's tensor math: rank-1 layer statistics, Sherman-Morrison inverse-factor updates,
the stabiliser, and the Kronecker-factored preconditioning with its norm-preserving rescale.

A layer ``y = W x + b`` (``nn.Linear``; ``nn.Conv2d`` with its kernel flattened to a matrix
``W`` of shape ``out x (in_channels * kh * kw)``) has the gradient matrix
``G = [dW | db]`` of shape ``m x n`` (``m`` outputs, ``n`` inputs plus one for the bias).
MKOR keeps two inverse factors, ``P_L`` (``m x m``, output side) and ``P_R`` (``n x n``,
input side), and preconditions ``G -> P_L G P_R``. The factors are never inverted: each
update folds one vector into the current inverse with the Sherman-Morrison identity

    (A + v v^T)^-1 = A^-1 - (A^-1 v)(v^T A^-1) / (1 + v^T A^-1 v),

which costs ``O(d^2)`` instead of the ``O(d^3)`` of an inversion. The vectors are batch
means: ``a`` (mean layer input, with a 1 for the bias) for ``P_R`` and ``g`` (mean of the
output gradients scaled by the number of rows) for ``P_L``.

Every function is pure (returns new tensors) and works on a single factor or on a stack
``(..., d, d)`` of same-size factors with vectors ``(..., d)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- statistics


def _finish(rows: torch.Tensor, bias: bool, clip: float) -> torch.Tensor:
    """Per-row clamp to ``[-clip, clip]``, append the bias column (a clamped 1), row mean."""
    rows = rows.clamp(-clip, clip)
    mean = rows.mean(0)
    if bias:
        one = torch.ones(1, dtype=mean.dtype, device=mean.device).clamp_(-clip, clip)
        mean = torch.cat([mean, one])
    return mean


def linear_input_stat(x: torch.Tensor, bias: bool, clip: float) -> torch.Tensor:
    """``a`` of an ``nn.Linear`` from its input ``x`` of shape ``(..., d_in)``.

    Rows are all leading positions (batch, or batch x sequence for 3-d input). Each entry
    is clamped to ``[-clip, clip]``, then rows are averaged; a 1 is appended for the bias.
    Computed in float32 (or float64 for float64 input).
    """
    rows = x.reshape(-1, x.shape[-1])
    return _finish(rows.to(_stat_dtype(x)), bias, clip)


def linear_output_stat(gout: torch.Tensor, clip: float) -> torch.Tensor:
    """``g`` of an ``nn.Linear`` from the gradient of its output, shape ``(..., d_out)``.

    The mean over the ``r`` rows of ``clamp(r * dL/dy_row)``; without clamping this is the
    sum of the rows, i.e. the per-example mean gradient for a mean-reduced loss.
    """
    rows = gout.reshape(-1, gout.shape[-1]).to(_stat_dtype(gout))
    return _finish(rows * rows.shape[0], False, clip)


class ConvGeometry(NamedTuple):
    """What ``nn.Conv2d`` needs to locate its input patches (zero padding only)."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    padding: tuple[int, int, int, int]  # left, right, top, bottom (F.pad order)


def conv_geometry(conv: torch.nn.Conv2d) -> ConvGeometry:
    """The geometry of ``conv``; string padding (``"same"``/``"valid"``) is resolved."""
    kh, kw = conv.kernel_size
    dh, dw = conv.dilation
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            pad = (0, 0, 0, 0)
        else:  # "same": total padding d (k - 1), the extra one on the right/bottom
            th, tw = dh * (kh - 1), dw * (kw - 1)
            pad = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    else:
        ph, pw = conv.padding
        pad = (pw, pw, ph, ph)
    return ConvGeometry((kh, kw), tuple(conv.stride), (dh, dw), pad)


def conv2d_input_stat(x: torch.Tensor, geom: ConvGeometry, bias: bool, clip: float) -> torch.Tensor:
    """``a`` of an ``nn.Conv2d`` from its input ``x`` of shape ``(N, C, H, W)``.

    Per example, the mean over the ``L`` output positions of the unfolded input patches
    (the columns of ``F.unfold``, ordered channel, kernel row, kernel column like the
    flattened weight); clamped per example, then averaged over the batch, with a 1 for the
    bias. Computed without materialising the ``N x C kh kw x L`` unfolded tensor: each
    kernel offset is one strided slice of the padded input.
    """
    if x.dim() == 3:  # unbatched input
        x = x.unsqueeze(0)
    x = x.to(_stat_dtype(x))
    if any(geom.padding):
        x = F.pad(x, geom.padding)
    (kh, kw), (sh, sw), (dh, dw) = geom.kernel_size, geom.stride, geom.dilation
    oh = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    sums = torch.stack(
        [
            x[
                :,
                :,
                i * dh : i * dh + sh * (oh - 1) + 1 : sh,
                j * dw : j * dw + sw * (ow - 1) + 1 : sw,
            ].sum((2, 3))
            for i in range(kh)
            for j in range(kw)
        ],
        dim=-1,
    )  # (N, C, kh * kw)
    rows = sums.reshape(x.shape[0], -1) / (oh * ow)
    return _finish(rows, bias, clip)


def conv2d_output_stat(gout: torch.Tensor, clip: float) -> torch.Tensor:
    """``g`` of an ``nn.Conv2d`` from its output gradient ``(N, out, OH, OW)``: per example
    ``N * (sum over positions) / L``, clamped, then averaged over the batch."""
    if gout.dim() == 3:
        gout = gout.unsqueeze(0)
    g = gout.to(_stat_dtype(gout))
    n, positions = g.shape[0], g.shape[2] * g.shape[3]
    return _finish(g.sum((2, 3)) * (n / positions), False, clip)


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------- factor updates


def _eye_like(p: torch.Tensor) -> torch.Tensor:
    return torch.eye(p.shape[-1], dtype=p.dtype, device=p.device).expand_as(p)


def sherman_morrison(m: torch.Tensor, v: torch.Tensor, c: float | torch.Tensor = 1.0):
    """``(M^-1 + c v v^T)^-1`` given ``M`` (any square matrix, or a stack) and ``v``:
    ``M - c (M v)(v^T M) / (1 + c v^T M v)``."""
    mv = (m @ v.unsqueeze(-1)).squeeze(-1)  # M v
    vm = (v.unsqueeze(-2) @ m).squeeze(-2)  # v^T M
    denom = 1 + c * (v * mv).sum(-1)
    return m - (c / denom)[..., None, None] * (mv.unsqueeze(-1) * vm.unsqueeze(-2))


def official_update(p: torch.Tensor, v: torch.Tensor, decay: float | torch.Tensor):
    """The released code's rule: blend towards the identity in inverse space, then fold in
    ``v`` with unit weight: ``P <- (M^-1 + v v^T)^-1`` with ``M = decay P + (1 - decay) I``.
    """
    m = decay * p + (1 - decay) * _eye_like(p)
    return sherman_morrison(m, v)


def ema_update(p: torch.Tensor, v: torch.Tensor, decay: float | torch.Tensor):
    """The paper's rule, exactly: the inverse of the exponential moving average
    ``decay * P^-1 + (1 - decay) v v^T``, i.e. ``(1/decay) (P^-1 + c v v^T)^-1`` with
    ``c = (1 - decay) / decay``."""
    return sherman_morrison(p, v, (1 - decay) / decay) / decay


def blend_identity(p: torch.Tensor, weight: float | torch.Tensor) -> torch.Tensor:
    """``(1 - weight) P + weight I``: the stabiliser's reset (``weight = 1``: back to I)."""
    return (1 - weight) * p + weight * _eye_like(p)


def too_large(p: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """The stabiliser's trigger, a bool tensor (no host read): ``max |P_ij| > threshold``."""
    return p.abs().amax((-2, -1)) > threshold


# ---------------------------------------------------------------------- preconditioning


def kron_precondition(left: torch.Tensor, grad: torch.Tensor, right: torch.Tensor):
    """``P_L G P_R`` (stacks batch), in the dtype of ``grad``: the factors are cast to it.

    In vectorised (column-major) form this is ``(P_R^T kron P_L) vec(G)``, the
    Kronecker-factored preconditioner applied without forming the Kronecker product.
    """
    return left.to(grad.dtype) @ grad @ right.to(grad.dtype)


def norm_preserving_scale(grad_norm: torch.Tensor, update_norm: torch.Tensor) -> torch.Tensor:
    """``grad_norm / update_norm``, and 0 where the update is 0 (then the gradient was 0 and
    the scale does not matter). No host read."""
    safe = torch.where(update_norm > 0, update_norm, torch.ones_like(update_norm))
    return torch.where(update_norm > 0, grad_norm / safe, torch.zeros_like(update_norm))


def weight_bias_norms(mat: torch.Tensor, bias: bool) -> torch.Tensor:
    """``||W|| + ||b||`` of a matrix ``[W | b]`` (``||W||`` without a bias column): the
    released code's measure, a sum of the two Frobenius norms."""
    if not bias:
        return torch.linalg.vector_norm(mat, dim=(-2, -1))
    w = torch.linalg.vector_norm(mat[..., :-1], dim=(-2, -1))
    return w + torch.linalg.vector_norm(mat[..., -1], dim=-1)
