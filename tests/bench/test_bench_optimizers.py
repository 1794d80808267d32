"""Optimizer names, ``name:key=value`` specs and their error messages."""

from __future__ import annotations

import pytest
import torch

import secondorder
from secondorder.bench.errors import BenchUsageError
from secondorder.bench.optimizers import (
    OPTIMIZERS,
    OptimizerUnavailable,
    build_optimizer,
    parse_spec,
    parse_value,
    resolve,
)


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(3, 2))]


def test_values_are_python_literals() -> None:
    assert parse_value("1e-3") == 1e-3 and parse_value("10") == 10
    assert parse_value("True") is True and parse_value("false") is False
    assert parse_value("None") is None and parse_value("none") is None
    assert parse_value("(0.9, 0.95)") == (0.9, 0.95) and parse_value("[1,2]") == (1, 2)
    assert parse_value("adam") == "adam" and parse_value("'x,y'") == "x,y"
    assert parse_value("torch.bfloat16") is torch.bfloat16 and parse_value("torch.nn") == "torch.nn"


def test_spec_splits_on_top_level_commas_only() -> None:
    spec = parse_spec("Shampoo:lr=1e-3,betas=(0.9,0.99),graft=adam, block_size=128")
    assert spec.name == "shampoo"
    assert spec.overrides == {"lr": 1e-3, "betas": (0.9, 0.99), "graft": "adam", "block_size": 128}
    assert spec.label == "Shampoo:lr=1e-3,betas=(0.9,0.99),graft=adam, block_size=128"
    assert parse_spec("adamw").label == "adamw" and parse_spec("adamw:").overrides == {}


def test_unknown_optimizer_lists_the_valid_ones() -> None:
    with pytest.raises(BenchUsageError, match="unknown optimizer 'adamx'") as info:
        parse_spec("adamx:lr=1")
    for name in ("adamw", "adam", "sgd", "adagrad", "rmsprop", "shampoo", "sonew"):
        assert name in str(info.value)


@pytest.mark.parametrize("text", ["adamw:lr", "adamw:=3", "adamw:lr=1,lr=2", "adamw:1x=2"])
def test_malformed_items_are_rejected(text: str) -> None:
    with pytest.raises(BenchUsageError, match="--opt"):
        parse_spec(text)


def test_unknown_hyperparameter_lists_the_constructor_arguments() -> None:
    with pytest.raises(BenchUsageError, match="unknown hyperparameter 'lrate' for adamw") as info:
        build_optimizer(parse_spec("adamw:lrate=1"), _params())
    assert "lr, betas, eps, weight_decay, amsgrad" in str(info.value)


def test_bad_value_becomes_a_usage_error() -> None:
    with pytest.raises(BenchUsageError, match="invalid hyperparameters for 'adamw:lr=-1'"):
        build_optimizer(parse_spec("adamw:lr=-1"), _params())


def test_defaults_and_overrides() -> None:
    opt, kwargs = build_optimizer(parse_spec("sgd:lr=0.5"), _params(), default_lr=0.1)
    assert isinstance(opt, torch.optim.SGD)
    assert kwargs == {"momentum": 0.9, "nesterov": True, "lr": 0.5}
    group = opt.param_groups[0]
    assert group["nesterov"] and group["momentum"] == 0.9 and group["lr"] == 0.5
    opt, kwargs = build_optimizer(parse_spec("rmsprop"), _params(), default_lr=0.01)
    assert isinstance(opt, torch.optim.RMSprop) and opt.param_groups[0]["lr"] == 0.01
    for name in ("adam", "adamw", "adagrad", "momentum"):
        assert isinstance(build_optimizer(parse_spec(name), _params())[0], torch.optim.Optimizer)


def test_missing_secondorder_class_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(secondorder, "SONew", raising=False)
    with pytest.raises(OptimizerUnavailable, match="secondorder.SONew does not exist"):
        resolve("sonew")


@pytest.mark.parametrize("name, attr", [("shampoo", "Shampoo"), ("sonew", "SONew")])
def test_secondorder_optimizers_resolve_lazily(name: str, attr: str) -> None:
    if getattr(secondorder, attr, None) is None:
        pytest.skip(f"secondorder.{attr} is not in this version yet")
    try:
        cls = resolve(name)
    except OptimizerUnavailable as exc:
        pytest.skip(str(exc))
    assert cls is getattr(secondorder, attr)
    assert OPTIMIZERS[name].doc == f"secondorder.{attr}"
    with pytest.raises(BenchUsageError, match="valid hyperparameters: .*lr"):
        build_optimizer(parse_spec(f"{name}:no_such_knob=1"), _params())
