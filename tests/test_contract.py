"""The optimizer contract: one suite every optimizer in ``secondorder`` passes.

Every ``torch.optim.Optimizer`` subclass exported in ``secondorder.__all__`` is discovered
automatically and runs every test below. A new optimizer joins by **one line in CONFIGS**
(its test hyperparameters) and **one line in INVALID** (bad values for each of its
hyperparameters); without them every test of that optimizer fails with a message saying so.

Two extra rows run beside the library's optimizers:

* ``AdamW`` -- ``torch.optim.AdamW`` as a *reference*: where the contract says "behave like
  torch.optim", the same test passes on AdamW, which proves the expectation is torch's.
  Tests of behaviour torch.optim does not have (non-finite policy, shape-checked loading,
  complex rejection) skip this row with the reason.
* ``ContractSGD`` -- a ten-line :class:`SecondOrderOptimizer` subclass defined here, so the
  shared base class (``optim/base.py``) is exercised on its own.

Run as a script (``python tests/test_contract.py resume ...``) this module is the *new
process* of the checkpoint/resume test.
"""

from __future__ import annotations

import copy
import gc
import inspect
import math
import os
import pickle
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import secondorder
from secondorder._validation import check_float
from secondorder.optim.base import SecondOrderOptimizer

# ============================================================================ registry
# fmt: off
#: Test hyperparameters, one line per optimizer. ``precondition_frequency`` is small so the
#: short runs below cross several root computations; ``block_size`` is small so real blocking
#: happens on tiny tensors.
CONFIGS: dict[str, dict[str, Any]] = {
    "AdamW": dict(lr=0.02, weight_decay=0.01),  # torch.optim reference row
    "ContractSGD": dict(lr=0.02, momentum=0.9, weight_decay=0.01),  # base.py on its own
    "Shampoo": dict(lr=0.02, weight_decay=0.01, block_size=8, precondition_frequency=3),
    "SONew": dict(lr=0.02, weight_decay=0.01, band=1, eps=3e-2),  # eps: see contract-findings
    "AdaHessian": dict(lr=0.1, weight_decay=0.01, eps=1e-2, hessian_power=0.5, update_every=2),
    "MFAC": dict(lr=0.02, weight_decay=0.01, num_grads=4, damp=1e-2, momentum=0.9),
    "SCALE": dict(lr=0.02, weight_decay=0.01),
    "Muon": dict(lr=0.02, weight_decay=0.01),
    "MKOR": dict(lr=0.02, weight_decay=0.01, base="adam"),  # no model: all go to the base
    "AdaGradNorm": dict(lr=0.5, weight_decay=0.01),
    "SOAP": dict(lr=0.02, weight_decay=0.01, block_size=8, precondition_frequency=3),
}

NAN, INF = float("nan"), float("inf")
#: Invalid values per hyperparameter: ``(argument, value)`` must raise ``ValueError`` or
#: ``TypeError`` at construction with the argument's name in the message, or
#: ``(argument, value, pattern)`` where the message names it differently (torch.optim).
#: Every hyperparameter in the optimizer's ``defaults`` must appear (a test checks it).
INVALID: dict[str, list[tuple[Any, ...]]] = {
    "AdamW": [
        ("lr", -1e-3, "learning rate"), ("eps", -1e-8, "epsilon"),
        ("betas", (1.0, 0.999), "beta parameter at index 0"),
        ("betas", (0.9, -0.1), "beta parameter at index 1"), ("weight_decay", -0.1, "weight_decay"),
    ],
    "ContractSGD": [
        ("lr", -1.0), ("lr", NAN), ("lr", INF), ("lr", "0.1"), ("momentum", 1.0),
        ("momentum", -0.5), ("weight_decay", -1.0), ("weight_decay", INF), ("nonfinite", "ignore"),
    ],
    "Shampoo": [
        ("lr", -1.0), ("lr", NAN), ("lr", INF), ("lr", None), ("betas", (1.0, 0.9)),
        ("betas", (0.9, 1.5)), ("betas", (-0.1, 0.9)), ("betas", 0.9), ("betas", (0.9, NAN)),
        ("eps", 0.0), ("eps", -1e-6), ("eps", NAN), ("weight_decay", -1e-2),
        ("weight_decay", NAN), ("weight_decay", INF), ("block_size", 0), ("block_size", 2.5),
        ("block_size", True), ("precondition_frequency", 0), ("precondition_frequency", 1.5),
        ("start_preconditioning_step", 0), ("start_preconditioning_step", 2.0),
        ("graft", "adamw"), ("graft", 1), ("graft_eps", 0.0), ("graft_eps", -1.0),
        ("nesterov", "yes"), ("nesterov", 1), ("exponent_override", 0),
        ("exponent_override", 0.5), ("root_method", "svd"), ("decoupled_weight_decay", None),
        ("precondition_1d", "no"), ("inverse_failure_threshold", 0.0),
        ("inverse_failure_threshold", NAN), ("matmul_dtype", torch.float64),
        ("matmul_dtype", "bfloat16"), ("nonfinite", "ignore"), ("async_roots", "yes"),
        ("async_staleness", 0), ("async_staleness", 1.5), ("async_deterministic_delay", 0),
        ("async_workers", 0), ("distributed", 1), ("communication_dtype", torch.float16),
        ("process_group", "gloo"),
        ("max_consecutive_root_failures", 0), ("on_root_failure", "ignore"),
        ("root_memory_budget", 0), ("root_memory_budget", 1.5), ("packed_statistics", "yes"),
        ("ridge", "abs"), ("statistics_frequency", 0), ("statistics_frequency", 1.5),
        ("shard_optimizer_state", "yes"), ("fsdp_mode", "global"),
    ],
    "SONew": [
        ("lr", -1.0), ("lr", NAN), ("lr", INF), ("betas", (1.0, 0.9)), ("betas", (0.9, 1.5)),
        ("betas", 0.9), ("eps", 0.0), ("eps", -1.0), ("weight_decay", -1e-2),
        ("weight_decay", NAN), ("band", -1), ("band", 1.5), ("graft", "sgdw"),
        ("graft_eps", 0.0), ("graft_eps", -1.0), ("damping", "none"), ("state_dtype", torch.int32),
        ("state_dtype", "float32"), ("compute_dtype", torch.float16), ("guard_threshold", 1.5),
        ("guard_threshold", -0.1), ("precondition_1d", 1), ("nonfinite", "ignore"),
        ("foreach", "yes"),
    ],
    "AdaHessian": [
        ("lr", -1.0), ("lr", NAN), ("betas", (1.0, 0.9)), ("betas", (0.9, 1.0)), ("eps", 0.0),
        ("weight_decay", -0.1), ("hessian_power", 0.0), ("hessian_power", 1.5),
        ("spatial_average", "window"), ("spatial_average", 0), ("spatial_average", True),
        ("abs_before_average", 1), ("update_every", 0), ("n_probes", 0), ("n_probes", 1.5),
        ("seed", -1), ("seed", "a"), ("nonfinite", "ignore"), ("foreach", "yes"),
        ("process_group", "world"),
    ],
    "MFAC": [
        ("lr", -1.0), ("lr", INF), ("num_grads", 0), ("num_grads", 2.5), ("damp", 0.0),
        ("damp", -1e-3), ("damp", NAN), ("momentum", 1.0), ("momentum", -0.1),
        ("weight_decay", -1e-2), ("block_size", 0), ("block_size", 1.5), ("scale", "t"),
        ("nonfinite", "ignore"), ("foreach", 1),
    ],
    "SCALE": [
        ("lr", -1.0), ("lr", NAN), ("momentum", 1.0), ("momentum", -0.1), ("weight_decay", -1.0),
        ("norm", "l1"), ("eps", 0.0), ("adamw_betas", (1.0, 0.9)), ("adamw_betas", 0.9),
        ("adamw_eps", 0.0), ("role", None), ("role", "head"), ("nonfinite", "ignore"),
        ("foreach", 1),
    ],
    "Muon": [
        ("lr", -1.0), ("lr", INF), ("momentum", 1.0), ("nesterov", 1), ("ns_steps", 0),
        ("ns_steps", 2.5), ("scaling", "l2"), ("weight_decay", -1.0), ("adamw_betas", (0.9, 1.0)),
        ("adamw_eps", -1.0), ("ns_dtype", torch.float16), ("role", None), ("nonfinite", "ignore"),
        ("foreach", "auto"),
    ],
    "MKOR": [
        ("lr", -1.0), ("lr", NAN), ("betas", (1.0, 0.9)), ("eps", -1.0), ("weight_decay", -0.1),
        ("amsgrad", "yes"), ("decoupled_weight_decay", 1), ("momentum", 0.9), ("model", 3),
        ("base", "lamb"), ("base", secondorder.Shampoo), ("nesterov", True), ("base_kwargs", {}),
        ("variant", "both"), ("inv_freq", 0), ("factor_decay", 1.0), ("factor_decay", 0.0),
        ("stabilizer_threshold", 0.0), ("stabilizer_blend", 0.0), ("stabilizer_blend", 1.5),
        ("clip", 0.0), ("warmup_steps", -1), ("factor_dtype", torch.int32), ("precondition", 1),
        ("exclude", "fc1"), ("exclude", ["fc1"]), ("max_factor_dim", 0), ("hybrid_window", -1),
        ("hybrid_tol", NAN), ("base_optimizer", "SGD"), ("nonfinite", "ignore"),
    ],
    "AdaGradNorm": [("lr", -1.0), ("lr", NAN), ("initial_accumulator", 0.0), ("eps", -1.0),
                    ("weight_decay", -1.0), ("mode", "column"), ("nonfinite", "ignore"),
                    ("foreach", 0)],
    "SOAP": [
        ("lr", -1.0), ("lr", NAN), ("betas", (1.0, 0.9)), ("betas", (0.9, 1.5)), ("eps", 0.0),
        ("weight_decay", -1e-2), ("block_size", 0), ("precondition_frequency", 0),
        ("start_preconditioning_step", 1), ("start_preconditioning_step", 2.5),
        ("shampoo_beta", 1.5), ("shampoo_beta", NAN), ("basis_method", "svd"),
        ("precondition_1d", "no"), ("nonfinite", "ignore"), ("foreach", "yes"),
    ],
}

