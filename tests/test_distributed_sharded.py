"""Shampoo(distributed=True, shard_optimizer_state=True): ZeRO-1 style state sharding.

Each parameter (all its blocks, its momentum and graft state) belongs to one rank, which
alone updates it and then sends the new values to the other ranks. Compared, with real gloo
processes, against distributed Shampoo without sharding and single-process Shampoo on the
same gradients: parameters, optimizer state and checkpoints are **bit-identical**. By
construction: an owner runs single-process Shampoo on its parameters (every kernel on the
path treats each block of a batch independently of the others, which the unsharded
distributed tests rely on too) and the parameters are sent exactly, in their own dtype.
Per-rank state: each parameter's state lives on exactly one rank, so the ranks' state bytes
add up to the single process's.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.distributed as dist

from _spawn import run_ranks  # noqa: E402 - tests/ is on sys.path
from secondorder import Shampoo

# the model (weights (7, 10), (5, 7), (3, 5) with block_size 4, three graft-only biases),
# batches and settings of the unsharded distributed tests
from test_distributed import KW, _batch, _model, _step  # noqa: E402 - tests/ is on sys.path

SHARD = dict(distributed=True, shard_optimizer_state=True)


def _assert_same_params(m1, m2):
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b), f"max abs diff {(a - b).abs().max().item():.3g}"


def _assert_same_tree(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: {sorted(a)} != {sorted(b)}"
        for k in a:
            _assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# ------------------------------------------------------------------------ unit tests


def test_sharding_needs_distributed():
    params = _model().parameters()
    with pytest.raises(ValueError, match="shard_optimizer_state=True needs distributed=True"):
        Shampoo(params, shard_optimizer_state=True, **KW)
    with pytest.raises((TypeError, ValueError), match="shard_optimizer_state"):
        Shampoo(_model().parameters(), distributed=True, shard_optimizer_state="yes", **KW)


def test_sharding_without_process_group_is_plain_shampoo():
    torch.manual_seed(0)
    m1 = _model()
    m2 = copy.deepcopy(m1)
    o1, o2 = Shampoo(m1.parameters(), **KW), Shampoo(m2.parameters(), **SHARD, **KW)
    for step in range(5):
        _step(m1, o1, *_batch(step))
        _step(m2, o2, *_batch(step))
    _assert_same_params(m1, m2)
    _assert_same_tree(o1.state_dict()["state"], o2.state_dict()["state"])


# -------------------------------------------------------------------- multi-process


def _check_equal(world, rank, report):
    torch.manual_seed(0)
    model = _model()
    plain, ref = copy.deepcopy(model), copy.deepcopy(model)
    opt = Shampoo(model.parameters(), **SHARD, **KW)
    popt = Shampoo(plain.parameters(), distributed=True, **KW)
    ropt = Shampoo(ref.parameters(), **KW)
    for step in range(8):
        for m, o in ((model, opt), (plain, popt), (ref, ropt)):
            _step(m, o, *_batch(step))
    _assert_same_params(model, ref)
    _assert_same_params(plain, ref)
    report["state_bytes"] = opt.state_bytes()
    report["state_bytes_unsharded"] = popt.state_bytes()
    report["state_bytes_single"] = ropt.state_bytes()
    report["owned_params"] = sum(1 for p in model.parameters() if opt.state.get(p))

    # checkpoints: the gathered state is the single-process state, bit for bit
    full, rsd = opt.full_state_dict(), ropt.state_dict()
    _assert_same_tree(full["state"], rsd["state"])
    _assert_same_tree(popt.full_state_dict()["state"], rsd["state"])
    shard = opt.state_dict()  # this rank's parameters only
    if world > 1:
        assert shard["distributed_shard"] == dict(rank=rank, world_size=world)
        assert len(shard["state"]) == report["owned_params"] < len(rsd["state"])
    runs = [(model, opt), (ref, ropt)]
    for sd, kw in ((full, {}), (rsd, SHARD), (full, SHARD), (shard, SHARD)):
        m = _model()
        m.load_state_dict(ref.state_dict())
        o = Shampoo(m.parameters(), **kw, **KW)
        o.load_state_dict(sd)
        runs.append((m, o))
    for step in range(8, 12):
        for m, o in runs:
            _step(m, o, *_batch(step))
    for m, _ in runs:
        _assert_same_params(m, ref)


def _check_ddp(world, rank, report):
    """Under DDP (each rank half the batch, averaged gradients): sharded equals unsharded
    distributed Shampoo stepping on the same gradients, and all ranks agree."""
    torch.manual_seed(0)
    model = _model()
    plain = copy.deepcopy(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = Shampoo(ddp.parameters(), **SHARD, **KW)
    popt = Shampoo(plain.parameters(), distributed=True, **KW)
    per = 12 // world
    for step in range(8):
        x, y = _batch(step)
        opt.zero_grad()
        xs, ys = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        torch.nn.functional.mse_loss(ddp(xs), ys).backward()
        for p, q in zip(plain.parameters(), model.parameters()):
            p.grad = q.grad.clone()
        opt.step()
        popt.step()
    _assert_same_params(model, plain)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    every = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(every, flat)
    assert all(torch.equal(e, flat) for e in every)


def _check_async(world, rank, report):
    torch.manual_seed(0)
    model = _model()
    ref = copy.deepcopy(model)
    kw = dict(KW, async_roots=True, async_deterministic_delay=2)
    opt = Shampoo(model.parameters(), **SHARD, **kw)
    ropt = Shampoo(ref.parameters(), **kw)
    for step in range(9):
        _step(model, opt, *_batch(step))
        _step(ref, ropt, *_batch(step))
    sd = opt.full_state_dict()  # gathers every rank's pending jobs
    mine, theirs = sd["async_roots"], ropt.state_dict()["async_roots"]
    assert mine["clock"] == theirs["clock"]

    def key(rec):  # gathered records come rank by rank
        return rec["step"], rec["param"], rec["cls"], rec["axis"]

    pending = [sorted(x["pending"], key=key) for x in (mine, theirs)]
    assert pending[0], "expected pending root jobs at step 9"
    _assert_same_tree(*pending, "pending")
    m2 = _model()
    m2.load_state_dict(model.state_dict())
    opt2 = Shampoo(m2.parameters(), **SHARD, **kw)
    opt2.load_state_dict(sd)
    for step in range(9, 13):
        for m, o in ((model, opt), (ref, ropt), (m2, opt2)):
            _step(m, o, *_batch(step))
    _assert_same_params(model, ref)
    _assert_same_params(m2, ref)
    for o in (opt, ropt, opt2):
        o.close()


def _check_all(rank, world, tmp):
    report = {}
    _check_equal(world, rank, report)
    _check_ddp(world, rank, report)
    _check_async(world, rank, report)
    return report


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_sharded_state_equals_unsharded_and_single_process(world, tmp_path):
    reports = run_ranks(_check_all, world, tmp_path)
    assert sum(r["owned_params"] for r in reports) == 6  # every parameter on exactly one rank
    single = reports[0]["state_bytes_single"]
    # the state of each parameter lives on one rank: together exactly one copy
    assert sum(r["state_bytes"] for r in reports) == single
    # whole parameters are the unit: with this small model the largest weight's state
    # bounds the busiest rank (the benchmark shows the ~1/world split on a real model)
    assert max(r["state_bytes"] for r in reports) < single
    print(f"\nworld {world}:", json.dumps(reports))
