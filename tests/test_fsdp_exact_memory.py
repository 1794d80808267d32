"""Shampoo's ``fsdp_mode="exact"`` keeps momentum and graft moments only where a rank uses them.

Real gloo processes: FSDP2 on 2 ranks; FSDP2 on 4 ranks and HSDP 2 x 2 (slow). Uneven
shards (7 rows: 4 + 3, or 2 + 2 + 2 + 1), an empty shard (3 rows on 4 shards), a
graft-only vector next to preconditioned ones, and a plain (unsharded) parameter.

What each check compares against:

* **bytes**: the moment bytes of every parameter on every rank equal a formula computed
  here, from the block plan of the whole tensor and the ownership of its blocks (which
  are checked to partition the blocks over the shard group): a sharded, preconditioned
  parameter keeps (its rows ∪ the entries of its owned blocks) entries, a sharded
  graft-only one its rows, an unsharded one all of them; 4 bytes each, per moment. Their
  sum is ``memory_diagnostics()["moments"]``, less than the whole tensors' moments.
* **values**: the kept moments equal, bit for bit, the moments of single-process Shampoo
  (fed the whole gradients) at exactly those entries, in the order of the flattened tensor;
  the parameters equal the reference's bit for bit.
* **older checkpoints**: a state dict whose moments have the whole shape (what exact mode
  stored before: zero outside the used entries) loads, is cut to the used entries, and the
  run goes on equal to the reference; a moment of another size is refused with
  ``ValueError`` and nothing is loaded. Through ``torch.distributed.checkpoint`` such a
  checkpoint stops ``dcp.load`` with its size mismatch, naming the moment, and loads once
  the moments of the template have the whole shape (docs/distributed.md): the run then
  goes on bit for bit like the one that saved it.
* **the compact vector itself** (one process, hypothesis): gathering is the whole tensor at
  a boolean mask of the used entries, scattering puts it back with zeros elsewhere.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from hypothesis import given, settings
from hypothesis import strategies as hst
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from _spawn import mark, run_ranks  # tests/ is on sys.path
from secondorder import Shampoo
from secondorder.blocking import BlockPlan
from secondorder.placement.fsdp import UsedEntries
from test_fsdp import (
    EXACT,
    _assert_same_local_params,
    _fsdp_backward,
    _fsdp_model,
    _Holder,
    _meshes,
    _single,
    _train_holder,
)

MOMENTS = ("exp_avg", "graft_v")
VARIANTS = (
    EXACT,  # the vector v is graft-only
    # v preconditioned too; momentum only (the sgd graft keeps no second moments)
    dict(EXACT, precondition_1d=True, nesterov=True, graft="sgd", betas=(0.5, 0.99)),
)


def _used_mask(opt, key, p, full_shape, group):
    """Which entries of the whole tensor this rank uses (the formula): its rows (cut as
    torch.chunk cuts), and the entries of the blocks it owns (``key``: the parameter's index
    in param-group order) when the parameter is preconditioned."""
    mesh = p.device_mesh
    shards = mesh.size(mesh.ndim - 1)
    index = mesh.get_local_rank(mesh.ndim - 1)
    rows = torch.arange(full_shape[0]).chunk(shards)
    mine = torch.zeros(full_shape, dtype=torch.bool)
    if index < len(rows):
        mine[rows[index]] = True
    plan = BlockPlan(full_shape, group["block_size"])
    preconditioned = len(plan.merged_shape) >= 2 or group["precondition_1d"]
    if not preconditioned:
        return mine, None
    layout = opt._rt.layout
    owned = [layout.owned(key, c) for c in range(len(plan.counts))]
    stacks = []
    for c, (bs, n) in enumerate(zip(plan.block_shapes, plan.counts)):
        s = torch.zeros(n, *bs)
        s[owned[c]] = 1.0
        stacks.append(s)
    return mine | plan.merge(stacks).bool(), (plan.counts, owned)


def _whole_grads(params):
    return [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in params]


def _check_compact(opt, ref, params, refp, label):
    """Bytes = formula, values = the reference's at the used entries, blocks partitioned."""
    group = opt.param_groups[0]
    total, whole = 0, 0
    for i, (p, q) in enumerate(zip(params, refp)):
        st, rst = opt.state[p], ref.state[q]
        assert sorted(k for k in MOMENTS if k in st) == sorted(k for k in MOMENTS if k in rst)
        keys = [k for k in MOMENTS if k in st]
        whole += 4 * q.numel() * len(keys)
        if not hasattr(p, "device_mesh"):  # unsharded: whole moments, as in one process
            for k in keys:
                assert torch.equal(st[k], rst[k]), (label, i, k)
            total += sum(st[k].numel() * 4 for k in keys)
            continue
        mask, ownership = _used_mask(opt, i, p, q.shape, group)
        if ownership is not None:  # every block has exactly one owner in the shard group
            counts, owned = ownership
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, owned)
            mesh = p.device_mesh
            shard_dim = mesh.ndim - 1
            peers = mesh.mesh.movedim(shard_dim, -1).reshape(-1, mesh.size(shard_dim))
            mine = next(row for row in peers.tolist() if dist.get_rank() in row)
            for c, n in enumerate(counts):
                blocks = sorted(b for r in mine for b in every[r][c])
                assert blocks == list(range(n)), (label, i, c, blocks)
        for k in keys:
            assert st[k].shape == (int(mask.sum()),), (label, i, k, st[k].shape)
            assert torch.equal(st[k], rst[k][mask]), (label, i, k)
        total += 4 * int(mask.sum()) * len(keys)
    moments = opt.memory_diagnostics()["moments"]
    assert moments == total, (label, moments, total)
    assert moments < whole, (label, moments, whole)
    return total


