"""FSDP2 / HSDP shards for AdaGradNorm, SCALE and M-FAC: reductions over the shards.

Real gloo processes: 2 ranks (FSDP, uneven shards: 7 rows as 4 + 3) in the default run; 4
ranks (FSDP with 2 + 2 + 2 + 1 rows and an empty shard of a 3-row tensor, HSDP 2 x 2) are
slow. A plain (unsharded) parameter sits next to the sharded ones; every reference is the
single-process optimizer fed the whole gradients. A NaN in one shard makes every rank
skip the step (the reference, seeing the whole gradient, skips it too).

What is compared, and the tolerance where a sum crosses shards (``eps``: float32's; ``t``:
steps taken; ``|Δθ_t|``: the reference's step; every bound adds ``2 eps |θ_t|`` per step
for the final rounding of the parameter, as in tests/test_fsdp.py):

* **AdaGradNorm, row mode**: local; parameters and statistics bit for bit.
  **Scalar mode**: a sharded tensor's squared norm is a float64 sum over its shards; it
  rounds to float32 within one ulp of the reference's, so every accumulator stays within
  ``2 t eps`` relative (checked), the step size ``1 / (b + eps)`` within ``(t + 1) eps``
  and its products within ``(t + 3) eps``: ``|Δθ| <= Σ_t ((t + 4) eps |Δθ_t| + 2 eps |θ_t|)``.
  The share of ``b²`` is the same on every rank (checked).
* **SCALE**: per-row scales, momentum and AdamW are local: bit for bit (states too). A
  sharded embedding's per-column scale sums ``n`` rows over the shards (float64) where the
  reference sums them in float32 (relative error up to ``n eps / 2``):
  ``|Δθ| <= Σ_t ((n + 4) eps |Δθ_t| + 2 eps |θ_t|)``. Also on a real ``fully_shard`` model
  built with ``SCALE.from_model`` (roles found on the sharded model).
* **M-FAC, dense window**: the ring buffer and row exponents are bit for bit the
  reference's entries. Gram entries are dot products of length ``n <= N`` (the largest
  tensor) summed in another order: ``|ΔK_ij| <= 2 N eps Σ_k |G_ik| |G_jk| =: E_ij``
  (checked). With ``M = λ I + s K`` (``M ⪰ λ I``) and ``δ = s ‖E‖_F``, the coefficients
  ``a = M⁻¹ e`` move by ``‖Δa‖ <= δ / (λ − δ) ‖a‖`` (plus the float64 solves' rounding,
  ``4 m² eps64 cond(M) ‖a‖``), the direction ``u = Gᵀ a`` by
  ``|Δu_j| <= ‖G_{:j}‖ ‖Δa‖ + 2 (m + 1) eps (|G|ᵀ |a|)_j`` (``a``'s cast to float32 and
  the float32 sum over ``m`` rows), and ``|Δθ| <= Σ_t (lr |Δu| + 2 eps (|θ_t| + |Δθ_t|))``
  elementwise (no weight decay, no momentum: the window does not depend on ``θ``).
  **Blocked window**: blocks cut inside each shard: bit for bit single-process M-FAC on
  clones of the shards (momentum, weight decay); when ``block_size`` divides every shard's
  entries but the last, the blocks are the whole tensor's: within the same bound per block
  (``N = block_size``) of single-process M-FAC on the whole tensor.
* **checkpoints**: ``get/set_optimizer_state_dict`` with ``dcp.save`` / ``dcp.load``, then
  the same steps as the original: bit-identical parameters. Into another number of shards
  (4 -> 2): AdaGradNorm's scalar shares, SCALE's state and M-FAC's dense window reshard
  (checked against the saved state); state cut per shard (row statistics of AdaGradNorm,
  blocked M-FAC windows) fails with an error naming the shard.
* **bad input**: a ``Shard(1)`` parameter raises ``ValueError`` naming it and its placement.
"""

from __future__ import annotations

import copy
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
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor

from _spawn import chosen, mark, run_ranks  # tests/ is on sys.path
from secondorder import MFAC, SCALE, AdaGradNorm
from test_fsdp import EPS, _Holder, _local_rows, _meshes, _shard_count, _shard_rows

