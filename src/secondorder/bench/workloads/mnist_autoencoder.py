"""The SONew paper's MNIST autoencoder benchmark, exactly.

784-1000-500-250-30-250-500-1000-784 fully connected, tanh after every hidden layer except
the 30-unit code layer, logits out; sigmoid cross-entropy summed over the 784 pixels and
averaged over the batch; batch 1000; 100 epochs; linear warm-up over 5 epochs, then linear
decay to 0. Pixels are scaled to [0, 1]. The paper reports training loss, so there is no
validation split. Uses the ``train`` split when ``--data-dir`` holds it, else ``t10k``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..mnist import MNISTNotFoundError, available_splits, expected_files, load_mnist_images
from . import register
from ._mlp import autoencoder, pixel_bce
from .base import Setup, Workload

WIDTHS = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]


def make_autoencoder() -> nn.Sequential:
    """The paper's 784-1000-500-250-30-250-500-1000-784 autoencoder (logits out)."""
    return autoencoder(WIDTHS, code_index=4)


def load_pixels(data_dir: str, split: str | None = None) -> tuple[torch.Tensor, str]:
    """The images of ``split`` (default: ``train`` when present, else ``t10k``) as float32
    pixels in [0, 1], shape ``[N, 784]``, and the split's name."""
    if split is None:
        splits = available_splits(data_dir)
        split = splits[0] if splits else "t10k"  # loading "t10k" raises the clear error
    images = load_mnist_images(data_dir, split)
    return images.reshape(images.shape[0], -1).to(torch.float32) / 255.0, split


@register
class MNISTAutoencoder(Workload):
    name = "mnist-autoencoder"
    description = (
        "SONew paper benchmark: MNIST 784-1000-500-250-30-250-500-1000-784 tanh autoencoder, "
        "summed sigmoid BCE (needs --data-dir with the IDX files)"
    )
    default_batch_size = 1000
    default_epochs = 100
    default_schedule = "warmup-linear"
    default_warmup = 0.05  # 5 of 100 epochs
    default_lrs = {
        "adamw": 1e-3,
        "adam": 1e-3,
        "shampoo": 1e-3,
        "sonew": 3e-3,  # 1e-3 barely moves in the first epochs
        "rmsprop": 1e-4,
        "adagrad": 1e-2,
        "sgd": 1e-3,
    }
    needs_data_dir = True

    def setup(self, device: torch.device, dtype: torch.dtype) -> Setup:
        if self.data_dir is None:
            images_stem = expected_files("t10k")[0]
            raise MNISTNotFoundError(
                f"mnist-autoencoder needs --data-dir: a directory holding {images_stem}[.gz] "
                f"(or {expected_files('train')[0]}[.gz])"
            )
        pixels, split = load_pixels(self.data_dir)
        return self.use_pixels(pixels, device, dtype, split)

    def use_pixels(
        self, pixels: torch.Tensor, device: torch.device, dtype: torch.dtype, split: str = "given"
    ) -> Setup:
        """Set up on already loaded ``[N, 784]`` pixels (the benchmark scripts do this)."""
        self.pixels = pixels.to(device=device, dtype=dtype)
        return Setup(
            num_train=self.pixels.shape[0],
            info={"split": split, "data_dir": str(self.data_dir), "widths": WIDTHS},
        )

    def make_model(self) -> nn.Module:
        return make_autoencoder()

    def train_batch(self, index: torch.Tensor) -> torch.Tensor:
        return self.pixels[index.to(self.pixels.device)]

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return pixel_bce(model(batch), batch)
