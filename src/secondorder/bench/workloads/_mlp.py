"""The deep fully connected autoencoder shared by the two autoencoder workloads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def autoencoder(widths: list[int], code_index: int) -> nn.Sequential:
    """Linear layers ``widths[0] -> ... -> widths[-1]`` with tanh after every hidden layer
    except the code layer (``widths[code_index]``, left linear); the output is logits."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]), start=1):
        layers.append(nn.Linear(a, b))
        if i != code_index and i != len(widths) - 1:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def pixel_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sigmoid cross-entropy summed over pixels, averaged over the batch (computed in fp32)."""
    per_pixel = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="sum")
    return per_pixel / logits.shape[0]
