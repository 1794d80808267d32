"""FSDP2 / HSDP (DTensor parameters): the optimizers on local shards (secondorder.placement).

Real gloo processes: 2 ranks (FSDP on a 1-d mesh) and 4 ranks (FSDP on 4 ranks, HSDP on a
2 x 2 replicate x shard mesh). Shards are uneven (7 rows: 4 + 3 on 2 ranks, 2 + 2 + 2 + 1 on
4; 3 rows on 4 ranks leave one rank an empty shard) and a plain (unsharded) parameter sits
next to the sharded ones.

What each check compares against, and its tolerance:

* **Shampoo** on shards is single-process Shampoo applied to every rank's shards as tensors
  of their own (blocks cut inside each shard): compared bit for bit with a plain Shampoo
  stepping on clones of the shards with the same gradients (same kernels, same shapes,
  same batches), with synchronous and with (deterministic-delay) asynchronous roots.
* **SONew** on shards is single-process SONew on the whole tensors with the band links
  that cross a shard boundary cut (the reference's statistics update is wrapped here to
  hold those entries at zero). Momentum and statistics must be bit-identical. Parameters
  differ only by the rounding of the graft's two norms, which become sums over shards:
  the ratio's relative error is at most ``(2n + 4) eps`` (``n`` entries summed), so after
  ``T`` steps ``|Δθ| <= Σ_t ((2n + 4) eps |θ_t − θ_{t−1}| + 2 eps |θ_t|)``.
  Every shard stores its statistics in the whole tensor's units (``stats_scale`` equal to
  the reference's); a checkpoint of older versions (unscaled statistics) migrates on each
  shard from its own rows, and after one step the statistics are again bit-identical.
* a NaN in one rank's shard makes every rank skip the step (the reference skips it too).
* **checkpoints**: ``get/set_optimizer_state_dict`` with ``dcp.save`` / ``dcp.load``, then
  the same steps as the original: bit-identical parameters. Into another number of shards
  SONew's state reshards (checked against the saved state, with the links the new layout
  cuts dropped) and Shampoo's per-shard blocks fail to load with an error naming the shard.
"""

from __future__ import annotations

import copy
import math
import os
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import secondorder
import secondorder.optim.base
import secondorder.placement.fsdp as fsdp_placement
from _spawn import chosen, run_ranks  # tests/ is on sys.path
from secondorder import Shampoo, SONew
from secondorder.kernels import sonew as K
from test_distributed import KW, _batch, _model  # noqa: E402 - tests/ is on sys.path

EPS = torch.finfo(torch.float32).eps
SONEW_KW = dict(lr=0.02, weight_decay=0.01, betas=(0.9, 0.99))


# ------------------------------------------------------------------------ helpers
def _meshes(world):
    if world == 2:
        return [("fsdp2", init_device_mesh("cpu", (2,)))]
    return [
        ("fsdp4", init_device_mesh("cpu", (4,))),
        ("hsdp2x2", init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))),
    ]


def _placements(mesh):
    return [Shard(0)] if mesh.ndim == 1 else [Replicate(), Shard(0)]


