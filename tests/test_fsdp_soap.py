"""SOAP on FSDP2 / HSDP (DTensor parameters): local mode, blocks cut inside each shard.

Real gloo processes: 2 ranks (FSDP on a 1-d mesh; uneven shards) in the default run, 4
ranks (FSDP with an empty shard, and HSDP on a 2 x 2 replicate x shard mesh) marked slow.
The models are those of ``tests/test_fsdp.py`` (a real ``fully_shard`` MLP; a holder of
DTensor parameters with uneven, one-row and empty shards and a plain parameter).

What each check compares against:

* **shards as tensors of their own**: SOAP on the shards equals a plain single-process SOAP
  stepping on clones of every rank's shards with the same gradients: parameters and every
  state tensor bit for bit (``torch.equal``) after each of several steps, across basis
  refreshes (the first by ``eigh``, later ones by ``qr`` or ``eigh``), with the real
  FSDP2 model's reduce-scattered gradients and with the holder.
* **whole tensors**: where ``block_size`` divides the rows of every shard the shards' blocks
  are the whole tensor's blocks, and SOAP on shards equals single-process SOAP on the whole
  tensors, bit for bit: parameters, and every shard's per-block state equals its slice of
  the reference's stacks. One step has a gradient beyond ``2**SAFE_EXP`` on one shard only:
  the state's scale is the whole tensor's on every shard (without the reduction over the
  shards the other shards would keep the unscaled state).
* a NaN in one rank's shard: every rank skips (parameters and state unchanged).
* **checkpoints**: ``get/set_optimizer_state_dict`` with ``dcp.save`` / ``dcp.load`` on the
  same mesh, then the same steps as the original: parameters and state bit-identical.
  Another number of shards fails with the error naming the shard and what to do.
* a tensor-parallel ``Shard(1)`` parameter is refused, naming the parameter and placement.
* (one process) a parameter's step is bit for bit the same whatever other parameters share
  the optimizer, which the comparisons with whole tensors rest on.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import Shard, distribute_tensor

from _spawn import chosen, run_ranks  # tests/ is on sys.path
from secondorder import SOAP
from secondorder.optim.soap import SAFE_EXP
from test_fsdp import (  # noqa: E402 - tests/ is on sys.path
    _fsdp_backward,
    _fsdp_model,
    _Holder,
    _local,
    _meshes,
    _placements,
    _shard_count,
)

# a basis after step 1 (eigh), refreshed after steps 3 and 5
KW = dict(lr=0.05, betas=(0.9, 0.95), weight_decay=0.01, block_size=4,
          precondition_frequency=2, start_preconditioning_step=2)  # fmt: skip
VARIANTS = (KW, dict(KW, basis_method="eigh", precondition_1d=True))


# ------------------------------------------------------------------------ helpers
def _assert_tree_equal(a, b, where):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (where, sorted(a), sorted(b))
        for k in a:
            _assert_tree_equal(a[k], b[k], (*where, k))
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_tree_equal(x, y, (*where, i))
    else:
        assert a == b, where


def _snapshot(opt, params):
    """This rank's state of ``params`` (local shards), cloned."""
    out = []
    for p in params:
        st = opt.state.get(p, {})
        out.append({k: _clone(v) for k, v in st.items()})
    return out


def _clone(v):
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, list):
        return [_clone(x) for x in v]
    return v


def _reference(params, shards, kw):
    """Plain SOAP on clones of the shards, one param group each (order kept). Whether a
    tensor is rotated is decided for the whole parameter: a matrix (two dims > 1), or a
    vector with ``precondition_1d``, provided no shard (``torch.chunk`` rows) is a single
    entry. For a clone, ``precondition_1d`` set to that decision gives the same (a one-row
    shard of a matrix is rotated, a two-entry shard of a vector with a one-entry
    neighbour is not)."""
    groups = []
    for p, s in zip(params, shards):
        nonunit = sum(d != 1 for d in p.shape)
        rotated = nonunit >= 2 or (nonunit == 1 and kw.get("precondition_1d", False))
        if hasattr(p, "device_mesh"):
            count = _shard_count(p.device_mesh)
            rest = p.shape[1:].numel()
            rotated &= all(len(c) > 1 or rest > 1 for c in torch.arange(p.shape[0]).chunk(count))
        groups.append({"params": [s], "precondition_1d": rotated})
    return SOAP(groups, **kw)


