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


# --------------------------------------------------------------- extreme gradient scales
def _scaled_run(k, band, dtype, damping, graft, steps=4, zero_init=False):
    """Parameters after ``steps`` steps on gradients ``g · 2**k`` (the same g for every k),
    with every hyperparameter that carries units scaled along (graft_eps ~ g, absolute
    eps ~ g²)."""
    gen = torch.Generator().manual_seed(3)
    w0 = torch.zeros(5, 7) if zero_init else torch.randn(5, 7, generator=gen)
    w = torch.nn.Parameter(w0.to(dtype))
    eps = 1e-2 * 4.0**k if damping == "absolute" else 1e-5
    opt = SONew(
        [w], lr=0.1, band=band, graft=graft, graft_eps=1e-8 * 2.0**k, eps=eps, damping=damping
    )
    for _ in range(steps):
        w.grad = (torch.randn(5, 7, generator=gen) * 2.0**k).to(dtype)
        opt.step()
    return w.detach(), opt


@settings(max_examples=20, deadline=None)
@given(
    k=st.integers(-90, 90),
    band=st.integers(0, 3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    damping=st.sampled_from(["relative", "absolute"]),
)
def test_update_is_exactly_scale_invariant_with_the_adam_graft(k, band, dtype, damping):
    """Statistics are stored relative to a power-of-two scale, so multiplying every gradient
    by 2**k (up to ~1e27 and down to ~1e-27, where squares overflow / underflow float32)
    leaves the graft-adam update bit-identical."""
    ref, _ = _scaled_run(0, band, dtype, damping, "adam")
    got, opt = _scaled_run(k, band, dtype, damping, "adam")
    assert torch.equal(got, ref)
    assert opt.state[opt.param_groups[0]["params"][0]]["band_stats"].abs().max() <= 1.0


@settings(max_examples=10, deadline=None)
@given(k=st.integers(-60, 60), band=st.integers(0, 3))
def test_update_without_graft_scales_as_the_inverse_gradient(k, band):
    """graft=None is Newton-like: X m̂ ~ g / g², so gradients 2**k give updates 2**-k,
    exactly (absolute damping scaled as g²; parameters start at 0)."""
    ref, _ = _scaled_run(0, band, torch.float32, "absolute", None, zero_init=True)
    got, _ = _scaled_run(k, band, torch.float32, "absolute", None, zero_init=True)
    assert torch.equal(got, ref * 2.0**-k)


def test_statistics_are_those_of_the_unscaled_gradients():
    """band_statistics() (H = c² · state) equals a float64 EMA of g gᵀ, gradients 1e25."""
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(12))
    opt = SONew([w], band=2, betas=(0.9, 0.99))
    H = torch.zeros(3, 12, dtype=torch.float64)
    for _ in range(5):
        g = torch.randn(12, generator=gen, dtype=torch.float64) * 1e25
        w.grad = g.float()
        opt.step()
        g = w.grad.double()
        H *= 0.99
        for k in range(3):
            H[k, : 12 - k] += 0.01 * g[: 12 - k] * g[k:]
    got = opt.band_statistics(w)
    scale = H.abs().max()
    # float32 storage: a few rounding errors of the largest entry
    torch.testing.assert_close(got / scale, H / scale, rtol=0, atol=20 * 2.0**-24)


def test_a_gradient_spike_is_forgotten():
    """One step of 1e25 gradients, then unit gradients: the scale follows the statistics
    back down, so they regain full precision (a fixed scale would flush the unit-gradient
    statistics, (1/1e25)², to zero) and match a run that never saw the spike."""
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(20, generator=gen) for _ in range(200)]
    runs = []
    for spike in (False, True):
        w = torch.nn.Parameter(torch.zeros(20))
        opt = SONew([w], lr=1e-3, band=1, betas=(0.9, 0.5))
        for i, g in enumerate(grads):
            w.grad = g * 1e25 if (spike and i == 0) else g
            opt.step()
        assert torch.isfinite(w).all()
        runs.append((opt.band_statistics(w), opt.stats_scale(w)))
    (h_ref, c_ref), (h_spk, c_spk) = runs
    assert c_spk == c_ref  # the scale came back down
    # the spike's weight after 199 decays: 0.5**199 · 1e50 ≈ 1e-10 relative to O(1) stats
    torch.testing.assert_close(h_spk, h_ref, rtol=1e-6, atol=1e-9)


