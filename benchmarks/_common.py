"""Shared pieces of the benchmark scripts, all taken from ``secondorder.bench`` (one MNIST
reader, one autoencoder, one training loop, one state-size function for the CLI and the
scripts): thin adapters to the scripts' older call signatures, plus ``machine()``.

Run the scripts with the package importable (``pip install -e ".[bench]"`` or the venv of
``scripts/setup.sh``).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from secondorder.bench.mnist import available_splits
from secondorder.bench.optimizers import Built
from secondorder.bench.training import Plan, batch_order, state_bytes, train_run
from secondorder.bench.workloads._mlp import pixel_bce
from secondorder.bench.workloads.mnist_autoencoder import (
    WIDTHS,
    MNISTAutoencoder,
    load_pixels,
    make_autoencoder,
)

DEFAULT_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
LAYERS = tuple(WIDTHS)
__all__ = ["DEFAULT_MNIST", "LAYERS", "autoencoder", "autoencoder_loss", "load_mnist_images",
           "machine", "state_bytes", "train", "busy_note"]  # fmt: skip


def load_mnist_images(data_dir: str | os.PathLike = DEFAULT_MNIST) -> torch.Tensor:
    """The t10k images (else the train images) as float32 in [0, 1], shape (N, 784)."""
    splits = available_splits(data_dir)
    split = "t10k" if "t10k" in splits or not splits else splits[0]
    return load_pixels(str(data_dir), split)[0]


def autoencoder() -> nn.Module:
    """784-1000-500-250-30-250-500-1000-784, tanh after every hidden layer but the code."""
    return make_autoencoder()


def autoencoder_loss(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Sigmoid cross-entropy summed over the 784 pixels, averaged over the batch."""
    return pixel_bce(logits, x)


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
    """Train the autoencoder on ``data`` with ``secondorder bench``'s loop (same seeded
    initialisation and batch order, constant learning rate); every step is timed
    (zero_grad + forward + backward + optimizer step). Step-time statistics leave out the
    first ``warmup_steps`` steps."""
    workload = MNISTAutoencoder(None)
    device = torch.device("cpu")
    setup = workload.use_pixels(data, device, dtype)
    per_epoch = setup.num_train // batch_size
    steps = epochs * per_epoch
    plan = Plan(workload, batch_order(setup.num_train, batch_size, steps, seed), device, dtype,
                seed, "constant", 0, per_epoch, per_epoch)  # fmt: skip
    run = train_run(plan, lambda m: Built(make_opt(list(m.parameters())), {}, False), "train")
    losses = run["train_loss"]
    epoch_losses = [statistics.fmean(losses[i : i + per_epoch])
                    for i in range(0, len(losses), per_epoch)]  # fmt: skip
    for i, value in enumerate(epoch_losses):
        if log:
            log(f"  epoch {i + 1}/{epochs}: train loss {value:.3f}")
    timed = run["step_seconds"][warmup_steps:] or run["step_seconds"]
    return dict(
        final_loss=epoch_losses[-1] if epoch_losses else float("nan"),
        epoch_losses=epoch_losses,
        mean_step_s=statistics.fmean(timed) if timed else float("nan"),
        median_step_s=statistics.median(timed) if timed else float("nan"),
        steps=len(losses),
        all_finite=run["status"] == "ok" and len(losses) == steps,
        peak_state_bytes=run["peak_state_bytes"],
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
    load = f", load {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}{load}"


def busy_note() -> None:
    """Warn (stderr) when the CPUs are already busy and torch uses several threads.

    Step-time ratios then mean little: an OpenMP parallel region waits for its slowest
    thread, and on an oversubscribed machine one of them is often descheduled. Shampoo's
    step has many small parallel regions (per-block kernels, the eigensolver's panel
    steps), AdamW's few large ones, so Shampoo / AdamW comes out inflated (measured:
    4.0 at 2 threads vs 2.8 at 1 thread, same process, load ~20 on 2 CPUs).
    """
    if not hasattr(os, "getloadavg") or torch.get_num_threads() == 1:
        return
    load = os.getloadavg()[0]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if cpus and load > cpus:
        print(
            f"note: the machine is busy (load {load:.1f} on {cpus} CPUs) and torch uses "
            f"{torch.get_num_threads()} threads: step-time ratios will be skewed against the "
            "optimizer with more, smaller parallel kernels (Shampoo); use --threads 1 or a "
            "quiet machine",
            file=sys.stderr,
            flush=True,
        )
