"""Muon on FSDP2 / HSDP shards, and the gather-to-owner step it uses (placement.gather).

Real gloo processes: 2 ranks (FSDP on a 1-d mesh, uneven shards: 7 rows as 4 + 3, one row
as 1 + 0) by default; 4 ranks (FSDP with empty shards: 3 rows as 1 + 1 + 1 + 0; HSDP on a
2 x 2 replicate x shard mesh) marked slow.

What each check compares against:

* **gather** (:func:`apply_whole` alone): ``fn(x) = x x^T x`` of the whole tensors, computed
  here on the full tensors, sliced to this rank's rows: ``torch.equal`` (also with tensors
  on two shard groups in one call). The entries the
  plans say each rank receives add up to each matrix's entries outside its owner's rows.
* **Muon** on a holder module with every role (hidden matrices sharded, unevenly and with
  empty shards, of one shape class, its transpose, a conv-like 3-d kernel, a one-row
  matrix, a plain unsharded matrix in the same class; a sharded vector, embedding and
  output layer) and on a ``fully_shard``-ed MLP built with ``from_model``: single-process
  Muon on the whole tensors fed the full gradients, ``torch.equal`` on every parameter
  and momentum after every step (several settings, a NaN step skipped everywhere, a
  single-process state dict loaded into the shards). The
  owners batch only their own matrices while the reference stacks all of a shape class:
  equality also checks that batching does not change a matrix's bits.
* **checkpoints**: DCP save after 3 steps, load into a fresh optimizer on the same mesh
  and on a mesh with another shard count (2 ranks: 2 shards -> 1 shard per replica; 4
  ranks: 4 shards -> HSDP 2 x 2), then 3 more steps: ``torch.equal`` with the
  single-process reference trained straight through.
* **bad input**: a ``Shard(1)`` parameter raises ``ValueError`` naming it and the placement.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from _spawn import chosen, mark, run_ranks  # tests/ is on sys.path
from secondorder import Muon
from secondorder.kernels.newton_schulz import orthogonalize_many
from secondorder.placement import ParamPlacement, placement_of
from secondorder.placement.gather import apply_whole, matrix_cost, plan_whole, shard_rows
from test_distributed import _model  # noqa: E402
from test_fsdp import _fsdp_backward, _fsdp_model, _meshes, _placements  # noqa: E402

KW = dict(lr=0.02, weight_decay=0.01)
VARIANTS = (
    KW,
    dict(KW, nesterov=False, scaling="spectral", ns_steps=3, ns_dtype=torch.bfloat16),
    dict(KW, momentum=0.0, scaling="none", foreach=False),
)

# name -> (shape, role, sharded)
SPECS = {
    "w": ((7, 5), "hidden", True),
    "w2": ((7, 5), "hidden", True),
    "t": ((5, 7), "hidden", True),  # the transpose: the same batch as w in one process
    "k": ((5, 2, 3), "hidden", True),  # a conv-like kernel, orthogonalised as 5 x 6
    "u": ((3, 4), "hidden", True),  # on 4 shards: 1 + 1 + 1 + 0 rows
    "r": ((1, 6), "hidden", True),  # one row: an empty shard on every rank but the first
    "plain": ((7, 5), "hidden", False),  # unsharded, in w's shape class
    "v": ((9,), "vector", True),
    "emb": ((6, 3), "embedding", True),
    "head": ((4, 5), "output", True),
}


def _values(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(*s, generator=gen) for n, (s, _, _) in SPECS.items()}


class _Holder(torch.nn.Module):
    """The parameters of SPECS: DTensors on ``mesh`` (or plain tensors with ``mesh=None``,
    the single-process reference), with ``values`` (whole tensors)."""

    def __init__(self, mesh, values):
        super().__init__()
        self.mesh = mesh
        for n, (_, _, sharded) in SPECS.items():
            x = values[n].clone()
            if mesh is not None and sharded:
                x = distribute_tensor(x, mesh, _placements(mesh))
            self.register_parameter(n, torch.nn.Parameter(x))

    def groups(self):
        by_role = {}
        for n, (_, role, _) in SPECS.items():
            by_role.setdefault(role, []).append(getattr(self, n))
        return [{"params": ps, "role": role} for role, ps in by_role.items()]

    def set_grads(self, step, nan=False):
        gen = torch.Generator().manual_seed(1000 + step)
        for n, (shape, _, sharded) in SPECS.items():
            g = torch.randn(*shape, generator=gen)
            if nan and n == "w":  # only the shard holding w's last row sees it
                g[-1, -1] = float("nan")
            p = getattr(self, n)
            if self.mesh is not None and sharded:
                g = distribute_tensor(g, self.mesh, _placements(self.mesh))
            p.grad = g

    def whole(self, n):
        p = getattr(self, n)
        return p.full_tensor() if hasattr(p, "full_tensor") else p.detach()


def _assert_equal(holder, ref, opt, ropt, what):
    for n in SPECS:
        assert torch.equal(holder.whole(n), ref.whole(n)), (what, n)
        st, rst = opt.state[getattr(holder, n)], ropt.state[getattr(ref, n)]
        assert sorted(st) == sorted(rst), (what, n)
        for key, value in st.items():
            if key == "step":
                assert torch.equal(value, rst[key]), (what, n)
                continue
            p = getattr(holder, n)
            if hasattr(p, "to_local"):  # this rank's rows of the reference's state
                rows = shard_rows(p.shape[0], _shard_count(holder.mesh), _shard_index(p))
                assert torch.equal(value, rst[key][rows]), (what, n, key)
            else:
                assert torch.equal(value, rst[key]), (what, n, key)


def _shard_count(mesh):
    return mesh.size(mesh.ndim - 1)


def _shard_index(p):
    return p.device_mesh.get_local_rank(p.device_mesh.ndim - 1)


# ------------------------------------------------------------------------- checks
def _check_gather(mesh):
    """apply_whole alone against fn of the whole tensors."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(7, 5), (3, 4), (1, 6), (5, 2, 3), (9, 3), (4, 2)]
    dtypes = [torch.float32, torch.float64, torch.float32, torch.float32, torch.float64,
              torch.float32]  # fmt: skip
    full = [torch.randn(*s, generator=gen, dtype=d) for s, d in zip(shapes, dtypes)]
    items = []
    for i, f in enumerate(full):
        if i == len(full) - 1:  # a plain tensor: computed locally
            items.append((f, None))
            continue
        d = distribute_tensor(f, mesh, _placements(mesh))
        pl = placement_of(d, f"t{i}")
        local = d.to_local()
        items.append((local.reshape(local.shape[0], f[0].numel()), pl))
    calls = []

    def fn(mats):
        calls.append([tuple(m.shape) for m in mats])
        return [m @ m.mT @ m for m in mats]

    out = apply_whole(items, fn)
    for (_, pl), f, o in zip(items, full, out):
        mat = f.reshape(f.shape[0], -1)
        want = mat @ mat.mT @ mat
        if pl is not None:
            want = want[pl.rows()]
        assert o.dtype == f.dtype and torch.equal(o, want), pl.name if pl else "plain"
    assert len(calls) == 1  # one call: the owner's matrices and the plain one, batched
    plan = plan_whole(items)
    assert len(calls[0]) == len(plan.mine)
    # volume: summed over the shard group, what arrives is every matrix minus its owner's
    # rows (the scatter sends the same back)
    got = torch.tensor([plan.received, plan.sent])
    dist.all_reduce(got, group=items[0][1].group())
    expected = 0
    for (local, pl), owner in zip(items, plan.owners):
        if owner is not None:
            s = shard_rows(pl.global_shape[0], pl.shard_count, owner)
            expected += (pl.global_shape[0] - (s.stop - s.start)) * local.shape[1]
    assert got.tolist() == [expected, expected]
    # results in another dtype travel in it
    out = apply_whole(items[:1], lambda ms: [m.to(torch.bfloat16) for m in ms],
                      out_dtype=torch.bfloat16)  # fmt: skip
    assert out[0].dtype == torch.bfloat16
    assert torch.equal(out[0], full[0].to(torch.bfloat16)[items[0][1].rows()])