def test_legacy_checkpoint_without_scale_is_migrated():
    """A state dict of the unscaled format (no stats_bound, band_stats = H) loads into the
    scaled format and continues exactly like the run that wrote it."""
    gen = torch.Generator().manual_seed(2)
    w = torch.nn.Parameter(torch.randn(4, 6, generator=gen))
    opt = SONew([w], band=2)
    _train(opt, [w], 3)
    sd = copy.deepcopy(opt.state_dict())
    legacy = copy.deepcopy(sd)
    st0 = legacy["state"][0]
    st0["band_stats"] = opt.band_statistics(w).float()
    del st0["stats_bound"]
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = SONew([w2], band=2)
    opt2.load_state_dict(legacy)
    torch.testing.assert_close(opt2.band_statistics(w2), opt.band_statistics(w))
    _train(opt, [w], 2, seed=9)
    _train(opt2, [w2], 2, seed=9)
    torch.testing.assert_close(w2, w, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------ health
def _dense_direction(opt, w, gamma):
    """X(Ĥ + δI) m̂ and the Adam direction, in float64 from the optimizer's own state."""
    group = opt.param_groups[0]
    b1, b2 = group["betas"]
    st_ = opt.state[w]
    t = int(st_["step"])
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    Hh = opt.band_statistics(w) / bc2
    mh = st_["exp_avg"].double().reshape(-1) / bc1
    delta = group["eps"] * K.band_to_dense(Hh).abs().sum(1).max()  # relative damping
    if group["band"] == 1:
        psi, D = K.tridiag_ldl(Hh, delta, gamma)
    else:
        psi, D = K.band_ldl(Hh, delta, gamma)
    X = K.ldl_to_dense(psi, D)
    adam = mh / (Hh[0].sqrt() + group["graft_eps"])
    return X @ mh, adam, float(delta), psi, D, Hh


@pytest.mark.parametrize("band", [1, 3])
@pytest.mark.parametrize("scale", [1.0, 1e25, 1e-25])
def test_diagnostics_match_a_dense_float64_reference(band, scale):
    gen = torch.Generator().manual_seed(4)
    w = torch.nn.Parameter(torch.randn(6, 5, generator=gen))
    b = torch.nn.Parameter(torch.randn(5, generator=gen))
    opt = SONew([w, b], lr=1e-3, band=band, precondition_1d=False)
    for _ in range(6):
        w.grad = torch.randn(6, 5, generator=gen) * scale
        b.grad = torch.randn(5, generator=gen) * scale
        opt.step()
    rec, rec_b = opt.diagnostics()
    assert rec_b["param"] == 1 and rec_b["band"] is None and rec_b["damping"] is None
    assert rec["param"] == 0 and rec["band"] == band and rec["step"] == 6 and rec["finite"]
    u, adam, delta, psi, D, Hh = _dense_direction(opt, w, K.guard_threshold(torch.float32))
    rel = 1e-4  # float32 factorisation of a well-conditioned band
    assert rec["max_stat"] == pytest.approx(float(Hh[0].max()), rel=rel)
    assert rec["damping"] == pytest.approx(delta, rel=rel)
    assert rec["direction_norm"] == pytest.approx(float(u.norm()), rel=rel)
    assert rec["graft_norm"] == pytest.approx(float(adam.norm()), rel=rel)
    assert rec["graft_ratio"] == pytest.approx(float(adam.norm() / u.norm()), rel=2 * rel)
    pivots = 1.0 / (D * (Hh[0] + delta))
    assert rec["min_pivot"] == pytest.approx(float(pivots.min()), rel=1e-3)
    assert rec["guarded_columns"] == 0.0 and rec["dropped_edges"] == 0.0  # iid gradients


def test_diagnostics_report_the_guard_on_perfectly_correlated_gradients():
    """Rank-one statistics with a tiny damping: every relative Schur complement is about
    1e-12 plus float32 rounding (~1e-7), far below a 1e-3 guard threshold, so every edge is
    dropped and X is diagonal (all pivots 1)."""
    w = torch.nn.Parameter(torch.zeros(10))
    opt = SONew([w], band=2, eps=1e-12, guard_threshold=1e-3)
    v = torch.linspace(1.0, 2.0, 10)
    for s in (1.0, -2.0, 0.5):
        w.grad = v * s
        opt.step()
    (rec,) = opt.diagnostics()
    assert rec["guarded_columns"] == 1.0 - 0.1  # the last column has no neighbour
    assert rec["dropped_edges"] == 1.0
    assert rec["min_pivot"] == pytest.approx(1.0, rel=1e-6)


def test_state_bytes_is_the_size_of_the_state():
    w = torch.nn.Parameter(torch.randn(6, 5))
    v = torch.nn.Parameter(torch.randn(7, dtype=torch.bfloat16))
    opt = SONew([w, v], band=2)
    assert opt.state_bytes() == 0
    _train(opt, [w, v], 1)
    # fp32 W: exp_avg 30, band 3 x 30, bound, step; bf16 v: exp_avg 7, band 3 x 7 (bf16)
    assert opt.state_bytes() == 4 * (30 + 90 + 1 + 1) + 2 * (7 + 21) + 4 * (1 + 1)
    assert opt.scratch_bytes() > 0


def test_readme_quick_start_runs_with_the_sonew_swap(capsys):
    """The README's Quick start, with its "or: SONew" line swapped in, runs as written and
    its final print shows SONew health records."""
    import pathlib
    import re

    readme = pathlib.Path(__file__).resolve().parents[2] / "README.md"
    text = readme.read_text()
    section = text[text.index("## Quick start") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    swap = re.search(r"^# or: (opt = secondorder\.SONew\(.*)$", code, re.M)
    assert swap, "the Quick start lost its SONew alternative"
    code = code + "\n" + swap.group(1).split("  #")[0] + "\n" + code[code.index("for x, y") :]
    gen = torch.Generator().manual_seed(0)
    loader = [(torch.randn(4, 784, generator=gen), torch.tensor([1, 2, 3, 4])) for _ in range(2)]
    namespace = {"loader": loader}
    exec(compile(code, str(readme), "exec"), namespace)
    assert isinstance(namespace["opt"], SONew)
    records = namespace["opt"].diagnostics()[:2]
    assert [r["param"] for r in records] == [0, 1] and all(r["finite"] for r in records)
    out = capsys.readouterr().out
    assert "'band': 1" in out and "'min_pivot'" in out


@pytest.mark.parametrize("scale", [1.0, 1e-25])
def test_diagnostics_report_the_absolute_damping(scale):
    """With damping="absolute", the reported δ is eps itself, also for tiny gradients (the
    scale floor keeps eps representable); for huge ones the float32 floor of the scaled
    damping (sqrt(tiny) · c²) shows instead, and is reported as such."""
    gen = torch.Generator().manual_seed(5)
    w = torch.nn.Parameter(torch.randn(4, 6, generator=gen))
    eps = 1e-3 * scale**2
    opt = SONew([w], band=1, damping="absolute", eps=eps, graft=None)
    for _ in range(3):
        w.grad = torch.randn(4, 6, generator=gen) * scale
        opt.step()
    (rec,) = opt.diagnostics()
    assert rec["damping"] == pytest.approx(eps, rel=1e-6)
    w.grad = torch.randn(4, 6, generator=gen) * 1e30
    opt.step()
    (rec,) = opt.diagnostics()
    c = rec["stats_scale"]
    floor = torch.finfo(torch.float32).tiny ** 0.5 * c * c / (1 - 0.999**4)
    assert rec["damping"] == pytest.approx(max(eps, floor), rel=1e-6)
    assert torch.isfinite(w).all() and rec["finite"]
