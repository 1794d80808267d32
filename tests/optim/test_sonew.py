"""SONew optimizer: contract, convergence, dtypes, state and bad input."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import secondorder
from secondorder import SONew
from secondorder.kernels import sonew as K


def _quadratic_problem(n: int = 40, rho: float = 0.98, seed: int = 0):
    """f(w) = ½ (w − w*)ᵀ Σ (w − w*) with an AR(1) Σ (cond ≈ 100, equal diagonal).

    Σ⁻¹ is tridiagonal, so no diagonal preconditioner helps while a chain one can.
    """
    idx = torch.arange(n, dtype=torch.float32)
    sigma = rho ** (idx[:, None] - idx[None, :]).abs()
    wstar = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return sigma, wstar


def _steps_to(make_opt, threshold: float, steps: int = 300) -> int:
    sigma, wstar = _quadratic_problem()
    w = torch.nn.Parameter(torch.zeros_like(wstar))
    opt = make_opt([w])
    for t in range(steps):
        e = w.detach() - wstar
        if 0.5 * float(e @ sigma @ e) < threshold:
            return t
        w.grad = sigma @ e
        opt.step()
    return steps


def test_tridiagonal_beats_diagonal_and_adamw_on_ill_conditioned_problem():
    lrs = (0.1, 0.3, 1.0)  # each method gets its best learning rate from the same grid
    thr = 0.02

    def best(factory):
        return min(_steps_to(lambda ps, lr=lr: factory(ps, lr), thr) for lr in lrs)

    adamw = best(lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.0))
    diag = best(lambda ps, lr: SONew(ps, lr=lr, band=0))
    tri = best(lambda ps, lr: SONew(ps, lr=lr, band=1))
    assert tri < 300, "tridiagonal SONew did not converge"
    assert tri < diag and tri < adamw, (tri, diag, adamw)


@pytest.mark.parametrize("band", [0, 1, 2, 4])
@pytest.mark.parametrize("graft", ["adam", None])
def test_decreases_loss_on_a_small_regression(band, graft):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x = torch.randn(64, 8)
    y = x[:, :1] * 2 - x[:, 1:2]
    lr = 3e-2 if graft == "adam" else 3e-3
    opt = SONew(model.parameters(), lr=lr, band=band, graft=graft, eps=1e-3)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_exported_from_package():
    assert secondorder.SONew is SONew
    assert "SONew" in secondorder.__all__


def test_step_matches_hand_computation():
    """One step with graft=None on a vector: θ ← θ − lr · X(Ĥ + δI) m̂ (absolute damping)."""
    g = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    w = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    w.grad = g.clone()
    opt = SONew([w], lr=0.1, betas=(0.9, 0.99), eps=0.5, band=1, graft=None, damping="absolute")
    opt.step()
    H = torch.outer(g, g)  # bias-corrected after one step
    mask = (torch.arange(4)[:, None] - torch.arange(4)[None, :]).abs() <= 1
    Hb = torch.where(mask, H, torch.zeros(())) + 0.5 * torch.eye(4, dtype=torch.float64)
    # X is the inverse of the max-det completion of Hb; verify through the kernels' dense refs
    h = torch.stack([g * g, torch.cat([g[:-1] * g[1:], torch.zeros(1, dtype=g.dtype)])])
    psi, D = K.tridiag_ldl(h, 0.5, None)
    X = K.ldl_to_dense(psi, D)
    torch.testing.assert_close(torch.linalg.inv(X)[mask], Hb[mask])
    torch.testing.assert_close(w.detach(), -0.1 * X @ g)
    assert torch.equal(w.grad, g)  # grad untouched


def test_adam_graft_matches_adam_norm_and_1d_adam_option():
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(6, 5))
    bias = torch.nn.Parameter(torch.randn(5))
    ref_b = torch.nn.Parameter(bias.detach().clone())
    opt = SONew([W, bias], lr=0.1, band=1, precondition_1d=False, weight_decay=0.0)
    adam = torch.optim.Adam([ref_b], lr=0.1, eps=1e-8)
    W0 = W.detach().clone()
    for _ in range(3):
        gW, gb = torch.randn(6, 5), torch.randn(5)
        W.grad, bias.grad, ref_b.grad = gW, gb, gb.clone()
        opt.step()
        adam.step()
    # the 1-d tensor took the plain Adam update
    torch.testing.assert_close(bias.detach(), ref_b.detach(), rtol=1e-5, atol=1e-6)
    assert opt.state[bias]["band_stats"].shape == (1, 5)
    assert opt.state[W]["band_stats"].shape == (2, 30)
    assert not torch.equal(W.detach(), W0)


def test_first_step_graft_norm_equals_adam_step_norm():
    torch.manual_seed(1)
    W = torch.nn.Parameter(torch.randn(7, 9))
    g = torch.randn(7, 9)
    W.grad = g
    W0 = W.detach().clone()
    SONew([W], lr=1.0, band=2).step()
    # Adam's first step is g / (|g| + eps): norm sqrt(numel)
    torch.testing.assert_close(
        (W.detach() - W0).norm(), torch.tensor(63.0).sqrt(), rtol=1e-4, atol=0
    )


def test_decoupled_weight_decay():
    w = torch.nn.Parameter(torch.ones(3, 3))
    w.grad = torch.zeros(3, 3)
    SONew([w], lr=0.1, weight_decay=0.5).step()
    torch.testing.assert_close(w.detach(), torch.full((3, 3), 0.95))


def test_flattening_order_is_row_major():
    """Only neighbours in row-major order are coupled: gradient along a column is diagonal."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(4, 3))
    opt = SONew([w], lr=0.1, band=1)
    g = torch.randn(4, 3)
    w.grad = g
    opt.step()
    h = opt.band_statistics(w)  # unscaled: the state holds H / c² (see below)
    flat = g.reshape(-1).double()
    torch.testing.assert_close(h[1, :-1], 0.001 * flat[:-1] * flat[1:])