def _check_holder(mesh):
    for kw in VARIANTS:
        holder = _Holder(mesh)
        refp = [torch.nn.Parameter(f.clone()) for f in holder.full]
        params = list(holder.parameters())
        opt, ref = Shampoo(params, **kw), Shampoo(refp, **_single(kw))
        for step in range(5):
            for q, g in zip(refp, holder.set_grads(step)):
                q.grad = g.clone()
            opt.step()
            ref.step()
        for i, (p, q) in enumerate(zip(params, refp)):
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            assert torch.equal(full, q), (kw, i)
        _check_compact(opt, ref, params, refp, kw)

        # an exact-mode state dict of the older format: moments of the whole shape
        sd = opt.state_dict()
        old = copy.deepcopy(sd)
        for i, p in enumerate(params):
            if not hasattr(p, "device_mesh"):
                continue
            mask, _ = _used_mask(opt, i, p, holder.full[i].shape, opt.param_groups[0])
            for k in MOMENTS:
                if k in old["state"][i]:
                    (shard,) = old["state"][i][k]
                    big = torch.zeros(holder.full[i].shape)
                    big[mask] = old["state"][i][k][shard]
                    old["state"][i][k] = {shard: big}
        # a moment of another size is refused before anything is loaded
        bad = copy.deepcopy(sd)
        (shard,) = bad["state"][0]["exp_avg"]
        n = bad["state"][0]["exp_avg"][shard].numel()
        bad["state"][0]["exp_avg"] = {shard: torch.zeros(n + 1)}
        opt3 = Shampoo(params, **kw)
        with pytest.raises(ValueError, match=r"'exp_avg' has shape .* keeps \d+ entries"):
            opt3.load_state_dict(bad)
        assert not opt3.state
        opt2 = Shampoo(params, **kw)
        opt2.load_state_dict(old)
        for p in params:
            for k in MOMENTS:
                if k in opt.state[p]:
                    assert torch.equal(opt2.state[p][k], opt.state[p][k]), (kw, k)
        for step in range(5, 8):
            for q, g in zip(refp, holder.set_grads(step)):
                q.grad = g.clone()
            opt2.step()
            ref.step()
        for i, (p, q) in enumerate(zip(params, refp)):
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            assert torch.equal(full, q), (kw, "old format", i)
        _check_compact(opt2, ref, params, refp, (kw, "old format"))
        for o in (opt, opt2, opt3, ref):
            o.close()


def _check_model(mesh):
    """A real FSDP2 / HSDP model (gradients from FSDP's reduce-scatter)."""
    model = _fsdp_model(mesh)
    params = list(model.parameters())
    refp = [torch.nn.Parameter(p.full_tensor().detach().clone()) for p in params]
    opt, ref = Shampoo(params, **EXACT), Shampoo(refp, **_single(EXACT))
    rank, world = dist.get_rank(), dist.get_world_size()
    for step in range(4):
        opt.zero_grad()
        _fsdp_backward(model, step, rank, world)
        for q, g in zip(refp, _whole_grads(params)):
            q.grad = g.clone()
        opt.step()
        ref.step()
    for i, (p, q) in enumerate(zip(params, refp)):
        assert torch.equal(p.full_tensor(), q), ("model", i)
    return _check_compact(opt, ref, params, refp, "model")