EPS64 = torch.finfo(torch.float64).eps


# ------------------------------------------------------------------------ helpers
def _is_dt(p):
    return hasattr(p, "full_tensor")


def _full(p):
    return p.full_tensor() if _is_dt(p) else p.detach()


def _local(p):
    return p.to_local() if _is_dt(p) else p.detach()


def _refs(holder):
    return [torch.nn.Parameter(f.clone()) for f in holder.full]


def _feed(holder, refp, step, nan=False):
    for q, g in zip(refp, holder.set_grads(step, nan=nan)):
        q.grad = g.clone()


def _same_on_all_ranks(x):
    hi, lo = x.detach().double().clone(), x.detach().double().clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return torch.equal(hi, lo)


def _local_flat(full_rows_last, p):
    """This rank's part of ``(k, numel)`` state laid out along the flattened parameter."""
    k = full_rows_last.shape[0]
    t = full_rows_last.reshape(k, *p.shape).transpose(0, 1)
    return _local_rows(t, p).transpose(0, 1).reshape(k, -1)


# ------------------------------------------------------------------- AdaGradNorm
AGN_ROW = dict(lr=0.3, mode="row", weight_decay=0.01, initial_accumulator=0.1)
AGN_SCALAR = dict(lr=0.3, mode="scalar", initial_accumulator=0.1)


def _check_adagradnorm(mesh):
    # row mode: every row lives on one shard -> bit for bit
    holder = _Holder(mesh)
    refp = _refs(holder)
    opt, ref = AdaGradNorm(holder.parameters(), **AGN_ROW), AdaGradNorm(refp, **AGN_ROW)
    for step in range(5):
        _feed(holder, refp, step, nan=step == 2)
        opt.step()
        ref.step()
        for i, (p, q) in enumerate(zip(holder.parameters(), refp)):
            assert torch.equal(_full(p), q), ("row", step, i)
        for p, q in zip(holder.sharded(), refp):
            assert torch.equal(opt.state[p]["sum_sq"], _local_rows(ref.state[q]["sum_sq"], p))
    assert opt.skipped_steps == ref.skipped_steps == 1
    # a single-process state dict loads into the shards: each rank takes its rows
    opt2 = AdaGradNorm(holder.parameters(), **AGN_ROW)
    opt2.load_state_dict(ref.state_dict())
    for p in holder.parameters():
        assert torch.equal(opt2.state[p]["sum_sq"], opt.state[p]["sum_sq"])

    # scalar mode: squared norms summed over the shards (module docstring)
    holder = _Holder(mesh)
    refp = _refs(holder)
    opt, ref = AdaGradNorm(holder.parameters(), **AGN_SCALAR), AdaGradNorm(refp, **AGN_SCALAR)
    bound, t = [0.0] * 4, 0
    for step in range(5):
        nan = step == 2
        _feed(holder, refp, step, nan=nan)
        before = [q.detach().clone() for q in refp]
        opt.step()
        ref.step()
        t += not nan
        for i, (p, q, q0) in enumerate(zip(holder.parameters(), refp, before)):
            bound[i] += ((t + 4) * (q - q0).abs().max() + 2 * q.abs().max()).item() * EPS
            err = (_full(p) - q).abs().max().item()
            assert err <= bound[i], ("scalar", step, i, err, bound[i])
            share, rshare = opt.state[p]["sum_sq"], ref.state[q]["sum_sq"]
            assert share.dim() == 0 and _same_on_all_ranks(share), (step, i)
            assert abs(share.item() - rshare.item()) <= 2 * t * EPS * rshare.item(), (step, i)
        assert nan == torch.equal(holder.w.full_tensor(), before[0])  # moved unless skipped
    assert opt.skipped_steps == ref.skipped_steps == 1
    rec, rrec = opt.diagnostics()[0], ref.diagnostics()[0]
    assert abs(rec["accumulator"] - rrec["accumulator"]) <= 2 * t * EPS * rrec["accumulator"]


# ------------------------------------------------------------------------- SCALE
SCALE_KW = dict(lr=0.05, weight_decay=0.01, momentum=0.8)