#: Optional: more settings per optimizer (overrides of CONFIGS) that reach other code paths.
#: Rows ``"Name/v1"``, ``"Name/v2"``, ... run the resume, state-dict, non-finite, shape,
#: dtype and grad tests; ``v1`` is also the per-group override in the param-group tests and
#: the "other constructor settings" of test_loaded_hyperparameters_win.
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "AdamW": [dict(amsgrad=True, betas=(0.8, 0.99))],
    "ContractSGD": [dict(momentum=0.5, weight_decay=0.0)],
    "Shampoo": [
        dict(block_size=4, precondition_frequency=2, start_preconditioning_step=1,
             precondition_1d=True, graft="rmsprop", nesterov=True, root_method="eigh"),
        dict(graft=None, betas=(0.0, 1.0), exponent_override=2, decoupled_weight_decay=False,
             lr=0.005, eps=1e-4),
        dict(graft="adagrad", block_size=3, betas=(0.5, 0.9), matmul_dtype=torch.bfloat16),
        dict(async_roots=True, async_deterministic_delay=1, precondition_frequency=2),
        dict(distributed=True, communication_dtype=torch.bfloat16),  # no process group: 1 rank
        dict(root_memory_budget=1, on_root_failure="graft", max_consecutive_root_failures=1,
             packed_statistics=True),
        dict(ridge="absolute", eps=1e-4, block_size=3, precondition_frequency=2),
        dict(statistics_frequency=2, precondition_frequency=3, start_preconditioning_step=2),
    ],
    "SONew": [
        dict(band=0, precondition_1d=False, betas=(0.8, 0.99)),
        dict(band=3, state_dtype=torch.float32, graft=None, damping="absolute", eps=1e-2,
             lr=0.05, foreach=False),
        dict(compute_dtype=torch.bfloat16, betas=(0.0, 1.0), band=2),
    ],
    "AdaHessian": [
        dict(hessian_power=1.0, eps=1e-4, spatial_average="row", update_every=1, n_probes=2,
             betas=(0.8, 0.99)),
        dict(spatial_average=3, abs_before_average=False, update_every=3, seed=7),
    ],
    "MFAC": [
        dict(block_size=4, scale="count", momentum=0.0, lr=20.0, damp=1e3),
        dict(block_size=7, num_grads=1, weight_decay=0.0, lr=10.0, damp=1e3),
    ],
    "SCALE": [dict(norm="l2", momentum=0.5, adamw_betas=(0.8, 0.99), eps=1e-6, foreach=False)],
    "Muon": [dict(nesterov=False, scaling="spectral", ns_steps=3, ns_dtype=torch.bfloat16,
                  foreach=False)],
    "MKOR": [  # v1: per-group settings only (it is also a param-group override)
        dict(variant="paper", inv_freq=3, factor_decay=0.9, stabilizer_blend=0.5, clip=10.0,
             warmup_steps=2, factor_dtype=torch.bfloat16, precondition=False),
        dict(base="sgd", lr=0.005), dict(base="adamw", hybrid_window=2, hybrid_tol=0.5),
    ],
    "AdaGradNorm": [dict(mode="row", lr=1.0, initial_accumulator=1.0, foreach=False)],
    "SOAP": [
        dict(block_size=4, precondition_frequency=2, start_preconditioning_step=3,
             precondition_1d=True, basis_method="eigh", betas=(0.9, 0.99)),
        dict(betas=(0.0, 1.0), shampoo_beta=0.9, weight_decay=0.0, precondition_frequency=1,
             foreach=False),
    ],
}
# fmt: on

#: Rows that are torch.optim itself: tests of library-only behaviour skip them.
REFERENCE = {"AdamW"}


# ====================================================================== local optimizer
class ContractSGD(SecondOrderOptimizer):
    """SGD with momentum and decoupled weight decay: the smallest SecondOrderOptimizer."""

    _param_shaped_keys = ("momentum_buffer",)

    def __init__(self, params, lr=1e-3, momentum=0.0, weight_decay=0.0, *, nonfinite="skip"):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _validate_group(self, group):
        check_float("lr", group["lr"], low=0.0)
        check_float("momentum", group["momentum"], low=0.0, high=1.0, high_open=True)
        check_float("weight_decay", group["weight_decay"], low=0.0)

    def _check_loaded_state(self, p, st):
        super()._check_loaded_state(p, st)
        if st and "momentum_buffer" not in st:  # e.g. a torch.optim.AdamW state dict
            raise ValueError(f"state {sorted(st)} is not a ContractSGD state (no momentum_buffer)")

    def _update(self, work):
        for group, params in work:
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["momentum_buffer"] = torch.zeros(p.shape, dtype=torch.float32)
                state["step"] += 1
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(p.grad.float())
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(buf.to(p.dtype), alpha=-group["lr"])


# ==================================================================== discovery helpers
def _exported_optimizers() -> dict[str, type[torch.optim.Optimizer]]:
    out = {}
    for name in secondorder.__all__:
        obj = getattr(secondorder, name)
        if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer):
            out[name] = obj
    return out


EXPORTED = _exported_optimizers()
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "AdamW": torch.optim.AdamW,
    "ContractSGD": ContractSGD,
    **EXPORTED,
}
NAMES = list(OPTIMIZERS)
LIBRARY = [n for n in NAMES if n not in REFERENCE]
#: every optimizer with its CONFIGS settings, then each of its VARIANTS ("Shampoo/v1", ...)
ROWS = NAMES + [f"{n}/v{i + 1}" for n in NAMES for i in range(len(VARIANTS.get(n, [])))]


def base_name(row: str) -> str:
    return row.split("/")[0]


def variant(name: str, i: int) -> dict[str, Any]:
    """Overrides of variant ``i`` (1-based) of optimizer ``name``; ``{}`` when it has none."""
    vs = VARIANTS.get(base_name(name), [])
    return dict(vs[i - 1]) if len(vs) >= i else {}


def config(row: str) -> dict[str, Any]:
    """Hyperparameters of a row: ``"Shampoo"`` or a variant ``"Shampoo/v2"``."""
    name, _, v = row.partition("/")
    if name not in CONFIGS:
        pytest.fail(
            f"secondorder.{name} is exported but has no entry in CONFIGS in "
            f"tests/test_contract.py: add one line with its test hyperparameters"
        )
    return {**CONFIGS[name], **(variant(name, int(v[1:])) if v else {})}


def make(row: str, params, **overrides) -> torch.optim.Optimizer:
    """Construct the optimizer of ``row`` with its CONFIGS (+ variant) settings + overrides."""
    return with_graph_grads(OPTIMIZERS[base_name(row)](params, **{**config(row), **overrides}))


