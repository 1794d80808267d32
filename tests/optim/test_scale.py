"""SCALE against dense float64 references written here, and torch.optim.AdamW."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _role_models import TinyLM, lm_batch, lm_loss, lm_train
from torch import nn

from secondorder import SCALE
from secondorder.roles import param_roles

EPS64 = torch.finfo(torch.float64).eps
EPS32 = torch.finfo(torch.float32).eps


def row_rms(x: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """Dense reference: RMS of each row (axis=1, over all other dims) or column (axis=0)."""
    mat = x.reshape(x.shape[0], -1)
    return torch.sqrt((mat * mat).mean(axis, keepdim=True))


def one_step(p: torch.nn.Parameter, g: torch.Tensor, **kw) -> torch.Tensor:
    """The update SCALE applies to ``p`` for gradient ``g`` (one fresh step)."""
    before = p.detach().clone()
    p.grad = g
    SCALE([{"params": [p], **kw}]).step()
    return (p.detach() - before).reshape(p.shape[0], -1)


@pytest.mark.parametrize("shape", [(5, 7), (7, 5), (4, 3, 3, 2), (1, 9), (9, 1)])
def test_every_row_update_has_rms_exactly_lr(shape):
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64))
    grad = torch.randn(shape, generator=g, dtype=torch.float64) * torch.logspace(-3, 3, shape[-1])
    lr = 0.03
    d = one_step(p, grad.clone(), lr=lr, role="hidden")
    # rounding of p + d: |p| eps per element, relative to lr
    tol = 4 * (1 + p.abs().max().item() / lr) * EPS64
    torch.testing.assert_close(row_rms(d), torch.full((shape[0], 1), lr, dtype=torch.float64),
                               rtol=tol, atol=0)  # fmt: skip
    ref = -lr * grad.reshape(shape[0], -1) / row_rms(grad)
    torch.testing.assert_close(d, ref, rtol=0, atol=tol * lr)


def test_l2_norm_option():
    g = torch.Generator().manual_seed(1)
    p = nn.Parameter(torch.randn(6, 10, generator=g, dtype=torch.float64))
    grad = torch.randn(6, 10, generator=g, dtype=torch.float64)
    d = one_step(p, grad.clone(), lr=0.5, norm="l2")
    norms = torch.linalg.vector_norm(d, dim=1)
    torch.testing.assert_close(norms, torch.full((6,), 0.5, dtype=torch.float64),
                               rtol=64 * EPS64, atol=0)  # fmt: skip
    # the same direction as "rms", sqrt(fan_in) times smaller
    q = nn.Parameter(p.detach().clone())
    d_rms = one_step(q, grad.clone(), lr=0.5)
    torch.testing.assert_close(d * math.sqrt(10), d_rms, rtol=64 * EPS64, atol=1e-15)


def test_embedding_is_normalised_over_the_vocabulary_axis():
    g = torch.Generator().manual_seed(2)
    p = nn.Parameter(torch.randn(11, 4, generator=g, dtype=torch.float64))
    grad = torch.randn(11, 4, generator=g, dtype=torch.float64)
    grad[3] *= 1e-4  # a rare token: its row must stay small
    d = one_step(p, grad.clone(), lr=0.1, role="embedding")
    col = torch.sqrt((d * d).mean(0))
    torch.testing.assert_close(col, torch.full((4,), 0.1, dtype=torch.float64),
                               rtol=64 * EPS64, atol=0)  # fmt: skip
    torch.testing.assert_close(d, -0.1 * grad / row_rms(grad, axis=0), rtol=0, atol=1e-15)
    assert d[3].abs().max() < 1e-3 * d.abs().max()


def test_output_layer_momentum_is_an_ema():
    """M_t = beta M_{t-1} + (1 - beta) G_t; update -lr M_t / rms_row(M_t); decay (1 - lr wd)."""
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(5, 8, generator=g, dtype=torch.float64)
    p = nn.Parameter(w0.clone())
    lr, beta, wd = 0.05, 0.8, 0.1
    opt = SCALE([{"params": [p], "role": "output"}], lr=lr, momentum=beta, weight_decay=wd)
    m = torch.zeros_like(w0)
    w = w0.clone()
    for _ in range(4):
        grad = torch.randn(5, 8, generator=g, dtype=torch.float64)
        p.grad = grad.clone()
        opt.step()
        m = beta * m + (1 - beta) * grad
        w = (1 - lr * wd) * w - lr * m / row_rms(m)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], m, rtol=16 * EPS64, atol=1e-15)
    torch.testing.assert_close(p.detach(), w, rtol=0, atol=64 * EPS64 * w.abs().max().item())
    # the hidden role keeps no momentum: each step is the current gradient's direction
    q = nn.Parameter(w0.clone())
    hidden = SCALE([q], lr=lr, momentum=beta)
    for _ in range(2):
        grad = torch.randn(5, 8, generator=g, dtype=torch.float64)
        before = q.detach().clone()
        q.grad = grad.clone()
        hidden.step()
    torch.testing.assert_close(q.detach() - before, -lr * grad / row_rms(grad), rtol=0, atol=1e-15)
    assert not hidden.state[q]


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_vectors_equal_torch_adamw(wd):
    """Vector parameters (biases, gains, scalars) follow torch.optim.AdamW."""
    g = torch.Generator().manual_seed(4)
    init = [torch.randn(7, generator=g), torch.randn(3, generator=g), torch.randn((), generator=g)]
    ours = [nn.Parameter(t.clone()) for t in init]
    ref = [nn.Parameter(t.clone()) for t in init]
    kw = dict(lr=0.01, weight_decay=wd)
    opt = SCALE(ours, adamw_betas=(0.8, 0.95), adamw_eps=1e-6, **kw)
    torch_opt = torch.optim.AdamW(ref, betas=(0.8, 0.95), eps=1e-6, **kw)
    steps = 12
    for k in range(steps):
        for a, b in zip(ours, ref):
            a.grad = torch.randn(a.shape, generator=g) * 10.0 ** (k % 3 - 1)
            b.grad = a.grad.clone()
        opt.step()
        torch_opt.step()
    # rounding: each step's update (size ~lr) and the parameter (size |p|) are rounded
    for a, b in zip(ours, ref):
        tol = 4 * steps * (0.01 + b.abs().max().item()) * EPS32
        torch.testing.assert_close(a, b, rtol=0, atol=tol)
        st_ours, st_ref = opt.state[a], torch_opt.state[b]
        assert torch.equal(st_ours["step"], st_ref["step"]) and int(st_ours["step"]) == steps
        torch.testing.assert_close(st_ours["exp_avg_sq"], st_ref["exp_avg_sq"], rtol=1e-6, atol=0)


def test_vectors_with_huge_gradients_saturate_instead_of_overflowing():
    """torch's AdamW squares a float32 gradient of 1e25 to inf; ours saturates the gradient
    at 2**63 first: equal to torch.optim.AdamW fed the saturated gradients."""
    g = torch.Generator().manual_seed(7)
    init = torch.randn(5, generator=g)
    ours, ref = nn.Parameter(init.clone()), nn.Parameter(init.clone())
    opt, torch_opt = SCALE([ours], lr=0.01), torch.optim.AdamW([ref], lr=0.01, weight_decay=0)
    bound = 2.0**63
    for k in range(6):
        grad = torch.randn(5, generator=g) * 10.0 ** (25 if k % 2 else -25)
        ours.grad = grad.clone()
        ref.grad = grad.clamp(-bound, bound)
        opt.step()
        torch_opt.step()
        assert torch.equal(ours.grad, grad)  # the gradient itself is left alone
    assert torch.isfinite(opt.state[ours]["exp_avg_sq"]).all()
    torch.testing.assert_close(ours, ref, rtol=0, atol=4 * 6 * (0.01 + 3.0) * EPS32)


def test_updates_are_invariant_to_loss_scaling():
    """Matrix roles: bit-identical for power-of-two loss scales (exact in floating point),
    to rounding for others. Vectors (AdamW, which has eps) are not part of the claim, so
    they are held fixed here (``adamw_lr=0``) to keep the gradients comparable."""

    def run(scale):
        torch.manual_seed(0)
        model = TinyLM().double()
        opt = SCALE.from_model(model, lr=0.01, momentum=0.9, adamw_lr=0.0)
        lm_train(model, opt, range(5), scale=scale)
        roles = param_roles(model)
        matrices = ("hidden", "embedding", "output")
        return {n: p.detach() for r in matrices for n, p in roles[r].items()}

    base = run(1.0)
    for scale in (1024.0, 1 / 64):
        got = run(scale)
        assert all(torch.equal(got[n], base[n]) for n in base), scale
    got = run(3.7)
    # not exact: 3.7 g rounds (relative error eps64 per entry), which moves each normalised
    # update by ~eps64 * lr; 1e-10 leaves room for five steps of growth through the model
    for n in base:
        torch.testing.assert_close(got[n], base[n], rtol=0, atol=1e-10)


def test_state_is_output_layer_plus_two_per_vector_value():
    model = TinyLM()
    opt = SCALE.from_model(model)
    lm_train(model, opt, range(2))
    roles = param_roles(model)
    numel = {r: sum(p.numel() for p in d.values()) for r, d in roles.items()}
    assert opt.state_numel(per_element_only=True) == numel["output"] + 2 * numel["vector"]
    # plus one scalar step counter per AdamW tensor, as torch.optim.AdamW keeps
    assert opt.state_numel() == opt.state_numel(per_element_only=True) + len(roles["vector"])
    assert opt.state_bytes() == 4 * opt.state_numel()
    # nothing at all for the hidden matrices and the embedding
    for r in ("hidden", "embedding"):
        assert all(not opt.state.get(p) for p in roles[r].values())
    adamw = torch.optim.AdamW(model.parameters())
    lm_train(model, adamw, range(1))
    adamw_numel = sum(v.numel() for s in adamw.state.values() for k, v in s.items() if k != "step")
    assert adamw_numel == 2 * sum(p.numel() for p in model.parameters())


def test_conv_kernels_are_normalised_per_output_channel():
    g = torch.Generator().manual_seed(5)
    p = nn.Parameter(torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64))
    grad = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    d = one_step(p, grad.clone(), lr=0.2)
    torch.testing.assert_close(d, -0.2 * grad.reshape(4, -1) / row_rms(grad), rtol=0, atol=1e-15)


def test_bfloat16_parameters_round_once_from_float32():
    g = torch.Generator().manual_seed(6)
    w = torch.randn(4, 6, generator=g).bfloat16()
    grad = torch.randn(4, 6, generator=g).bfloat16()
    p = nn.Parameter(w.clone())
    p.grad = grad.clone()
    SCALE([p], lr=0.1, weight_decay=0.1).step()
    g32 = grad.float()
    ref = ((1 - 0.01) * w.float() - 0.1 * g32 / row_rms(g32).clamp_min(1e-8)).bfloat16()
    assert p.dtype == torch.bfloat16
    # one rounding to bfloat16 of float32 values that agree to float32 rounding
    torch.testing.assert_close(p.detach().float(), ref.float(), rtol=2**-8, atol=0)


def test_from_model_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    model = TinyLM()
    opt = SCALE.from_model(model, lr=0.01, adamw_lr=0.003)
    assert {g["role"]: g["lr"] for g in opt.param_groups} == {
        "hidden": 0.01, "embedding": 0.01, "output": 0.01, "vector": 0.003}  # fmt: skip
    lm_train(model, opt, range(3))
    sd = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = SCALE.from_model(model2, lr=0.5)  # the checkpoint's hyperparameters win
    opt2.load_state_dict(sd)
    lm_train(model, opt, range(3, 6))
    lm_train(model2, opt2, range(3, 6))
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_loading_a_state_of_the_wrong_role_raises():
    torch.manual_seed(0)
    model = TinyLM()
    opt = SCALE.from_model(model)
    lm_train(model, opt, range(2))
    sd = opt.state_dict()
    plain = SCALE(model.parameters())  # one "auto" group: no output role
    with pytest.raises(ValueError, match="parameter groups"):
        plain.load_state_dict(sd)
    # the output weight's momentum given to a hidden matrix
    bad = copy.deepcopy(sd)
    out_idx = [i for i, g in enumerate(sd["param_groups"]) if g["role"] == "output"][0]
    bad["param_groups"][out_idx]["role"] = "hidden"
    fresh = SCALE.from_model(copy.deepcopy(model))
    with pytest.raises(ValueError, match="role 'hidden' is not a SCALE state"):
        fresh.load_state_dict(bad)


def test_diagnostics_describe_roles_and_row_scales():
    torch.manual_seed(0)
    model = TinyLM()
    opt = SCALE.from_model(model, eps=1e-8)
    lm_train(model, opt, range(2))
    model.fc.weight.grad[2] = 0  # a dead unit: its row scale is at the clamp
    recs = opt.diagnostics()
    assert len(recs) == sum(len(g["params"]) for g in opt.param_groups)
    by_role = {}
    for r in recs:
        by_role.setdefault(r["role"], []).append(r)
    assert {r["axis"] for r in by_role["embedding"]} == {0}
    assert all(r["update"] == "adamw" and r["step"] == 2 for r in by_role["vector"])
    (out,) = by_role["output"]
    assert out["state_numel"] == model.head.weight.numel()
    fc = next(r for r in by_role["hidden"] if r["shape"] == tuple(model.fc.weight.shape))
    assert fc["clamped"] == 1 and fc["scale_min"] < 1e-8 < fc["scale_max"]
    lm_loss(model, lm_batch(9)).backward()  # diagnostics read state and grads only
