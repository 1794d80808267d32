"""``secondorder bench``'s output directory, incremental results, --version, and what a
core install (no [bench] extra) can still do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import secondorder
from secondorder.cli import main

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TINY = ["--steps", "4", "--batch-size", "50", "--quiet", "--threads", "1"]


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(REPO / "src"), str(HERE)])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _one_line_error(capsys: pytest.CaptureFixture[str], message: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("secondorder bench: error:") and message in err, err
    assert err.count("\n") == 1


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"secondorder {secondorder.__version__} (torch ")


def test_out_that_is_a_file_is_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "results"
    target.write_text("keep me")
    import secondorder.bench.runner as runner

    def no_training(*args, **kwargs):
        raise AssertionError("the output location must be checked before any training")

    monkeypatch.setattr(runner, "run_benchmark", no_training)
    assert main(["bench", *TINY, "--opt", "adamw", "--out", str(target)]) == 2
    _one_line_error(capsys, f"--out {target} is an existing file")
    assert target.read_text() == "keep me"


def test_out_below_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "f").write_text("")
    assert main(["bench", *TINY, "--out", str(tmp_path / "f" / "sub")]) == 2
    _one_line_error(capsys, "cannot create --out")


def test_earlier_results_are_kept_unless_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["bench", *TINY, "--opt", "sgd", "--out", str(out)]) == 0
    first = (out / "results.json").read_text()
    capsys.readouterr()
    assert main(["bench", *TINY, "--opt", "adam", "--out", str(out)]) == 2
    _one_line_error(capsys, "already holds results.json, loss.png from an earlier run")
    assert (out / "results.json").read_text() == first
    assert main(["bench", *TINY, "--opt", "adam", "--out", str(out), "--overwrite"]) == 0
    labels = [r["label"] for r in json.loads((out / "results.json").read_text())["optimizers"]]
    assert labels == ["adam"]


def test_default_out_is_a_new_directory_per_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert main(["bench", *TINY, "--opt", "sgd"]) == 0
    runs = sorted((tmp_path / "bench-out").iterdir())
    assert len(runs) == 2 and all(r.name.startswith("digits-autoencoder-") for r in runs)
    assert all((r / "results.json").is_file() for r in runs)
    assert f"wrote {Path('bench-out') / runs[1].name / 'results.json'}" in capsys.readouterr().out


@pytest.mark.slow  # a subprocess: ~5 s quiet, more when the machine is loaded
def test_results_of_a_finished_optimizer_survive_a_kill(tmp_path: Path) -> None:
    """The second optimizer hangs in its first step; the first one's results are on disk
    by then, and a killed run leaves them there, complete and valid."""
    marker, out = tmp_path / "second-started", tmp_path / "out"
    cmd = [sys.executable, "-m", "secondorder", "bench", *TINY, "--opt", "adamw",
           "--opt", "_toy_optimizers.Hangs", "--out", str(out)]  # fmt: skip
    env = {**_env(), "TOY_HANG_MARKER": str(marker)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), proc.stderr.read().decode() if proc.poll() is not None else ""
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    results = json.loads((out / "results.json").read_text())
    (adamw,) = results["optimizers"]
    assert adamw["label"] == "adamw" and adamw["status"] == "ok" and adamw["steps_run"] == 4
    assert len(adamw["train_loss"]) == 4 and adamw["mean_step_ratio"] == 1.0
    assert not (out / "results.json.tmp").exists()


_CORE_SCRIPT = """
import contextlib, io, json, struct, sys
sys.modules.update({m: None for m in ("numpy", "matplotlib", "sklearn", "tqdm")})
from secondorder.cli import main
import torch

def cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    return {"code": code, "out": out.getvalue(), "err": err.getvalue()}

tmp = sys.argv[1]
report = {
    "list": cli(["bench", "--list"]),
    "version": cli(["--version"]),
    "run": cli(["bench", "--steps", "2", "--quiet", "--out", tmp + "/o"]),
    "idx": [],
}
# IDX files of every type decode with torch alone (values against Python's struct)
cases = {0x08: ("B", torch.uint8, [0, 7, 255]), 0x09: ("b", torch.int8, [-128, 5, 127]),
         0x0B: ("h", torch.int16, [-30000, 1, 513]), 0x0C: ("i", torch.int32, [-2, 70000, 3]),
         0x0D: ("f", torch.float32, [1.5, -2.25, 2.0**100]),
         0x0E: ("d", torch.float64, [1e-300, 3.0, -0.5])}
from secondorder.bench.mnist import read_idx
for code, (fmt, dtype, values) in cases.items():
    path = tmp + f"/x{code}"
    head = bytes([0, 0, code, 2]) + struct.pack(">II", 1, 3)
    open(path, "wb").write(head + struct.pack(">3" + fmt, *values))
    t = read_idx(path)
    report["idx"].append([str(t.dtype) == str(dtype), list(t.shape), t.flatten().tolist(), values])
print(json.dumps(report))
"""


def test_core_install_without_the_bench_extra(tmp_path: Path) -> None:
    """numpy, matplotlib, scikit-learn and tqdm unimportable: --list, --version and the IDX
    reader work; a run fails in one line naming the extra, before creating anything."""
    proc = subprocess.run([sys.executable, "-c", _CORE_SCRIPT, str(tmp_path)],
                          capture_output=True, text=True, env=_env(), timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    listing = report["list"]
    assert listing["code"] == 0 and "mnist-autoencoder" in listing["out"]
    assert "shampoo" in listing["out"] and "torch.optim.NAdam" in listing["out"]
    assert report["version"]["code"] == 0
    assert report["version"]["out"].startswith(f"secondorder {secondorder.__version__} ")
    run = report["run"]
    assert run["code"] == 2 and run["err"] == (
        "secondorder bench: error: this benchmark needs matplotlib, sklearn, from the [bench] "
        "extra: pip install 'secondorder[bench]'\n"
    )
    assert not (tmp_path / "o").exists()  # nothing created
    for same_dtype, shape, got, want in report["idx"]:
        assert same_dtype and shape == [1, 3] and got == want


def test_missing_progress_library_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    args = ["bench", "--steps", "2", "--threads", "1", "--out", str(tmp_path / "o")]
    assert main(args) == 2
    _one_line_error(capsys, "needs tqdm, from the [bench] extra")
    assert main([*args, "--quiet"]) == 0  # without progress output tqdm is not needed


def test_ctrl_c_keeps_finished_results_and_says_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import secondorder.bench.runner as runner

    real = runner.run_benchmark

    def interrupted_after_first(config, stream=None, on_update=None):
        def once(run):
            on_update(run)
            raise KeyboardInterrupt

        return real(config, stream, on_update=once)

    monkeypatch.setattr(runner, "run_benchmark", interrupted_after_first)
    out = tmp_path / "o"
    assert main(["bench", *TINY, "--opt", "sgd", "--opt", "adam", "--out", str(out)]) == 130
    assert f"interrupted; the finished optimizers are in {out / 'results.json'}" in (
        capsys.readouterr().err
    )
    labels = [r["label"] for r in json.loads((out / "results.json").read_text())["optimizers"]]
    assert labels == ["sgd"]