# Optimizers that differentiate through the gradients (AdaHessian) say so with an attribute
# ``create_graph`` (the bench protocol): the suite's losses then call
# ``loss.backward(create_graph=opt.create_graph)``, and the gradients the tests assign by
# hand (``p.grad = ...``), which have no graph, get the graph of an identity Hessian.
def backward(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    loss.backward(create_graph=bool(getattr(opt, "create_graph", False)))


def _identity_hessian_graphs(opt, args, kwargs) -> None:
    """Step pre-hook: ``g += p - p.detach()`` adds exact zeros to each hand-made gradient
    and makes its derivative with respect to ``p`` the identity."""
    with torch.enable_grad():
        for group in opt.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None or g.requires_grad or g.layout != torch.strided:
                    continue
                if g.is_complex() or g.shape != p.shape or g.dtype != p.dtype:
                    continue
                g.add_(p - p.detach())


def with_graph_grads(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    if hasattr(opt, "create_graph"):
        opt.register_step_pre_hook(_identity_hessian_graphs)
    return opt


def library_only(row: str, why: str) -> None:
    if base_name(row) in REFERENCE:
        pytest.skip(f"torch.optim.{base_name(row)} does not promise this: {why}")


def _probe_named() -> None:
    torch.optim.SGD([("w", torch.nn.Parameter(torch.zeros(2)))], lr=0.1)


def _probe_one_element_lr() -> None:
    p = torch.nn.Parameter(torch.tensor(1.0))  # 0-d: a (1,) lr must not broadcast into it
    p.grad = torch.tensor(1.0)
    torch.optim.AdamW([p], lr=torch.tensor([0.1])).step()
    try:
        torch.optim.AdamW([p], lr=torch.tensor([0.1, 0.1]))
    except ValueError as e:
        assert "Tensor lr must be 1-element" in str(e)
    else:
        raise AssertionError("a 2-element lr was accepted")


#: behaviour of torch.optim that depends on the installed torch version (torch>=2.4 is
#: supported): the reference row checks it only where this torch has it.
TORCH_FEATURES: dict[str, Callable[[], None]] = {
    "named parameters": _probe_named,
    "1-element tensor lr": _probe_one_element_lr,
}


def torch_has(feature: str, row: str) -> None:
    """Skip a reference row when the installed torch.optim lacks ``feature``."""
    if base_name(row) not in REFERENCE:
        return
    try:
        TORCH_FEATURES[feature]()
    except Exception as e:
        pytest.skip(f"torch {torch.__version__} lacks {feature}: {type(e).__name__}: {e}")


# ========================================================================== utilities
def tree_clone(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: tree_clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(tree_clone(v) for v in x)
    return copy.deepcopy(x)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bit_identical(a: Any, b: Any, where: str = "") -> None:
    """Same structure, dtypes, shapes and bits (NaN == NaN) throughout two state trees."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} vs {b.dtype}"
        assert a.shape == b.shape, f"{where}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        assert torch.equal(_bits(a), _bits(b)), f"{where}: values differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a)} vs {set(b)}"
        for k in a:
            assert_bit_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bit_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} vs {b!r}"


def opt_state(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[Any]:
    """The optimizer state in parameter order (comparable across optimizer instances)."""
    return [tree_clone(dict(opt.state[p])) if p in opt.state else {} for p in params]


def state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0

    def walk(x):
        nonlocal total
        if isinstance(x, torch.Tensor):
            total += x.numel() * x.element_size()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    for s in opt.state.values():
        walk(s)
    return total


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ====================================================================== toy workload
class ToyNet(torch.nn.Module):
    """Tiny net with every kind of tensor the optimizers special-case.

    A 4-d conv kernel, matrices on both sides of block_size, biases (1-d), a 0-d scalar, a
    bfloat16 matrix, an empty tensor, and a parameter that never gets a gradient.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3)  # (3, 2, 3, 3) -> 12 features on 4x4 input
        self.fc1 = torch.nn.Linear(12, 9)  # 9 > block_size 8: a full and a remainder block
        self.fc2 = torch.nn.Linear(9, 1)
        self.scale = torch.nn.Parameter(torch.tensor(1.0))
        self.low = torch.nn.Parameter(0.3 * torch.randn(5, 3).bfloat16())
        self.unused = torch.nn.Parameter(torch.ones(4))  # grad stays None
        self.empty = torch.nn.Parameter(torch.zeros(0, 3))  # 0 elements, gets a (0, 3) grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).flatten(1)
        y = self.fc2(torch.tanh(self.fc1(h))).squeeze(1) * self.scale
        side = (x.flatten(1)[:, :5].bfloat16() @ self.low).float().sum(1)
        return y + 0.1 * side + self.empty.sum()


def toy_batch(k: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + k)
    x = torch.randn(n, 2, 4, 4, generator=g)
    return x, x[:, 0, :2, :2].sum((1, 2)).sin()


def toy_model(seed: int = 0) -> ToyNet:
    torch.manual_seed(seed)
    return ToyNet()


def toy_step(model: torch.nn.Module, opt: torch.optim.Optimizer, k: int) -> torch.Tensor:
    x, y = toy_batch(k)
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    backward(opt, loss)
    opt.step()
    return loss.detach()


def train(name: str, model: torch.nn.Module, steps: range, opt=None, **kw):
    opt = opt if opt is not None else make(name, model.parameters(), **kw)
    for k in steps:
        toy_step(model, opt, k)
    return opt


# ===================================================================== 0. the registry
def test_every_exported_optimizer_is_registered():
    """A new optimizer in ``secondorder.__all__`` must add its CONFIGS and INVALID lines."""
    assert EXPORTED, "secondorder exports no torch.optim.Optimizer subclass"
    missing = [n for n in EXPORTED if n not in CONFIGS or n not in INVALID]
    assert not missing, (
        f"optimizers exported without a contract entry: {missing}; add one line each to "
        "CONFIGS and INVALID in tests/test_contract.py"
    )


@pytest.mark.parametrize("name", LIBRARY)
def test_every_hyperparameter_has_invalid_values(name):
    """Every argument the optimizer accepts is covered by the INVALID table: the per-group
    hyperparameters (``defaults``) and the constructor-only ones (``nonfinite``, ...)."""
    opt = make(name, [torch.nn.Parameter(torch.zeros(2))])
    args = set(inspect.signature(OPTIMIZERS[name].__init__).parameters) - {"self", "params"}
    covered = {row[0] for row in INVALID.get(name, [])}
    missing = sorted((set(opt.defaults) | args) - covered)
    assert not missing, f"{name}: no invalid values listed in INVALID for {missing}"
    assert "nonfinite" in covered


# ========================================================================= 1. converge
def _quadratic():
    torch.manual_seed(1)
    x = torch.nn.Parameter(torch.randn(4, 6))
    target = torch.randn(4, 6)
    scale = torch.logspace(0, 2, 24).reshape(4, 6)  # condition number 100
    return [x], lambda: 0.5 * (scale * (x - target) ** 2).sum()


def _rosenbrock():
    xy = torch.nn.Parameter(torch.tensor([-1.5, 2.0]))
    return [xy], lambda: (1 - xy[0]) ** 2 + 100 * (xy[1] - xy[0] ** 2) ** 2


def _least_squares():
    """min_W ||A W B - C||^2 with A, B ill-conditioned (condition number 30 each)."""
    g = torch.Generator().manual_seed(2)

    def illcond(n, cond):
        q1, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
        q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
        return q1 @ torch.diag(torch.logspace(0, math.log10(cond), n)) @ q2 / math.sqrt(cond)

    a, b = illcond(6, 30.0), illcond(5, 30.0)
    c = a @ torch.randn(6, 5, generator=g) @ b
    w = torch.nn.Parameter(torch.zeros(6, 5))
    return [w], lambda: ((a @ w @ b - c) ** 2).sum()


#: problem -> (factory, steps, lr for Adam-like methods, required loss reduction factor)
PROBLEMS: dict[str, tuple[Callable, int, float, float]] = {
    "quadratic": (_quadratic, 300, 0.05, 1e-3),
    "rosenbrock": (_rosenbrock, 600, 0.05, 1e-2),
    "least_squares": (_least_squares, 400, 0.05, 1e-2),
}
#: optional per-optimizer learning rates for PROBLEMS (methods not on Adam's lr scale)
CONVERGE_LR: dict[str, dict[str, float]] = {
    "ContractSGD": {"quadratic": 1e-3, "rosenbrock": 1e-3, "least_squares": 1e-3},
    "MFAC": {"quadratic": 20.0, "rosenbrock": 20.0, "least_squares": 20.0},  # CONVERGE_KW
    "AdaHessian": {"quadratic": 0.1, "rosenbrock": 0.1, "least_squares": 0.1},
    "Muon": {"quadratic": 0.15},  # its default "rms" scaling makes updates 0.2 x lr in RMS
    "AdaGradNorm": {"quadratic": 5.0, "rosenbrock": 2.0, "least_squares": 2.0},  # lr: a length
}


#: optional per-optimizer settings for PROBLEMS. M-FAC's curvature (outer products of the
#: last few full-batch gradients) normalises steps while gradients are large; near the
#: optimum, once they are small against ``damp``, its step is gradient descent with step
#: ``lr / damp``: these deterministic problems need that regime.
CONVERGE_KW: dict[str, dict[str, Any]] = {"MFAC": dict(damp=1e3)}


def _run_problem(name, problem, dtype=torch.float32, steps=None):
    factory, n, lr, _ = PROBLEMS[problem]
    lr = CONVERGE_LR.get(name, {}).get(problem, lr)
    if "/" in name:  # a variant keeps its own learning rate
        lr = config(name)["lr"]
    params, loss_fn = factory()
    with torch.no_grad():
        for p in params:
            p.data = p.data.to(dtype)
    opt = make(name, params, lr=lr, weight_decay=0.0, **CONVERGE_KW.get(base_name(name), {}))
    first = loss_fn().item()
    for _ in range(steps or n):
        opt.zero_grad()
        loss = loss_fn()
        backward(opt, loss)
        opt.step()
    return first, loss_fn().item(), params, opt


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("name", NAMES)
def test_converges(name, problem):
    first, last, _, _ = _run_problem(name, problem)
    factor = PROBLEMS[problem][3]
    assert math.isfinite(last) and last <= factor * first, (
        f"{name} on {problem}: loss {first:.4g} -> {last:.4g}, wanted <= {factor:g} x start"
    )


# =========================================================================== 2. dtypes
DTYPES = [torch.float32, torch.bfloat16, torch.float64, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ROWS)
def test_dtypes(name, dtype):
    """Parameters keep their dtype and the optimizer still makes progress in it.

    float16 is beyond the issue's list but common: its range (max 65504) is the trap, e.g.
    for squared-gradient statistics kept in the parameter's dtype.
    """
    first, last, params, opt = _run_problem(name, "quadratic", dtype=dtype, steps=100)
    assert all(p.dtype == dtype for p in params)
    assert all(p.grad.dtype == dtype for p in params)
    # Variants are not tuned for this problem: they only have to make progress.
    want = 0.1 if "/" not in name else 1.0
    assert last < want * first, f"{name} in {dtype}: loss {first:.4g} -> {last:.4g}"
    for p in params:
        assert torch.isfinite(p).all(), f"{name}: non-finite {dtype} parameters"
    # A state round trip keeps the dtype of every state tensor (torch.optim would cast
    # float32 statistics down to a bfloat16 parameter's dtype; we promise it doesn't).
    saved = opt_state(opt, params)
    opt.load_state_dict(opt.state_dict())
    assert_bit_identical(saved, opt_state(opt, params), "state after load")


# ============================================================== 3. groups and plumbing
def _two_params(seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(6, 10, generator=g)) for _ in range(2)]


def _grads_for(params, k):
    g = torch.Generator().manual_seed(500 + k)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) + 0.1 * p.detach()