# ------------------------------------------------------------------------- dtypes and state
@settings(max_examples=6, deadline=None)
@given(
    band=st.integers(0, 4),
    shape=st.sampled_from([(7,), (3, 5), (2, 3, 4), ()]),
    state_dtype=st.sampled_from([None, torch.float32]),
    compute_dtype=st.sampled_from([None, torch.bfloat16]),
)
def test_bf16_params_keep_dtype(band, shape, state_dtype, compute_dtype):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(shape, dtype=torch.bfloat16))
    opt = SONew([w], lr=1e-2, band=band, state_dtype=state_dtype, compute_dtype=compute_dtype)
    for _ in range(3):
        w.grad = torch.randn(shape, dtype=torch.bfloat16)
        opt.step()
    assert w.dtype == torch.bfloat16 and torch.isfinite(w).all()
    st_ = opt.state[w]
    expected = state_dtype or torch.bfloat16
    assert st_["exp_avg"].dtype == expected and st_["band_stats"].dtype == expected
    assert st_["band_stats"].shape == (band + 1, max(w.numel(), 1))


def test_bf16_correlated_gradients_stay_finite():
    """Strongly correlated bf16 gradients over many steps: no NaN/Inf in params or state."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(64, dtype=torch.bfloat16))
    opt = SONew([w], lr=1e-3, band=4, compute_dtype=torch.bfloat16, eps=1e-8)
    base = torch.linspace(1, 2, 64)
    for _ in range(50):
        w.grad = (base * torch.randn(())).to(torch.bfloat16)
        opt.step()
    assert torch.isfinite(w).all()
    assert all(torch.isfinite(t).all() for t in opt.state[w].values())


def _train(opt, params, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()


@pytest.mark.parametrize(
    "dtype,state_dtype", [(torch.float32, None), (torch.bfloat16, torch.float32)]
)
def test_state_dict_round_trip_is_exact(dtype, state_dtype):
    torch.manual_seed(0)
    ps = [
        torch.nn.Parameter(torch.randn(5, 4, dtype=dtype)),
        torch.nn.Parameter(torch.randn(4, dtype=dtype)),
    ]
    opt = SONew(ps, lr=1e-2, band=2, weight_decay=0.1, state_dtype=state_dtype)
    _train(opt, ps, 3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = SONew(ps2, lr=1.0, band=2, state_dtype=state_dtype)  # hyperparams come from the dict
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf))
    for p, p2 in zip(ps, ps2):
        for k, v in opt.state[p].items():
            assert v.dtype == opt2.state[p2][k].dtype
            assert torch.equal(v, opt2.state[p2][k])
    _train(opt, ps, 2, seed=5)
    _train(opt2, ps2, 2, seed=5)
    for p, p2 in zip(ps, ps2):
        assert torch.equal(p, p2)


def test_load_rejects_mismatched_state():
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = SONew([p])
    _train(opt, [p], 1)
    sd = copy.deepcopy(opt.state_dict())
    q = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="shape"):
        SONew([q]).load_state_dict(sd)


# ------------------------------------------------------------------------ non-finite grads
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradients_do_not_poison_state(bad):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 5))
    opt = SONew([w], band=2)
    _train(opt, [w], 2)
    before_w = w.detach().clone()
    before = {k: v.clone() for k, v in opt.state[w].items()}
    g = torch.randn(4, 5)
    g[1, 2] = bad
    w.grad = g
    opt.step()
    assert torch.equal(w, before_w)
    assert all(torch.equal(before[k], v) for k, v in opt.state[w].items())
    assert opt.skipped_steps == 1
    w.grad = torch.randn(4, 5)
    opt.step()
    assert torch.isfinite(w).all()

    opt_r = SONew([w], band=1, nonfinite="raise")
    w.grad = g
    with pytest.raises(FloatingPointError):
        opt_r.step()
    assert len(opt_r.state) == 0


# ------------------------------------------------------------------------------ bad input
def _p():
    return [torch.nn.Parameter(torch.randn(3, 3))]


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        (dict(band=-1), ValueError, "band"),
        (dict(band=1.0), TypeError, "band"),
        (dict(band=True), TypeError, "band"),
        (dict(band="1"), TypeError, "band"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(eps=-1e-3), ValueError, "eps"),
        (dict(betas=(1.0, 0.9)), ValueError, "betas"),
        (dict(betas=(0.9, 1.5)), ValueError, "betas"),
        (dict(betas=(-0.1, 0.9)), ValueError, "betas"),
        (dict(betas=0.9), ValueError, "betas"),
        (dict(graft="shampoo"), ValueError, "graft"),
        (dict(lr=-1.0), ValueError, "lr"),
        (dict(weight_decay=-1.0), ValueError, "weight_decay"),
        (dict(damping="fixed"), ValueError, "damping"),
        (dict(state_dtype=torch.int32), ValueError, "state_dtype"),
        (dict(compute_dtype=torch.float16), ValueError, "compute_dtype"),
        (dict(guard_threshold=-1.0), ValueError, "guard_threshold"),
        (dict(precondition_1d=1), TypeError, "precondition_1d"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        SONew(_p(), **kwargs)


def test_bad_param_group_override():
    opt = SONew(_p())
    with pytest.raises(ValueError, match="band"):
        opt.add_param_group({"params": _p(), "band": -2})


def test_sparse_and_complex_grads_rejected():
    w = torch.nn.Parameter(torch.randn(3, 3))
    opt = SONew([w])
    w.grad = torch.eye(3).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    emb = torch.nn.Embedding(5, 3, sparse=True)
    opt = SONew(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    with pytest.raises(TypeError, match="complex"):
        SONew([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])


def test_closure_and_none_grads():
    w = torch.nn.Parameter(torch.ones(4))
    unused = torch.nn.Parameter(torch.ones(4))
    opt = SONew([w, unused], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 4.0
    assert unused not in opt.state
    assert torch.equal(unused, torch.ones(4))


def test_default_guard_threshold_follows_the_less_precise_dtype():
    bf16, fp32 = torch.bfloat16, torch.float32
    eps = torch.finfo
    assert SONew.default_guard_threshold(fp32, fp32) == eps(fp32).eps
    assert SONew.default_guard_threshold(bf16, fp32) == eps(bf16).eps
    assert SONew.default_guard_threshold(fp32, bf16) == eps(bf16).eps


def test_load_rejects_other_optimizers_and_other_bands():
    p = torch.nn.Parameter(torch.randn(3, 4))
    adam = torch.optim.AdamW([p])
    _train(adam, [p], 1)
    with pytest.raises(ValueError, match="state"):
        SONew([torch.nn.Parameter(torch.randn(3, 4))]).load_state_dict(adam.state_dict())
    opt = SONew([p], band=2)
    _train(opt, [p], 1)
    sd = opt.state_dict()
    sd["param_groups"][0]["band"] = 1
    with pytest.raises(ValueError, match="band"):
        SONew([torch.nn.Parameter(torch.randn(3, 4))], band=2).load_state_dict(sd)


def test_deepcopy_and_pickle_keep_working():
    p = torch.nn.Parameter(torch.randn(5, 3))
    opt = SONew([p], band=1)
    _train(opt, [p], 2)
    clone = copy.deepcopy(opt)
    assert "_scratch" not in clone.__dict__
    _train(clone, clone.param_groups[0]["params"], 1)