def _check_gather_two_groups(meshes):
    """Tensors on two shard groups (FSDP on 4 ranks, HSDP's shard pairs) in one call."""
    (_, fsdp), (_, hsdp) = meshes
    gen = torch.Generator().manual_seed(6)
    full = [torch.randn(7, 5, generator=gen), torch.randn(5, 3, generator=gen),
            torch.randn(3, 4, generator=gen)]  # fmt: skip
    items = []
    for f, mesh in zip(full, (fsdp, hsdp, fsdp)):
        d = distribute_tensor(f, mesh, _placements(mesh))
        items.append((d.to_local(), placement_of(d, "t")))
    out = apply_whole(items, lambda ms: [m @ m.mT @ m for m in ms])
    for (_, pl), f, o in zip(items, full, out):
        assert torch.equal(o, (f @ f.mT @ f)[pl.rows()])
    assert len(plan_whole(items).groups) == 2


def _check_muon_holder(mesh):
    for kw in VARIANTS:
        values = _values()
        holder, ref = _Holder(mesh, values), _Holder(None, values)
        opt, ropt = Muon(holder.groups(), **kw), Muon(ref.groups(), **kw)
        for step in range(5):
            nan = step == 2
            holder.set_grads(step, nan=nan)
            ref.set_grads(step, nan=nan)
            opt.step()
            ropt.step()
            _assert_equal(holder, ref, opt, ropt, (kw, step))
        assert opt.skipped_steps == ropt.skipped_steps == 1
        assert not torch.equal(holder.whole("w"), values["w"])
        # a single-process state dict loads into the shards (rows sliced); training goes on
        # equal to the reference
        opt2 = Muon(holder.groups(), **kw)
        opt2.load_state_dict(ropt.state_dict())
        for step in range(5, 7):
            holder.set_grads(step)
            ref.set_grads(step)
            opt2.step()
            ropt.step()
            _assert_equal(holder, ref, opt2, ropt, (kw, "loaded", step))
        # diagnostics describe the local shard and the whole matrix, without communicating
        diag = {d["param"]: d for d in opt.diagnostics()}
        rdiag = {d["param"]: d for d in ropt.diagnostics()}
        for i, d in diag.items():
            assert d["role"] == rdiag[i]["role"] and d["update"] == rdiag[i]["update"], i
            if d["update"] == "muon":
                assert d["matrix"] == rdiag[i]["matrix"], i
                assert d["shape_factor"] == rdiag[i]["shape_factor"], i
                assert d.get("sharded", False) == SPECS[list(SPECS)[i]][2], i


