"""Small models with every parameter role, shared by the SCALE / Muon / roles tests."""

from __future__ import annotations

import torch
from torch import nn


class TinyLM(nn.Module):
    """Embedding -> conv over time -> linear -> LayerNorm -> linear head (untied or tied)."""

    def __init__(self, vocab: int = 11, width: int = 6, hidden: int = 8, tied: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.conv = nn.Conv1d(width, width, 3, padding=1)
        self.fc = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=not tied)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + torch.tanh(self.conv(h.transpose(1, 2)).transpose(1, 2))
        h = h + self.fc2(torch.tanh(self.fc(h)))
        return self.head(self.norm(h))


def lm_batch(k: int, vocab: int = 11, n: int = 4, t: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + k)
    return torch.randint(0, vocab, (n, t + 1), generator=g)


def lm_loss(model: nn.Module, tokens: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    targets = tokens[:, 1:].reshape(-1)
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets)
    return loss * scale


def lm_train(model: nn.Module, opt: torch.optim.Optimizer, steps, scale: float = 1.0) -> None:
    for k in steps:
        opt.zero_grad()
        lm_loss(model, lm_batch(k), scale).backward()
        opt.step()