def _scale_groups(ps, config):
    w, v, u, plain = ps
    if config == "embeddings":  # two sharded tables (one empty shard on 4): one all-reduce
        roles = {"embedding": [w, u], "output": [plain]}
    else:  # sharded hidden / output, a plain embedding table
        roles = {"hidden": [w], "output": [u], "embedding": [plain]}
    return [{"params": ps, "role": r} for r, ps in roles.items()] + [
        {"params": [v], "role": "vector"}
    ]


def _check_scale(mesh):
    for config in ("embeddings", "rows"):
        holder = _Holder(mesh)
        refp = _refs(holder)
        ps = list(holder.parameters())
        opt = SCALE(_scale_groups(ps, config), **SCALE_KW)
        ref = SCALE(_scale_groups(refp, config), **SCALE_KW)
        role = {id(p): g["role"] for g in opt.param_groups for p in g["params"]}
        bound = [0.0] * 4
        for step in range(5):
            nan = step == 3
            _feed(holder, refp, step, nan=nan)
            before = [q.detach().clone() for q in refp]
            opt.step()
            ref.step()
            for i, (p, q, q0) in enumerate(zip(ps, refp, before)):
                if role[id(p)] == "embedding" and _is_dt(p):
                    n = q.shape[0]
                    bound[i] += ((n + 4) * (q - q0).abs().max() + 2 * q.abs().max()).item() * EPS
                    err = (_full(p) - q).abs().max().item()
                    assert err <= bound[i], (config, step, i, err, bound[i])
                    assert nan == torch.equal(q, q0)
                else:
                    assert torch.equal(_full(p), q), (config, step, i)
                for key, value in opt.state.get(p, {}).items():
                    rv = ref.state[q][key]
                    want = _local_rows(rv, p) if _is_dt(p) and rv.dim() else rv
                    assert torch.equal(value, want), (config, step, i, key)
        assert opt.skipped_steps == ref.skipped_steps == 1