class _Even:
    """DTensor parameters whose every shard (of 2 or 4) holds a multiple of ``block_size=4``
    rows, so that the shards' blocks are the whole tensor's: ``w`` (16, 8), ``v`` (16,) (a
    vector, rotated with ``precondition_1d``), and a plain ``(4, 4)``. All factors are 4 x 4:
    a 64-byte matrix sits on a 64-byte boundary wherever it is in a batch (LAPACK / BLAS
    results for smaller ones may depend on their alignment, i.e. on the batch)."""

    def __init__(self, mesh):
        gen = torch.Generator().manual_seed(5)
        self.full = [torch.randn(*s, generator=gen) for s in ((16, 8), (16,), (4, 4))]
        pl = _placements(mesh)
        self.mesh = mesh
        self.sharded = [
            torch.nn.Parameter(distribute_tensor(f.clone(), mesh, pl)) for f in self.full[:2]
        ]
        self.params = [*self.sharded, torch.nn.Parameter(self.full[2].clone())]

    def grads(self, step, big=False):
        gen = torch.Generator().manual_seed(2000 + step)
        grads = [torch.randn(f.shape, generator=gen) for f in self.full]
        if big:  # beyond 2**SAFE_EXP, in the last rows of w only (one shard holds them)
            grads[0][-1] *= 2.0 ** (SAFE_EXP + 6)
        pl = _placements(self.mesh)
        for p, g in zip(self.sharded, grads):
            p.grad = distribute_tensor(g, self.mesh, pl)
        self.params[2].grad = grads[2].clone()
        return grads


# ---------------------------------------------------------------- single process
def test_a_parameters_step_does_not_depend_on_the_others():
    """What shards-vs-whole equality rests on: a parameter's SOAP step is bit for bit the
    same whatever other parameters share the optimizer (and so its batched refreshes). Here
    the parameter's factors have sizes 4 and 2, its neighbour's 2 and 4: the buckets come in
    the other order, and the momentum's rotations into the new bases must not follow it."""
    gen = torch.Generator().manual_seed(7)
    a0, b0 = torch.randn(8, 2, generator=gen), torch.randn(2, 8, generator=gen)
    alone = [torch.nn.Parameter(a0.clone())]
    pair = [torch.nn.Parameter(b0.clone()), torch.nn.Parameter(a0.clone())]
    for basis_method in ("qr", "eigh"):
        kw = dict(KW, basis_method=basis_method)
        opt1, opt2 = SOAP(alone, **kw), SOAP(pair, **kw)
        for _ in range(6):
            g = torch.randn(8, 2, generator=gen)
            alone[0].grad, pair[1].grad = g.clone(), g.clone()
            pair[0].grad = torch.randn(2, 8, generator=gen)
            opt1.step()
            opt2.step()
            assert torch.equal(alone[0], pair[1]), basis_method
        _assert_tree_equal(_snapshot(opt1, alone), _snapshot(opt2, pair[1:]), (basis_method,))


# ------------------------------------------------------------------------- checks
def _check_model(mesh):
    """A real FSDP2 model: SOAP on shards == plain SOAP on clones of the shards."""
    rank, world = dist.get_rank(), dist.get_world_size()
    for kw in VARIANTS:
        model = _fsdp_model(mesh)
        params = list(model.parameters())
        shards = [p.to_local().detach().clone() for p in params]
        opt, ref = SOAP(params, **kw), _reference(params, shards, kw)
        for step in range(7):
            opt.zero_grad()
            _fsdp_backward(model, step, rank, world)
            nan = step == 4
            # one shard only (under HSDP its replicas hold the same gradient)
            if nan and mesh.get_local_rank(mesh.ndim - 1) == 0:
                params[0].grad.to_local()[0, 0] = float("nan")
            before = _snapshot(opt, params)
            opt.step()
            if nan:  # every rank skipped the step
                assert opt.skipped_steps == 1, kw
                _assert_tree_equal(_snapshot(opt, params), before, ("skipped", step))
            else:
                for s, p in zip(shards, params):
                    s.grad = p.grad.to_local().clone()
                ref.step()
            for i, (s, p) in enumerate(zip(shards, params)):
                assert torch.equal(p.to_local(), s), (kw, step, i)
        _assert_tree_equal(_snapshot(opt, params), _snapshot(ref, shards), ("state",))
        assert [d["shape"] for d in opt.diagnostics()] == [d["shape"] for d in ref.diagnostics()]
        assert opt.state_bytes() == ref.state_bytes()


