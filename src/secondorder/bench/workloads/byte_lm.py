"""A small decoder-only byte-level transformer language model on text shipped with Python.

Corpus: the reference documentation that CPython bundles for ``help()``
(``pydoc_data.topics``; topics in sorted order), or, where a distribution strips it, the
source of a fixed list of standard-library modules. Both are available offline and selected
deterministically; the corpus size and SHA-256 go into ``results.json`` because they depend
on the Python version. The last 10% of the bytes are the validation split.

Model: byte embedding + learned positions, pre-LayerNorm blocks (causal self-attention,
GELU MLP), final LayerNorm, linear head over 256 byte values. Training examples are the
non-overlapping windows of ``context + 1`` bytes of the training split.
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import register
from .base import Setup, Workload

CONTEXT = 128
WIDTH = 128
HEADS = 4
LAYERS = 4
VAL_FRACTION = 0.1
MAX_VAL_WINDOWS = 64
_FALLBACK_MODULES = (
    "argparse.py",
    "textwrap.py",
    "difflib.py",
    "inspect.py",
    "functools.py",
    "typing.py",
    "dataclasses.py",
    "pathlib.py",
    "subprocess.py",
    "tarfile.py",
)


def load_corpus() -> tuple[bytes, str]:
    """The corpus bytes and a description of where they came from."""
    try:
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[key] for key in sorted(topics))
        if len(text) > 100_000:
            return text.encode("utf-8"), "pydoc_data.topics (sorted topics)"
    except ImportError:  # pragma: no cover - depends on the Python build
        pass
    stdlib = Path(sysconfig.get_paths()["stdlib"])  # pragma: no cover
    parts = [(stdlib / n).read_bytes() for n in _FALLBACK_MODULES if (stdlib / n).is_file()]
    return b"\n".join(parts), "stdlib sources: " + ", ".join(_FALLBACK_MODULES)  # pragma: no cover


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.norm2(x))


class ByteTransformer(nn.Module):
    def __init__(self, context: int, width: int, heads: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.position = nn.Parameter(torch.randn(context, width) / math.sqrt(width))
        self.blocks = nn.Sequential(*(_Block(width, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.head(self.norm(self.blocks(x)))


def _next_byte_loss(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    logits = model(windows[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, 256), windows[:, 1:].reshape(-1))


@register
class ByteLM(Workload):
    name = "byte-lm"
    description = (
        f"decoder-only byte-level transformer ({LAYERS} layers, width {WIDTH}, context "
        f"{CONTEXT}) on Python's bundled documentation text; reports validation loss"
    )
    default_batch_size = 32
    default_steps = 300
    default_schedule = "warmup-linear"
    default_lrs = {
        "adamw": 1e-3,
        "adam": 1e-3,
        "shampoo": 1e-3,
        "sonew": 1e-3,
        "rmsprop": 3e-4,
        "adagrad": 1e-2,
        "sgd": 3e-2,
    }

    def setup(self, device: torch.device, dtype: torch.dtype) -> Setup:
        corpus, source = load_corpus()
        data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long()
        n_val = int(len(data) * VAL_FRACTION)
        train, val = data[:-n_val], data[-n_val:]
        span = CONTEXT + 1
        self.train = train[: len(train) // span * span].view(-1, span).to(device)
        val_windows = val[: len(val) // span * span].view(-1, span)
        self.val = val_windows[:MAX_VAL_WINDOWS].to(device)
        return Setup(
            num_train=self.train.shape[0],
            num_val=self.val.shape[0],
            info={
                "corpus": source,
                "corpus_bytes": len(corpus),
                "corpus_sha256": hashlib.sha256(corpus).hexdigest(),
                "context": CONTEXT,
                "width": WIDTH,
                "heads": HEADS,
                "layers": LAYERS,
            },
        )

    def make_model(self) -> nn.Module:
        return ByteTransformer(CONTEXT, WIDTH, HEADS, LAYERS)

    def train_batch(self, index: torch.Tensor) -> torch.Tensor:
        return self.train[index.to(self.train.device)]

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return _next_byte_loss(model, batch)

    @torch.no_grad()
    def validation_loss(self, model: nn.Module) -> float:
        total = 0.0
        for chunk in self.val.split(32):
            total += float(_next_byte_loss(model, chunk)) * chunk.shape[0]
        return total / self.val.shape[0]