def _group_override(name):
    defaults = OPTIMIZERS[name]([torch.nn.Parameter(torch.zeros(1))], **config(name)).defaults
    over = {"lr": config(name)["lr"] * 0.5, "weight_decay": 0.1}
    if "betas" in defaults:
        over["betas"] = (0.8, 0.99)
    if "momentum" in defaults:
        over["momentum"] = 0.5
    return {**over, **variant(name, 1)}  # structural settings (block_size, band...) too


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_with_different_hyperparameters(name):
    """Two groups in one optimizer == two optimizers, one per group's settings."""
    over = _group_override(name)
    a, b = _two_params()
    a2, b2 = (torch.nn.Parameter(t.detach().clone()) for t in (a, b))
    opt = make(name, [{"params": [a]}, {"params": [b], **over}])
    opt_a, opt_b = make(name, [a2]), make(name, [b2], **over)
    for k in range(7):
        _grads_for([a, b], k)
        a2.grad, b2.grad = a.grad.clone(), b.grad.clone()
        opt.step()
        opt_a.step()
        opt_b.step()
    for key, value in over.items():
        assert opt.param_groups[1][key] == value
    torch.testing.assert_close(a, a2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b, b2, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_after_construction(name):
    """A group added after some steps behaves like a fresh optimizer for its params."""
    over = _group_override(name)
    a, b = _two_params()
    b2 = torch.nn.Parameter(b.detach().clone())
    opt = make(name, [a])
    for k in range(4):
        _grads_for([a], k)
        opt.step()
    opt.add_param_group({"params": iter([b]), **over})  # any iterable, like torch.optim
    assert len(opt.param_groups[1]["params"]) == 1
    ref = make(name, [b2], **over)
    for k in range(4, 11):
        _grads_for([a, b], k)
        b2.grad = b.grad.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(b, b2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", LIBRARY)
def test_add_param_group_validates(name):
    a, b = _two_params()
    opt = make(name, [a])
    bad = next(r for r in INVALID[name] if r[0] != "nonfinite")
    with pytest.raises((ValueError, TypeError), match=bad[2] if len(bad) > 2 else bad[0]):
        opt.add_param_group({"params": [b], bad[0]: bad[1]})
    assert len(opt.param_groups) == 1


def _shaped_like(v: Any, p: torch.Tensor) -> bool:
    return isinstance(v, torch.Tensor) and v.shape == p.shape


@pytest.mark.parametrize("name", ROWS)
def test_grad_none_params_are_skipped(name):
    """``grad=None``: no state created, value and existing state unchanged, also at roots."""
    a, b = _two_params()
    before = b.detach().clone()
    opt = make(name, [a, b])
    for k in range(5):
        _grads_for([a], k)
        assert b.grad is None
        opt.step()
    assert torch.equal(b, before), "a parameter without grad changed"
    assert b not in opt.state or not opt.state[b], "state created for a parameter without grad"
    # b trains for a while, then loses its grad: from then on nothing of b may change.
    for k in range(5, 9):
        _grads_for([a, b], k)
        opt.step()
    b.grad = None
    snap_b, snap_state = b.detach().clone(), opt_state(opt, [b])
    for k in range(9, 16):  # crosses root steps of a
        _grads_for([a], k)
        opt.step()
    assert torch.equal(b, snap_b), "a parameter whose grad was set to None changed"
    now = opt_state(opt, [b])
    if getattr(opt, "async_roots", False):
        # Roots computed in the background from b's earlier statistics may still be
        # installed; its step count and per-element state must not move.
        keep = [k for k, v in snap_state[0].items() if k == "step" or _shaped_like(v, b)]
        snap_state, now = [{k: snap_state[0][k] for k in keep}], [{k: now[0][k] for k in keep}]
    assert_bit_identical(snap_state, now, "state of a grad=None parameter")
    # All grads None: step is a no-op.
    a.grad = None
    snap = tree_clone(a)
    opt.step()
    assert torch.equal(a, snap)


@pytest.mark.parametrize("name", ROWS)
def test_grads_are_left_untouched(name):
    a, b = _two_params()
    opt = make(name, [a, b], weight_decay=0.1)
    for k in range(5):
        _grads_for([a, b], k)
        grads = [a.grad.clone(), b.grad.clone()]
        ids = [id(a.grad), id(b.grad)]
        opt.step()
        assert [id(a.grad), id(b.grad)] == ids
        assert torch.equal(a.grad, grads[0]) and torch.equal(b.grad, grads[1])


@pytest.mark.parametrize("name", NAMES)
def test_zero_grad_semantics(name):
    model = toy_model()
    opt = train(name, model, range(2))
    grads = {n: p.grad for n, p in model.named_parameters()}
    opt.zero_grad(set_to_none=False)
    for n, p in model.named_parameters():
        if grads[n] is None:
            assert p.grad is None
        else:
            assert p.grad is grads[n] and not p.grad.any()
    opt.zero_grad()  # set_to_none=True is the default, as in torch.optim
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_step_with_closure_returns_the_loss(name):
    model = toy_model()
    opt = make(name, model.parameters())
    calls = []

    def closure():
        opt.zero_grad()
        x, y = toy_batch(0)
        loss = torch.nn.functional.mse_loss(model(x), y)
        backward(opt, loss)
        calls.append(loss)
        return loss

    with torch.no_grad():  # step must enable grad for the closure itself
        out = opt.step(closure)
    assert len(calls) == 1 and out is calls[0]
    first = out.item()
    for _ in range(30):
        out = opt.step(closure)
    assert out.item() < first
    sentinel = object()
    assert opt.step(lambda: sentinel) is sentinel
    assert opt.step() is None
    # torch.optim step hooks run around every step (what LR schedulers and profilers use).
    seen = []
    h1 = opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("pre"))
    h2 = opt.register_step_post_hook(lambda o, args, kwargs: seen.append("post"))
    opt.step(closure)
    h1.remove()
    h2.remove()
    assert seen == ["pre", "post"]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_and_pickle(name, how):
    """A deep copy / pickle round trip of (model, optimizer) continues bit-identically."""
    model = toy_model()
    opt = train(name, model, range(4))
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    for k in range(4, 9):
        toy_step(model, opt, k)
        toy_step(model2, opt2, k)
    assert_bit_identical(model.state_dict(), model2.state_dict())
    if hasattr(opt, "skipped_steps"):
        assert opt2.nonfinite == opt.nonfinite and opt2.skipped_steps == opt.skipped_steps


@pytest.mark.parametrize("name", NAMES)
def test_hyperparameters_can_change_between_steps(name):
    """What schedulers and users change mid-run (lr, weight decay, momentum) just works.

    Momentum may start at 0 (no momentum buffer needed yet) and be switched on later, as a
    momentum warm-up or ``OneCycleLR(cycle_momentum=True)`` on a resumed run does.
    """
    model = toy_model()
    opt = make(name, model.parameters(), weight_decay=0.0)
    defaults = opt.defaults
    for g in opt.param_groups:
        if "betas" in defaults:
            g["betas"] = (0.0, g["betas"][1])
        if "momentum" in defaults:
            g["momentum"] = 0.0
    train(name, model, range(4), opt=opt)
    for g in opt.param_groups:
        g["lr"] *= 0.5
        g["weight_decay"] = 0.1
        if "betas" in defaults:
            g["betas"] = (0.9, g["betas"][1])
        if "momentum" in defaults:
            g["momentum"] = 0.9
    train(name, model, range(4, 8), opt=opt)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0d", "1elem", "1x1"])
@pytest.mark.parametrize("name", NAMES)
def test_tensor_learning_rate(name, shape):
    """``lr`` may be any 1-element tensor, as in torch.optim: same training as the float;
    the group keeps the user's tensor (saved as given), and changing it in place (what LR
    schedulers do to tensor learning rates) takes effect at the next step."""
    if shape:
        torch_has("1-element tensor lr", name)
    m1, m2 = toy_model(), toy_model()
    lr = torch.full(shape, config(name)["lr"])
    train(name, m1, range(6))
    opt = train(name, m2, range(6), lr=lr)
    # float32 lr vs Python float: products differ in the last float32 bit per step.
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert opt.param_groups[0]["lr"] is lr
    saved = opt.state_dict()["param_groups"][0]["lr"]
    assert isinstance(saved, torch.Tensor) and saved.shape == shape
    lr.fill_(0.0)  # lr 0: the next step leaves every parameter bit-identical
    before = tree_clone(list(m2.parameters()))
    toy_step(m2, opt, 6)
    assert_bit_identical(before, tree_clone(list(m2.parameters())), "params after lr=0")


def _float_hparams(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's real-valued hyperparameters (floats and pairs of floats)."""
    out = {}
    for k, v in opt.defaults.items():
        if type(v) is float:
            out[k] = v
        elif isinstance(v, tuple) and v and all(type(x) is float for x in v):
            out[k] = v
    return out


#: hyperparameters torch.optim documents as possibly 1-element tensors
TORCH_TENSOR_HPARAMS = ("lr", "betas")


def _as_tensors(hparams: dict[str, Any], shape: tuple[int, ...]) -> dict[str, Any]:
    def t(x):
        return torch.full(shape, x)

    return {k: tuple(map(t, v)) if isinstance(v, tuple) else t(v) for k, v in hparams.items()}


@pytest.mark.parametrize("name", ROWS)
def test_one_element_tensor_hyperparameters(name):
    """Real-valued hyperparameters may be 1-element tensors (torch.optim: ``lr`` and
    ``betas``; this library: every one). Shape ``(1,)`` trains bit-identically to 0-d (every
    variant), and 0-d like the same float32 values given as Python floats (main settings;
    some variants, e.g. early asynchronous roots of near-singular statistics, amplify the
    last-bit differences beyond the bound below)."""
    torch_has("1-element tensor lr", name)
    probe = make(name, [torch.nn.Parameter(torch.zeros(2))])
    floats = _float_hparams(probe)
    if base_name(name) in REFERENCE:
        floats = {k: v for k, v in floats.items() if k in TORCH_TENSOR_HPARAMS}
    assert "lr" in floats
    floats = _as_tensors(floats, ())
    floats = {
        k: tuple(map(float, v)) if isinstance(v, tuple) else float(v) for k, v in floats.items()
    }
    runs, init = [], None
    for kw in (floats, _as_tensors(floats, ()), _as_tensors(floats, (1,))):
        params = [
            *_two_params(),
            torch.nn.Parameter(torch.tensor(0.5)),
            torch.nn.Parameter(torch.ones(4)),
        ]
        init = tree_clone(params) if init is None else init
        opt = make(name, params, **kw)
        for k in range(8):
            _grads_for(params, k)
            opt.step()
        runs.append(params)
    assert_bit_identical(tree_clone(runs[1]), tree_clone(runs[2]), "(1,) vs 0-d tensors")
    # Python floats vs float32 tensors: the hyperparameter arithmetic rounds differently
    # (float64 vs float32), a few float32 ulps per step; 8 steps with a margin of ~200 for
    # the preconditioners' sensitivity give 1e-4 of the distance travelled. A hyperparameter
    # ignored or misused would differ by O(1).
    for a, b, p0 in zip(runs[0], runs[1], init):
        moved = (a - p0).norm()
        assert moved > 0 and torch.isfinite(b).all()
        if "/" not in name:
            assert (a - b).norm() <= 1e-4 * moved, f"{name}: {(a - b).norm() / moved:.3g}"


@pytest.mark.parametrize("name", NAMES)
def test_tensor_lr_must_have_one_element(name):
    """torch.optim's rule and message: ``Tensor lr must be 1-element``."""
    torch_has("1-element tensor lr", name)
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        make(name, [torch.nn.Parameter(torch.zeros(3))], lr=torch.tensor([1e-3, 1e-3]))


@pytest.mark.parametrize("name", NAMES)
def test_tensor_lr_with_a_scheduler(name):
    """A scheduler drives a 1-element tensor lr (in place) exactly as it drives a float."""
    torch_has("1-element tensor lr", name)
    runs = []
    for lr in (config(name)["lr"], torch.tensor([config(name)["lr"]])):
        model = toy_model()
        opt = make(name, model.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5**e)
        lrs = []
        for k in range(5):
            toy_step(model, opt, k)
            sched.step()
            lrs.append(float(opt.param_groups[0]["lr"]))
        runs.append((lrs, list(model.parameters())))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-6)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ================================================================ 3b. torch.optim parity
def _name_groups(model: torch.nn.Module, named: bool, split: bool, lr: float) -> list[Any]:
    """The model's parameters, named or not, as one list or as two groups (fc layers with
    half the learning rate, the rest)."""
    items = list(model.named_parameters())
    if not named:
        items = [p for _, p in items]
    if not split:
        return items
    first = [x for x in items if _is_fc(model, x)]
    rest = [x for x in items if not _is_fc(model, x)]
    return [{"params": first, "lr": 0.5 * lr}, {"params": iter(rest)}]


def _is_fc(model: torch.nn.Module, item: Any) -> bool:
    p = item[1] if isinstance(item, tuple) else item
    return any(p is q for q in [*model.fc1.parameters(), *model.fc2.parameters()])


def _names(model: torch.nn.Module, split: bool) -> list[list[str]]:
    named = list(model.named_parameters())
    if not split:
        return [[n for n, _ in named]]
    fc = [n for n, p in named if _is_fc(model, p)]
    return [fc, [n for n, p in named if not _is_fc(model, p)]]


def _continue_and_compare(name, model, opt, ref_model, ref_opt, steps=range(4, 8)):
    """Train both further; parameters and optimizer state must stay bit-identical."""
    train(name, model, steps, opt=opt)
    train(name, ref_model, steps, opt=ref_opt)
    params, ref_params = list(model.parameters()), list(ref_model.parameters())
    assert_bit_identical(tree_clone(ref_params), tree_clone(params), "params")
    assert_bit_identical(opt_state(ref_opt, ref_params), opt_state(opt, params), "state")


def _check_named_parameters(name: str, split: bool) -> None:
    lr = config(name)["lr"]
    model, ref_model = toy_model(), toy_model()
    opt = make(name, _name_groups(model, True, split, lr))
    ref = make(name, _name_groups(ref_model, False, split, lr))
    names = _names(model, split)
    assert [g["param_names"] for g in opt.param_groups] == names
    by_name = dict(model.named_parameters())
    for g in opt.param_groups:  # each name goes with its own tensor
        assert len(g["params"]) == len(g["param_names"])
        assert all(p is by_name[n] for n, p in zip(g["param_names"], g["params"]))
    assert all("param_names" not in g for g in ref.param_groups)
    # Names change nothing in the math.
    _continue_and_compare(name, model, opt, ref_model, ref, range(4))
    sd = opt.state_dict()
    assert [g["param_names"] for g in sd["param_groups"]] == names
    # Round trip into a fresh named optimizer: names kept, the run continues exactly.
    model2 = toy_model(seed=7)
    model2.load_state_dict(model.state_dict())
    fresh = make(name, _name_groups(model2, True, split, lr))
    fresh.load_state_dict(copy.deepcopy(sd))
    assert [g["param_names"] for g in fresh.param_groups] == names
    _continue_and_compare(name, model2, fresh, model, opt)


def _check_named_into_unnamed_and_back(name: str) -> None:
    """As torch.optim: a checkpoint's names replace the optimizer's (an unnamed optimizer
    becomes named); a checkpoint without names leaves the optimizer's names alone."""
    names = _names(toy_model(), False)
    for src_named in (True, False):
        model = toy_model()
        opt = make(name, _name_groups(model, src_named, False, 0.0))
        train(name, model, range(4), opt=opt)
        sd = copy.deepcopy(opt.state_dict())
        assert ("param_names" in sd["param_groups"][0]) == src_named
        model2 = toy_model(seed=7)
        model2.load_state_dict(model.state_dict())
        dst = make(name, _name_groups(model2, not src_named, False, 0.0))
        dst.load_state_dict(sd)
        assert [g.get("param_names") for g in dst.param_groups] == names
        assert [g.get("param_names") for g in dst.state_dict()["param_groups"]] == names
        _continue_and_compare(name, model2, dst, model, opt)


def _skip_if_torch_lacks_names(name: str) -> None:
    torch_has("named parameters", name)


@pytest.mark.parametrize("split", [False, True], ids=["one_group", "two_groups"])
@pytest.mark.parametrize("name", NAMES)
def test_named_parameters(name, split):
    """``opt(model.named_parameters())`` (or named groups) keeps the names in each group's
    ``param_names``, trains exactly as without names, and round-trips through a state dict."""
    _skip_if_torch_lacks_names(name)
    _check_named_parameters(name, split)


@pytest.mark.parametrize("name", NAMES)
def test_named_state_dict_into_unnamed_optimizer_and_back(name):
    _skip_if_torch_lacks_names(name)
    _check_named_into_unnamed_and_back(name)


def _check_named_and_unnamed_do_not_mix(name: str) -> None:
    model = toy_model()
    named = list(model.named_parameters())
    with pytest.raises(ValueError, match="with/without names"):
        make(name, [named[0], named[1][1]])
    a, b, c = (torch.nn.Parameter(torch.randn(3)) for _ in range(3))
    opt = make(name, [("a", a)])
    with pytest.raises(ValueError, match="with/without names"):
        opt.add_param_group({"params": [b]})
    opt.add_param_group({"params": [("b", b)], "lr": 0.01})
    assert [g["param_names"] for g in opt.param_groups] == [["a"], ["b"]]
    unnamed = make(name, [a])
    with pytest.raises(ValueError, match="with/without names"):
        unnamed.add_param_group({"params": [("c", c)]})
    assert len(opt.param_groups) == 2 and len(unnamed.param_groups) == 1


@pytest.mark.parametrize("name", NAMES)
def test_named_and_unnamed_parameters_do_not_mix(name):
    """torch.optim's rule: all parameters of all groups are named, or none is."""
    _skip_if_torch_lacks_names(name)
    _check_named_and_unnamed_do_not_mix(name)


@pytest.fixture
def torch_without_named_params(monkeypatch):
    """torch.optim as before named-parameter support (torch < 2.6): ``add_param_group``
    rejects ``(name, tensor)`` pairs and ignores ``param_names``; ``load_state_dict`` keeps
    only the loaded groups' keys."""
    base = torch.optim.Optimizer
    add, load = base.add_param_group, base.load_state_dict

    def old_add(self, group):
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        group["params"] = params
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(
                    "optimizer can only optimize Tensors, but one of the params is "
                    + torch.typename(p)
                )
        hidden = {id(g): g.pop("param_names") for g in [*self.param_groups, group]
                  if "param_names" in g}  # fmt: skip
        try:
            add(self, group)
        finally:
            for g in [*self.param_groups, group]:
                if id(g) in hidden:
                    g["param_names"] = hidden[id(g)]

    def old_load(self, state_dict):
        for g in self.param_groups:
            g.pop("param_names", None)
        load(self, state_dict)

    monkeypatch.setattr(base, "add_param_group", old_add)
    monkeypatch.setattr(base, "load_state_dict", old_load)
    with pytest.raises(TypeError, match="only optimize Tensors"):  # the emulation bites
        torch.optim.AdamW(toy_model().named_parameters())


@pytest.mark.parametrize("name", LIBRARY)
def test_named_parameters_on_torch_without_them(name, torch_without_named_params):
    """Named parameters do not depend on the installed torch: with torch.optim's support
    taken away, every named-parameter behaviour above still holds."""
    _check_named_parameters(name, split=True)
    _check_named_into_unnamed_and_back(name)
    _check_named_and_unnamed_do_not_mix(name)


@pytest.mark.parametrize("name", LIBRARY)
def test_named_parameters_bad_input(name):
    t = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(TypeError, match="name"):
        make(name, [(0, t)])
    with pytest.raises(TypeError, match="name"):
        make(name, [("a", t, "extra")])
    with pytest.raises(ValueError, match="param_names"):
        make(name, [{"params": [t], "param_names": ["a", "b"]}])
    model = toy_model()
    opt = make(name, model.named_parameters())
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["param_names"] = sd["param_groups"][0]["param_names"][:-1]
    with pytest.raises(ValueError, match="param_names"):
        opt.load_state_dict(sd)
    assert len(opt.param_groups[0]["param_names"]) == len(opt.param_groups[0]["params"])


def _resume_pair(name: str, edit: Callable[[dict[str, Any]], dict[str, Any]]):
    """(model, optimizer) trained 4 steps, and a fresh pair loaded from its state dict after
    ``edit`` (a copy of the dict goes in; what it returns is loaded)."""
    model = toy_model()
    opt = train(name, model, range(4))
    model2 = toy_model(seed=7)
    model2.load_state_dict(model.state_dict())
    fresh = make(name, model2.parameters())
    fresh.load_state_dict(edit(copy.deepcopy(opt.state_dict())))
    return model, opt, model2, fresh


def _python_steps(sd: dict[str, Any]) -> dict[str, Any]:
    """Every ``step`` as a Python number (floats and ints), as older torch wrote them."""
    for i, s in enumerate(sd["state"].values()):
        if "step" in s:
            s["step"] = float(s["step"]) if i % 2 else int(s["step"])
    return sd


@pytest.mark.parametrize("name", NAMES)
def test_loaded_step_may_be_a_python_number(name):
    """A state dict whose ``step`` counters are Python numbers loads as torch.optim loads it
    (converted to tensors) and the run continues exactly as if nothing happened."""
    model, opt, model2, fresh = _resume_pair(name, _python_steps)
    params, params2 = list(model.parameters()), list(model2.parameters())
    for p, q in zip(params, params2):
        if "step" in opt.state.get(p, {}):
            a, b = opt.state[p]["step"], fresh.state[q]["step"]
            assert isinstance(b, torch.Tensor), f"step loaded as {type(b).__name__}"
            assert_bit_identical(a, b, "step")
    _continue_and_compare(name, model2, fresh, model, opt)


@pytest.mark.parametrize("bad", [-1, 2.5, NAN, INF, "3", None, torch.tensor([1.0, 2.0])], ids=repr)
@pytest.mark.parametrize("name", NAMES)
def test_loaded_step_that_is_not_a_count_raises(name, bad):
    library_only(name, "torch.optim loads any step value")
    model = toy_model()
    opt = train(name, model, range(2))
    sd = copy.deepcopy(opt.state_dict())
    next(st for st in sd["state"].values() if "step" in st)["step"] = bad
    before = opt_state(opt, list(model.parameters()))
    with pytest.raises(ValueError, match="step"):
        opt.load_state_dict(sd)
    assert_bit_identical(before, opt_state(opt, list(model.parameters())), "state")


#: per-group keys of older checkpoints that torch.optim.AdamW fills in on load
_TORCH_LATER_KEYS = ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused")


@pytest.mark.parametrize("name", NAMES)
def test_loads_older_state_dict_formats(name):
    """A checkpoint in an older format -- only ``state`` and ``param_groups`` (as torch.optim
    and tools such as torch.distributed.checkpoint write it), hyperparameters added to the
    optimizer since (filled from the constructor), Python-number steps -- continues exactly.
    """

    def older(sd):
        sd = {"state": sd["state"], "param_groups": sd["param_groups"]}
        drop = _TORCH_LATER_KEYS if base_name(name) in REFERENCE else ("weight_decay",)
        for g in sd["param_groups"]:
            for k in drop:
                g.pop(k, None)
        return _python_steps(sd)

    model, opt, model2, fresh = _resume_pair(name, older)
    assert fresh.param_groups[0]["weight_decay"] == opt.param_groups[0]["weight_decay"]
    _continue_and_compare(name, model2, fresh, model, opt)


@pytest.mark.parametrize("name", NAMES)
def test_step_hooks(name):
    """torch.optim's step hooks fire once per step, around it, for every optimizer:
    per-instance and global ones; a pre-hook may replace the step's arguments."""
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    model = toy_model()
    opt = make(name, model.parameters())
    seen = []

    def closure():
        opt.zero_grad()
        x, y = toy_batch(0)
        loss = torch.nn.functional.mse_loss(model(x), y)
        backward(opt, loss)
        seen.append("closure")
        return loss

    def swap(o, args, kwargs):  # args: (optimizer, closure)
        seen.append("pre")
        return (args[0], lambda: closure() * 0 + 42.0), kwargs

    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: seen.append(("gpre", o is opt))),
        register_optimizer_step_post_hook(lambda o, a, k: seen.append(("gpost", o is opt))),
        opt.register_step_pre_hook(swap),
        opt.register_step_post_hook(lambda o, a, k: seen.append(("post", len(a)))),
    ]
    try:
        out = opt.step(closure)
    finally:
        for h in handles:
            h.remove()
    assert float(out.detach()) == 42.0
    assert seen == [("gpre", True), "pre", "closure", ("post", 2), ("gpost", True)]
    seen.clear()
    opt.step(closure)  # removed hooks no longer fire
    assert seen == ["closure"]


