"""``secondorder bench`` end to end on tiny settings, plus the runner's building blocks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import secondorder
from secondorder.bench.runner import BenchConfig, run_benchmark
from secondorder.bench.training import batch_order, lr_factor, smooth, state_bytes
from secondorder.cli import main

REPO = Path(__file__).resolve().parents[2]
# the MNIST IDX files: $SECONDORDER_MNIST_DIR, else ../shared/data/mnist beside the repository
MNIST_DIR = Path(
    os.environ.get("SECONDORDER_MNIST_DIR", REPO.parent / "shared" / "data" / "mnist")
)
# one thread: steadier and much faster than oversubscribed OpenMP on a busy 2-core machine
TINY = ["--steps", "6", "--batch-size", "50", "--quiet", "--threads", "1"]


def _run(tmp_path: Path, *args: str) -> dict:
    assert main(["bench", *args, "--out", str(tmp_path)]) == 0
    return json.loads((tmp_path / "results.json").read_text())


def _check_schema(results: dict) -> None:
    top = {"schema_version": int, "created_utc": str, "command": str, "argv": list,
           "environment": dict, "workload": dict, "settings": dict, "optimizers": list}  # fmt: skip
    for key, kind in top.items():
        assert isinstance(results[key], kind), key
    for key in ("python", "torch", "platform", "machine", "cpu_count", "torch_threads"):
        assert key in results["environment"]
    assert isinstance(results["workload"]["num_parameters"], int)
    for key in ("steps", "batch_size", "seed", "dtype", "device", "schedule", "target_loss"):
        assert key in results["settings"]
    numbers = ("train_seconds", "wall_seconds", "mean_step_seconds", "median_step_seconds",
               "mean_step_ratio", "median_step_ratio", "final_train_loss")  # fmt: skip
    for r in results["optimizers"]:
        assert r["status"] in ("ok", "diverged", "unavailable")
        if r["status"] == "unavailable":
            assert isinstance(r["error"], str)
            continue
        for key in numbers:
            assert isinstance(r[key], float), key
        assert isinstance(r["peak_state_bytes"], int) and isinstance(r["steps_run"], int)
        assert isinstance(r["hyperparameters"], dict) and isinstance(r["label"], str)
        assert r["steps_to_target"] is None or isinstance(r["steps_to_target"], int)
        for key in ("train_loss", "train_loss_smoothed", "step_seconds", "cumulative_seconds"):
            assert len(r[key]) == r["steps_run"] and all(isinstance(v, float) for v in r[key])
        assert all(set(p) == {"step", "loss"} for p in r["val_loss"])


def test_bench_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [*TINY, "--opt", "adamw:lr=3e-3", "--opt", "sgd", "--seed", "3"]
    threads = torch.get_num_threads()
    results = _run(tmp_path, "digits-autoencoder", *args)
    assert torch.get_num_threads() == threads  # restored after the run
    _check_schema(results)
    out = capsys.readouterr().out
    assert "adamw:lr=3e-3" in out and "sgd" in out and "state MB" in out
    adamw, sgd = results["optimizers"]
    assert adamw["status"] == sgd["status"] == "ok" and adamw["steps_run"] == 6
    assert adamw["mean_step_ratio"] == 1.0 and adamw["hyperparameters"]["lr"] == 3e-3
    assert sgd["hyperparameters"] == {"momentum": 0.9, "nesterov": True, "lr": 1e-2}
    assert adamw["resolved_hyperparameters"]["betas"] == [0.9, 0.999]
    # AdamW keeps two fp32 moments per weight (+ step counters); SGD one momentum buffer
    n = results["workload"]["num_parameters"]
    assert 8 * n <= adamw["peak_state_bytes"] <= 8 * n + 1024
    assert 4 * n == sgd["peak_state_bytes"]
    assert adamw["steps_to_target"] <= 6 and results["settings"]["target_source"]
    assert [p["step"] for p in adamw["val_loss"]][0] == 0 and adamw["val_loss"][-1]["step"] == 6
    assert results["argv"][0] == "digits-autoencoder" and "--seed 3" in results["command"]
    assert results["settings"]["threads"] == 1 and "(1 thread)" in out
    assert "adamw:lr=3e-3  0.003  0.01" in out  # resolved lr and weight decay are shown
    png = tmp_path / "loss.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_same_seed_same_losses_other_seed_differs() -> None:
    config = BenchConfig(optimizers=["adamw", "rmsprop"], steps=5, batch_size=40, seed=7, threads=1)
    first = run_benchmark(config, stream=None)
    second = run_benchmark(config, stream=None)
    for a, b in zip(first["optimizers"], second["optimizers"]):
        assert a["train_loss"] == b["train_loss"] and a["val_loss"] == b["val_loss"]
    config.seed = 8
    other = run_benchmark(config, stream=None)
    assert other["optimizers"][0]["train_loss"] != first["optimizers"][0]["train_loss"]
    # same seed: every optimizer starts from the same weights and sees the same first batch
    assert first["optimizers"][0]["train_loss"][0] == first["optimizers"][1]["train_loss"][0]


def test_progress_goes_to_stderr(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    main(["bench", "--steps", "4", "--batch-size", "50", "--opt", "adam", "--threads", "1",
          "--out", str(tmp_path)])  # fmt: skip
    err = capsys.readouterr().err
    # not a terminal: no bars, one summary line per finished run
    assert "adam: 4 steps, final train loss" in err and "\r" not in err


def test_python_dash_m_subprocess(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "secondorder", "bench", *TINY, "--opt", "adagrad",
           "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "adagrad" in proc.stdout and (tmp_path / "results.json").is_file()


def test_bfloat16_mode_trains_in_bfloat16(tmp_path: Path) -> None:
    results = _run(tmp_path, *TINY, "--dtype", "bfloat16", "--opt", "adam")
    record = results["optimizers"][0]
    assert results["settings"]["dtype"] == "bfloat16" and record["status"] == "ok"
    assert all(math.isfinite(v) for v in record["train_loss"])
    # Adam's moments follow the bf16 parameters: 2 bytes each
    n = results["workload"]["num_parameters"]
    assert 4 * n <= record["peak_state_bytes"] <= 4 * n + 1024


@pytest.mark.skipif(not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason=f"real MNIST files not found in {MNIST_DIR}")  # fmt: skip
def test_mnist_autoencoder_tiny(tmp_path: Path) -> None:
    args = ["--data-dir", str(MNIST_DIR), "--steps", "2", "--batch-size", "200", "--quiet",
            "--threads", "1"]  # fmt: skip
    results = _run(tmp_path, "mnist-autoencoder", *args, "--opt", "sgd")
    w = results["workload"]
    assert w["num_parameters"] == 2_837_314 and w["split"] == "t10k" and w["num_train"] == 10000
    assert results["settings"]["schedule"] == "warmup-linear" and not w["has_validation"]
    loss = results["optimizers"][0]["train_loss"]
    assert 400 < loss[0] < 600  # summed BCE over 784 pixels at initialisation (~ 784 * 0.6)


def test_default_workload_runs_single_threaded_unless_told() -> None:
    config = BenchConfig(optimizers=["sgd"], steps=1, batch_size=500)
    assert run_benchmark(config, stream=None)["settings"]["threads"] == 1
    config.threads = 2
    assert run_benchmark(config, stream=None)["settings"]["threads"] == 2


def test_epochs_count_whole_batches() -> None:
    config = BenchConfig(epochs=2, batch_size=400, optimizers=["sgd"], threads=1)
    settings = run_benchmark(config, stream=None)["settings"]
    assert settings["steps_per_epoch"] == 3 and settings["steps"] == 6 and settings["epochs"] == 2


def test_byte_lm_reports_validation_loss(tmp_path: Path) -> None:
    results = _run(tmp_path, "byte-lm", "--steps", "2", "--batch-size", "4", "--quiet",
                   "--opt", "adamw", "--threads", "1")  # fmt: skip
    w, r = results["workload"], results["optimizers"][0]
    assert w["has_validation"] and w["corpus_bytes"] > 100_000 and len(w["corpus_sha256"]) == 64
    assert [p["step"] for p in r["val_loss"]] == [0, 1, 2]
    assert abs(r["val_loss"][0]["loss"] - math.log(256)) < 1.0  # untrained: near uniform


@pytest.mark.parametrize(
    "args, message",
    [
        (["imagenet"], "unknown workload 'imagenet'; valid workloads: byte-lm, digits-autoencoder"),
        (["--opt", "lion"], "valid optimizers: adamw, adam, sgd"),
        (["--opt", "adamw:bogus=1"], "valid hyperparameters: lr, betas"),
        (["--steps", "0"], "--steps must be a positive integer"),
        (["--threads", "-1"], "--threads must be a positive integer"),
        (["--batch-size", "100000"], "exceeds the 1500 training examples"),
        (["mnist-autoencoder", "--data-dir", "/nonexistent/mnist"], "t10k-images-idx3-ubyte[.gz]"),
        (["mnist-autoencoder"], "needs --data-dir"),
        (["--opt", "shampoo:lr=abc"], "lr='abc' in --opt 'shampoo:lr=abc' is not a number"),
        (["--opt", "adamw:lr=nan"], "lr=nan in --opt 'adamw:lr=nan' is not a finite number"),
        (["--opt", "sonew:lr=inf"], "lr=inf in --opt 'sonew:lr=inf' is not a finite number"),
        (["--opt", "torch.optim.Nope"], "module 'torch.optim' has no attribute 'Nope'"),
        (["--device", "meta"], "--device meta cannot train a model here"),
        (["--device", "nonsense"], "invalid --device 'nonsense'"),
        (["--data-dir", "/tmp"], "--data-dir is not used by digits-autoencoder"),
        (["--target-loss", "nan"], "--target-loss must be a finite number"),
        (["--warmup", "inf"], "--warmup must be a finite number"),
        (["--opt", "adamw", "--opt", "sgd", "--opt", "AdamW"], "the same optimizer is given twice"),
        (["--opt", "adamw:lr=1e-3,betas=(0.9,0.99)", "--opt", "adamw:betas=(0.9,0.99),lr=0.001"],
         "the same optimizer is given twice"),
        (["--sweep", "lr"], "cannot parse --sweep 'lr'"),
        (["--sweep", "lr=1e-3"], "needs at least two values"),
        (["--sweep", "lr=1e-3,abc"], "'abc' is not a finite number"),
        (["--sweep", "lr=1e-3,nan"], "nan is not a finite number"),
        (["--opt", "sgd", "--sweep", "lr=1e-3,1e-3"], "repeats a value"),
        (["--opt", "sgd", "--sweep", "lr=1e-3,-1"], "invalid hyperparameters for 'sgd'"),
    ],
)
def test_usage_errors_are_one_clear_line(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "--quiet", "--threads", "1", *args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("secondorder bench: error:") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err  # one line
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "3", "--epochs", "1"], "not allowed with argument"),
        (["--steps", "abc"], "invalid int value: 'abc'"),
        (["--dtype", "float16"], "invalid choice: 'float16'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_argument_errors_are_one_line_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["bench", *args])
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and err.count("\n") == 1


def test_list_shows_workloads_and_optimizers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert "mnist-autoencoder" in out and "byte-lm" in out and "rmsprop" in out


def test_missing_optimizer_is_reported_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delattr(secondorder, "SONew", raising=False)
    results = _run(tmp_path, *TINY, "--opt", "sonew", "--opt", "adamw")
    sonew, adamw = results["optimizers"]
    assert sonew["status"] == "unavailable" and "does not exist" in sonew["error"]
    assert adamw["status"] == "ok" and adamw["mean_step_ratio"] == 1.0  # reference: first that ran
    assert "unavailable: secondorder.SONew does not exist" in capsys.readouterr().out


def test_secondorder_optimizers_run_when_present(tmp_path: Path) -> None:
    present = [n for n, a in (("shampoo", "Shampoo"), ("sonew", "SONew"))
               if getattr(secondorder, a, None) is not None]  # fmt: skip
    if not present:
        pytest.skip("neither secondorder.Shampoo nor secondorder.SONew exists yet")
    results = _run(tmp_path, *TINY, "--opt", "adamw", *[f"--opt={n}" for n in present])
    for r in results["optimizers"][1:]:
        if r["status"] == "unavailable":
            continue  # a placeholder class; real errors would have raised
        assert r["status"] == "ok" and all(math.isfinite(v) for v in r["train_loss"])
        assert r["peak_state_bytes"] > 0


def test_schedule_order_and_helpers() -> None:
    f = lr_factor("warmup-linear", total=10, warmup=2)
    assert [round(f(s), 3) for s in range(10)] == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5,
                                                   0.375, 0.25, 0.125]  # fmt: skip
    assert lr_factor("constant", 10, 2)(7) == 1.0
    order = batch_order(10, 3, steps=7, seed=0)
    assert order.shape == (7, 3)
    assert sorted(order[:3].flatten().tolist()) == sorted(set(order[:3].flatten().tolist()))
    assert torch.equal(order, batch_order(10, 3, steps=7, seed=0))
    assert smooth([4.0, 2.0, 0.0, 2.0], 2) == [4.0, 3.0, 1.0, 1.0]
    p = torch.nn.Parameter(torch.zeros(10))
    opt = torch.optim.Adam([p])
    p.grad = torch.ones(10)
    opt.step()
    assert state_bytes(opt) == 2 * 40 + 4  # exp_avg, exp_avg_sq, step (fp32 scalar)


def test_divergence_stops_that_run_and_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = _run(tmp_path, *TINY, "--schedule", "constant", "--opt", "adam",
                   "--opt", "_toy_optimizers.NaNAtStep3:lr=1")  # fmt: skip
    adam, bad = results["optimizers"]
    assert adam["status"] == "ok" and bad["status"] == "diverged"
    # step 3 wrote NaN into the weights: the loss of step 4 is the first non-finite one
    assert bad["steps_run"] == 4 and bad["error"] == "loss became nan at step 4"
    assert bad["train_loss"][-1] is None  # NaN is written as null: results.json stays valid JSON
    assert "_toy_optimizers.NaNAtStep3:lr=1: loss became nan at step 4" in capsys.readouterr().out


@pytest.mark.parametrize("device", ["mps", "xpu", "cuda", "cuda:7"])
def test_unavailable_accelerators_are_one_line_errors(
    device: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kind = device.split(":")[0]
    backend = torch.backends.mps if kind == "mps" else getattr(torch, kind, None)
    if backend is not None and backend.is_available():
        if ":" not in device or backend.device_count() > int(device.split(":")[1]):
            pytest.skip(f"{device} is available on this machine")
    assert main(["bench", *TINY, "--device", device, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"secondorder bench: error: --device {device}") and err.count("\n") == 1