class _EmbNet(torch.nn.Module):
    """An embedding table (7 rows: uneven shards), a hidden layer and an output layer (5 and
    3 rows: empty shards on 4 ranks)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(7, 6)
        self.hid = torch.nn.Linear(6, 5)
        self.out = torch.nn.Linear(5, 3)

    def forward(self, ids):
        return self.out(torch.tanh(self.hid(self.emb(ids).mean(1))))


def _emb_batch(step, n=8):
    gen = torch.Generator().manual_seed(300 + step)
    return torch.randint(0, 7, (n, 4), generator=gen), torch.randn(n, 3, generator=gen)


def _check_scale_from_model(mesh):
    torch.manual_seed(0)
    model = _EmbNet()
    ref_model = copy.deepcopy(model)
    for m in (model.emb, model.hid, model.out):
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt, ref = SCALE.from_model(model, **SCALE_KW), SCALE.from_model(ref_model, **SCALE_KW)
    roles = {id(p): g["role"] for g in opt.param_groups for p in g["params"]}
    assert roles[id(model.emb.weight)] == "embedding" and _is_dt(model.emb.weight)
    assert roles[id(model.out.weight)] == "output" and roles[id(model.hid.weight)] == "hidden"
    assert [g["role"] for g in opt.param_groups] == [g["role"] for g in ref.param_groups]
    pairs = list(zip(model.parameters(), ref_model.parameters()))
    rank, world = dist.get_rank(), dist.get_world_size()
    bound = 0.0
    for step in range(4):
        ids, y = _emb_batch(step)
        per = ids.shape[0] // world
        opt.zero_grad()
        out = model(ids[rank * per : (rank + 1) * per])
        torch.nn.functional.mse_loss(out, y[rank * per : (rank + 1) * per]).backward()
        for p, q in pairs:
            q.grad = p.grad.full_tensor()
        q0 = ref_model.emb.weight.detach().clone()
        opt.step()
        ref.step()
        q = ref_model.emb.weight
        bound += ((7 + 4) * (q - q0).abs().max() + 2 * q.abs().max()).item() * EPS
        for p, q in pairs:
            if p is model.emb.weight:
                err = (p.full_tensor() - q).abs().max().item()
                assert err <= bound, (step, err, bound)
            else:
                assert torch.equal(p.full_tensor(), q), step


# ------------------------------------------------------------------------- M-FAC
MFAC_DENSE = dict(lr=0.1, num_grads=3, damp=0.5)
MFAC_BLOCK = dict(MFAC_DENSE, block_size=4, momentum=0.9, weight_decay=0.01)


def _window(st):
    """The window of a reference state in true units (float64): ``grads · 2**row_exp``."""
    return st["grads"].double() * torch.exp2(st["row_exp"].double()).unsqueeze(-1)


def _gram_bound(g, n):
    """``E = 2 n eps |G| |G|ᵀ``: how far two float32 summation orders of the Gram matrix of
    the window ``g`` (``(..., m, d)``, dot products of length ``n``) may differ."""
    return 2 * n * EPS * (g.abs() @ g.abs().transpose(-1, -2))


def _direction_bound(g, gram, slot, s, lam, n):
    """Elementwise bound on ``|Δu|`` (module docstring) from the reference's window ``g``
    (``(..., m, d)``, true units) and Gram matrix ``gram`` (``(..., m, m)``)."""
    m = gram.shape[-1]
    eye = torch.eye(m, dtype=torch.float64)
    mat = lam * eye + s * gram
    e = torch.zeros(gram.shape[:-1], dtype=torch.float64)
    e[..., slot] = 1.0
    a = torch.linalg.solve(mat, e)
    delta = s * torch.linalg.matrix_norm(_gram_bound(g, n))
    assert bool((delta < lam / 2).all()), "the bound needs a damping above the Gram's rounding"
    cond = (lam + s * gram.diagonal(dim1=-2, dim2=-1).sum(-1)) / lam
    anorm = torch.linalg.vector_norm(a, dim=-1)
    da = delta / (lam - delta) * anorm + 4 * m * m * EPS64 * cond * anorm
    cols = torch.linalg.vector_norm(g, dim=-2)
    rounding = (a.abs().unsqueeze(-2) @ g.abs()).squeeze(-2)
    return cols * da.unsqueeze(-1) + 2 * (m + 1) * EPS * rounding


def _check_mfac_dense(mesh):
    holder = _Holder(mesh)
    refp = _refs(holder)
    kw = MFAC_DENSE
    opt, ref = MFAC(holder.parameters(), **kw), MFAC(refp, **kw)
    bound = [torch.zeros(f.shape, dtype=torch.float64) for f in holder.full]
    biggest = max(f.numel() for f in holder.full)
    for step in range(6):
        nan = step == 2
        _feed(holder, refp, step, nan=nan)
        before = [q.detach().clone() for q in refp]
        opt.step()
        ref.step()
        if not nan:
            states = [ref.state[q] for q in refp]
            t = int(states[0]["step"])
            win = torch.cat([_window(st) for st in states], dim=1)
            gram = sum(st["gram"] for st in states)
            m = kw["num_grads"]
            du = _direction_bound(win, gram, (t - 1) % m, 1.0 / m, kw["damp"], biggest)
            for i, (q, q0, du_i) in enumerate(zip(refp, before, du.split(
                [q.numel() for q in refp]))):  # fmt: skip
                move = (q - q0).abs().double()
                bound[i] += kw["lr"] * du_i.view(q.shape) + 2 * EPS * (q.abs() + move)
        for i, (p, q) in enumerate(zip(holder.parameters(), refp)):
            err = (_full(p) - q).abs().double()
            assert bool((err <= bound[i]).all()), (step, i, (err - bound[i]).max().item())
        for p, q in zip(holder.sharded(), refp):
            st, rst = opt.state[p], ref.state[q]
            assert torch.equal(st["grads"], _local_flat(rst["grads"], p)), step
            assert torch.equal(st["row_exp"], rst["row_exp"]), step
            diff = (st["gram"] - rst["gram"]).abs()
            assert bool((diff <= _gram_bound(_window(rst), q.numel())).all()), step
            assert _same_on_all_ranks(st["gram"]), step
    assert opt.skipped_steps == ref.skipped_steps == 1
    assert not torch.equal(holder.w.full_tensor(), holder.full[0])
    d, rd = opt.diagnostics()[0], ref.diagnostics()[0]
    assert (d["step"], d["filled"], d["rank"]) == (rd["step"], rd["filled"], rd["rank"])

    # gradients far outside float32's safe range (2**±100): every shard stores its rows
    # with the whole tensor's exponent (shard 0 holds the largest entry, 2**103)
    holder3 = _Holder(mesh)
    refp3 = _refs(holder3)
    opt3, ref3 = MFAC(holder3.parameters(), **kw), MFAC(refp3, **kw)
    grads = holder3.set_grads(7)
    grads[0].mul_(2.0**100)[0, 0] = 2.0**103
    grads[2].mul_(2.0**-100)
    for p, q, g in zip(holder3.parameters(), refp3, grads):
        q.grad = g.clone()
        p.grad = distribute_tensor(g, mesh, p.placements) if _is_dt(p) else g.clone()
    opt3.step()
    ref3.step()
    for p, q in zip(holder3.sharded(), refp3):
        st, rst = opt3.state[p], ref3.state[q]
        assert torch.equal(st["row_exp"], rst["row_exp"])
        assert torch.equal(st["grads"], _local_flat(rst["grads"], p))
        diff = (st["gram"] - rst["gram"]).abs()
        assert bool((diff <= _gram_bound(_window(rst), q.numel())).all())
    assert ref3.state[refp3[0]]["row_exp"][0] == 104 and ref3.state[refp3[2]]["row_exp"][0] < 0

    # a single-process state dict loads into the shards: the window sliced, Gram kept
    opt2 = MFAC(holder.parameters(), **kw)
    opt2.load_state_dict(ref.state_dict())
    for p, q in zip(holder.sharded(), refp):
        st, rst = opt2.state[p], ref.state[q]
        assert torch.equal(st["grads"], _local_flat(rst["grads"], p))
        assert torch.equal(st["gram"], rst["gram"]) and torch.equal(st["step"], rst["step"])


def _aligned(rows, cols, shards, b):
    """Whether no block of ``b`` entries of the whole tensor straddles a shard boundary."""
    return all(r * cols % b == 0 for r in _shard_rows(rows, shards))


def _check_mfac_blocks(mesh):
    # blocks cut inside each shard: single-process M-FAC on the shards as tensors, exactly
    holder = _Holder(mesh)
    ps = list(holder.parameters())
    shards = [torch.nn.Parameter(_local(p).clone()) for p in ps]
    opt, ref = MFAC(ps, **MFAC_BLOCK), MFAC(shards, **MFAC_BLOCK)
    for step in range(5):
        holder.set_grads(step)
        for s, p in zip(shards, ps):
            s.grad = _local(p.grad).clone()
        opt.step()
        ref.step()
        for i, (s, p) in enumerate(zip(shards, ps)):
            assert torch.equal(_local(p), s), (step, i)
    assert opt.state_bytes() == ref.state_bytes()

    # blocks that do not straddle shards are the whole tensor's (module docstring)
    b, kw = 5, dict(MFAC_DENSE, block_size=5)
    holder = _Holder(mesh)
    refp = _refs(holder)
    ps = list(holder.parameters())
    opt, ref = MFAC(ps, **kw), MFAC(refp, **kw)
    count = _shard_count(mesh)
    checked = [
        i
        for i, f in enumerate(holder.full[:3])
        if _aligned(f.shape[0], f[0].numel() if f.dim() > 1 else 1, count, b)
    ]
    assert 0 in checked
    bound = [torch.zeros(f.shape, dtype=torch.float64) for f in holder.full]
    for step in range(5):
        _feed(holder, refp, step)
        before = [q.detach().clone() for q in refp]
        opt.step()
        ref.step()
        for i in checked:
            q, st = refp[i], ref.state[refp[i]]
            t = int(st["step"])
            m = kw["num_grads"]
            du = _direction_bound(_window(st), st["gram"], (t - 1) % m, 1 / m, kw["damp"], b)
            du = du.reshape(-1)[: q.numel()].view(q.shape)
            move = (q - before[i]).abs().double()
            bound[i] += kw["lr"] * du + 2 * EPS * (q.abs() + move)
            err = (_full(ps[i]) - q).abs().double()
            assert bool((err <= bound[i]).all()), (step, i, (err - bound[i]).max().item())


# ------------------------------------------------------------------- checkpoints
def _makers():
    return {
        "agn-scalar": lambda h: AdaGradNorm(h.parameters(), **AGN_SCALAR),
        "agn-row": lambda h: AdaGradNorm(h.parameters(), **AGN_ROW),
        "scale": lambda h: SCALE(_scale_groups(list(h.parameters()), "embeddings"), **SCALE_KW),
        "mfac-dense": lambda h: MFAC(h.parameters(), **dict(MFAC_DENSE, momentum=0.5)),
        "mfac-block": lambda h: MFAC(h.parameters(), **MFAC_BLOCK),
    }


def _train(holder, opt, steps):
    for step in steps:
        holder.set_grads(step)
        opt.step()


#: how sharded state appears in ``state_dict()``: a DTensor, a plain tensor (the same on
#: every shard) or a per-shard entry
FORMS = {
    "agn-scalar": {"sum_sq": "plain"},
    "agn-row": {"sum_sq": "dtensor"},
    "scale": {"exp_avg": "dtensor", "exp_avg_sq": "dtensor"},
    "mfac-dense": {"grads": "dtensor", "gram": "plain", "row_exp": "plain"},
    "mfac-block": {"grads": "per-shard", "gram": "per-shard", "momentum_buffer": "dtensor"},
}


def _form(v):
    return "dtensor" if _is_dt(v) else "per-shard" if isinstance(v, dict) else "plain"


def _check_dcp_round_trip(mesh, tmp, label):
    for name, make in _makers().items():
        mark(f"dcp:{label}:{name}")
        path = os.path.join(tmp, f"{label}-{name}")
        holder = _Holder(mesh)
        opt = make(holder)
        _train(holder, opt, range(3))
        state = opt.state_dict()["state"]
        for key, form in FORMS[name].items():
            assert {_form(st[key]) for st in state.values() if key in st} >= {form}, (name, key)
        dcp.save({"optim": get_optimizer_state_dict(holder, opt)}, checkpoint_id=path)
        saved_params = {k: v.detach().clone() for k, v in holder.state_dict().items()}
        _train(holder, opt, range(3, 6))

        other = _Holder(mesh)
        other.load_state_dict(saved_params)
        opt2 = make(other)
        sd = {"optim": get_optimizer_state_dict(other, opt2)}
        dcp.load(sd, checkpoint_id=path)
        set_optimizer_state_dict(other, opt2, sd["optim"])
        _train(other, opt2, range(3, 6))
        for a, b in zip(holder.parameters(), other.parameters()):
            assert torch.equal(_local(a), _local(b)), (label, name)
        for p, q in zip(holder.parameters(), other.parameters()):
            for key, v in opt.state[p].items():
                assert torch.equal(v, opt2.state[q][key]), (label, name, key)


#: per optimizer, how each state key of a sharded parameter reshards: "rows" (this rank's
#: rows of the saved tensor), "flat" (its part of ``(k, numel)`` state), "same" (equal on
#: every shard); ``None``: the load fails naming the shard (state cut per shard)
RESHARD = {
    "agn-scalar": {"sum_sq": "same", "step": "same"},
    "agn-row": {"sum_sq": "rows", "step": "same"},
    "scale": {"exp_avg": "rows", "exp_avg_sq": "rows", "momentum_buffer": "rows", "step": "same"},
    "mfac-dense": {"grads": "flat", "gram": "same", "row_exp": "same", "step": "same",
                   "momentum_buffer": "rows"},  # fmt: skip
    "mfac-block": None,
}


def _check_reshard(meshes, tmp):
    """Save with 4 shards (FSDP), load with 2 (HSDP 2 x 2)."""
    (_, fsdp), (_, hsdp) = meshes
    for name, make in _makers().items():
        mark(f"reshard:{name}")
        path = os.path.join(tmp, f"reshard-{name}")
        holder = _Holder(fsdp)
        opt = make(holder)
        _train(holder, opt, range(3))
        saved = get_optimizer_state_dict(holder, opt)
        dcp.save({"optim": saved}, checkpoint_id=path)
        other = _Holder(hsdp)
        opt2 = make(other)
        sd = {"optim": get_optimizer_state_dict(other, opt2)}
        how = RESHARD[name]
        if how is None:
            with pytest.raises(CheckpointException, match=r"Missing key.*shard_\d_of_2"):
                dcp.load(sd, checkpoint_id=path)
            continue
        full = {  # the same collectives on every rank, in the same order
            fqn: {k: (v.full_tensor() if _is_dt(v) else v) for k, v in st.items()}
            for fqn, st in saved["state"].items()
        }
        dcp.load(sd, checkpoint_id=path)
        set_optimizer_state_dict(other, opt2, sd["optim"])
        for fqn, p in zip(("w", "v", "u"), other.sharded()):
            st = opt2.state[p]
            assert set(st) == set(full[fqn]), (name, fqn)
            for key, value in st.items():
                want = full[fqn][key]
                if how.get(key) == "rows":
                    want = _local_rows(want, p)
                elif how.get(key) == "flat":
                    want = _local_flat(want.reshape(want.shape[0], -1), p)
                else:
                    assert how.get(key) == "same", (name, key)
                assert torch.equal(value, want), (name, fqn, key)
        _train(other, opt2, range(3, 5))  # and it trains on


# ------------------------------------------------------------------- collectives
#: all-reduces per step (the shared non-finite flag included; one param group, one mesh),
#: as docs/distributed.md states them
COLLECTIVES = {
    "agn-scalar": 2,
    "agn-row": 1,
    "scale": 2,  # the two sharded embedding tables share one all-reduce
    "mfac-dense": 3,  # row maxima, Gram rows
    "mfac-block": 1,
}


@contextmanager
def _counting_all_reduces():
    """The sizes of the all-reduces started inside the block."""
    calls, all_reduce = [], dist.all_reduce

    def counting(t, *args, **kwargs):
        calls.append(t.numel())
        return all_reduce(t, *args, **kwargs)

    dist.all_reduce = counting
    try:
        yield calls
    finally:
        dist.all_reduce = all_reduce


def _check_collectives(mesh):
    for name, make in _makers().items():
        holder = _Holder(mesh)
        opt = make(holder)
        holder.set_grads(0)
        with _counting_all_reduces() as calls:
            opt.step()
        assert len(calls) == COLLECTIVES[name], (name, calls)


# --------------------------------------------------------------------- bad input
def _check_bad_input(mesh):
    w = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)] * mesh.ndim))
    for cls in (AdaGradNorm, SCALE, MFAC):
        with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*Shard\(dim=1\)"):
            cls([w])
        with pytest.raises(ValueError, match=r"parameter 'enc\.w'.*Shard\(dim=1\)"):
            cls([("enc.w", w)])


# ------------------------------------------------------------------------ runner
CHECKS = {
    "agn": _check_adagradnorm,
    "scale": _check_scale,
    "scale-model": _check_scale_from_model,
    "mfac-dense": _check_mfac_dense,
    "mfac-blocks": _check_mfac_blocks,
    "collectives": _check_collectives,
}


def _check_named(rank, world, tmp, names):
    meshes = _meshes(world)
    for label, mesh in meshes:
        for name, check in CHECKS.items():
            if chosen(names, name, label):
                check(mesh)
        if chosen(names, "dcp", label):
            _check_dcp_round_trip(mesh, tmp, label)
    if chosen(names, "bad"):
        _check_bad_input(meshes[0][1])
    if chosen(names, "reshard"):
        _check_reshard(meshes, tmp)


@pytest.mark.distributed
def test_reduce_two_ranks(tmp_path):
    run_ranks(_check_named, 2, tmp_path, (*CHECKS, "dcp", "bad"))


@pytest.mark.distributed
@pytest.mark.slow
def test_reduce_four_ranks(tmp_path):
    run_ranks(_check_named, 4, tmp_path, (*CHECKS, "dcp", "reshard"))
