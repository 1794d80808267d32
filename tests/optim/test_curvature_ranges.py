"""M-FAC and MKOR far outside the ordinary range of gradients (``1e30``, ``1e-30``).

Both rescale by exact powers of two only what would overflow or vanish, so the checks are
exact: against the ordinary-range computation multiplied by the same power of two
(bit-identical), or against dense float64 references with a tolerance from float32
rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder import MFAC, MKOR
from secondorder.kernels import mfac as K
from secondorder.kernels import pow2

EPS32 = torch.finfo(torch.float32).eps


# ----------------------------------------------------------------------------- pow2 kernel
@pytest.mark.parametrize("e", [-1074, -1022, -149, -1, 0, 1, 127, 128, 1023])
def test_pow2_is_exact(e):
    got = pow2.pow2(torch.tensor(e))
    assert got.item() == 2.0**e
    x = torch.tensor([1.5, -3.0], dtype=torch.float64)
    if -1000 < e < 1000:
        assert torch.equal(pow2.mul_pow2(x, torch.tensor(e)), x * 2.0**e)


def test_row_exponents_leave_the_ordinary_range_alone():
    limit = pow2.safe_exponent(torch.float32, 1000)
    x = torch.tensor([[3.0, -1e-3], [1e30, 2.0], [1e-30, 0.0], [0.0, 0.0]])
    e = pow2.row_exponents(x, limit)
    assert e.tolist()[0] == 0 and e.tolist()[3] == 0
    assert e[1] > limit and e[2] < -limit
    scaled = pow2.mul_pow2(x, -e.unsqueeze(-1))
    big = scaled.abs().amax(-1)
    assert 0.5 <= big[1] < 1 and 0.5 <= big[2] < 1
    # exact: scaling back gives the input (float64 holds every product)
    assert torch.equal(pow2.mul_pow2(scaled.double(), e.unsqueeze(-1)), x.double())
    # the bound: n products of two numbers <= 2**limit stay below max / 4
    assert 1000 * 2.0 ** (2 * limit) <= torch.finfo(torch.float32).max / 4


# ----------------------------------------------------------------------------------- M-FAC
def _stream(decades, n=40, m=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen, dtype=torch.float64) * 10.0**d for d in decades]


@pytest.mark.parametrize(
    "decades",
    [[30] * 6, [-30] * 6, [0, 30, -30, 30, 0, -30, 12], [25, 25, -25, -25, 0, 0]],
    ids=["huge", "tiny", "mixed", "jumps"],
)
def test_mfac_window_matches_a_float64_solve_at_any_scale(decades):
    """float32 window, gradients from 1e-30 to 1e30 (the float32 Gram overflowed at 1e19):
    the stored rows stand for the gradients exactly, the Gram matrix is within float32
    rounding of the float64 one, and each step is (λI + s Σ g gᵀ)⁻¹ g of float64."""
    m, n, damp = 4, 40, 1e-2
    grads = torch.zeros(m, n)
    exps = torch.zeros(m, dtype=torch.int16)
    gram = torch.zeros(m, m, dtype=torch.float64)
    seen = []
    checked = 0
    for t, g in enumerate(_stream(decades, n, m), start=1):
        g32 = g.float()
        slot = (t - 1) % m
        stored = K.ring_write(grads, slot, g32, exps)
        K.set_gram_row(gram, slot, K.gram_row(grads, stored, exps, exps[slot]))
        seen.append(g32.double())
        window = torch.stack(seen[-m:])
        # the stored window stands for the gradients exactly
        stored = pow2.mul_pow2(grads.double(), exps.unsqueeze(-1))
        assert torch.equal(stored[slot], g32.double())
        exact = window @ window.T
        # float32 dot products of stored rows: relative error <= n eps |g_i||g_j|
        norms = window.norm(dim=1)
        bound = 2 * n * EPS32 * torch.outer(norms, norms)
        rows = [(i - 1) % m for i in range(t - len(window) + 1, t + 1)]
        assert ((gram[rows][:, rows] - exact).abs() <= bound).all(), f"step {t}"
        e = torch.zeros(m, dtype=torch.float64)
        e[slot] = 1.0
        s = 1.0 / m
        u = K.combine(grads, K.coefficients(gram, e, damp, s), exps).double()
        assert torch.isfinite(u).all()
        # reference: the window-space formula Wᵀ (λI + s W Wᵀ)⁻¹ e_t in float64 (a dense
        # d x d solve cannot represent λ = 1e-2 beside s |g|² = 1e60)
        kf = damp * torch.eye(len(window), dtype=torch.float64) + s * exact
        unit = torch.zeros(len(window), dtype=torch.float64)
        unit[-1] = 1.0
        ref = window.T @ torch.linalg.solve(kf, unit)
        cond = torch.linalg.cond(kf).item()
        if cond * n * EPS32 > 1e-2:
            continue  # windows mixing 1e30 and 1e-30 rows: only finiteness is meaningful
        # rounding of K (relative n eps) moves the solution by <= cond(λI + sK) n eps |ref|;
        # float32 rounding of the coefficients and of Gᵀa adds m n eps |ref|-sized terms
        tol = 8 * (cond + m) * n * EPS32 * ref.abs().max().item()
        torch.testing.assert_close(u, ref, rtol=0, atol=tol, msg=f"step {t}")
        checked += 1
    assert checked, "no step was compared"


def _old_mfac_step(window, gram, slot, g, damp, s):
    """The computation before row exponents existed (unscaled rows): the reference."""
    K.ring_write(window, slot, g)
    K.set_gram_row(gram, slot, K.gram_row(window, g))
    e = torch.zeros(window.shape[-2], dtype=torch.float64)
    e[slot] = 1.0
    return K.combine(window, K.coefficients(gram, e, damp, s))


def test_mfac_ordinary_gradients_are_bit_identical_to_unscaled_rows():
    """In the ordinary range every row exponent is 0: results equal the unscaled
    computation bit for bit (float32 parameter, dense window)."""
    m, damp, lr = 3, 1e-3, 0.1
    p = nn.Parameter(torch.randn(50, generator=torch.Generator().manual_seed(0)))
    ref_p = p.detach().clone()
    opt = MFAC([p], lr=lr, num_grads=m, damp=damp)
    window = torch.zeros(m, 50)
    gram = torch.zeros(m, m, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    for t in range(1, 8):
        g = torch.randn(50, generator=gen) * 10.0 ** (t - 4)  # 1e-3 .. 1e3
        p.grad = g.clone()
        opt.step()
        u = _old_mfac_step(window, gram, (t - 1) % m, g, damp, 1.0 / m)
        ref_p.add_(u, alpha=-lr)
        assert torch.equal(p.detach(), ref_p), f"step {t}"
    assert not opt.state[p]["row_exp"].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [None, 8])
@pytest.mark.parametrize("decade", [30, -30])
def test_mfac_huge_or_tiny_gradients_step_like_float64(dtype, block_size, decade):
    """Steady gradients of ~1e30 or ~1e-30 (then one jump to the other end and back):
    parameters and state stay finite, and each steady-window step equals the float64
    window-space formula Gᵀ (λI + s G Gᵀ)⁻¹ e_t on the same gradients."""
    m, damp, n = 3, 1e-6, 24
    p = nn.Parameter(torch.zeros(n, dtype=dtype))
    opt = MFAC([p], lr=1.0, num_grads=m, damp=damp, block_size=block_size)
    gen = torch.Generator().manual_seed(3)
    blocks = [slice(0, n)] if block_size is None else [
        slice(i, min(i + block_size, n)) for i in range(0, n, block_size)
    ]
    seen = []
    for t, d in enumerate([decade] * 5 + [-decade, decade], start=1):
        g = (torch.randn(n, generator=gen) * 10.0**d).to(dtype)
        seen.append(g.double())
        before = p.detach().double().clone()
        p.grad = g
        opt.step()
        assert torch.isfinite(p).all()
        for key, v in opt.state[p].items():
            if v.is_floating_point():
                assert torch.isfinite(v).all(), key
        if t > 5:
            continue  # mixed windows: finite (checked above); no well-conditioned reference
        du = before - p.detach().double()
        window = torch.stack(seen[-m:])
        ref = torch.empty(n, dtype=torch.float64)
        tol = 0.0
        for b in blocks:
            w = window[:, b]
            kf = damp * torch.eye(len(w), dtype=torch.float64) + w @ w.T / m
            e = torch.zeros(len(w), dtype=torch.float64)
            e[-1] = 1.0
            ref[b] = w.T @ torch.linalg.solve(kf, e)
            cond = torch.linalg.cond(kf).item()
            tol = max(tol, 8 * (cond + m) * n * EPS32 * ref[b].abs().max().item())
        # + the rounding of the parameter update itself (dtype eps of |p|)
        tol += 2 * torch.finfo(dtype).eps * p.detach().double().abs().max().item()
        torch.testing.assert_close(du, ref, rtol=0, atol=tol, msg=f"step {t}")


def test_mfac_loads_a_checkpoint_without_row_exponents():
    """Checkpoints from before the row exponents: rows were stored unscaled (exponent 0)."""
    p = nn.Parameter(torch.randn(6))
    opt = MFAC([p], lr=0.1, num_grads=3)
    p.grad = torch.randn(6)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][0]["row_exp"]
    q = nn.Parameter(p.detach().clone())
    other = MFAC([q], lr=0.1, num_grads=3)
    other.load_state_dict(sd)
    g = torch.randn(6)
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    other.step()
    assert torch.equal(p, q)
    assert torch.equal(other.state[q]["row_exp"], opt.state[p]["row_exp"])


# ------------------------------------------------------------------------------------ MKOR
class _Recorder(torch.optim.SGD):
    """SGD that records the gradients it is handed (what MKOR gives its base)."""

    seen: list[list[torch.Tensor]]

    def step(self, closure=None):
        self.seen.append([p.grad.clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _loss(model, k, scale):
    g = torch.Generator().manual_seed(k)
    x, y = torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)
    return F.mse_loss(model(x), y) * scale


@pytest.mark.parametrize("exponent", [57, -60])
def test_mkor_preconditioned_gradient_scales_exactly_with_the_loss(exponent):
    """After some steps (factors no longer the identity), one step on the loss x 2**k
    hands the base exactly 2**k times what the loss x 1 hands it: the norm-preserving
    rescale is computed on power-of-two-scaled gradients (the float32 norms of the raw
    ones overflow at 2**57 and vanish at 2**-60 here)."""
    _Recorder.seen = []
    model = _mlp()
    opt = MKOR(model, lr=0.01, momentum=0.0, base=_Recorder, inv_freq=2, warmup_steps=3)
    for k in range(5):
        opt.zero_grad()
        _loss(model, k, 1.0).backward()
        opt.step()
    assert opt.diagnostics()[0]["sm_updates_left"] > 0  # rank-1 updated factors
    runs = []
    for scale in (1.0, 2.0**exponent):
        m2, o2 = copy.deepcopy((model, opt))
        _Recorder.seen = []
        o2.zero_grad()
        _loss(m2, 5, scale).backward()  # step 5: not a factor-update step
        raw = [p.grad.clone() for p in m2.parameters()]
        o2.step()
        runs.append((raw, _Recorder.seen[-1]))
    (raw1, got1), (raw2, got2) = runs
    for a, b in zip(raw1, raw2):
        assert torch.equal(a.double() * 2.0**exponent, b.double())  # the premise
    for a, b in zip(got1, got2):
        assert torch.equal(a.double() * 2.0**exponent, b.double())
        assert torch.isfinite(b).all() and b.abs().max() > 0


def test_mkor_huge_gradients_reach_the_base_saturated_and_keep_adam_finite():
    """Gradients of ~1e30 (loss x 2**100): the base (Adam) gets them saturated at 2**63,
    so its second moment (g² up to 2**126) stays finite; the direction is the one of the
    ordinary-range step (same signs where not saturated)."""
    model = _mlp()
    opt = MKOR(model, lr=1e-3, base="adam", inv_freq=1)
    for k in range(4):
        opt.zero_grad()
        _loss(model, k, 2.0**100).backward()
        opt.step()
        for p in model.parameters():
            assert torch.isfinite(p).all()
            for key, v in opt.state[p]["base"].items():
                if isinstance(v, torch.Tensor) and v.is_floating_point():
                    assert torch.isfinite(v).all(), key
                    if key == "exp_avg_sq":
                        assert v.max() <= 2.0**126
    assert opt.skipped_steps == 0