def _check_holder(mesh):
    """Uneven, one-row and (on 4 shards) empty shards next to a plain parameter: the same
    comparison, with the non-finite gradient in the shard holding the last row of ``w``."""
    for kw in VARIANTS:
        holder = _Holder(mesh)
        params = list(holder.parameters())
        shards = [torch.nn.Parameter(_local(p).detach().clone()) for p in params]
        opt, ref = SOAP(params, **kw), _reference(params, shards, kw)
        for step in range(6):
            nan = step == 2
            holder.set_grads(step, nan=nan)
            before = _snapshot(opt, params)
            opt.step()
            if nan:
                assert opt.skipped_steps == 1, kw
                _assert_tree_equal(_snapshot(opt, params), before, ("skipped", step))
                continue
            for s, p in zip(shards, params):
                s.grad = _local(p.grad).clone()
            ref.step()
            for i, (s, p) in enumerate(zip(shards, params)):
                assert torch.equal(_local(p), s), (kw, step, i)
        _assert_tree_equal(_snapshot(opt, params), _snapshot(ref, shards), ("state",))
        # every shard of a matrix is rotated, one-row shards included
        for p in (holder.w, holder.u):
            assert _local(p).numel() == 0 or "bases" in opt.state[p], kw


def _check_whole(mesh):
    """Block boundaries that coincide: SOAP on shards == SOAP on the whole tensors."""
    index = mesh.get_local_rank(mesh.ndim - 1)
    for kw in (dict(KW, precondition_1d=True), dict(KW, precondition_1d=True, basis_method="eigh")):
        even = _Even(mesh)
        whole = [torch.nn.Parameter(f.clone()) for f in even.full]
        opt, ref = SOAP(even.params, **kw), SOAP(whole, **kw)
        for step in range(6):
            grads = even.grads(step, big=step == 3)
            for q, g in zip(whole, grads):
                q.grad = g.clone()
            opt.step()
            ref.step()
            for i, (p, q) in enumerate(zip(even.params, whole)):
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                assert torch.equal(full, q), (kw, step, i)
        assert float(ref.state[whole[0]]["scale_exp"]) > 0  # the big gradient was scaled
        for p, q in zip(even.sharded, whole):
            st, rst = opt.state[p], ref.state[q]
            for key in ("step", "scale_exp", "basis_step"):
                assert torch.equal(st[key], rst[key]), key
            pairs = [(key, x, y) for key in ("rotated_exp_avg", "rotated_exp_avg_sq")
                     for x, y in zip(st[key], rst[key])]  # fmt: skip
            pairs += [(key, x, y) for key in ("factors", "bases", "eigenvalues", "basis_failures")
                      for xs, ys in zip(st[key], rst[key]) for x, y in zip(xs, ys)]  # fmt: skip
            for key, x, y in pairs:  # this shard's blocks: a slice of the whole's stack
                n = x.shape[0]
                assert torch.equal(x, y[index * n : (index + 1) * n]), (kw, key)


