"""MKOR and AdaHessian on FSDP2 / HSDP models (DTensor parameters).

Real gloo processes: 2 ranks (FSDP on a 1-d mesh) and 4 ranks (FSDP on 4 ranks, HSDP on a
2 x 2 replicate x shard mesh). The model has a conv layer (5 output channels), a linear
layer (7 rows) and a bias-free linear layer (3 rows): shards are uneven (4 + 3, 3 + 2,
2 + 1 on 2 ranks) and, on 4 ranks, two layers leave one rank an empty shard. A variant
leaves the middle layer out of ``fully_shard`` (a plain parameter next to sharded ones).

**MKOR** on shards must equal single-process MKOR fed the same global batch:

* the reference runs the global batch as one forward/backward pass per rank's part (MKOR
  averages the statistics of several passes before one step, so this is the global batch
  for MKOR), with the same parameters. Its per-pass statistics are bit for bit those of
  the ranks (same rows, same shapes). The sharded run sums them over the mesh in gloo's
  order; the reference's mean is formed here in rank order: two sums of the same ``W``
  values differ by at most ``(W - 1) eps sum_r |a_r|`` (each is within ``(W - 1) u`` of
  the exact sum, ``u = eps / 2``), and the mean divides by ``W``, a power of two (exact);
* given the statistics the sharded run used and its (reduce-scattered) gradients, the
  reference then steps and every parameter must be **bit-identical** on every rank (the
  whole gradient matrix is preconditioned by its owner rank with the same arithmetic as in
  one process; the base optimizer is elementwise);
* each sharded layer's factors are updated and held by exactly one rank of its shard group
  (the one ``diagnostics()`` names in ``factors_on``), bit-identical to the reference's
  there, with the same diagnostics; the other ranks hold none and report ``None``; an
  unsharded layer's factors are on every rank;
* a ``torch.distributed.checkpoint`` round trip continues bit for bit, factors on the same
  owners; another shard count is refused (``dcp.load``'s missing per-shard key, and
  ``load_state_dict``'s ``ValueError``, both naming the shard);
* ``apply_whole(..., owners=...)`` uses the caller's owners and checks them.

**AdaHessian** refuses DTensor parameters: FSDP2's gradients carry no graph (its
reduce-scatter runs outside autograd), checked here as a fact of FSDP2 and through the
error message (parameter name, reason, what to do). Plain parameters with a sharded module
between them and the loss raise a ``RuntimeError`` naming the cause, changing nothing;
plain parameters with sharded modules only before them work, bit for bit as one process.
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
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from _spawn import chosen, mark, run_ranks  # tests/ is on sys.path
from secondorder import MKOR, AdaHessian
from secondorder.placement import placement_of
from secondorder.placement.gather import apply_whole, plan_whole
from test_fsdp import _meshes  # tests/ is on sys.path

EPS = torch.finfo(torch.float32).eps
BATCH = 12
MKOR_KW = dict(lr=0.05, inv_freq=2, warmup_steps=3, weight_decay=0.01)


# ------------------------------------------------------------------------ helpers
def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 5, 3, padding=1),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(80, 7),
        torch.nn.Tanh(),
        torch.nn.Linear(7, 3, bias=False),
    )


SHARDED = (0, 3, 5)


def _fsdp_model(mesh, mixed=False):
    """``_model()`` with every layer sharded, or (``mixed``) the middle one left plain."""
    model = _model()
    if mixed:
        fully_shard(model[0], mesh=mesh)
        fully_shard(model[5], mesh=mesh)
    else:
        for i in SHARDED:
            fully_shard(model[i], mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def _batch(step):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 2, 4, 4, generator=gen), torch.randn(BATCH, 3, generator=gen)


def _part(t, r, world):
    per = BATCH // world
    return t[r * per : (r + 1) * per]


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _sharded_backward(model, step, rank, world, mixed):
    x, y = _batch(step)
    _loss(model, _part(x, rank, world), _part(y, rank, world)).backward()
    if mixed:  # the plain layer's gradient: averaged by hand, as a data-parallel wrapper does
        for p in model[3].parameters():
            dist.all_reduce(p.grad)
            p.grad /= world


class _Spy:
    """Records the mean statistics of every due layer (all ranks get them) and the layers
    whose factors this rank updates with them (only the rank that keeps them)."""

    def __init__(self, opt):
        self.seen, self.updated = {}, set()
        self.names = [lay.name for lay in opt._layers]
        self.update, self.stats = opt._update_factors, opt._global_stats
        opt._update_factors, opt._global_stats = self._update, self._stats

    def _stats(self, due):
        out = self.stats(due)
        for index, ag in out.items():
            if ag is not None:
                self.seen[self.names[index]] = (ag[0].clone(), ag[1].clone())
        return out

    def _update(self, st, group, a, g, layer, dev):
        self.updated.add(layer.name)
        return self.update(st, group, a, g, layer, dev)


def _shard_group(model):
    """The process group of the ranks holding the other shards (``None``: not sharded)."""
    p = next(model.parameters())
    if not hasattr(p, "device_mesh"):
        return None
    mesh = p.device_mesh
    return mesh.get_group(mesh.ndim - 1)


def _over_group(value, group):
    """``value`` of every rank of ``group`` (in group rank order)."""
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def _is_sharded(p):
    if not hasattr(p, "placements"):
        return False
    mesh = p.device_mesh
    return any(isinstance(pl, Shard) and mesh.size(d) > 1 for d, pl in enumerate(p.placements))


# ------------------------------------------------------------------------- checks
def _check_mkor(model, kw, mixed=False, steps=6):
    """``model``: sharded (``_fsdp_model``) or wrapped in DistributedDataParallel."""
    rank, world = dist.get_rank(), dist.get_world_size()
    ref = _model()
    opt, ref_opt = MKOR(model, **kw), MKOR(ref, **kw)
    spy = _Spy(opt)
    names = [lay.name for lay in opt._layers]
    group = _shard_group(model)
    sharded = {lay.name for lay in opt._layers if _is_sharded(lay.weight)}
    for step in range(steps):
        opt.zero_grad()
        _sharded_backward(model, step, rank, world, mixed)
        spy.seen, spy.updated = {}, set()
        opt.step()
        # the reference: one pass per rank's part of the global batch
        x, y = _batch(step)
        ref_opt.zero_grad()
        passes = []
        for r in range(world):
            ref_opt._stats = {}
            _loss(ref, _part(x, r, world), _part(y, r, world)).backward()
            passes.append(ref_opt._stats)
        # statistics on steps that record them; factor updates from the second step on
        # (the first only sets the factors to the identity), each sharded layer's on exactly
        # one rank of its shard group, an unsharded layer's on every rank
        recorded = step % kw["inv_freq"] == 0 or step < kw["warmup_steps"]
        assert set(spy.seen) == (set(names) if recorded else set()), step
        updaters = _over_group(sorted(spy.updated), group)
        for lay in opt._layers:
            count = sum(lay.name in u for u in updaters)
            want = 0 if step == 0 or not recorded else 1 if lay.name in sharded else len(updaters)
            assert count == want, (step, lay.name, updaters)
        used = dict(passes[0]) if step == 0 else {}  # unused at step 0, but present
        for i, name in enumerate(names):
            if step == 0 or name not in spy.seen:
                continue
            for k, got in enumerate(spy.seen[name]):
                per_pass = [p[i][k] for p in passes]
                want = sum(per_pass[1:], per_pass[0].clone()) / world
                tol = (world - 1) * EPS * sum(v.abs() for v in per_pass) / world
                assert ((got - want).abs() <= tol).all(), (step, name, k)
            used[i] = [*spy.seen[name], 1]
        # the same statistics and gradients: bit for bit
        ref_opt._stats = used
        for p, q in zip(ref.parameters(), model.parameters()):
            p.grad = _full(q.grad).clone()
        ref_opt.step()
        for (n, p), q in zip(ref.named_parameters(), model.parameters()):
            assert torch.equal(_full(q.detach()), p.detach()), (step, n)
    # factors: only the rank that keeps a layer's factors holds them, equal to the
    # reference's; its diagnostics too (the others report no factors)
    keys = ("left", "right", "counts", "reset_left", "reset_right")
    holders = _over_group([lay.name for lay in opt._layers if "left" in opt.state[lay.weight]],
                          group)  # fmt: skip
    diags = opt.diagnostics()
    for d, lay, ref_lay in zip(diags, opt._layers, ref_opt._layers):
        st, ref_st = opt.state[lay.weight], ref_opt.state[ref_lay.weight]
        on = [r for r, h in enumerate(holders) if lay.name in h]
        if lay.name in sharded:
            assert len(on) == 1 and d["factors_on"] == on[0], (lay.name, holders, d)
        else:
            assert len(on) == len(holders) and d["factors_on"] is None, (lay.name, holders)
        e = dict(ref_opt.diagnostics()[names.index(lay.name)], layer=d["layer"])
        if "left" in st:
            for key in keys:
                assert torch.equal(st[key], ref_st[key]), (lay.name, key)
            assert d == dict(e, factors_on=d["factors_on"]), (d, e)
        else:
            assert not set(keys) & set(st), (lay.name, sorted(st))
            none = dict.fromkeys(("left", "right", "sm_updates_left", "sm_updates_right",
                                  "resets_left", "resets_right"))  # fmt: skip
            assert d == dict(e, factors_on=d["factors_on"], **none), (d, e)
    for d, e in zip(diags[len(names) :], ref_opt.diagnostics()[len(names) :]):
        assert d == e, (d, e)
    if hasattr(next(model.parameters()), "to_local"):
        # a single-process state dict: the base optimizer's whole-tensor state is refused
        with pytest.raises(ValueError, match="base optimizer state .* does not match"):
            opt.load_state_dict(ref_opt.state_dict())


def _train(model, opt, steps, mixed):
    rank, world = dist.get_rank(), dist.get_world_size()
    for step in steps:
        opt.zero_grad()
        _sharded_backward(model, step, rank, world, mixed)
        opt.step()


def _check_mkor_dcp(mesh, tmp, label, mixed):
    path = os.path.join(tmp, f"mkor-{label}-{mixed}")
    model = _fsdp_model(mesh, mixed)
    opt = MKOR(model, **MKOR_KW)
    _train(model, opt, range(3), mixed)
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _train(model, opt, range(3, 7), mixed)

    other = _fsdp_model(mesh, mixed)
    other.load_state_dict(saved)
    opt2 = MKOR(other, **MKOR_KW)
    sd = {"optim": get_optimizer_state_dict(other, opt2)}
    dcp.load(sd, checkpoint_id=path)
    set_optimizer_state_dict(other, opt2, sd["optim"])
    _train(other, opt2, range(3, 7), mixed)
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(_full(a.detach()), _full(b.detach())), label
    for lay, lay2 in zip(opt._layers, opt2._layers):  # factors where they were
        assert ("left" in opt.state[lay.weight]) == ("left" in opt2.state[lay2.weight])

    # the factors are saved under the shard index of the rank keeping them: a state dict
    # of another shard count is refused, naming the state and the shard this run holds
    sd = opt2.state_dict()
    for st in sd["state"].values():
        if isinstance(st.get("left"), dict):
            (key,) = st["left"]
            st["left"] = {"shard_0_of_3": st["left"][key]}
            with pytest.raises(ValueError, match="'left'.*saved per shard.*same number of shards"):
                opt2.load_state_dict(sd)
            break


def _check_mkor_reshard(meshes, tmp):
    """Saved with 4 shards (FSDP), loaded with 2 (HSDP 2 x 2): the per-shard state is not
    found, and the error names the shard this run looks for."""
    (_, fsdp), (_, hsdp) = meshes
    path = os.path.join(tmp, "mkor-reshard")
    model = _fsdp_model(fsdp)
    opt = MKOR(model, **MKOR_KW)
    _train(model, opt, range(3), False)
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
    other = _fsdp_model(hsdp)
    opt2 = MKOR(other, **MKOR_KW)
    sd = {"optim": get_optimizer_state_dict(other, opt2)}
    with pytest.raises(CheckpointException, match=r"Missing key.*shard_\d_of_2"):
        dcp.load(sd, checkpoint_id=path)


def _check_adahessian(mesh):
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _fsdp_model(mesh)
    with pytest.raises(ValueError) as err:
        AdaHessian(model.named_parameters())
    msg = str(err.value)
    for part in ("does not support DTensor", "'0.weight'", "reduce-scatter outside autograd",
                 "no graph", "out of fully_shard", "process_group=", "DDP fails"):  # fmt: skip
        assert part in msg, (part, msg)
    # the reason, as a fact of FSDP2: its sharded gradients carry no graph
    x, y = _batch(0)
    _loss(model, _part(x, rank, world), _part(y, rank, world)).backward(create_graph=True)
    assert all(p.grad is not None and p.grad.grad_fn is None for p in model.parameters())

    # plain parameters with a sharded module between them and the loss: a clear error
    model = _model()
    fully_shard(model[5], mesh=mesh)
    plain = list(model[0].parameters()) + list(model[3].parameters())
    before = [p.detach().clone() for p in plain]
    opt = AdaHessian(plain)
    _loss(model, x, y).backward(create_graph=True)
    with pytest.raises(RuntimeError, match="storage was freed.*out of fully_shard"):
        opt.step()
    assert not opt.state and all(torch.equal(p, b) for p, b in zip(plain, before))

    # sharded modules only before them: works, as one process on the same batch
    model, ref = _model(), _model()
    fully_shard(model[0], mesh=mesh)
    plain = list(model[3].parameters()) + list(model[5].parameters())
    ref_plain = list(ref[3].parameters()) + list(ref[5].parameters())
    opt, ref_opt = AdaHessian(plain, lr=0.05), AdaHessian(ref_plain, lr=0.05)
    for step in range(3):
        x, y = _batch(step)
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            _loss(m, _part(x, rank, world), _part(y, rank, world)).backward(create_graph=True)
            o.step()
        for p, q in zip(plain, ref_plain):
            assert torch.equal(p, q), step


def _check_adahessian_data_parallel():
    """``process_group=``: a whole model on every rank, gradients and Hessian estimates
    averaged over the ranks. The reference is one process on the global batch's loss
    written as the mean of the ranks' parts' losses: on 2 ranks both sides form
    ``(x_0 + x_1) / 2`` of the same parts (autograd scales each part by the exact 1/2),
    so parameters agree bit for bit."""
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2
    model, ref = _model(), _model()
    kw = dict(lr=0.05, weight_decay=0.01, spatial_average="conv")
    opt = AdaHessian(model.parameters(), process_group=dist.group.WORLD, **kw)
    ref_opt = AdaHessian(ref.parameters(), **kw)
    for step in range(4):
        x, y = _batch(step)
        opt.zero_grad()
        _loss(model, _part(x, rank, world), _part(y, rank, world)).backward(create_graph=True)
        opt.step()
        ref_opt.zero_grad()
        parts = [_loss(ref, _part(x, r, world), _part(y, r, world)) for r in range(world)]
        ((parts[0] + parts[1]) / 2).backward(create_graph=True)
        ref_opt.step()
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.equal(p, q), step
    # a non-finite gradient on one rank: every rank skips the step
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    if rank == 1:
        next(model.parameters()).grad[0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(TypeError, match="process_group must be None or a"):
        AdaHessian(model.parameters(), process_group="world")


def _check_mkor_bad_input(mesh):
    other = init_device_mesh("cpu", (1, dist.get_world_size()))
    a = torch.nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))
    b = torch.nn.Parameter(distribute_tensor(torch.randn(4, 3), other, [Replicate(), Shard(0)]))
    with pytest.raises(ValueError, match="2 device meshes.*one mesh"):
        MKOR([a, b])
    # a layer whose weight and bias are laid out differently is left to the base optimizer
    lin = torch.nn.Linear(3, 4)
    lin.weight = torch.nn.Parameter(distribute_tensor(lin.weight.detach(), mesh, [Shard(0)]))
    with pytest.warns(UserWarning, match="laid out differently"):
        opt = MKOR(lin)
    diag = opt.diagnostics()
    assert not any(d["preconditioned"] for d in diag)
    assert "laid out differently" in diag[0]["reason"]


def _check_owners_hook(mesh):
    """``apply_whole(..., owners=...)``: the caller's owners are used (whatever the costs
    say), the result is ``fn`` of the whole matrices; owners out of range are refused."""
    world = mesh.size()
    gen = torch.Generator().manual_seed(7)
    full = [torch.randn(*s, generator=gen) for s in ((9, 4), (2, 3), (5, 5))]
    items = []
    for i, f in enumerate(full):
        d = distribute_tensor(f, mesh, [Shard(0)])
        items.append((d.to_local(), placement_of(d, f"t{i}")))
    owners = [world - 1, 0, world - 1]  # the largest and the smallest on the last rank
    seen = []

    def fn(mats):
        seen.extend(tuple(m.shape) for m in mats)
        return [m @ m.mT @ m for m in mats]

    out = apply_whole(items, fn, owners=owners)
    mine = [tuple(f.shape) for f, r in zip(full, owners) if r == dist.get_rank()]
    assert seen == mine, (seen, mine)
    assert plan_whole(items, owners=owners).owners == owners
    for (_, pl), f, o in zip(items, full, out):
        assert torch.equal(o, (f @ f.mT @ f)[pl.rows()]), pl.name
    for bad in ([0, 0], [0, world, 0], [0, None, 0]):
        with pytest.raises(ValueError, match="owners"):
            plan_whole(items, owners=bad)


def _check_named(rank, world, tmp, names):
    meshes = _meshes(world)
    for label, mesh in meshes:
        for mixed in (False, True) if world == 2 else (False,):
            if "mkor" in names:
                for variant in ("official", "paper"):
                    mark(f"mkor:{label}:{mixed}:{variant}")
                    _check_mkor(_fsdp_model(mesh, mixed), dict(MKOR_KW, variant=variant), mixed)
            if "dcp" in names:
                mark(f"dcp:{label}:{mixed}")
                _check_mkor_dcp(mesh, tmp, label, mixed)
    if chosen(names, "reshard"):
        _check_mkor_reshard(meshes, tmp)
    if chosen(names, "ddp"):
        _check_mkor(DistributedDataParallel(_model()), MKOR_KW)
    if chosen(names, "adahessian"):
        _check_adahessian(meshes[0][1])
    if chosen(names, "adahessian-dp"):
        _check_adahessian_data_parallel()
    if chosen(names, "owners"):
        _check_owners_hook(meshes[0][1])
    if chosen(names, "bad"):
        _check_mkor_bad_input(meshes[0][1])
    return list(names)


@pytest.mark.distributed
def test_mkor_and_adahessian_two_ranks(tmp_path):
    names = ("mkor", "dcp", "ddp", "adahessian", "adahessian-dp", "owners", "bad")
    run_ranks(_check_named, 2, tmp_path, names)


@pytest.mark.distributed
@pytest.mark.slow
def test_mkor_fsdp_and_hsdp_four_ranks(tmp_path):
    run_ranks(_check_named, 4, tmp_path, ("mkor", "dcp", "reshard"))
