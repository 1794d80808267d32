"""Shared pieces of the benchmark scripts: MNIST IDX data, the SONew-paper autoencoder and a
timed training loop. Self-contained on purpose (torch only) so that the scripts measure the
optimizers, not the harness.
"""

from __future__ import annotations

import gzip
import os
import platform
import statistics
import struct
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

DEFAULT_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
LAYERS = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)


def load_mnist_images(data_dir: str | os.PathLike = DEFAULT_MNIST) -> torch.Tensor:
    """The t10k (or train) images as float32 in [0, 1], shape (N, 784)."""
    d = Path(data_dir)
    for name in (
        "t10k-images-idx3-ubyte.gz",
        "t10k-images-idx3-ubyte",
        "train-images-idx3-ubyte.gz",
        "train-images-idx3-ubyte",
    ):
        f = d / name
        if f.exists():
            raw = gzip.open(f).read() if f.suffix == ".gz" else f.read_bytes()
            magic, n, rows, cols = struct.unpack(">IIII", raw[:16])
            if magic != 2051 or len(raw) != 16 + n * rows * cols:
                raise ValueError(f"{f} is not a valid IDX image file")
            x = torch.frombuffer(bytearray(raw[16:]), dtype=torch.uint8)
            return x.reshape(n, rows * cols).float().div_(255.0)
    raise FileNotFoundError(f"no MNIST image file (t10k-images-idx3-ubyte[.gz]) in {d}")


def autoencoder() -> nn.Module:
    """784-1000-500-250-30-250-500-1000-784, tanh after every hidden layer but the code."""
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(LAYERS[:-1], LAYERS[1:])):
        mods.append(nn.Linear(a, b))
        if i < len(LAYERS) - 2 and b != 30:
            mods.append(nn.Tanh())
    return nn.Sequential(*mods)


def autoencoder_loss(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Sigmoid cross-entropy summed over the 784 pixels, averaged over the batch."""
    return (
        nn.functional.binary_cross_entropy_with_logits(logits.float(), x.float(), reduction="sum")
        / x.shape[0]
    )


def train(
    make_opt: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    data: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 1000,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    warmup_steps: int = 5,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train the autoencoder; time every step (forward + backward + optimizer step)."""
    torch.manual_seed(seed)
    model = autoencoder().to(dtype)
    opt = make_opt(list(model.parameters()))
    data = data.to(dtype)
    gen = torch.Generator().manual_seed(seed)
    n = data.shape[0]
    step_times: list[float] = []
    epoch_losses: list[float] = []
    for ep in range(epochs):
        perm = torch.randperm(n, generator=gen)
        losses = []
        for i in range(0, n - batch_size + 1, batch_size):
            xb = data[perm[i : i + batch_size]]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = autoencoder_loss(model(xb), xb)
            loss.backward()
            opt.step()
            step_times.append(time.perf_counter() - t0)
            losses.append(loss.detach())
        epoch_losses.append(torch.stack(losses).float().mean().item())
        if log:
            log(f"  epoch {ep + 1}/{epochs}: train loss {epoch_losses[-1]:.3f}")
    timed = step_times[warmup_steps:] or step_times
    return dict(
        final_loss=epoch_losses[-1],
        epoch_losses=epoch_losses,
        mean_step_s=statistics.fmean(timed),
        median_step_s=statistics.median(timed),
        steps=len(step_times),
        all_finite=all(map(lambda v: v == v and abs(v) != float("inf"), epoch_losses)),
    )


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