def _check_dcp_round_trip(mesh, tmp, label):
    for v, kw in enumerate(VARIANTS):
        path = os.path.join(tmp, f"{label}-soap-{v}")
        holder = _Holder(mesh)
        opt = SOAP(holder.parameters(), **kw)
        for step in range(4):  # bases refreshed after steps 1 and 3
            holder.set_grads(step)
            opt.step()
        dcp.save({"optim": get_optimizer_state_dict(holder, opt)}, checkpoint_id=path)
        saved_params = {k: v.detach().clone() for k, v in holder.state_dict().items()}
        saved_state = _snapshot(opt, list(holder.parameters()))
        for step in range(4, 7):
            holder.set_grads(step)
            opt.step()

        other = _Holder(mesh)
        other.load_state_dict(saved_params)
        opt2 = SOAP(other.parameters(), **kw)
        sd = {"optim": get_optimizer_state_dict(other, opt2)}
        dcp.load(sd, checkpoint_id=path)
        set_optimizer_state_dict(other, opt2, sd["optim"])
        loaded = _snapshot(opt2, list(other.parameters()))
        _assert_tree_equal(loaded, saved_state, (label, "loaded"))
        for step in range(4, 7):
            other.set_grads(step)
            opt2.step()
        for a, b in zip(holder.parameters(), other.parameters()):
            assert torch.equal(_local(a), _local(b)), (label, kw)
        _assert_tree_equal(
            _snapshot(opt2, list(other.parameters())),
            _snapshot(opt, list(holder.parameters())),
            (label, "state"),
        )

        # per-shard state names its shard; a state dict of another shard count is refused
        sd = opt.state_dict()
        blocked = [st for st in sd["state"].values() if "factors" in st]
        if blocked:  # (with 4 shards, one rank holds only one-row and empty shards)
            st = blocked[0]
            (key,) = st["factors"].keys()
            shard = mesh.get_local_rank(mesh.ndim - 1)
            assert key == f"shard_{shard}_of_{_shard_count(mesh)}"
            st["factors"] = {"shard_0_of_3": st["factors"][key]}
            with pytest.raises(ValueError, match="'factors'.*same number of shards"):
                opt2.load_state_dict(sd)


def _check_reshard(meshes, tmp):
    """Saved with 4 shards (FSDP), loaded with 2 (HSDP 2 x 2): the per-shard blocks are not
    found, and the error names the shard this run looks for."""
    (_, fsdp), (_, hsdp) = meshes
    path = os.path.join(tmp, "reshard-soap")
    holder = _Holder(fsdp)
    opt = SOAP(holder.parameters(), **KW)
    for step in range(3):
        holder.set_grads(step)
        opt.step()
    dcp.save({"optim": get_optimizer_state_dict(holder, opt)}, checkpoint_id=path)
    other = _Holder(hsdp)
    opt2 = SOAP(other.parameters(), **KW)
    sd = {"optim": get_optimizer_state_dict(other, opt2)}
    with pytest.raises(CheckpointException, match=r"Missing key.*shard_\d_of_2"):
        dcp.load(sd, checkpoint_id=path)


def _check_bad_input(mesh):
    w = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)] * mesh.ndim))
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*Shard\(dim=1\)"):
        SOAP([w])
    with pytest.raises(ValueError, match=r"parameter 'w'.*Shard\(dim=1\)"):
        SOAP([("w", w)])


def _check_named(rank, world, tmp, names):
    meshes = _meshes(world)
    for label, mesh in meshes:
        for name, check, args in (
            ("model", _check_model, (mesh,)),
            ("holder", _check_holder, (mesh,)),
            ("whole", _check_whole, (mesh,)),
            ("dcp", _check_dcp_round_trip, (mesh, tmp, label)),
        ):
            if chosen(names, name, label):
                check(*args)
    if chosen(names, "bad"):
        _check_bad_input(meshes[0][1])
    if chosen(names, "reshard"):
        _check_reshard(meshes, tmp)


@pytest.mark.distributed
def test_soap_fsdp_two_ranks(tmp_path):
    run_ranks(_check_named, 2, tmp_path, ("model", "holder", "whole", "dcp", "bad"))


@pytest.mark.distributed
@pytest.mark.slow
def test_soap_fsdp_and_hsdp_four_ranks(tmp_path):
    run_ranks(_check_named, 4, tmp_path, ("model", "holder", "whole", "dcp", "reshard"))