def _check_muon_model(mesh):
    """A fully_shard-ed MLP, roles from the model (hidden, output, vectors)."""
    model = _fsdp_model(mesh)
    torch.manual_seed(0)
    ref = _model()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p.full_tensor(), q)
    opt = Muon.from_model(model, **KW)
    ropt = Muon.from_model(ref, **KW)
    assert [g["role"] for g in opt.param_groups] == ["hidden", "output", "vector"]
    rank, world = dist.get_rank(), dist.get_world_size()
    for step in range(4):
        opt.zero_grad()
        _fsdp_backward(model, step, rank, world)
        for p, q in zip(model.parameters(), ref.parameters()):
            q.grad = p.grad.full_tensor()
        opt.step()
        ropt.step()
        for i, (p, q) in enumerate(zip(model.parameters(), ref.parameters())):
            assert torch.equal(p.full_tensor(), q), (step, i)


def _train(holder, opt, steps):
    for step in steps:
        holder.set_grads(step)
        opt.step()


def _check_dcp(mesh, other_mesh, tmp, label):
    """Save on ``mesh`` after 3 steps; load on ``mesh`` and on ``other_mesh``; 3 more steps
    equal the single-process run trained straight through."""
    path = os.path.join(tmp, f"muon-{label}")
    values = _values()
    holder, ref = _Holder(mesh, values), _Holder(None, values)
    opt, ropt = Muon(holder.groups(), **KW), Muon(ref.groups(), **KW)
    _train(holder, opt, range(3))
    _train(ref, ropt, range(3))
    dcp.save({"optim": get_optimizer_state_dict(holder, opt)}, checkpoint_id=path)
    at3 = {n: ref.whole(n).clone() for n in SPECS}
    _train(ref, ropt, range(3, 6))
    for target in (mesh, other_mesh):
        other = _Holder(target, at3)
        opt2 = Muon(other.groups(), **KW)
        sd = {"optim": get_optimizer_state_dict(other, opt2)}
        dcp.load(sd, checkpoint_id=path)
        set_optimizer_state_dict(other, opt2, sd["optim"])
        _train(other, opt2, range(3, 6))
        _assert_equal(other, ref, opt2, ropt, (label, str(target)))


def _check_bad_input(mesh):
    w = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)] * mesh.ndim))
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*Shard\(dim=1\)"):
        Muon([w])
    with pytest.raises(ValueError, match=r"parameter 'lin.weight'.*Shard\(dim=1\)"):
        Muon([("lin.weight", w)])


def _check_named(rank, world, tmp, names):
    meshes = _meshes(world)
    if world == 2:  # another shard count: 2 replicas of 1 shard
        other = init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard"))
        pairs = [(meshes[0], other)]
    else:  # FSDP on 4 shards -> HSDP 2 x 2, and HSDP on itself
        pairs = [(meshes[0], meshes[1][1]), (meshes[1], meshes[1][1])]
    for label, mesh in meshes:
        for name, check in (("gather", _check_gather), ("holder", _check_muon_holder),
                            ("model", _check_muon_model)):  # fmt: skip
            if chosen(names, name, label):
                check(mesh)
    if "dcp" in names:
        for (label, mesh), other in pairs:
            mark(f"dcp:{label}")
            _check_dcp(mesh, other, tmp, label)
    if chosen(names, "gather-groups"):
        _check_gather_two_groups(meshes)
    if chosen(names, "bad"):
        _check_bad_input(meshes[0][1])


