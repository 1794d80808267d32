"""Small optimizer classes that exercise ``secondorder bench``'s construction protocol and
failure handling. They are loaded by dotted path (``--opt _toy_optimizers.NAME``), so this
module must stay importable from ``tests/bench`` (pytest puts that folder on the path)."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import nn


class ModelSGD(torch.optim.SGD):
    """Plain SGD built through ``from_model``: records the model it was built for."""

    built_for: list[nn.Module] = []

    @classmethod
    def from_model(cls, model: nn.Module, lr: float = 0.01, momentum: float = 0.0):
        opt = cls(model.parameters(), lr=lr, momentum=momentum)
        opt.model_type = type(model).__name__
        cls.built_for.append(model)
        return opt


class CurvatureProbe(torch.optim.SGD):
    """SGD that needs second derivatives: it asks for ``create_graph`` and, at every step,
    computes a Hessian-vector product through the gradients' graph (which fails without
    one). It counts the steps that had a graph in ``steps_with_graph``."""

    create_graph = True

    def __init__(self, params: Any, lr: float = 0.01) -> None:
        super().__init__(params, lr=lr)
        self.steps_with_graph = 0

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        with torch.enable_grad():
            grads = [p.grad for p in params]
            if all(g.requires_grad for g in grads):
                vs = [torch.ones_like(g) for g in grads]
                hv = torch.autograd.grad(grads, params, vs, retain_graph=False)
                assert all(torch.isfinite(h).all() for h in hv)
                self.steps_with_graph += 1
        for p in params:
            p.add_(p.grad.detach(), alpha=-self.param_groups[0]["lr"])
        return None


class CountingDiagnostics(torch.optim.SGD):
    """SGD whose ``diagnostics()`` reports known values: at step ``t`` two records with
    ``rejects`` = t and 1, ``level`` = [t, -1] and [0.5], ``param`` (an identity field)
    and a non-finite ``noisy`` value; ``skipped_steps`` is 2·t."""

    def __init__(self, params: Any, lr: float = 0.01) -> None:
        super().__init__(params, lr=lr)
        self.t = 0

    def step(self, closure: Any = None) -> Any:
        self.t += 1
        self.skipped_steps = 2 * self.t
        return super().step(closure)

    def diagnostics(self) -> list[dict[str, Any]]:
        t = float(self.t)
        return [
            {"param": 7, "rejects": self.t, "level": [t, -1.0], "noisy": float("nan")},
            {"param": 8, "rejects": 1, "level": [0.5], "noisy": 2.0},
        ]


class NaNAtStep3(torch.optim.SGD):
    """SGD that writes NaN into the parameters at its third step when ``lr >= 1`` (a
    diverging run)."""

    def __init__(self, params: Any, lr: float = 0.01) -> None:
        super().__init__(params, lr=lr)
        self.t = 0

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        self.t += 1
        if self.t == 3 and self.param_groups[0]["lr"] >= 1:
            for g in self.param_groups:
                for p in g["params"]:
                    p.fill_(float("nan"))
            return None
        return super().step(closure)


class Crashes(torch.optim.SGD):
    """SGD whose second step raises (a broken third-party optimizer)."""

    def __init__(self, params: Any, lr: float = 0.01) -> None:
        super().__init__(params, lr=lr)
        self.t = 0

    def step(self, closure: Any = None) -> Any:
        self.t += 1
        if self.t == 2:
            raise RuntimeError("boom at step 2")
        return super().step(closure)


class Hangs(torch.optim.SGD):
    """SGD whose first step creates the file named by ``$TOY_HANG_MARKER`` and then sleeps
    (a benchmark that gets killed while this optimizer trains)."""

    def step(self, closure: Any = None) -> Any:
        marker = os.environ.get("TOY_HANG_MARKER")
        if marker:
            with open(marker, "w") as f:
                f.write("started\n")
        time.sleep(600)
        return super().step(closure)
