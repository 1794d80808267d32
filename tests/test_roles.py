"""Parameter roles: finding the output layer and embeddings, groups, and role errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import secondorder
from secondorder.roles import muon_param_groups, param_roles, scale_param_groups


class LM(nn.Module):
    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.pos = nn.Parameter(torch.zeros(5, 4))
        self.body = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4), nn.LayerNorm(4))
        self.lm_head = nn.Linear(4, 10, bias=False)
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)
        self.scalar = nn.Parameter(torch.tensor(1.0))
        if tied:
            self.lm_head.weight = self.embed.weight


class HeadFirst(nn.Module):
    """Output layer registered *before* the body: the last nn.Linear is not the head."""

    def __init__(self) -> None:
        super().__init__()
        self.lm_head = nn.Linear(4, 10)
        self.body = nn.Sequential(nn.Linear(4, 4))


class HFStyle(HeadFirst):
    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


def names(roles):
    return {r: sorted(d) for r, d in roles.items()}


def test_roles_of_a_language_model():
    got = names(param_roles(LM()))
    assert got == {
        "hidden": ["body.0.weight", "body.2.weight", "pos"],
        "embedding": ["embed.weight"],
        "output": ["lm_head.weight"],
        "vector": ["body.0.bias", "body.2.bias", "body.3.bias", "body.3.weight", "scalar"],
    }  # frozen: left out


def test_get_output_embeddings_wins_over_the_last_linear():
    assert list(param_roles(HFStyle())["output"]) == ["lm_head.weight"]
    assert list(param_roles(HeadFirst())["output"]) == ["body.0.weight"]  # the fallback


@pytest.mark.parametrize("how", ["module", "module name", "param", "param name"])
def test_output_can_be_named(how):
    model = LM()
    target = {
        "module": model.body[2],
        "module name": "body.2",
        "param": model.body[2].weight,
        "param name": "body.2.weight",
    }[how]
    roles = param_roles(model, output=target)
    assert list(roles["output"]) == ["body.2.weight"]
    assert "lm_head.weight" in roles["hidden"]


def test_extra_embeddings():
    roles = param_roles(LM(), embeddings=["pos"])
    assert sorted(roles["embedding"]) == ["embed.weight", "pos"]


def test_tied_output_layer_warns_and_stays_an_embedding():
    with pytest.warns(UserWarning, match="tied"):
        roles = param_roles(LM(tied=True))
    assert list(roles["embedding"]) == ["embed.weight"] and not roles["output"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        param_roles(LM())  # untied: no warning


def test_no_output_layer_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
    with pytest.raises(ValueError, match=r"^output: .*pass output="):
        param_roles(model)
    with pytest.raises(ValueError, match=r"^output: .*pass output="):
        secondorder.SCALE.from_model(model)
    roles = param_roles(model, output="0")  # named: fine
    assert list(roles["output"]) == ["0.weight"]


@pytest.mark.parametrize(
    "output, error, pattern",
    [("nope", ValueError, "output='nope'"), (3, TypeError, "output must be"),
     ("body.0.bias", ValueError, "output: needs a weight with >= 2 dims"),
     (nn.ReLU(), ValueError, "output: module ReLU has no weight")],
)  # fmt: skip
def test_bad_output_argument(output, error, pattern):
    with pytest.raises(error, match=pattern):
        param_roles(LM(), output=output)


def test_param_groups_put_adamw_lr_where_adamw_runs():
    model = LM()
    scale = {g["role"]: g.get("lr") for g in scale_param_groups(model, adamw_lr=0.02)}
    muon = {g["role"]: g.get("lr") for g in muon_param_groups(model, adamw_lr=0.02)}
    assert scale == {"hidden": None, "embedding": None, "output": None, "vector": 0.02}
    assert muon == {"hidden": None, "embedding": 0.02, "output": 0.02, "vector": 0.02}
    total = sum(len(g["params"]) for g in scale_param_groups(model))
    assert total == sum(1 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("cls", [secondorder.SCALE, secondorder.Muon])
def test_groups_without_a_valid_role_are_rejected(cls):
    w, b = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="role must be one of"):
        cls([{"params": [w], "role": None}])
    for role in ("hidden", "embedding", "output"):
        with pytest.raises(ValueError, match=f"role='{role}' needs tensors with at least 2 dims"):
            cls([{"params": [w]}, {"params": [b], "role": role}])
    opt = cls([w])
    with pytest.raises(ValueError, match="role='output' needs"):
        opt.add_param_group({"params": [b], "role": "output"})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [b], "role": "vector"})
    assert len(opt.param_groups) == 2
    sd = opt.state_dict()
    sd["param_groups"][1]["role"] = "hidden"  # a checkpoint whose roles do not fit
    with pytest.raises(ValueError, match="role='hidden' needs"):
        opt.load_state_dict(sd)
    assert opt.param_groups[1]["role"] == "vector"


@pytest.mark.parametrize("name, cls", [("scale", secondorder.SCALE), ("muon", secondorder.Muon)])
def test_selectable_in_the_bench(name, cls):
    from secondorder.bench.optimizers import OPTIMIZERS, parse_spec, resolve

    assert parse_spec(f"{name}:lr=0.01").overrides == {"lr": 0.01}
    assert resolve(name) is cls and OPTIMIZERS[name].doc == f"secondorder.{cls.__name__}"
    # the bench builds optimizers that define from_model with it (roles from the model)
    opt = cls.from_model(LM(), lr=0.01)
    assert {g["role"] for g in opt.param_groups} == {"hidden", "embedding", "output", "vector"}
