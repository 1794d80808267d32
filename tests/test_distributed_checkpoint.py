"""Shampoo(distributed=True) checkpoints: ``state_dict()`` on one rank only must not block.

``if rank == 0: torch.save(opt.state_dict(), path)`` is what most PyTorch code does. Here
``state_dict()`` is not a collective (each rank returns its own shard, marked
``distributed_shard``); ``full_state_dict()`` is the collective that gives the single-process
format. The process group gets a short timeout, so a collective entered by rank 0 alone
fails the test within seconds instead of hanging for the default 30 minutes.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from _spawn import run_ranks  # noqa: E402 - tests/ is on sys.path
from secondorder import Shampoo

KW = dict(lr=0.05, block_size=4, precondition_frequency=2, start_preconditioning_step=2)
PG_TIMEOUT_S = 20  # a lone collective raises after this instead of hanging for 30 minutes


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _step(model, opt, step):
    gen = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(12, 10, generator=gen), torch.randn(12, 3, generator=gen)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _check(rank, world, tmp, async_roots):
    kw = dict(KW, async_roots=async_roots)
    if async_roots:
        kw["async_deterministic_delay"] = 1
    report = {}
    model = _model()
    opt = Shampoo(model.parameters(), distributed=True, **kw)
    for step in range(3):
        _step(model, opt, step)
    # the idiom: only rank 0 asks for the state dict, the others train on
    t0 = time.perf_counter()
    if rank == 0:
        shard0 = opt.state_dict()
        report["rank0_state_dict_seconds"] = time.perf_counter() - t0
        assert shard0["distributed_shard"] == dict(rank=0, world_size=world)
    for step in range(3, 5):
        _step(model, opt, step)
    # every rank's own shard resumes bit-identically on the same rank
    shard = opt.state_dict()
    full = opt.full_state_dict()  # collective, single-process format
    assert "distributed_shard" not in full
    m2 = _model()
    m2.load_state_dict(model.state_dict())
    opt2 = Shampoo(m2.parameters(), distributed=True, **kw)
    opt2.load_state_dict(shard)
    m3 = _model()
    m3.load_state_dict(model.state_dict())
    single = Shampoo(m3.parameters(), **kw)  # the full state loads in one process
    single.load_state_dict(full)
    for step in range(5, 9):
        for m, o in ((model, opt), (m2, opt2), (m3, single)):
            _step(m, o, step)
    assert torch.equal(_flat(model), _flat(m2))
    report["full_vs_single_max_abs_diff"] = (_flat(model) - _flat(m3)).abs().max().item()
    assert report["full_vs_single_max_abs_diff"] <= 1e-5  # batched kernels: fp32 rounding
    # a shard cannot be loaded by a single process (or another rank): a clear error
    with pytest.raises(ValueError, match="full_state_dict"):
        Shampoo(_model().parameters(), **kw).load_state_dict(shard)
    for o in (opt, opt2, single):
        o.close()
    return report


@pytest.mark.distributed
@pytest.mark.timeout(300)  # process start-up on a loaded machine; a hang fails at PG_TIMEOUT_S
@pytest.mark.parametrize("async_roots", [False, True])
def test_state_dict_on_rank_zero_only_does_not_block(tmp_path, async_roots):
    world = 2
    report = run_ranks(_check, world, tmp_path, async_roots, pg_timeout=PG_TIMEOUT_S)[0]
    # no collective: no waiting for the other rank (which is busy training)
    assert report["rank0_state_dict_seconds"] < PG_TIMEOUT_S / 2
    print("\n", json.dumps(report))