@pytest.mark.parametrize("name", NAMES)
def test_step_hooks_fire_on_a_skipped_step(name):
    library_only(name, "torch.optim has no skipped steps")
    model = toy_model()
    opt = train(name, model, range(2))
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    opt.zero_grad()
    x, y = toy_batch(2)
    torch.nn.functional.mse_loss(model(x), y).backward()
    model.fc1.weight.grad[0, 0] = NAN
    opt.step()
    assert opt.skipped_steps == 1 and seen == ["pre", "post"]


#: torch.optim flags the library's optimizers do not implement
UNSUPPORTED = ("maximize", "capturable", "differentiable")


@pytest.mark.parametrize("flag", UNSUPPORTED)
@pytest.mark.parametrize("name", NAMES)
def test_unsupported_torch_flags_are_rejected(name, flag):
    """``maximize``/``capturable``/``differentiable`` set to True are refused (a constructor
    argument or a group entry), never silently ignored; ``False`` is accepted."""
    library_only(name, f"torch.optim.AdamW implements {flag}")
    p, q = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    with pytest.raises((TypeError, ValueError), match=flag):
        make(name, [p], **{flag: True})
    with pytest.raises(ValueError, match=flag):
        make(name, [{"params": [p], flag: True}])
    opt = make(name, [{"params": [p], flag: False}])
    with pytest.raises(ValueError, match=flag):
        opt.add_param_group({"params": [q], flag: 1})
    assert len(opt.param_groups) == 1
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0][flag] = True
    with pytest.raises(ValueError, match=flag):
        opt.load_state_dict(sd)
    assert opt.param_groups[0][flag] is False
    opt.load_state_dict(opt.state_dict())  # torch's loading adds flags to ``defaults``
    with pytest.raises(ValueError, match=flag):
        opt.add_param_group({"params": [q], flag: True})


