"""--sweep, the construction protocol end to end, health from diagnostics(), warm-up
warnings, failed runs, and the table's formatting."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import secondorder
from secondorder.bench import health
from secondorder.bench.report import plural, sig
from secondorder.bench.runner import BenchConfig, run_benchmark
from secondorder.cli import main

TINY = ["--steps", "6", "--batch-size", "50", "--quiet", "--threads", "1"]


def _run(tmp_path: Path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "out"
    assert main(["bench", *args, "--out", str(out), "--overwrite"]) == 0
    return json.loads((out / "results.json").read_text()), str(out)


# -------------------------------------------------------------------------------- sweep
def test_sweep_reports_each_optimizer_at_its_best_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lrs = (1e-3, 3e-2)
    results, _ = _run(tmp_path, *TINY, "--opt", "adamw", "--opt", "sgd:lr=0.05",
                      "--sweep", ",".join(["lr=1e-3", "3e-2"]))  # fmt: skip
    table = capsys.readouterr().out
    adamw, sgd = results["optimizers"]
    # reference: each lr run on its own, same seed and batches (bit-identical on one thread)
    alone = {}
    for lr in lrs:
        config = BenchConfig(optimizers=[f"adamw:lr={lr}"], steps=6, batch_size=50, threads=1)
        alone[lr] = run_benchmark(config, stream=None)["optimizers"][0]
    best = min(lrs, key=lambda lr: alone[lr]["final_val_loss"])
    assert adamw["sweep"]["chosen"] == best and adamw["hyperparameters"]["lr"] == best
    assert adamw["train_loss"] == alone[best]["train_loss"]
    assert adamw["sweep"]["criterion"] == "final validation loss"
    trials = {t["value"]: t["final_val_loss"] for t in adamw["sweep"]["trials"]}
    assert trials == {lr: alone[lr]["final_val_loss"] for lr in lrs}
    # an --opt that sets the swept hyperparameter runs once, as given
    assert "sweep" not in sgd and sgd["hyperparameters"]["lr"] == 0.05
    assert results["settings"]["sweep"] == {"key": "lr", "values": list(lrs)}
    assert re.search(rf"^adamw +{best:g}\* ", table, re.M) and "is the best of the sweep" in table
    assert "at the edge of the sweep" in table  # two values: the best is always an edge
    assert "sgd:lr=0.05: not swept (lr fixed by its --opt)" in table


def test_a_diverging_trial_is_never_the_best() -> None:
    # the toy optimizer writes NaN into the weights at step 3 when lr >= 1
    config = BenchConfig(optimizers=["_toy_optimizers.NaNAtStep3"], steps=6, batch_size=50,
                         threads=1, schedule="constant", sweep="lr=1e-3,1.0")  # fmt: skip
    record = run_benchmark(config, stream=None)["optimizers"][0]
    statuses = {t["value"]: t["status"] for t in record["sweep"]["trials"]}
    assert statuses == {1e-3: "ok", 1.0: "diverged"} and record["sweep"]["chosen"] == 1e-3


# ---------------------------------------------------------------- construction protocol
def test_from_model_and_create_graph_end_to_end(tmp_path: Path) -> None:
    from _toy_optimizers import ModelSGD

    before = len(ModelSGD.built_for)
    results, _ = _run(tmp_path, *TINY, "--opt", "_toy_optimizers.ModelSGD:lr=0.01",
                      "--opt", "_toy_optimizers.CurvatureProbe:lr=0.01")  # fmt: skip
    model_sgd, probe = results["optimizers"]
    assert model_sgd["status"] == probe["status"] == "ok"
    # built once to check the hyperparameters, once to train; for a model each time
    assert len(ModelSGD.built_for) == before + 2
    assert all(type(m).__name__ == "Sequential" for m in ModelSGD.built_for[before:])
    assert probe["create_graph"] and not model_sgd["create_graph"]
    # with create_graph the probe's Hessian-vector products succeed; both are plain SGD
    # steps, so the two runs see identical losses
    assert probe["train_loss"] == model_sgd["train_loss"]


def test_create_graph_is_really_passed_to_backward() -> None:
    import torch
    from _toy_optimizers import CurvatureProbe

    from secondorder.bench.optimizers import build_optimizer, parse_spec
    from secondorder.bench.training import Plan, batch_order, train_run
    from secondorder.bench.workloads import get_workload

    workload = get_workload("digits-autoencoder")()
    setup = workload.setup(torch.device("cpu"), torch.float32)
    plan = Plan(workload, batch_order(setup.num_train, 20, 3, 0), torch.device("cpu"),
                torch.float32, 0, "constant", 0, 1, 1)  # fmt: skip
    made = []

    def build(model):
        built = build_optimizer(parse_spec("_toy_optimizers.CurvatureProbe"), model)
        made.append(built.optimizer)
        return built

    train_run(plan, build, "probe")
    assert isinstance(made[0], CurvatureProbe) and made[0].steps_with_graph == 3


# -------------------------------------------------------------------------------- health
def test_health_summary_reduces_each_field() -> None:
    records = [
        {"param": 3, "axis": 0, "root_error": [0.1, 0.4], "failures": [0, 2], "x": float("inf")},
        {"param": 4, "axis": 1, "root_error": [0.3], "failures": [1], "x": -2.0, "name": "w"},
    ]
    assert health.summarize(records) == {
        "root_error (max)": 0.4,
        "failures (sum)": 3.0,
        "x (max)": -2.0,
        "x non-finite": 1.0,
    }
    assert health.summarize([]) == {}


def test_health_samples_follow_the_optimizer_diagnostics(tmp_path: Path) -> None:
    results, out = _run(tmp_path, *TINY, "--eval-every", "2", "--opt", "adamw",
                        "--opt", "_toy_optimizers.CountingDiagnostics")  # fmt: skip
    adamw, toy = results["optimizers"]
    assert adamw["health"] == []  # torch.optim.AdamW has no diagnostics()
    expected = [
        {"step": t, "rejects (sum)": t + 1.0, "level (max)": float(t), "noisy (max)": 2.0,
         "noisy non-finite": 1.0, "skipped_steps": 2.0 * t}
        for t in (2, 4, 6)
    ]  # fmt: skip
    assert toy["health"] == expected
    png = Path(out) / "health.png"
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_no_health_plot_without_diagnostics(tmp_path: Path) -> None:
    _, out = _run(tmp_path, *TINY, "--opt", "adamw")
    assert (Path(out) / "loss.png").is_file() and not (Path(out) / "health.png").exists()


def test_shampoo_health_and_warm_up_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if getattr(secondorder, "Shampoo", None) is None:
        pytest.skip("secondorder.Shampoo is not in this version")
    results, _ = _run(tmp_path, *TINY, "--eval-every", "1",
                      "--opt", "shampoo:precondition_frequency=2",
                      "--opt", "shampoo:precondition_frequency=100")  # fmt: skip
    table = capsys.readouterr().out
    used, idle = results["optimizers"]
    assert used["warnings"] == [] and len(idle["warnings"]) == 1
    assert "never left its warm-up: its first preconditioned step is 100" in idle["warnings"][0]
    assert "warning: shampoo:precondition_frequency=100 never left its warm-up" in table
    last = used["health"][-1]
    assert last["step"] == 6 and last["failures (sum)"] == 0 and last["skipped_steps"] == 0
    assert 0 <= last["root_error (max)"] < 1 and last["lambda_max (max)"] > 0


def test_few_preconditioned_steps_are_flagged() -> None:
    import torch

    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.SGD([p], lr=0.1)
    opt.param_groups[0]["start_preconditioning_step"] = None
    opt.param_groups[0]["precondition_frequency"] = 95
    assert health.first_preconditioned_step(opt) == 95
    assert "only 5 of 100 losses" in health.warm_up_note(opt, 100, "x")
    # the loss of step 95 is measured before step 95's (first preconditioned) update
    assert health.warm_up_note(opt, 95, "x").startswith("x never left its warm-up")
    assert health.warm_up_note(opt, 200, "x") is None
    assert health.warm_up_note(torch.optim.SGD([p], lr=0.1), 5, "sgd") is None


# ---------------------------------------------------------------------- failures, table
def test_a_failing_optimizer_is_recorded_and_the_others_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results, _ = _run(tmp_path, *TINY, "--opt", "_toy_optimizers.Crashes", "--opt", "adam")
    crashed, adam = results["optimizers"]
    assert crashed["status"] == "failed" and crashed["error"] == "RuntimeError: boom at step 2"
    assert adam["status"] == "ok" and adam["mean_step_ratio"] == 1.0
    assert "failed: RuntimeError: boom at step 2" in capsys.readouterr().out


@pytest.mark.parametrize(
    "value, digits, text",
    [(124.0, 4, "124.0"), (204.91, 4, "204.9"), (83.634, 4, "83.63"), (0.000123456, 3, "0.000123"),
     (12345.6, 4, "12346"), (1.0, 3, "1.00"), (2.5e-9, 3, "2.50e-09"), (None, 3, "-"),
     (0.0, 3, "0"), (math.inf, 3, "inf")],
)  # fmt: skip
def test_significant_digits(value: float | None, digits: int, text: str) -> None:
    assert sig(value, digits) == text


def test_plurals() -> None:
    assert plural(1, "thread") == "1 thread" and plural(2, "thread") == "2 threads"
    assert plural(1.0, "epoch") == "1 epoch" and plural(0.2, "epoch") == "0.2 epochs"


@settings(max_examples=200, deadline=None)
@given(
    value=st.floats(min_value=1e-12, max_value=1e12) | st.floats(min_value=-1e12, max_value=-1e-12),
    digits=st.integers(min_value=2, max_value=6),
)
def test_significant_digits_round_to_the_nearest(value: float, digits: int) -> None:
    text = sig(value, digits)
    back = float(text)
    if 10 ** (digits - 1) <= abs(value) < 1e9:  # written in full: rounded to an integer
        assert abs(back - value) <= 0.5
    else:  # exactly `digits` significant digits, trailing zeros kept
        mantissa = text.lstrip("-").split("e")[0].replace(".", "").lstrip("0")
        assert len(mantissa) == digits
        unit = 10 ** (math.floor(math.log10(abs(back))) - digits + 1)  # of the last digit
        assert abs(back - value) <= 0.5 * unit * 1.0001


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_on_a_terminal() -> None:
    stream = _Terminal()
    config = BenchConfig(optimizers=["adamw", "sgd"], steps=5, batch_size=50, threads=1)
    run_benchmark(config, stream=stream)
    text = stream.getvalue()
    assert "runs:" in text and "2/2" in text  # the overall bar
    assert "\radamw:" in text and "/5 [" in text and "step/s" in text  # a bar per run
    assert "\r" in text  # redrawn in place
    assert "adamw: 5 steps, final train loss" in text and "sgd: 5 steps, final train loss" in text
