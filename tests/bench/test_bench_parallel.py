"""``secondorder bench --parallel ddp|fsdp2``: the same run as one process, split over ranks.

The data-parallel runs are compared with the one-process run of the same command (same
seed, same examples in the same order); the state size with the count derived from the
parameter shapes and FSDP2's shard rule. Two gloo ranks, one thread each, a tiny run.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from secondorder.bench.parallel import Ranks
from secondorder.bench.runner import BenchConfig, run_benchmark
from secondorder.bench.workloads import get_workload
from secondorder.cli import main

REPO = Path(__file__).resolve().parents[2]
STEPS, BATCH = 6, 50
U32 = 2.0**-24  # unit roundoff of float32


def _config(parallel: str = "none", **kw) -> BenchConfig:
    opts = kw.pop("optimizers", ["adamw", "sgd"])
    nproc = 2 if parallel != "none" else None
    return BenchConfig(optimizers=opts, steps=STEPS, batch_size=BATCH, threads=1,
                       parallel=parallel, nproc=nproc, **kw)  # fmt: skip


def _note_rank(path: str, run: dict) -> None:
    with open(path, "a") as f:
        f.write(f"{dist.get_rank()} {len(run['optimizers'])}\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """One process, 2-rank DDP and 2-rank FSDP2 runs of AdamW and SGD (Nesterov 0.9); the
    FSDP2 one through the command line, with AdaHessian (which refuses DTensor parameters)."""
    tmp = tmp_path_factory.mktemp("parallel")
    log = tmp / "updates.txt"
    runs = {
        "none": run_benchmark(_config(), stream=None),
        "ddp": run_benchmark(_config("ddp"), stream=None,
                             on_update=functools.partial(_note_rank, str(log))),
    }  # fmt: skip
    out = tmp / "out"
    args = ["bench", "--steps", str(STEPS), "--batch-size", str(BATCH), "--threads", "1",
            "--quiet", "--opt", "adamw", "--opt", "sgd", "--opt", "adahessian",
            "--parallel", "fsdp2", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    runs["fsdp2"] = json.loads((out / "results.json").read_text())
    runs["files"] = {"updates": log.read_text(), "out": sorted(p.name for p in out.iterdir())}
    return runs


def _gamma(n: int) -> float:
    """Worst-case relative error of a float32 sum of ``n`` terms of one sign."""
    return n * U32 / (1 - n * U32)


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_losses_match_one_process(runs: dict[str, dict], mode: str) -> None:
    """The ranks compute the same sums as one process, in another order: the global batch's
    loss and gradient are sums over its examples, split into two halves that are reduced
    separately and then added. Bound: step 1's loss is a sum of n = batch x pixels
    non-negative terms (sigmoid cross-entropy), so the two values differ by at most
    2 gamma_n L_1. Later steps start from parameters that already differ: to first order
    the relative perturbation of each update, hence of the loss change it causes, is again
    at most 2 gamma_n (n bounds the length of every reduction in the step: the batch sums of
    the gradient, the pixel sums of the loss), so
        |L_k(parallel) - L_k(one)| <= 2 gamma_n (L_k + sum_{j<k} |L_{j+1} - L_j|).
    A wrong slice, a gradient summed instead of averaged (SGD's update is linear in it) or
    one rank's loss reported instead of the global one breaks it by orders of magnitude."""
    single, par = runs["none"], runs[mode]
    assert par["settings"]["parallel"] == {"mode": mode, "ranks": 2, "backend": "gloo",
                                           "threads_per_rank": 1}  # fmt: skip
    n = BATCH * get_workload("digits-autoencoder")().make_model()[0].in_features
    for one, other in zip(single["optimizers"], par["optimizers"][:2]):
        assert other["status"] == one["status"] == "ok" and other["steps_run"] == STEPS
        assert other["mode"] == mode and other["ranks"] == 2
        ref, got = one["train_loss"], other["train_loss"]
        travelled = 0.0
        for k in range(STEPS):
            bound = 2 * _gamma(n) * (abs(ref[k]) + travelled)
            assert abs(got[k] - ref[k]) <= bound, (one["label"], k, got[k], ref[k], bound)
            travelled += abs(ref[k + 1] - ref[k]) if k + 1 < STEPS else 0.0
        # validation: every rank evaluates the whole held-out split with the same weights
        last = abs(one["val_loss"][-1]["loss"])
        assert abs(other["val_loss"][-1]["loss"] - one["val_loss"][-1]["loss"]) <= 2 * _gamma(
            n
        ) * (last + travelled)
        assert [v["step"] for v in other["val_loss"]] == [v["step"] for v in one["val_loss"]]


def _shard_rows(rows: int, world: int, rank: int) -> int:
    """FSDP2's dim-0 rule (``torch.chunk``): ceil(rows / world) rows per rank, the last
    ranks possibly fewer or none."""
    chunk = math.ceil(rows / world)
    return max(0, min(chunk, rows - rank * chunk))


@pytest.mark.distributed
def test_state_bytes_per_rank(runs: dict[str, dict]) -> None:
    """AdamW holds two float32 moments shaped like its (local) parameter and a 4-byte step
    counter per parameter; SGD one momentum buffer. DDP replicates them, FSDP2 keeps the
    local shard's rows: the largest rank's bytes are reported."""
    model = get_workload("digits-autoencoder")().make_model()
    shapes = [tuple(p.shape) for p in model.parameters()]

    def local(shape: tuple[int, ...], rank: int, world: int) -> int:
        return _shard_rows(shape[0], world, rank) * math.prod(shape[1:])

    def expected(world: int) -> dict[str, int]:
        per_rank = [
            {"adamw": sum(8 * local(s, r, world) + 4 for s in shapes),
             "sgd": sum(4 * local(s, r, world) for s in shapes)}
            for r in range(world)
        ]  # fmt: skip
        return {k: max(p[k] for p in per_rank) for k in ("adamw", "sgd")}

    one, two = expected(1), expected(2)
    for mode, want in (("none", one), ("ddp", one), ("fsdp2", two)):
        for r in runs[mode]["optimizers"][:2]:
            assert r["state_bytes_per_rank"] == r["peak_state_bytes"] == want[r["label"]], mode
            assert r["samples_per_second"] > 0
    # this model's dims are all even: FSDP2 halves the moments (the step counters stay)
    assert two["adamw"] - 4 * len(shapes) == (one["adamw"] - 4 * len(shapes)) // 2


@pytest.mark.distributed
def test_outputs_written_by_rank_zero_only(runs: dict[str, dict]) -> None:
    # on_update ran on rank 0 alone, after each optimizer
    assert runs["files"]["updates"].split("\n")[:-1] == ["0 1", "0 2"]
    assert runs["files"]["out"] == ["loss.png", "results.json"]  # one set, nothing left over
    results = runs["fsdp2"]
    assert results["settings"]["parallel"]["mode"] == "fsdp2"
    assert "--parallel fsdp2" in results["command"]
    # an optimizer that refuses DTensor parameters is an error row with its own message
    refused = results["optimizers"][2]
    assert refused["status"] == "failed" and "DTensor" in refused["error"]
    assert refused["error"].startswith("under --parallel fsdp2, rank 0: ValueError:")


@pytest.mark.distributed
def test_table_says_mode_and_per_rank_memory(runs: dict[str, dict]) -> None:
    from secondorder.bench.report import format_table

    table = format_table(runs["fsdp2"])
    assert "--parallel fsdp2: 2 ranks (gloo, 1 thread per rank), each rank 25 examples" in table
    assert "state MB/rank" in table and "samples/s" in table
    assert "adahessian" in table and "failed: under --parallel fsdp2" in table


class FailsOnRankOne(torch.optim.SGD):
    """SGD whose second step raises on rank 1 only."""

    def step(self, closure=None):  # type: ignore[override]
        self._calls = getattr(self, "_calls", 0) + 1
        if dist.get_rank() == 1 and self._calls == 2:
            raise RuntimeError("boom on purpose")
        return super().step(closure)


@pytest.mark.distributed
def test_a_rank_failure_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "--steps", "4", "--batch-size", "50", "--quiet", "--threads", "1",
            "--opt", "test_bench_parallel.FailsOnRankOne:lr=0.01", "--parallel", "ddp",
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("secondorder bench: error: rank 1: RuntimeError: boom on purpose")
    assert "test_bench_parallel.py" in err[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--nproc", "2"], "--nproc needs --parallel ddp or --parallel fsdp2"),
        (["--parallel", "ddp", "--nproc", "0"], "--nproc must be a positive integer, got 0"),
        (["--parallel", "zero3"], "unknown --parallel 'zero3'; valid: none, ddp, fsdp2"),
        (["--parallel", "fsdp2", "--nproc", "3"],
         "--batch-size 100 is not divisible by the 3 ranks of --parallel fsdp2"),
        (["--parallel", "ddp", "--batch-schedule", "adaptive:test=norm"],
         "--parallel ddp cannot run --batch-schedule adaptive:test=norm yet"),
    ],
)  # fmt: skip
def test_invalid_combinations(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "--quiet", *extra, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("secondorder bench: error: ")
    assert message in err
    assert not (tmp_path / "o").exists()  # refused before any output or process


def test_nproc_must_match_torchrun(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    assert main(["bench", "--parallel", "ddp", "--nproc", "4", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--nproc 4 does not match torchrun's WORLD_SIZE 2; omit --nproc" in err


def test_rank_slices_cover_the_global_batch_in_order() -> None:
    index = torch.arange(12) * 7
    slices = [Ranks("ddp", r, 3, torch.device("cpu"), "gloo", 1).local(index) for r in range(3)]
    assert torch.equal(torch.cat(slices), index) and {len(s) for s in slices} == {4}


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_launch(runs: dict[str, dict], tmp_path: Path) -> None:
    """Under torchrun the bench joins its group: rank 0 writes, the same losses as spawned."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this Python")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "secondorder",
           "bench", "--steps", str(STEPS), "--batch-size", str(BATCH), "--threads", "1",
           "--opt", "adamw", "--parallel", "ddp", "--quiet", "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    said = f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, said
    assert proc.stdout.count("--parallel ddp: 2 ranks") == 1, said  # rank 0 prints, alone
    results = json.loads((tmp_path / "results.json").read_text())
    got, want = (r["optimizers"][0]["train_loss"] for r in (results, runs["ddp"]))
    assert got == want, f"torchrun {got!r} vs spawned {want!r}\n{said}"


def _collectives(rank: int, world: int, tmp: str) -> dict:
    ranks = Ranks("ddp", rank, world, torch.device("cpu"), "gloo", 1)
    loss = torch.tensor(2.0 + rank, dtype=torch.float32)  # ranks' equal-slice losses 2 and 3
    mean, error = ranks.combine(loss, "step 3: bad" if rank == 1 else None, 3)
    same, differs = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    for p in (*same.parameters(), differs.bias):
        torch.nn.init.constant_(p, 0.5)
    torch.nn.init.constant_(differs.weight, 0.5 + rank)  # the weight differs between ranks
    return {
        "mean": mean.item(), "dtype": str(mean.dtype), "error": error,
        "peak": ranks.max_int(100 + rank), "slowest": ranks.slowest([0.1 * (rank + 1), 0.5]),
        "same": ranks.drift(same, "x"), "differs": ranks.drift(differs, "x"),
    }  # fmt: skip


@pytest.mark.distributed
def test_rank_collectives(tmp_path: Path) -> None:
    """The global loss is the mean of the ranks' losses, an error on one rank reaches all,
    memory is the largest rank's, each step's time the slowest rank's, and DDP replicas
    that differ are reported."""
    tests = str(REPO / "tests")  # the shared multi-process helper lives there
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from _spawn import run_ranks

    zero, one = run_ranks(_collectives, 2, tmp_path)
    assert zero["mean"] == one["mean"] == 2.5 and zero["dtype"] == "torch.float32"
    assert one["error"] == "step 3: bad"
    assert zero["error"] == "step 3: an optimizer raised FloatingPointError on another rank"
    assert zero["peak"] == one["peak"] == 101
    assert zero["slowest"] == one["slowest"] == [0.2, 0.5]
    assert zero["same"] is None and one["same"] is None
    assert "ranks' copies of the model differ at the end (parameter 0: sums differ by 6" in (
        zero["differs"]
    )
    assert zero["differs"] == one["differs"]