@pytest.mark.parametrize("name", NAMES)
def test_foreach_and_fused_group_hints_are_accepted(name):
    """``foreach``/``fused`` in a group are performance hints: accepted, same result."""
    library_only(name, "torch.optim.AdamW's fused path is another implementation")
    m1, m2 = toy_model(), toy_model()
    train(name, m1, range(4))
    groups = [{"params": list(m2.parameters()), "foreach": True, "fused": True}]
    train(name, m2, range(4), opt=make(name, groups))
    assert_bit_identical(m1.state_dict(), m2.state_dict(), "params")


@pytest.mark.parametrize("name", NAMES)
def test_grad_scaler(name):
    """``torch.amp.GradScaler`` drives the optimizer as it drives torch.optim: with a
    power-of-two scale the unscaled gradients are exact, so training is bit-identical."""
    if base_name(name) == "AdaHessian":
        pytest.skip(
            "AdaHessian: GradScaler unscales .grad but not the graph its Hessian-vector "
            "products come from (estimates are scale x too large; docs/guarantees.md)"
        )
    m1, m2 = toy_model(), toy_model()
    train(name, m1, range(4))
    opt = make(name, m2.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    for k in range(4):
        x, y = toy_batch(k)
        opt.zero_grad()
        backward(opt, scaler.scale(torch.nn.functional.mse_loss(m2(x), y)))
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() > 2.0**10  # the scale grew: no step was skipped
    assert_bit_identical(m1.state_dict(), m2.state_dict(), "params")


# ====================================================================== 4. schedulers
def _schedulers(opt, kind):
    sched = torch.optim.lr_scheduler
    if kind == "LambdaLR":
        return sched.LambdaLR(opt, lambda e: float(e % 2))  # lr is 0 on even epochs
    if kind == "CosineAnnealingLR":
        return sched.CosineAnnealingLR(opt, T_max=8, eta_min=1e-4)
    cycle = any(k in opt.defaults for k in ("betas", "momentum"))
    return sched.OneCycleLR(opt, max_lr=0.05, total_steps=12, cycle_momentum=cycle)


@pytest.mark.parametrize("kind", ["LambdaLR", "OneCycleLR", "CosineAnnealingLR"])
@pytest.mark.parametrize("name", NAMES)
def test_lr_schedulers(name, kind):
    model = toy_model()
    opt = make(name, model.parameters())
    ref = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config(name)["lr"])
    ref.defaults.update({k: opt.defaults[k] for k in ("betas", "momentum") if k in opt.defaults})
    for g in ref.param_groups:
        g.update({k: opt.defaults[k] for k in ("betas", "momentum") if k in opt.defaults})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        sched, ref_sched = _schedulers(opt, kind), _schedulers(ref, kind)
        for k in range(12):
            lr = opt.param_groups[0]["lr"]
            assert lr == pytest.approx(ref.param_groups[0]["lr"])
            before = tree_clone(list(model.parameters()))
            toy_step(model, opt, k)
            ref.step()
            changed = any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
            assert changed == (lr != 0), f"step {k} with lr={lr}: params changed={changed}"
            sched.step()
            ref_sched.step()
    if kind == "OneCycleLR" and "betas" in opt.defaults:
        assert opt.param_groups[0]["betas"][0] != opt.defaults["betas"][0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ============================================================ 5. checkpoint / resume
RESUME_TOTAL = 8
RESUME_AT = (2, 3, 4)  # with precondition_frequency=3: before, at and after a boundary


def _rows_of(name: str) -> list[str]:
    return [r for r in ROWS if base_name(r) == name]


def _resume_child(name: str, workdir: str, threads: int) -> None:
    """New process: load each checkpoint, continue to RESUME_TOTAL steps, save the result."""
    torch.set_num_threads(threads)
    for i, row in enumerate(_rows_of(name)):
        for n in RESUME_AT:
            ckpt = torch.load(os.path.join(workdir, f"ckpt{i}-{n}.pt"))  # weights_only=True
            model = toy_model(seed=123)  # another init: everything must come from the ckpt
            model.load_state_dict(ckpt["model"])
            opt = make(row, model.parameters())
            opt.load_state_dict(ckpt["opt"])
            train(row, model, range(n, RESUME_TOTAL), opt=opt)
            torch.save(
                {"model": model.state_dict(), "opt": opt.state_dict()},
                os.path.join(workdir, f"final{i}-{n}.pt"),
            )


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_resume_in_new_process_is_bit_identical(name, tmp_path):
    """Train N steps, torch.save, resume in a new Python process: bit-identical to no break.

    Every variant of the optimizer, resumed before, at and after a root computation.
    """
    rows = _rows_of(name)
    for i, row in enumerate(rows):
        for n in RESUME_AT:
            model = toy_model()
            opt = train(row, model, range(n))
            ckpt = {"model": model.state_dict(), "opt": opt.state_dict()}
            torch.save(ckpt, tmp_path / f"ckpt{i}-{n}.pt")
    proc = subprocess.run(
        [sys.executable, __file__, "resume", name, str(tmp_path), str(torch.get_num_threads())],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, f"resume process failed:\n{proc.stderr[-4000:]}"
    for i, row in enumerate(rows):
        model = toy_model()
        opt = train(row, model, range(RESUME_TOTAL))
        params = list(model.parameters())
        for n in RESUME_AT:
            final = torch.load(tmp_path / f"final{i}-{n}.pt")
            where = f"{row} resumed at step {n}"
            assert_bit_identical(model.state_dict(), final["model"], f"params of {where}")
            resumed = make(row, [torch.nn.Parameter(p.detach().clone()) for p in params])
            resumed.load_state_dict(final["opt"])
            got = opt_state(resumed, resumed.param_groups[0]["params"])
            assert_bit_identical(opt_state(opt, params), got, f"state of {where}")


@pytest.mark.parametrize("name", ROWS)
def test_state_dict_round_trip_is_exact(name):
    model = toy_model()
    opt = train(name, model, range(4))
    sd = opt.state_dict()
    fresh = make(name, toy_model(seed=5).parameters())
    fresh.load_state_dict(copy.deepcopy(sd))
    assert_bit_identical(sd["state"], fresh.state_dict()["state"], "state")
    assert sd["param_groups"] == fresh.state_dict()["param_groups"]
    if base_name(name) in REFERENCE:
        return  # torch.optim's load_state_dict may alias the dict's tensors
    # Loading copies: stepping the loaded optimizer leaves the dict (a checkpoint kept in
    # memory, perhaps loaded again later) untouched.
    snap = tree_clone(sd["state"])
    fresh2 = make(name, toy_model(seed=5).parameters())
    fresh2.load_state_dict(sd)
    train(name, toy_model(seed=5), range(4, 6), opt=fresh2)
    assert_bit_identical(snap, sd["state"], "the loaded state dict after more steps")


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_hooks(name):
    """torch.optim's state-dict hooks: each runs once; a load pre-hook's dict is the one
    loaded; a load post-hook sees the final state; a save post-hook may replace the dict."""
    model = toy_model()
    opt = train(name, model, range(4))
    calls = []
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("save") or {**sd, "mine": 1})
    # Pre-hooks run before the dict is built (``prepend`` puts one first); what they change
    # is in it.
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre-save"))
    opt.register_state_dict_pre_hook(
        lambda o: calls.append("first") or o.param_groups[0].update(tag=7), prepend=True
    )
    sd = opt.state_dict()
    assert calls == ["first", "pre-save", "save"] and sd["mine"] == 1
    assert sd["param_groups"][0]["tag"] == 7
    calls.clear()
    del sd["param_groups"][0]["tag"]
    model2 = toy_model(seed=5)
    fresh = make(name, model2.parameters())
    params = list(model2.parameters())

    def pre(o, sd):
        calls.append("pre")
        sd = dict(sd)
        sd.pop("mine")
        sd["param_groups"] = [{**g, "lr": 0.0123} for g in sd["param_groups"]]
        return sd

    seen = []
    fresh.register_load_state_dict_pre_hook(pre)
    fresh.register_load_state_dict_pre_hook(lambda o, sd: calls.append("pre0"), prepend=True)
    fresh.register_load_state_dict_post_hook(lambda o: seen.append(opt_state(o, params)))
    fresh.load_state_dict(sd)
    assert calls == ["pre0", "pre"] and len(seen) == 1
    assert all(g["lr"] == 0.0123 for g in fresh.param_groups)
    assert_bit_identical(seen[0], opt_state(fresh, params), "state seen by the post-hook")


@pytest.mark.parametrize("name", NAMES)
def test_loaded_hyperparameters_win(name):
    """As in torch.optim, a checkpoint's hyperparameters replace the constructor's.

    Resuming with an optimizer built with other (valid) settings -- a changed default, a
    variant -- continues exactly like the run that wrote the checkpoint.
    """
    model, ref_model = toy_model(), toy_model()
    opt = train(name, model, range(4))
    train(name, ref_model, range(8))
    other = {**variant(name, 1), "lr": 0.5 * config(name)["lr"]}
    resumed = make(name, model.parameters(), **other)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(name, model, range(4, 8), opt=resumed)
    assert_bit_identical(ref_model.state_dict(), model.state_dict(), "params")


@pytest.mark.parametrize("source", NAMES)
@pytest.mark.parametrize("name", LIBRARY)
def test_loading_another_optimizers_state_dict_raises(name, source):
    """A checkpoint of another optimizer: ValueError at load time, never a KeyError later."""
    if source == name:
        pytest.skip("same optimizer")
    model = toy_model()
    sd = copy.deepcopy(train(source, model, range(4)).state_dict())
    model2 = toy_model()
    opt = make(name, model2.parameters())
    toy_step(model2, opt, 0)
    before = opt_state(opt, list(model2.parameters()))
    with pytest.raises(ValueError, match="state"):
        opt.load_state_dict(sd)
    assert_bit_identical(
        before, opt_state(opt, list(model2.parameters())), "state after a failed load"
    )


def _mismatched(kind):
    if kind == "more_params":
        return ToyNet().parameters(), list(ToyNet().parameters()) + [
            torch.nn.Parameter(torch.ones(3))
        ]
    if kind == "more_groups":
        ps = list(ToyNet().parameters())
        return ToyNet().parameters(), [{"params": ps[:3]}, {"params": ps[3:]}]
    # Same number of tensors, different shapes (a transposed layer).
    other = ToyNet()
    other.fc1 = torch.nn.Linear(9, 12)
    other.fc2 = torch.nn.Linear(12, 1)
    return ToyNet().parameters(), other.parameters()


@pytest.mark.parametrize("kind", ["more_params", "more_groups", "other_shapes"])
@pytest.mark.parametrize("name", NAMES)
def test_loading_a_mismatched_state_dict_raises(name, kind):
    if kind == "other_shapes":
        library_only(name, "torch.optim does not check state shapes on load")
    torch.manual_seed(0)
    src_params, dst_params = _mismatched(kind)
    src_params = list(src_params)
    opt = make(name, src_params)
    x, y = toy_batch(0)
    for p in src_params:
        p.grad = torch.randn_like(p)
    opt.step()
    dst = make(name, dst_params)
    dst_ps = [p for g in dst.param_groups for p in g["params"]]
    for p in dst_ps:
        p.grad = torch.ones_like(p)
    dst.step()
    before = opt_state(dst, dst_ps)
    groups_before = copy.deepcopy(
        [{k: v for k, v in g.items() if k != "params"} for g in dst.param_groups]
    )
    with pytest.raises(ValueError, match="state dict|parameter group|shape"):
        dst.load_state_dict(opt.state_dict())
    assert_bit_identical(before, opt_state(dst, dst_ps), "state after a failed load")
    assert groups_before == [
        {k: v for k, v in g.items() if k != "params"} for g in dst.param_groups
    ]


# ========================================================================= 6. bad input
def _invalid_rows():
    for name in NAMES:
        for row in INVALID.get(name, [("<missing INVALID entry>", None)]):
            yield pytest.param(name, row, id=f"{name}-{row[0]}={row[1]!r}")


@pytest.mark.parametrize("name,row", list(_invalid_rows()))
def test_invalid_hyperparameter_raises_naming_it(name, row):
    if name not in INVALID:
        pytest.fail(f"{name} has no INVALID entry in tests/test_contract.py: add one line")
    arg, value = row[0], row[1]
    pattern = row[2] if len(row) > 2 else rf"\b{arg.split('[')[0]}"
    with pytest.raises((ValueError, TypeError), match=pattern):
        make(name, [torch.nn.Parameter(torch.zeros(3))], **{arg: value})
    if base_name(name) in REFERENCE:
        return
    good = torch.nn.Parameter(torch.zeros(3))
    if arg in make(name, [good]).defaults:  # a per-group hyperparameter: also as an override
        with pytest.raises((ValueError, TypeError), match=pattern):
            make(name, [{"params": [good], arg: value}])


@pytest.mark.parametrize("name", NAMES)
def test_sparse_gradients_raise(name):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    dense = torch.nn.Parameter(torch.randn(4, 3))
    opt = make(name, [dense, emb.weight])
    dense.grad = torch.randn(4, 3)
    emb(torch.tensor([1, 2])).sum().backward()
    snap = tree_clone([dense, emb.weight])
    errors = (TypeError, RuntimeError) if base_name(name) in REFERENCE else TypeError
    with pytest.raises(errors, match="sparse"):
        opt.step()
    if base_name(name) not in REFERENCE:  # torch.optim may have updated ``dense`` before raising
        assert_bit_identical(snap, tree_clone([dense, emb.weight]))
        assert not opt.state or all(not s for s in opt.state.values())


@pytest.mark.parametrize("name", NAMES)
def test_complex_parameters_raise(name):
    library_only(name, "torch.optim.AdamW supports complex parameters")
    z = torch.nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="complex"):
        make(name, [z])
    a = torch.nn.Parameter(torch.randn(3))
    opt = make(name, [a])
    with pytest.raises(TypeError, match="complex"):
        opt.add_param_group({"params": [z]})
    assert len(opt.param_groups) == 1
    # A complex tensor slipped into a group behind the optimizer's back: its complex
    # gradient raises at step time, before anything is modified.
    opt.param_groups[0]["params"].append(z)
    a.grad, z.grad = torch.ones(3), torch.ones(3, 3, dtype=torch.complex64)
    snap = a.detach().clone()
    with pytest.raises(TypeError, match="complex"):
        opt.step()
    assert torch.equal(a, snap) and not any(opt.state.values())