def _whole_moments(osd, module, masks=None):
    """``osd`` (from ``get_optimizer_state_dict``; not modified) with every per-shard moment
    of the whole parameter's shape: zeros, or with ``masks`` (name -> used entries) the
    compact values put back at their entries (what older versions kept)."""
    shapes = {name: p.shape for name, p in module.named_parameters()}
    state = {}
    for name, st in osd["state"].items():
        st = dict(st)
        for k in MOMENTS:
            if isinstance(st.get(k), dict):  # per shard: exact mode, a sharded parameter
                ((shard, compact),) = st[k].items()
                whole = torch.zeros(shapes[name])
                if masks is not None:
                    whole[masks[name]] = compact
                st[k] = {shard: whole}
        state[name] = st
    return {**osd, "state": state}


def _check_dcp_old(mesh, tmp, label):
    """An exact-mode DCP checkpoint of the older format (whole-shape moments)."""
    holder = _Holder(mesh)
    opt = Shampoo(holder.parameters(), **EXACT)
    _train_holder(holder, opt, range(3))
    masks = {
        name: _used_mask(opt, i, p, holder.full[i].shape, opt.param_groups[0])[0]
        for i, (name, p) in enumerate(holder.named_parameters())
        if hasattr(p, "device_mesh")
    }
    old = _whole_moments(get_optimizer_state_dict(holder, opt), holder, masks)
    path = os.path.join(tmp, f"old-{label}")
    dcp.save({"optim": old}, checkpoint_id=path)
    saved = {k: v.detach().clone() for k, v in holder.state_dict().items()}
    _train_holder(holder, opt, range(3, 6))

    other = _Holder(mesh)
    other.load_state_dict(saved)
    opt2 = Shampoo(other.parameters(), **EXACT)
    sd = {"optim": get_optimizer_state_dict(other, opt2)}
    with pytest.raises(CheckpointException, match=r"Size mismatch.*exp_avg"):
        dcp.load(sd, checkpoint_id=path)
    sd = {"optim": _whole_moments(get_optimizer_state_dict(other, opt2), other)}
    dcp.load(sd, checkpoint_id=path)
    set_optimizer_state_dict(other, opt2, sd["optim"])
    _train_holder(other, opt2, range(3, 6))
    _assert_same_local_params(holder, other, label)
    for p, q in zip(holder.parameters(), other.parameters()):
        for k in MOMENTS:
            assert torch.equal(opt.state[p][k], opt2.state[q][k]), (label, k)


def _check(rank, world, tmp):
    report = {}
    for label, mesh in _meshes(world):
        mark(f"holder:{label}")
        _check_holder(mesh)
        mark(f"dcp-old:{label}")
        _check_dcp_old(mesh, tmp, label)
        mark(f"model:{label}")
        report[label] = _check_model(mesh)
    return report


@pytest.mark.distributed
def test_exact_moments_two_ranks(tmp_path):
    run_ranks(_check, 2, tmp_path)


@pytest.mark.distributed
@pytest.mark.slow
def test_exact_moments_four_ranks(tmp_path):
    run_ranks(_check, 4, tmp_path)


@settings(max_examples=60, deadline=None)
@given(
    rows=hst.integers(1, 9),
    cols=hst.integers(1, 5),
    shards=hst.integers(1, 4),
    me=hst.integers(0, 3),
    seed=hst.integers(0, 2**16),
)
def test_used_entries_against_a_mask(rows, cols, shards, me, seed):
    """The compact vector of :class:`UsedEntries` is the whole tensor at the used entries in
    flat order (a boolean mask here), and scattering it back gives zeros elsewhere: built as
    a rank builds it (its rows as a range, per peer an ascending index of entries it owns)."""
    me = me % shards
    gen = torch.Generator().manual_seed(seed)
    owner = torch.randint(0, shards, (rows * cols,), generator=gen)
    chunk = -(-rows // shards)
    pieces, mask = [], torch.zeros(rows * cols, dtype=torch.bool)
    for r in range(shards):
        lo, hi = min(r * chunk, rows) * cols, min((r + 1) * chunk, rows) * cols
        if r == me:
            pieces.append(slice(lo, hi))
            mask[lo:hi] = True
        else:
            idx = lo + torch.nonzero(owner[lo:hi] == me).view(-1)
            pieces.append(idx)
            mask[idx] = True
    used = UsedEntries.of(pieces, rows * cols)
    full = torch.randn(rows, cols, generator=gen)
    compact = used.gather(full)
    assert used.count == int(mask.sum()) and compact.shape == (used.count,)
    assert torch.equal(compact, full.view(-1)[mask])
    back = used.scatter(compact, full.shape)
    assert torch.equal(back, torch.where(mask.view(rows, cols), full, torch.zeros(())))
