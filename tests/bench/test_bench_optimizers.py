"""Optimizer names, ``name:key=value`` specs and their error messages."""

from __future__ import annotations

import math

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


def _params() -> torch.nn.Module:
    """A tiny model (the bench builds optimizers for a model)."""
    return torch.nn.Linear(2, 3)


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
    built = build_optimizer(parse_spec("sgd:lr=0.5"), _params(), default_lr=0.1)
    opt = built.optimizer
    assert isinstance(opt, torch.optim.SGD) and not built.create_graph
    assert built.kwargs == {"momentum": 0.9, "nesterov": True, "lr": 0.5}
    group = opt.param_groups[0]
    assert group["nesterov"] and group["momentum"] == 0.9 and group["lr"] == 0.5
    opt = build_optimizer(parse_spec("rmsprop"), _params(), default_lr=0.01).optimizer
    assert isinstance(opt, torch.optim.RMSprop) and opt.param_groups[0]["lr"] == 0.01
    for name in ("adam", "adamw", "adagrad", "momentum"):
        built = build_optimizer(parse_spec(name), _params())
        assert isinstance(built.optimizer, torch.optim.Optimizer)


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


# ------------------------------------------------------------ any class, checked values
def test_any_importable_class_by_dotted_path() -> None:
    spec = parse_spec("torch.optim.NAdam:lr=2e-3,momentum_decay=5e-3")
    assert spec.name == "torch.optim.NAdam"
    assert spec.label == "torch.optim.NAdam:lr=2e-3,momentum_decay=5e-3"
    built = build_optimizer(spec, _params(), default_lr=0.5)
    assert type(built.optimizer) is torch.optim.NAdam
    assert built.optimizer.param_groups[0]["lr"] == 2e-3  # the spec beats the workload default
    assert built.optimizer.param_groups[0]["momentum_decay"] == 5e-3


@pytest.mark.parametrize(
    "text, message",
    [
        ("no_such_module_xyz.Opt", "cannot import 'no_such_module_xyz'"),
        ("torch.optim.Lion", "has no attribute 'Lion'"),
        ("torch.nn.Linear", "is not a torch.optim.Optimizer subclass"),
        ("torch.optim.NAdam:bogus=1", "valid hyperparameters: lr, betas"),
    ],
)
def test_bad_class_paths_are_usage_errors(text: str, message: str) -> None:
    with pytest.raises(BenchUsageError, match=message):
        build_optimizer(parse_spec(text), _params())


def test_malformed_class_path_is_rejected_when_parsed() -> None:
    with pytest.raises(BenchUsageError, match="dotted class path"):
        parse_spec("torch..optim:lr=1")


@pytest.mark.parametrize(
    "text, message",
    [
        ("adamw:lr=abc", "lr='abc' .*is not a number"),
        ("adamw:eps=tiny", "eps='tiny' .*is not a number"),
        ("adamw:lr=nan", "lr=nan .*is not a finite number"),
        ("adamw:lr=inf", "lr=inf .*is not a finite number"),
        ("adamw:weight_decay=-inf", "weight_decay=-inf .*is not a finite number"),
        ("adamw:lr=1e999", "lr=inf .*is not a finite number"),
        ("sgd:nesterov=True,momentum=0", "invalid hyperparameters"),  # torch's own ValueError
        ("adamw:betas=0.9", "invalid hyperparameters"),  # a TypeError inside torch
    ],
)
def test_bad_values_are_one_usage_error(text: str, message: str) -> None:
    model = _params()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(BenchUsageError, match=message):
        build_optimizer(parse_spec(text), model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_secondorder_lr_without_default_is_still_checked() -> None:
    if getattr(secondorder, "SONew", None) is None:
        pytest.skip("secondorder.SONew is not in this version")
    for text in ("sonew:lr=inf", "sonew:lr=abc", "shampoo:lr=nan"):
        with pytest.raises(BenchUsageError, match="lr="):
            build_optimizer(parse_spec(text), _params())


def test_nonfinite_words_parse_as_floats() -> None:
    assert math.isnan(parse_value("nan")) and parse_value("-inf") == -math.inf
    assert parse_value("inf") == math.inf and parse_value("1e999") == math.inf


# ------------------------------------------------------------------ construction protocol
def test_from_model_is_used_when_the_class_defines_it() -> None:
    from _toy_optimizers import ModelSGD

    model = _params()
    built = build_optimizer(parse_spec("_toy_optimizers.ModelSGD:momentum=0.5"), model, 0.2)
    assert type(built.optimizer) is ModelSGD and ModelSGD.built_for[-1] is model
    assert built.optimizer.model_type == "Linear"
    assert built.optimizer.param_groups[0]["lr"] == 0.2
    assert built.optimizer.param_groups[0]["momentum"] == 0.5
    # the hyperparameters it accepts come from from_model's signature
    with pytest.raises(BenchUsageError, match="valid hyperparameters: lr, momentum"):
        build_optimizer(parse_spec("_toy_optimizers.ModelSGD:dampening=1"), model)


def test_create_graph_attribute_is_reported() -> None:
    built = build_optimizer(parse_spec("_toy_optimizers.CurvatureProbe"), _params())
    assert built.create_graph