#: (warmup steps, policy, bad value); with precondition_frequency=3 the bad step after 2
#: or 5 warm-up steps is a root step, after 0 it would create the state.
NONFINITE_CASES = [(0, "skip", NAN), (2, "skip", INF), (5, "skip", -INF), (0, "raise", INF),
                   (2, "raise", NAN), (5, "raise", NAN)]  # fmt: skip
NONFINITE_ROWS = [(n, *c) for n in NAMES for c in NONFINITE_CASES] + [
    (r, *c) for r in ROWS if "/" in r for c in NONFINITE_CASES[1:3]
]


@pytest.mark.parametrize("name,warmup,policy,bad", NONFINITE_ROWS)
def test_nonfinite_gradients_follow_the_policy(name, warmup, policy, bad):
    library_only(name, "torch.optim applies NaN/Inf gradients")
    model = toy_model()
    ref_model = toy_model()
    opt = train(name, model, range(warmup), nonfinite=policy)
    ref = train(name, ref_model, range(warmup), nonfinite=policy)
    params = list(model.parameters())
    x, y = toy_batch(99)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    model.fc1.weight.grad[1, 2] = bad  # one bad element in one tensor
    snap_p, snap_s = tree_clone(params), opt_state(opt, params)
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="non-finite"):
            opt.step()
    else:
        opt.step()
        assert opt.skipped_steps == 1
    assert_bit_identical(snap_p, tree_clone(params), "params after a rejected step")
    assert_bit_identical(snap_s, opt_state(opt, params), "state after a rejected step")
    # ... and the run continues exactly as if the bad step never happened.
    for k in range(warmup, warmup + 4):
        toy_step(model, opt, k)
        toy_step(ref_model, ref, k)
    assert_bit_identical(tree_clone(list(ref_model.parameters())), tree_clone(params))
    if policy == "skip":
        assert opt.state_dict()["skipped_steps"] == 1


