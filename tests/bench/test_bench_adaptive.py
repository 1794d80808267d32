"""``--batch-schedule adaptive:...``: parsing, bad input, and a tiny end-to-end run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from secondorder.bench.adaptive import parse_batch_schedule
from secondorder.bench.errors import BenchUsageError
from secondorder.cli import main


def test_parse_batch_schedule():
    assert parse_batch_schedule(None) is None and parse_batch_schedule("constant") is None
    s = parse_batch_schedule("adaptive:test=inner_product,theta=0.5,nu=1,max_micro_batch=16")
    assert s.options == {"test": "inner_product", "theta": 0.5, "nu": 1, "max_micro_batch": 16}
    assert parse_batch_schedule("adaptive").options == {}
    s = parse_batch_schedule("adaptive:eta=0.1,lr_scaling=sqrt,lr_max_scale=4,lr_warmup=256")
    scaling = s.lr_scaling(8)
    assert (scaling.lr_scaling, scaling.lr_max_scale, scaling.lr_warmup) == ("sqrt", 4.0, 256)
    assert s.controller(8, 100).eta == 0.1  # the lr keys do not reach the controller
    # "none" is read as Python's None by the value parser: still the rule "none"
    assert parse_batch_schedule("adaptive:lr_scaling=none").lr_scaling(8).lr_scaling == "none"
    assert parse_batch_schedule("adaptive:lr_max_scale=inf").lr_scaling(8).lr_max_scale == math.inf


@pytest.mark.parametrize(
    "text, needle",
    [
        ("adaptive:test=variance", "test"),
        ("adaptive:eta=0", "eta"),
        ("adaptive:theta=-1", "theta"),
        ("adaptive:nu=0", "nu"),
        ("adaptive:speed=3", "speed"),
        ("growing", "constant, adaptive"),
        ("adaptive:chunk=0", "chunk"),
        ("adaptive:lr_scaling=cube", "lr_scaling"),
        ("adaptive:lr_max_scale=0.5", "lr_max_scale"),
        ("adaptive:lr_warmup=-8", "lr_warmup"),
        ("adaptive:lr_warmup=0.5", "lr_warmup"),
    ],
)
def test_bad_batch_schedules_name_the_argument(text, needle):
    with pytest.raises(BenchUsageError, match=needle):
        parse_batch_schedule(text)


def test_cap_below_the_starting_batch_is_a_usage_error(tmp_path: Path, capsys):
    rc = main(["bench", "--steps", "2", "--batch-size", "50", "--quiet", "--out",
               str(tmp_path / "o"), "--batch-schedule", "adaptive:max_batch=10"])  # fmt: skip
    assert rc == 2
    assert "max_batch" in capsys.readouterr().err


def test_adaptive_run_end_to_end(tmp_path: Path, capsys):
    out = tmp_path / "out"
    rc = main(["bench", "--steps", "12", "--batch-size", "4", "--quiet", "--threads", "1",
               "--opt", "adagradnorm", "--batch-schedule", "adaptive:test=norm,eta=0.2",
               "--out", str(out)])  # fmt: skip
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    (r,) = results["optimizers"]
    sizes, examples = r["batch_sizes"], r["examples"]
    assert sizes[0] == 4 and all(a <= b for a, b in zip(sizes, sizes[1:]))
    assert len(sizes) == r["steps_run"] and examples[-1] == sum(sizes)
    # the same examples as the constant run (12 x 4), in at most that many steps
    assert examples[-1] >= 48 and examples[-2] < 48 and r["steps_run"] <= 12
    assert (out / "batch_size.png").exists()
    assert "examples in" in capsys.readouterr().out


def test_adaptive_run_with_the_inner_product_family_and_accumulation(tmp_path: Path):
    from secondorder.bench.runner import BenchConfig, run_benchmark

    config = BenchConfig(
        optimizers=["adagrad"], steps=4, batch_size=4, threads=1,
        batch_schedule="adaptive:test=augmented,theta=0.5,nu=1,per_layer=True,max_micro_batch=3",
    )  # fmt: skip
    (r,) = run_benchmark(config, stream=None)["optimizers"]
    assert r["status"] == "ok" and r["batch_sizes"][0] == 4
    assert sum(r["batch_sizes"]) == r["examples_processed"] >= 16


def test_the_lr_follows_the_batch_as_specified():
    """``lr_scaling=linear``: the lr of every step is the base lr times min(cap, batch / b0)
    of that step's batch (constant schedule, no ramp), exactly."""
    from secondorder.bench.runner import BenchConfig, run_benchmark

    config = BenchConfig(
        optimizers=["adagrad:lr=0.01"], steps=12, batch_size=4, threads=1, schedule="constant",
        batch_schedule="adaptive:test=norm,eta=0.2,lr_scaling=linear,lr_max_scale=3",
    )  # fmt: skip
    (r,) = run_benchmark(config, stream=None)["optimizers"]
    assert r["status"] == "ok" and r["batch_sizes"][-1] > 4  # it grew
    assert r["lrs"] == [0.01 * min(3.0, b / 4) for b in r["batch_sizes"]]
    assert max(r["lrs"]) > 0.01


@pytest.mark.parametrize("extra", ["", ",lr_scaling=sqrt,lr_warmup=7"])
def test_an_adaptive_run_that_never_grows_is_the_constant_run(extra):
    from secondorder.bench.runner import BenchConfig, run_benchmark

    # warm-up over 2 steps, then linear decay: the sample-counted schedule matches it
    common = dict(optimizers=["adagradnorm"], steps=5, batch_size=6, threads=1, warmup=2.0)
    (const,) = run_benchmark(BenchConfig(**common), stream=None)["optimizers"]
    # a tolerance so loose the test can never ask for a larger batch
    never = "adaptive:test=norm,eta=1e30" + extra
    (adapt,) = run_benchmark(BenchConfig(**common, batch_schedule=never), stream=None)[
        "optimizers"
    ]
    assert adapt["batch_sizes"] == [6] * 5
    assert adapt["train_loss"] == const["train_loss"]  # same examples, same order: bit-identical
    assert adapt["final_val_loss"] == const["final_val_loss"]
