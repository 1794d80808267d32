"""The default quick workload: a deep autoencoder on scikit-learn's bundled digits.

A scaled-down version of the paper's MNIST autoencoder that needs no download: the 1,797
8×8 handwritten digits that ship inside scikit-learn, pixels scaled to [0, 1]. A fixed
split (independent of ``--seed``) holds out 297 images for validation. Architecture
64-256-128-64-8-64-128-256-64, tanh except at the 8-unit code layer, summed sigmoid BCE.
"""

from __future__ import annotations

import torch
from torch import nn

from . import register
from ._mlp import autoencoder, pixel_bce
from .base import Setup, Workload

WIDTHS = [64, 256, 128, 64, 8, 64, 128, 256, 64]
NUM_VAL = 297
SPLIT_SEED = 1234


@register
class DigitsAutoencoder(Workload):
    name = "digits-autoencoder"
    description = (
        "default quick run: 64-256-128-64-8-64-128-256-64 tanh autoencoder on scikit-learn's "
        "bundled 8x8 digits (1500 train / 297 val)"
    )
    default_batch_size = 100
    default_steps = 600
    default_schedule = "warmup-linear"
    # a model this small runs as fast on one CPU thread as on two, and one thread keeps the
    # timings steady when the machine is busy (oversubscribed OpenMP threads spin)
    default_threads = 1
    requires = ("sklearn",)
    default_lrs = {
        "adamw": 3e-3,
        "adam": 3e-3,
        "shampoo": 3e-3,
        "sonew": 1e-2,  # best of {1e-3, 3e-3, 1e-2} in a 300-step sweep
        "rmsprop": 1e-3,
        "adagrad": 3e-2,
        "sgd": 1e-2,
    }

    def setup(self, device: torch.device, dtype: torch.dtype) -> Setup:
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "the digits-autoencoder workload needs scikit-learn: "
                "pip install 'secondorder[bench]'"
            ) from exc
        pixels = torch.as_tensor(load_digits().data, dtype=torch.float32) / 16.0
        order = torch.randperm(pixels.shape[0], generator=torch.Generator().manual_seed(SPLIT_SEED))
        pixels = pixels[order].to(device=device, dtype=dtype)
        self.val, self.train = pixels[:NUM_VAL], pixels[NUM_VAL:]
        return Setup(
            num_train=self.train.shape[0], num_val=self.val.shape[0], info={"widths": WIDTHS}
        )

    def make_model(self) -> nn.Module:
        return autoencoder(WIDTHS, code_index=4)

    def train_batch(self, index: torch.Tensor) -> torch.Tensor:
        return self.train[index.to(self.train.device)]

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return pixel_bce(model(batch), batch)

    @torch.no_grad()
    def validation_loss(self, model: nn.Module) -> float:
        return float(pixel_bce(model(self.val), self.val))