def _shard_rows(rows, shards):
    """Row boundaries inside a tensor of ``rows`` rows cut as torch.chunk cuts."""
    chunk = -(-rows // shards)
    return [b for b in range(chunk, rows, chunk)]


def _fsdp_model(mesh):
    torch.manual_seed(0)
    model = _model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _fsdp_backward(model, step, rank, world):
    x, y = _batch(step)
    per = x.shape[0] // world
    xs, ys = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
    torch.nn.functional.mse_loss(model(xs), ys).backward()


class _Holder(torch.nn.Module):
    """Three DTensor parameters (uneven shards, one empty on 4 shards) and a plain one."""

    def __init__(self, mesh):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.full = [torch.randn(*s, generator=gen) for s in ((7, 5), (9,), (3, 4), (4, 2))]
        pl = _placements(mesh)
        self.w = torch.nn.Parameter(distribute_tensor(self.full[0].clone(), mesh, pl))
        self.v = torch.nn.Parameter(distribute_tensor(self.full[1].clone(), mesh, pl))
        self.u = torch.nn.Parameter(distribute_tensor(self.full[2].clone(), mesh, pl))
        self.plain = torch.nn.Parameter(self.full[3].clone())
        self.mesh = mesh

    def sharded(self):
        return [self.w, self.v, self.u]

    def groups(self, ps=None):
        ps = list(self.parameters()) if ps is None else ps
        return [{"params": ps[:2], "band": 1}, {"params": ps[2:], "band": 2}]

    def set_grads(self, step, nan=False):
        gen = torch.Generator().manual_seed(1000 + step)
        grads = [torch.randn(f.shape, generator=gen) for f in self.full]
        if nan:  # only the shard holding the last row of w sees it
            grads[0][-1, -1] = float("nan")
        pl = _placements(self.mesh)
        for p, g in zip(self.sharded(), grads):
            p.grad = distribute_tensor(g, self.mesh, pl)
        self.plain.grad = grads[3]
        return grads


@contextmanager
def _cut_links(cuts):
    """Single-process SONew with the band entries crossing the given flat boundaries held at
    zero: ``cuts`` maps a parameter's numel to its boundaries (flat indices)."""
    update = K.update_band_stats

    def cut_update(h, g, beta2, weight):
        update(h, g, beta2, weight)
        for b in cuts.get(g.shape[0], ()):
            for k in range(1, h.shape[0]):
                h[k, max(b - k, 0) : b].zero_()

    K.update_band_stats = cut_update
    try:
        yield
    finally:
        K.update_band_stats = update


def _cuts(holder, shards):
    out = {}
    for f in holder.full[:3]:
        cols = f[0].numel() if f.dim() > 1 else 1
        out[f.numel()] = [b * cols for b in _shard_rows(f.shape[0], shards)]
    return out


def _shard_count(mesh):
    return mesh.size(mesh.ndim - 1)


def _local(t):
    """This rank's shard of a DTensor; any other tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def _assert_same_local_params(a, b, where):
    """Every parameter of module ``a`` equals ``b``'s, bit for bit, on this rank."""
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(_local(p), _local(q)), where


def _local_rows(full, p):
    """The rows of ``full`` that ``p`` (a DTensor parameter) holds on this rank."""
    chunk = -(-full.shape[0] // _shard_count(p.device_mesh))
    start = min(p.device_mesh.get_local_rank(p.device_mesh.ndim - 1) * chunk, full.shape[0])
    return full[start : start + p.to_local().shape[0]]


def _local_band(h_full, p):
    """This rank's part of whole-tensor band statistics ``(k, numel)``, padding zeroed."""
    k = h_full.shape[0]
    local = _local_rows(h_full.view(k, *p.shape).transpose(0, 1), p).transpose(0, 1)
    local = local.reshape(k, -1).clone()
    n = local.shape[1]
    for j in range(1, k):
        local[j, max(n - j, 0) :] = 0
    return local


# ------------------------------------------------------------------------- checks
def _check_shampoo_local(mesh):
    for kw in (KW, dict(KW, async_roots=True, async_deterministic_delay=1)):
        model = _fsdp_model(mesh)
        shards = [p.to_local().detach().clone() for p in model.parameters()]
        opt = Shampoo(model.parameters(), **kw)
        ref = Shampoo(shards, **kw)
        rank, world = dist.get_rank(), dist.get_world_size()
        for step in range(6):
            opt.zero_grad()
            _fsdp_backward(model, step, rank, world)
            for s, p in zip(shards, model.parameters()):
                s.grad = p.grad.to_local().clone()
            opt.step()
            ref.step()
            for s, p in zip(shards, model.parameters()):
                assert torch.equal(p.to_local(), s), (kw, step)
        diag = opt.diagnostics()
        assert [d["shape"] for d in diag] == [d["shape"] for d in ref.diagnostics()]
        assert opt.state_bytes() == ref.state_bytes()
        opt.close()
        ref.close()


EXACT = dict(KW, fsdp_mode="exact")
EXACT_VARIANTS = (  # (settings, how gradients and directions travel)
    (EXACT, "owners"),
    (EXACT, "all_gather"),
    # coupled weight decay reads the parameters: they are gathered too
    (dict(EXACT, precondition_1d=True, weight_decay=0.01, decoupled_weight_decay=False), "owners"),
    (dict(EXACT, async_roots=True, async_deterministic_delay=1, precondition_1d=True), "owners"),
)


def _single(kw):
    return {k: v for k, v in kw.items() if k != "fsdp_mode"}


def _check_shampoo_exact(mesh):
    """fsdp_mode="exact" is single-process Shampoo on the whole tensors, bit for bit."""
    for kw, exchange in EXACT_VARIANTS:
        fsdp_placement.EXCHANGE = exchange
        holder, other = _Holder(mesh), _Holder(mesh)
        refp = [torch.nn.Parameter(f.clone()) for f in holder.full]
        opt = Shampoo(holder.parameters(), **kw)
        local = Shampoo(other.parameters(), **dict(kw, fsdp_mode="local"))
        ref = Shampoo(refp, **_single(kw))
        for step in range(6):
            grads = holder.set_grads(step)
            other.set_grads(step)
            for q, g in zip(refp, grads):
                q.grad = g.clone()
            opt.step()
            local.step()
            ref.step()
            for i, (p, q) in enumerate(zip(holder.parameters(), refp)):
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                assert torch.equal(full, q), (kw, step, i)
        # the check can fail: local mode (blocks cut inside the shards of u) differs
        assert not torch.equal(other.u.full_tensor(), refp[2]), kw
        # a single-process state dict loads (every rank keeps its own blocks) and the run
        # goes on equal to the reference
        opt2 = Shampoo(holder.parameters(), **kw)
        opt2.load_state_dict(ref.state_dict())
        for step in range(6, 9):
            grads = holder.set_grads(step)
            for q, g in zip(refp, grads):
                q.grad = g.clone()
            opt2.step()
            ref.step()
        for i, (p, q) in enumerate(zip(holder.parameters(), refp)):
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            assert torch.equal(full, q), (kw, "loaded", i)
        for o in (opt, opt2, local, ref):
            o.close()
    fsdp_placement.EXCHANGE = "owners"
    # a real FSDP2 / HSDP model: gradients from FSDP's reduce-scatter
    model = _fsdp_model(mesh)
    refp = [torch.nn.Parameter(p.full_tensor().detach().clone()) for p in model.parameters()]
    opt, ref = Shampoo(model.parameters(), **EXACT), Shampoo(refp, **_single(EXACT))
    rank, world = dist.get_rank(), dist.get_world_size()
    for step in range(5):
        opt.zero_grad()
        _fsdp_backward(model, step, rank, world)
        for q, p in zip(refp, model.parameters()):
            q.grad = p.grad.full_tensor()
        opt.step()
        ref.step()
        for i, (p, q) in enumerate(zip(model.parameters(), refp)):
            assert torch.equal(p.full_tensor(), q), ("model", step, i)
    with pytest.raises(ValueError, match="fsdp_mode must be one of 'local', 'exact'"):
        Shampoo(model.parameters(), fsdp_mode="global")
    with pytest.raises(ValueError, match="full_state_dict.*fsdp_mode='exact'"):
        opt.full_state_dict()


def _check_exact_one_group(meshes):
    """Exact mode needs one shard group: parameters on two meshes are refused."""
    (_, fsdp), (_, hsdp) = meshes
    a, b = _Holder(fsdp), _Holder(hsdp)
    opt = Shampoo([a.w, b.w], **EXACT)
    a.set_grads(0)
    b.set_grads(0)
    with pytest.raises(ValueError, match="one shard group"):
        opt.step()
    assert torch.equal(a.w.full_tensor(), a.full[0]) and not opt.state


def _check_sonew_cut_links(mesh):
    holder = _Holder(mesh)
    refp = [torch.nn.Parameter(f.clone()) for f in holder.full]
    opt = SONew(holder.groups(), **SONEW_KW)
    ref = SONew(holder.groups(refp), **SONEW_KW)
    cuts = _cuts(holder, _shard_count(mesh))
    bound = [0.0] * 3
    for step in range(5):
        nan = step == 2
        grads = holder.set_grads(step, nan=nan)
        for q, g in zip(refp, grads):
            q.grad = g.clone()
        before = [q.detach().clone() for q in refp]
        opt.step()
        with _cut_links(cuts):
            ref.step()
        for i, (p, q, q0) in enumerate(zip(holder.sharded(), refp, before)):
            n = q.numel()
            bound[i] += ((2 * n + 4) * (q - q0).abs().max() + 2 * q.abs().max()).item() * EPS
            st, rst = opt.state[p], ref.state[q]
            assert torch.equal(st["exp_avg"], _local_rows(rst["exp_avg"], p)), (i, step)
            assert torch.equal(st["band_stats"], _local_band(rst["band_stats"], p)), (i, step)
            err = (p.full_tensor() - q).abs().max().item()
            assert err <= bound[i], (i, step, err, bound[i])
        assert torch.equal(holder.plain, refp[3])
    assert opt.skipped_steps == ref.skipped_steps == 1
    # every shard (the empty one too) stores its statistics in the whole tensor's units;
    # diagnostics describe the local shard without communicating
    diag = {d["param"]: d for d in opt.diagnostics()}
    for i, (p, q) in enumerate(zip(holder.sharded(), refp)):
        assert opt.stats_scale(p) == ref.stats_scale(q) == diag[i]["stats_scale"], i
        assert diag[i]["shape"] == tuple(p.to_local().shape) and diag[i]["finite"], i

    # a single-process state dict (whole tensors) loads into the shards: rows sliced
    opt2 = SONew(holder.groups(), **SONEW_KW)
    opt2.load_state_dict(ref.state_dict())
    for p in holder.parameters():
        for key in ("exp_avg", "band_stats", "step"):
            assert torch.equal(opt2.state[p][key], opt.state[p][key]), key

    # a checkpoint of older versions (statistics unscaled, no stats_bound) is converted on
    # each shard with a bound from its own rows; the next step brings every shard to the
    # common scale, rescaling each from its own: statistics bit-identical to the reference
    old = ref.state_dict()
    for st in old["state"].values():
        c = 2.0 ** float(K.scale_exponent(st.pop("stats_bound")))
        st["band_stats"] = st["band_stats"] * c * c  # powers of two: exact
    opt3 = SONew(holder.groups(), **SONEW_KW)
    opt3.load_state_dict(copy.deepcopy(old))
    ref.load_state_dict(old)
    for q, g in zip(refp, holder.set_grads(5)):
        q.grad = g.clone()
    opt3.step()
    with _cut_links(cuts):
        ref.step()
    for i, (p, q) in enumerate(zip(holder.sharded(), refp)):
        assert opt3.stats_scale(p) == ref.stats_scale(q), i
        h, rh = opt3.state[p]["band_stats"], ref.state[q]["band_stats"]
        assert torch.equal(h, _local_band(rh, p)), i


def _train_holder(holder, opt, steps):
    for step in steps:
        holder.set_grads(step)
        opt.step()


def _check_dcp_round_trip(mesh, tmp, label):
    for cls, kw in (
        (SONew, SONEW_KW),
        (Shampoo, dict(KW, precondition_1d=True)),
        (Shampoo, dict(EXACT, precondition_1d=True)),
    ):
        path = os.path.join(tmp, f"{label}-{cls.__name__}-{kw.get('fsdp_mode', '')}")
        holder = _Holder(mesh)
        opt = cls(holder.groups() if cls is SONew else holder.parameters(), **kw)
        _train_holder(holder, opt, range(3))
        dcp.save({"optim": get_optimizer_state_dict(holder, opt)}, checkpoint_id=path)
        saved_params = {k: v.detach().clone() for k, v in holder.state_dict().items()}
        _train_holder(holder, opt, range(3, 6))

        other = _Holder(mesh)
        other.load_state_dict(saved_params)
        opt2 = cls(other.groups() if cls is SONew else other.parameters(), **kw)
        sd = {"optim": get_optimizer_state_dict(other, opt2)}
        dcp.load(sd, checkpoint_id=path)
        set_optimizer_state_dict(other, opt2, sd["optim"])
        _train_holder(other, opt2, range(3, 6))
        _assert_same_local_params(holder, other, (label, cls.__name__))

        if cls is Shampoo:  # per-shard state names its shard; another count is rejected
            sd = opt.state_dict()
            st = sd["state"][0]["stats"]
            (key,) = st.keys()
            sd["state"][0]["stats"] = {"shard_0_of_3": st[key]}
            with pytest.raises(ValueError, match="same number of shards"):
                opt2.load_state_dict(sd)


def _check_reshard(meshes, tmp):
    """Save with 4 shards (FSDP), load with 2 (HSDP 2 x 2)."""
    (_, fsdp), (_, hsdp) = meshes
    for cls, kw in ((SONew, SONEW_KW), (Shampoo, KW)):
        path = os.path.join(tmp, f"reshard-{cls.__name__}")
        holder = _Holder(fsdp)
        opt = cls(holder.groups() if cls is SONew else holder.parameters(), **kw)
        _train_holder(holder, opt, range(3))
        saved = get_optimizer_state_dict(holder, opt)
        dcp.save({"optim": saved}, checkpoint_id=path)
        other = _Holder(hsdp)
        opt2 = cls(other.groups() if cls is SONew else other.parameters(), **kw)
        sd = {"optim": get_optimizer_state_dict(other, opt2)}
        if cls is Shampoo:
            # every rank reports the per-shard key it cannot find (a BaseException)
            with pytest.raises(CheckpointException, match=r"Missing key.*shard_\d_of_2"):
                dcp.load(sd, checkpoint_id=path)
            continue
        # the same collectives on every rank, in the same order
        full = {
            name: {k: saved["state"][name][k].full_tensor() for k in ("exp_avg", "band_stats")}
            for name in ("w", "v", "u")
        }
        dcp.load(sd, checkpoint_id=path)
        set_optimizer_state_dict(other, opt2, sd["optim"])
        cuts = _cuts(other, 2)
        for name, p in zip(("w", "v", "u"), other.sharded()):
            st = opt2.state[p]
            assert torch.equal(st["exp_avg"], _local_rows(full[name]["exp_avg"], p))
            h = full[name]["band_stats"].reshape(full[name]["band_stats"].shape[0], -1).clone()
            for b in cuts[p.numel()]:  # links the new layout cuts are dropped
                for k in range(1, h.shape[0]):
                    h[k, max(b - k, 0) : b] = 0
            assert torch.equal(st["band_stats"], _local_band(h, p)), name
        _train_holder(other, opt2, range(3, 5))  # and it trains on


def _check_bad_input(mesh):
    w = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)] * mesh.ndim))
    for cls in (SONew, Shampoo):
        with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*Shard\(dim=1\)"):
            cls([w])
    holder = _Holder(mesh)
    with pytest.raises(ValueError, match="distributed=True"):
        Shampoo(holder.parameters(), distributed=True)
    # optimizers whose math spans whole tensors refuse shards instead of a silent local step
    for name in secondorder.__all__:
        cls = getattr(secondorder, name)
        if (
            isinstance(cls, type)
            and issubclass(cls, secondorder.optim.base.SecondOrderOptimizer)
            and not cls._supports_dtensor
        ):
            with pytest.raises(ValueError, match="does not support DTensor"):
                cls(holder.parameters())
    opt = SONew(holder.parameters())
    holder.set_grads(0)
    holder.w.grad = distribute_tensor(holder.w.grad.full_tensor(), mesh, [Replicate()] * mesh.ndim)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="gradient of param_groups"):
        opt.step()
    assert before["state"] == opt.state_dict()["state"] == {}


