"""The benchmark scripts' shared helpers come from ``secondorder.bench`` and keep their
meaning: seeded initialisation, per-epoch seeded permutations, last batch dropped."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture()
def common():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import _common

        yield _common
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_train_matches_a_hand_written_loop(common) -> None:
    data = torch.rand(50, 784, generator=torch.Generator().manual_seed(1))
    make = lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9)  # noqa: E731
    got = common.train(make, data, epochs=2, batch_size=20, seed=3, warmup_steps=0)

    # reference: the loop the scripts used to carry, written out
    torch.manual_seed(3)
    model = torch.nn.Sequential(*[m for pair in [
        (torch.nn.Linear(a, b), torch.nn.Tanh()) for a, b in zip(common.LAYERS[:-1],
                                                                  common.LAYERS[1:])
    ] for m in pair])  # fmt: skip
    layers = [m for m in model if isinstance(m, torch.nn.Linear)]

    def forward(x):  # tanh after every hidden layer except the 30-unit code layer
        for i, lin in enumerate(layers):
            x = lin(x)
            if i < len(layers) - 1 and lin.out_features != 30:
                x = torch.tanh(x)
        return x

    opt = make(list(model.parameters()))
    gen = torch.Generator().manual_seed(3)
    epoch_losses = []
    for _ in range(2):
        perm, losses = torch.randperm(50, generator=gen), []
        for i in range(0, 50 - 20 + 1, 20):  # 2 batches, the last 10 examples dropped
            xb = data[perm[i : i + 20]]
            opt.zero_grad()
            logits = forward(xb)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, xb, reduction="sum") / 20
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        epoch_losses.append(statistics.fmean(losses))
    assert got["steps"] == 4 and got["all_finite"]
    assert got["epoch_losses"] == epoch_losses
    assert got["peak_state_bytes"] == 4 * sum(p.numel() for p in model.parameters())


def test_loader_and_state_size_are_the_package_ones(common) -> None:
    from secondorder.bench import training
    from secondorder.bench.workloads import mnist_autoencoder

    assert common.state_bytes is training.state_bytes
    assert type(common.autoencoder()) is type(mnist_autoencoder.make_autoencoder())
    assert common.LAYERS == tuple(mnist_autoencoder.WIDTHS)