@pytest.mark.distributed
def test_muon_fsdp_two_ranks(tmp_path):
    run_ranks(_check_named, 2, tmp_path, ("gather", "holder", "model", "dcp", "bad"))


@pytest.mark.distributed
@pytest.mark.slow
def test_muon_fsdp_and_hsdp_four_ranks(tmp_path):
    run_ranks(_check_named, 4, tmp_path, ("gather", "gather-groups", "holder", "model", "dcp"))


# ------------------------------------------------------------ single process
def _placement(rows, cols, count, index):
    s = shard_rows(rows, count, index)
    return ParamPlacement(
        "p", torch.Size((rows, cols)), torch.Size((s.stop - s.start, cols)), "mesh",
        (Shard(0),), 0, index, count, s.start,
    )  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=25),
    count=st.integers(1, 5),
)
def test_plans_agree_across_ranks_and_balance(shapes, count):
    """Every rank computes the same owners (greedy on cost, from global shapes only); each
    input is computed by exactly one rank; the volumes add up over the ranks (what one
    sends, another receives) and equal every matrix minus its owner's rows; the busiest
    rank carries at most 4/3 of the optimum (greedy longest-processing-time's bound)."""
    plans = []
    for index in range(count):
        items = []
        for rows, cols in shapes:
            pl = _placement(rows, cols, count, index)
            items.append((torch.zeros(pl.local_shape), pl))
        plans.append(plan_whole(items))
    if count == 1:  # nothing sharded: every rank computes everything itself
        assert plans[0].owners == [None] * len(shapes) and plans[0].sent == 0
        return
    assert all(p.owners == plans[0].owners for p in plans)
    assert sorted(i for p in plans for i in p.mine) == list(range(len(shapes)))
    own_rows = [
        len(range(rows)[shard_rows(rows, count, owner)])
        for (rows, _), owner in zip(shapes, plans[0].owners)
    ]
    moved = sum((rows - o) * cols for (rows, cols), o in zip(shapes, own_rows))
    assert sum(p.sent for p in plans) == sum(p.received for p in plans) == moved
    loads = [0] * count
    for shape, owner in zip(shapes, plans[0].owners):
        loads[owner] += matrix_cost(shape)
    costs = [matrix_cost(s) for s in shapes]
    assert max(loads) <= 4 / 3 * max(sum(costs) / count, max(costs))


def test_plan_rejects_a_local_tensor_that_is_not_the_rows():
    pl = _placement(7, 5, 2, 0)
    with pytest.raises(ValueError, match="rows of the parameter"):
        plan_whole([(torch.zeros(3, 5), pl)])
    with pytest.raises(ValueError, match="rows of the parameter"):
        plan_whole([(torch.zeros(4, 4), pl)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batching_does_not_change_a_matrix(dtype):
    """Newton-Schulz of a matrix is the same bits whichever matrices share its batch (what
    lets an owner batch only its own matrices; the sizes take torch's small-matrix and
    its gemm paths)."""
    gen = torch.Generator().manual_seed(0)
    for shape in ((7, 5), (48, 64), (130, 96)):
        mats = [torch.randn(*shape, generator=gen) for _ in range(4)]
        mats[1] = mats[1].mT.contiguous()  # the transpose joins the same batch
        whole = orthogonalize_many(mats, 5, dtype)
        split = orthogonalize_many(mats[0::2], 5, dtype), orthogonalize_many(mats[1::2], 5, dtype)
        alone = [orthogonalize_many([m], 5, dtype)[0] for m in mats]
        for i, o in enumerate(whole):
            assert torch.equal(o, split[i % 2][i // 2]), (shape, i)
            assert torch.equal(o, alone[i]), (shape, i)


def test_shard_rows_follow_torch_chunk():
    """The rows of every shard, as FSDP2 cuts them (torch.chunk; empty trailing shards)."""
    for rows in range(0, 12):
        for count in range(1, 6):
            chunks = torch.arange(rows).chunk(count) if rows else ()
            got = [torch.arange(rows)[shard_rows(rows, count, i)] for i in range(count)]
            want = [c for c in chunks] + [torch.arange(0)] * (count - len(chunks))
            assert [g.tolist() for g in got] == [w.tolist() for w in want], (rows, count)