def _check_named(rank, world, tmp, names):
    meshes = _meshes(world)
    for label, mesh in meshes:
        for name, check, args in (
            ("shampoo", _check_shampoo_local, (mesh,)),
            ("exact", _check_shampoo_exact, (mesh,)),
            ("sonew", _check_sonew_cut_links, (mesh,)),
            ("dcp", _check_dcp_round_trip, (mesh, tmp, label)),
        ):
            if chosen(names, name, label):
                check(*args)
    if chosen(names, "bad"):
        _check_bad_input(meshes[0][1])
    if chosen(names, "exact-groups"):
        _check_exact_one_group(meshes)
    if chosen(names, "reshard"):
        _check_reshard(meshes, tmp)


def _spawn(world, tmp_path, names):
    run_ranks(_check_named, world, tmp_path, names)


@pytest.mark.distributed
def test_fsdp_two_ranks(tmp_path):
    _spawn(2, tmp_path, ("shampoo", "exact", "sonew", "dcp", "bad"))


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp_and_hsdp_four_ranks(tmp_path):
    _spawn(4, tmp_path, ("shampoo", "exact", "exact-groups", "sonew", "dcp", "reshard"))


def test_exact_mode_on_plain_tensors_is_shampoo():
    """Without DTensor parameters fsdp_mode="exact" changes nothing: bit for bit."""
    gen = torch.Generator().manual_seed(3)
    full = [torch.randn(7, 5, generator=gen), torch.randn(9, generator=gen)]
    a = [torch.nn.Parameter(f.clone()) for f in full]
    b = [torch.nn.Parameter(f.clone()) for f in full]
    kw = dict(KW, precondition_1d=True)
    opt, ref = Shampoo(a, fsdp_mode="exact", **kw), Shampoo(b, **kw)
    for _ in range(5):
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], full[0])
    with pytest.raises(ValueError, match="fsdp_mode must be one of 'local', 'exact'; got 'all'"):
        Shampoo(a, fsdp_mode="all")


def test_shard_rows_follow_torch_chunk():
    for rows in range(1, 12):
        for shards in range(1, 6):
            sizes = [c.shape[0] for c in torch.arange(rows).chunk(shards)]
            starts = [sum(sizes[:i]) for i in range(1, len(sizes))]
            assert _shard_rows(rows, shards) == starts
    assert math.isclose(EPS, 2.0**-23)