def _degenerate_grad(kind: str, shape: tuple[int, ...], k: int, g: torch.Generator):
    x = torch.randn(shape, generator=g)
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "zeros_then_random":  # e.g. a layer that only starts to matter later
        return torch.zeros(shape) if k < 4 else x
    if kind == "half_zero_rows":  # dead units: singular statistics
        x[: shape[0] // 2] = 0
        return x
    if kind == "rank_one":
        return torch.randn(shape[0], 1, generator=g) @ torch.randn(1, shape[1], generator=g)
    if kind == "constant":
        return torch.ones(shape)
    return x * {"tiny": 1e-30, "huge": 1e15}[kind]


@pytest.mark.parametrize(
    "kind",
    ["zeros", "zeros_then_random", "half_zero_rows", "rank_one", "constant", "tiny", "huge"],
)
@pytest.mark.parametrize("name", ROWS)
def test_degenerate_gradients_keep_params_finite(name, kind):
    """Finite but degenerate gradients (zero, singular, extreme scale) never give NaN/Inf;
    all-zero gradients (without weight decay) leave the parameters unchanged."""
    for shape in [(6, 10), (10,), ()] if kind not in ("half_zero_rows", "rank_one") else [(6, 10)]:
        p = torch.nn.Parameter(torch.randn(shape))
        init = p.detach().clone()
        opt = make(name, [p], weight_decay=0.0)
        g = torch.Generator().manual_seed(0)
        for k in range(8):
            p.grad = _degenerate_grad(kind, shape, k, g)
            opt.step()
        assert torch.isfinite(p).all(), f"{name}: non-finite parameter, {kind} grads {shape}"
        if kind == "zeros":
            assert torch.equal(p, init), f"{name}: zero gradients moved a {shape} parameter"


# ============================================================================ 7. shapes
def _block(name):
    return config(name).get("block_size", 8)


SPECIAL_SHAPES = [
    (),
    (1,),
    (5,),
    (1, 7),
    (7, 1),
    (0,),
    (3, 0),
    (2, 3, 4),
    (4, 3, 3, 3),
    (2, 2, 3, 2, 2),
    (1, 1, 1),
    (8,),
    (9,),
    (7, 9),
    (9, 8),
    (16, 17),
    (8, 8, 8),
]


def _check_shape(name, shape, steps=4):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape))
    before = p.detach().clone()
    opt = make(name, [p])
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        p.grad = torch.randn(shape, generator=g)
        opt.step()
    assert p.shape == shape and p.dtype == torch.float32
    assert torch.isfinite(p).all(), f"{name}: non-finite values for shape {shape}"
    if p.numel() > 0:
        assert not torch.equal(p, before), f"{name}: shape {shape} was not updated"
    elif base_name(name) not in REFERENCE:  # torch.optim keeps (empty) state for empty params
        assert not opt.state.get(p), f"{name}: state created for an empty parameter"
    for v in opt_state(opt, [p])[0].values():
        for t in v if isinstance(v, list) else [v]:
            ts = t if isinstance(t, list) else [t]
            for u in ts:
                if isinstance(u, torch.Tensor) and u.is_floating_point():
                    assert torch.isfinite(u).all(), f"{name}: non-finite state for shape {shape}"


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_shapes(name, data):
    b = _block(name)
    dim = st.sampled_from([0, 1, 2, b - 1, b, b + 1, 2 * b + 1])
    shape = data.draw(
        st.one_of(
            st.sampled_from(SPECIAL_SHAPES), st.lists(dim, min_size=0, max_size=4).map(tuple)
        ),
        label="shape",
    )
    _check_shape(name, shape)


def _setting_space(name: str) -> dict[str, list[Any]]:
    """Per hyperparameter, the values used anywhere in CONFIGS/VARIANTS of ``name``."""
    space: dict[str, list[Any]] = {}
    for d in [CONFIGS[name], *VARIANTS.get(name, [])]:
        for k, v in d.items():
            if all(v is not u and v != u for u in space.get(k, [])):
                space.setdefault(k, []).append(v)
    return space


@pytest.mark.parametrize("name", LIBRARY)
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_combinations_of_settings(name, data):
    """Any mix of the settings the variants use works together, on any shape: finite
    updates, and the state dict round-trips into a fresh optimizer."""
    space = _setting_space(name)
    kw = {k: data.draw(st.sampled_from(vs), label=k) for k, vs in space.items()}
    shape = data.draw(st.sampled_from(SPECIAL_SHAPES), label="shape")
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape))
    opt = with_graph_grads(OPTIMIZERS[name]([p], **kw))
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        p.grad = torch.randn(shape, generator=g)
        opt.step()
    assert torch.isfinite(p).all(), f"{name}({kw}): non-finite parameter of shape {shape}"
    q = torch.nn.Parameter(p.detach().clone())
    fresh = with_graph_grads(OPTIMIZERS[name]([q], **kw))
    fresh.load_state_dict(opt.state_dict())
    assert_bit_identical(opt_state(opt, [p]), opt_state(fresh, [q]), "state after load")


@pytest.mark.parametrize("name", ROWS)
def test_special_shapes(name):
    for shape in SPECIAL_SHAPES:
        _check_shape(name, shape)


def _noncontiguous(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as ``t`` in another memory layout."""
    if kind == "transposed":
        return t.t().contiguous().t()
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    out = torch.zeros(*t.shape[:-1], 2 * t.shape[-1])[..., ::2]  # every other element
    return out.copy_(t)


@pytest.mark.parametrize("kind", ["transposed", "channels_last", "strided"])
@pytest.mark.parametrize("name", ROWS)
def test_noncontiguous_params_and_grads(name, kind):
    """Layout is invisible: a non-contiguous parameter/grad is updated like a contiguous one."""
    shape = (3, 4, 3, 3) if kind == "channels_last" else (6, 10)
    torch.manual_seed(0)
    init = torch.randn(shape)
    a = torch.nn.Parameter(init.clone())
    b = torch.nn.Parameter(_noncontiguous(init.clone(), kind))
    assert not b.is_contiguous() and torch.equal(a, b)
    opt_a, opt_b = make(name, [a]), make(name, [b])
    g = torch.Generator().manual_seed(3)
    for k in range(7):
        grad = torch.randn(shape, generator=g)
        a.grad = grad.clone()
        b.grad = _noncontiguous(grad.clone(), kind) if k % 2 else grad.clone()
        opt_a.step()
        opt_b.step()
    assert not torch.equal(a, init), "parameter was not updated"
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ROWS)
def test_very_long_1d(name):
    _check_shape(name, (1_000_003,), steps=2)


# ========================================================================= 8. long run
#: the long-run rows: every optimizer, plus variants that run background work (threads)
LONG_RUN_ROWS = NAMES + [
    f"{n}/v{i + 1}"
    for n, vs in VARIANTS.items()
    if n in OPTIMIZERS
    for i, v in enumerate(vs)
    if any(k.startswith("async") for k in v)
]


@pytest.mark.parametrize("name", LONG_RUN_ROWS)
def test_optimizers_leave_no_threads_behind(name):
    """Optimizers that are dropped (after training) release their background threads."""
    before = threading.active_count()
    for seed in range(4):
        model = toy_model(seed)
        opt = train(name, model, range(5))
        del opt, model
    gc.collect()
    deadline = time.monotonic() + 5.0
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= before, (
        f"{threading.active_count() - before} threads left: "
        f"{[t.name for t in threading.enumerate()]}"
    )


@pytest.mark.parametrize("name", LONG_RUN_ROWS)
def test_long_run_has_no_memory_growth(name):
    """2,000 steps: after 500 warm-up steps no growth of optimizer-state bytes or Python
    objects, and no steady growth of the process's resident memory."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 1))
    opt = make(name, model.parameters())
    x = torch.randn(16, 6)
    y = x.sum(1, keepdim=True).sin()
    loss_fn = torch.nn.functional.mse_loss
    rss, states, objects = [], [], []
    for k in range(1, 2001):
        opt.zero_grad()
        backward(opt, loss_fn(model(x), y))
        opt.step()
        if k >= 500 and k % 250 == 0:  # 500, 750, ..., 2000
            gc.collect()
            rss.append(rss_bytes())
            states.append(state_bytes(opt))
            objects.append(len(gc.get_objects()))
    assert len(set(states)) == 1, f"optimizer state bytes changed: {states}"
    assert objects[-1] - objects[0] < 200, f"Python objects grew: {objects}"
    # Allocator noise is a jump or two; a leak grows in (nearly) every window. A leak of one
    # small tensor per step adds > 1 MiB over these 1,500 steps.
    grew = sum(b > a for a, b in zip(rss, rss[1:]))
    total = rss[-1] - rss[0]
    mib = [round((r - rss[0]) / 2**20, 2) for r in rss]
    assert not (total > 1 << 20 and grew >= len(rss) - 2) and total <= 8 << 20, (
        f"RSS grew steadily: +MiB at steps 500, 750, ..., 2000: {mib}"
    )
    assert torch.isfinite(loss_fn(model(x), y))


# ========================================================================== 9. compile
@pytest.fixture(scope="module")
def compiled_toy():
    try:
        import torch._inductor  # noqa: F401

        model = toy_model()
        fn = torch.compile(model, backend="inductor")
        fn(toy_batch(0)[0])
        return model, fn
    except Exception as e:  # pragma: no cover - depends on the machine's toolchain
        pytest.skip(f"torch.compile(backend='inductor') unusable here: {type(e).__name__}: {e}")


@pytest.mark.parametrize("name", NAMES)
def test_works_with_a_compiled_model(name, compiled_toy):
    if hasattr(OPTIMIZERS[name], "create_graph"):
        pytest.skip("torch.compile'd graphs do not support double backward (create_graph)")
    model, fn = compiled_toy
    model.load_state_dict(toy_model().state_dict())
    eager = toy_model()
    opt, opt_eager = make(name, model.parameters()), make(name, eager.parameters())
    losses = []
    for k in range(6):
        x, y = toy_batch(k)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(fn(x), y)
        backward(opt, loss)
        opt.step()
        losses.append(loss.item())
        toy_step(eager, opt_eager, k)
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-3)


if __name__ == "__main__":  # the "new process" of the resume test
    if sys.argv[1] == "resume":
        _resume_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
