"""Shampoo against an independent dense float64 reference, plus behaviour checks."""

from __future__ import annotations

import itertools

import pytest
import torch

import secondorder
from secondorder import Shampoo

# --------------------------------------------------------------------------- reference


def _root_fp64(s: torch.Tensor, p: int, eps: float) -> torch.Tensor:
    lam, q = torch.linalg.eigh(s)
    ridge = eps * lam.max().clamp_min(0)
    lam = (lam + ridge).clamp_min(1e-300)
    return (q * lam.pow(-1.0 / p)) @ q.T


def _blocks(shape, bs):
    """All block index tuples (slices) of a tensor of ``shape`` cut into chunks of ``bs``."""
    ranges = [[slice(i, min(i + bs, n)) for i in range(0, n, bs)] for n in shape]
    return list(itertools.product(*ranges))


class DenseShampoo:
    """Straightforward float64 Shampoo on one tensor whose shape is already merged.

    Loops over blocks and axes with tensordot/eigh; shares no code with the library.
    """

    def __init__(
        self,
        shape,
        *,
        lr,
        betas,
        eps,
        block_size,
        freq,
        start,
        graft,
        graft_eps,
        weight_decay=0.0,
        exponent=None,
    ):
        self.shape, self.lr, self.b1, self.b2 = shape, lr, betas[0], betas[1]
        self.eps, self.freq, self.start, self.graft, self.geps = eps, freq, start, graft, graft_eps
        self.wd, self.t = weight_decay, 0
        self.blocks = _blocks(shape, block_size)
        k = len(shape)
        self.exponent = exponent or 2 * k
        self.stats = []
        self.roots = []
        for b in self.blocks:
            dims = [s.stop - s.start for s in b]
            self.stats.append([torch.zeros(n, n, dtype=torch.float64) for n in dims])
            self.roots.append([torch.eye(n, dtype=torch.float64) for n in dims])
        self.m = torch.zeros(shape, dtype=torch.float64)
        self.v = torch.zeros(shape, dtype=torch.float64)

    def step(self, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        self.t += 1
        t, b1, b2 = self.t, self.b1, self.b2
        k = len(self.shape)
        for bi, b in enumerate(self.blocks):
            gb = g[b]
            for i in range(k):
                other = [j for j in range(k) if j != i]
                self.stats[bi][i] = b2 * self.stats[bi][i] + (1 - b2) * torch.tensordot(
                    gb, gb, dims=(other, other)
                )
        if t >= self.start and (t - self.start) % self.freq == 0:
            for bi in range(len(self.blocks)):
                self.roots[bi] = [
                    _root_fp64(s / (1 - b2**t), self.exponent, self.eps) for s in self.stats[bi]
                ]
        self.m = b1 * self.m + (1 - b1) * g
        mhat = self.m / (1 - b1**t)
        self.v = b2 * self.v + (1 - b2) * g * g
        if self.graft == "adam" or (self.graft is None and t < self.start):
            a = mhat / ((self.v / (1 - b2**t)).sqrt() + self.geps)
        else:  # sgd
            a = mhat
        out = torch.empty_like(w)
        for bi, b in enumerate(self.blocks):
            if t >= self.start:
                d = mhat[b]
                for i, r in enumerate(self.roots[bi]):
                    # contract axis i with the (symmetric) root
                    d = torch.tensordot(r, d, dims=([1], [i])).movedim(0, i)
                if self.graft is not None:
                    d = d * a[b].norm() / (d.norm() + 1e-16)
            else:
                d = a[b]
            out[b] = d
        w = w * (1 - self.lr * self.wd)
        return w - self.lr * out


def _grad_fn(shape, seed):
    """A fixed smooth loss whose gradient depends on the parameter: 0.5 * ||A w - c||^2."""
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.tensor(shape).prod())
    a = torch.randn(n, n, generator=gen, dtype=torch.float64) / n**0.5
    c = torch.randn(n, generator=gen, dtype=torch.float64)

    def grad(w):
        r = a @ w.reshape(-1).double() - c
        return (a.T @ r).reshape(shape)

    return grad


def _run_pair(
    shape,
    merged,
    steps,
    *,
    root_method="newton",
    block_size=6,
    freq=3,
    start=2,
    graft="adam",
    betas=(0.9, 0.95),
    eps=1e-6,
    lr=0.05,
    weight_decay=0.0,
    precondition_1d=False,
):
    torch.manual_seed(0)
    w0 = torch.randn(shape, dtype=torch.float64)
    grad = _grad_fn(shape, 1)
    p = torch.nn.Parameter(w0.float().clone())
    opt = Shampoo(
        [p],
        lr=lr,
        betas=betas,
        eps=eps,
        block_size=block_size,
        precondition_frequency=freq,
        start_preconditioning_step=start,
        graft=graft,
        root_method=root_method,
        weight_decay=weight_decay,
        precondition_1d=precondition_1d,
    )
    ref = DenseShampoo(
        merged,
        lr=lr,
        betas=betas,
        eps=eps,
        block_size=block_size,
        freq=freq,
        start=start,
        graft=graft,
        graft_eps=1e-8,
        weight_decay=weight_decay,
    )
    w = w0.reshape(merged).clone()
    for _ in range(steps):
        p.grad = grad(p.detach()).float()
        opt.step()
        w = ref.step(w, grad(w).reshape(merged))
    return p.detach().double(), w.reshape(shape), opt


# ------------------------------------------------------------------- against reference


@pytest.mark.parametrize("root_method", ["newton", "eigh"])
@pytest.mark.parametrize("graft", ["adam", "sgd", None])
def test_matrix_matches_dense_reference(root_method, graft):
    got, want, opt = _run_pair(
        (6, 5), (6, 5), 8, root_method=root_method, graft=graft, lr=0.05 if graft else 0.01
    )
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-5)
    assert all(f == 0 for d in opt.diagnostics() for f in d["failures"])


def test_blocked_matrix_matches_reference():
    # 7 x 5 with blocks of 3: classes (3,3), (3,2), (1,3), (1,2) — edge blocks included.
    got, want, _ = _run_pair((7, 5), (7, 5), 7, block_size=3)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=2e-4)


def test_conv_kernel_is_merged_and_matches_reference():
    # (6, 2, 3, 1): the size-1 dim is dropped, then 2 * 3 <= 6 merge -> (6, 6)
    got, want, _ = _run_pair((6, 2, 3, 1), (6, 6), 6, block_size=6)
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-5)


def test_3d_tensor_matches_reference():
    # (3, 4, 5) with block_size 4: no merge (3*4 > 4), the last dim is blocked 4 + 1.
    got, want, _ = _run_pair((3, 4, 5), (3, 4, 5), 6, block_size=4)
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-5)


def test_weight_decay_decoupled_matches_reference():
    got, want, _ = _run_pair((5, 4), (5, 4), 6, weight_decay=0.1)
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-5)


def test_graft_adam_before_start_is_exactly_adamw():
    torch.manual_seed(0)
    w = torch.randn(8, 6)
    p1, p2 = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    b = torch.nn.Parameter(torch.randn(6))
    b2 = torch.nn.Parameter(b.detach().clone())
    sh = Shampoo(
        [p1, b],
        lr=1e-2,
        betas=(0.9, 0.99),
        weight_decay=0.05,
        start_preconditioning_step=100,
        graft_eps=1e-8,
    )
    ad = torch.optim.AdamW([p2, b2], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05, eps=1e-8)
    for _ in range(10):
        g, gb = torch.randn(8, 6), torch.randn(6)
        p1.grad, p2.grad, b.grad, b2.grad = g.clone(), g.clone(), gb.clone(), gb.clone()
        sh.step()
        ad.step()
    torch.testing.assert_close(p1, p2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b, b2, rtol=1e-6, atol=1e-7)


def test_one_dim_tensors_use_graft_only_unless_asked():
    p = torch.nn.Parameter(torch.randn(10))
    opt = Shampoo([p], lr=0.1)
    p.grad = torch.randn(10)
    opt.step()
    assert "stats" not in opt.state[p]
    q = torch.nn.Parameter(torch.randn(10))
    opt = Shampoo([q], lr=0.1, precondition_1d=True)
    q.grad = torch.randn(10)
    opt.step()
    assert [tuple(s.shape) for s in opt.state[q]["stats"][0]] == [(1, 10, 10)]


def test_precondition_1d_matches_reference():
    got, want, _ = _run_pair((9,), (9,), 6, block_size=4, precondition_1d=True)
    # the reference treats the vector as order 1 with blocks 4, 4, 1
    torch.testing.assert_close(got, want, rtol=1e-3, atol=2e-4)


# ----------------------------------------------------------------------------- dtypes


def test_bfloat16_params_keep_dtype_and_follow_fp32():
    torch.manual_seed(0)
    w = torch.randn(16, 12)
    target = torch.randn(16, 12)
    ps = {dt: torch.nn.Parameter(w.to(dt, copy=True)) for dt in (torch.float32, torch.bfloat16)}
    opts = {
        dt: Shampoo([p], lr=0.05, precondition_frequency=2, block_size=16) for dt, p in ps.items()
    }
    for _ in range(60):
        for dt, p in ps.items():
            p.grad = (p.float() - target).to(dt)
            opts[dt].step()
    assert ps[torch.bfloat16].dtype == torch.bfloat16
    for st in opts[torch.bfloat16].state.values():
        assert st["exp_avg"].dtype == torch.float32
    err32 = (ps[torch.float32] - target).norm()
    err16 = (ps[torch.bfloat16].float() - target).norm()
    assert err16 < 0.5 * (w - target).norm()
    assert abs(err16 - err32) < 0.05 * (w - target).norm()


def test_float64_params_work():
    p = torch.nn.Parameter(torch.randn(5, 4, dtype=torch.float64))
    opt = Shampoo([p], lr=0.1, precondition_frequency=1)
    for _ in range(3):
        p.grad = torch.randn(5, 4, dtype=torch.float64)
        opt.step()
    assert p.dtype == torch.float64 and torch.isfinite(p).all()


# ------------------------------------------------------------------------ convergence


def _steps_to_target(make_opt, lr, steps=250, tol=1e-3):
    gen = torch.Generator().manual_seed(0)
    n = 16
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    a = u @ torch.diag(torch.logspace(0, 1.5, n)) @ u.T  # condition ~ 30 on each side
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    b = v @ torch.diag(torch.logspace(0, 1.5, n)) @ v.T
    w_star = torch.randn(n, n, generator=gen)
    c = a @ w_star @ b
    w = torch.nn.Parameter(torch.zeros(n, n))
    opt = make_opt([w], lr)
    loss0 = None
    for k in range(1, steps + 1):
        opt.zero_grad()
        loss = 0.5 * (a @ w @ b - c).pow(2).sum()
        loss.backward()
        loss0 = loss0 or loss.item()
        if loss.item() < tol * loss0:
            return k
        opt.step()
    return steps + 1


def test_shampoo_needs_clearly_fewer_steps_than_adamw_on_ill_conditioned_problem():
    def shampoo(ps, lr):
        return Shampoo(
            ps,
            lr=lr,
            betas=(0.9, 0.99),
            precondition_frequency=5,
            block_size=16,
            start_preconditioning_step=5,
            graft="adam",
            eps=1e-6,
        )

    def adamw(ps, lr):
        return torch.optim.AdamW(ps, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)

    grid = (1.0, 0.3, 0.1)  # each optimizer at its best learning rate of the grid
    best_sh = min(_steps_to_target(shampoo, lr) for lr in grid)
    best_ad = min(_steps_to_target(adamw, lr) for lr in grid)
    assert best_sh <= 0.6 * best_ad, (best_sh, best_ad)


# ---------------------------------------------------------------- state and failures


def test_state_dict_round_trip_is_exact():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    clone = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    clone.load_state_dict(model.state_dict())
    kw = dict(lr=0.05, precondition_frequency=3, start_preconditioning_step=2, block_size=5)
    opt = Shampoo(model.parameters(), **kw)
    x, y = torch.randn(32, 6), torch.randn(32, 3)

    def train(m, o, n):
        for _ in range(n):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()

    train(model, opt, 4)
    sd = opt.state_dict()
    opt2 = Shampoo(clone.parameters(), **kw)
    train(clone, opt2, 0)
    # clone has trained 0 steps; bring its params to model's and load the state
    clone.load_state_dict(model.state_dict())
    opt2.load_state_dict(sd)
    train(model, opt, 5)
    train(clone, opt2, 5)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def test_mismatched_state_dict_is_rejected():
    p = torch.nn.Parameter(torch.randn(6, 4))
    opt = Shampoo([p], lr=0.1)
    p.grad = torch.randn(6, 4)
    opt.step()
    q = torch.nn.Parameter(torch.randn(4, 6))
    other = Shampoo([q], lr=0.1)
    with pytest.raises(ValueError, match="does not match"):
        other.load_state_dict(opt.state_dict())


def test_failed_root_keeps_previous_root_and_is_counted(monkeypatch):
    import secondorder.optim.shampoo as mod

    p = torch.nn.Parameter(torch.randn(5, 4))
    opt = Shampoo([p], lr=0.1, precondition_frequency=1, start_preconditioning_step=1, block_size=5)
    p.grad = torch.randn(5, 4)
    opt.step()
    good = [r.clone() for r in opt.state[p]["roots"][0]]
    real = mod.inverse_root

    def failing(a, p_, **kw):
        res = real(a, p_, **kw)
        return type(res)(
            root=torch.full_like(res.root, float("nan")),
            error=torch.full_like(res.error, float("nan")),
            lambda_max=res.lambda_max,
            ok=torch.zeros_like(res.ok),
        )

    monkeypatch.setattr(mod, "inverse_root", failing)
    p.grad = torch.randn(5, 4)
    opt.step()
    for r, g in zip(opt.state[p]["roots"][0], good):
        assert torch.equal(r, g)
    assert torch.isfinite(p).all()
    assert [d["failures"] for d in opt.diagnostics()] == [[1], [1]]


def test_diagnostics_report_root_health():
    p = torch.nn.Parameter(torch.randn(12, 7))
    opt = Shampoo([p], lr=0.1, precondition_frequency=2, block_size=8)
    for _ in range(4):
        p.grad = torch.randn(12, 7)
        opt.step()
    diag = opt.diagnostics()
    assert {d["block_shape"] for d in diag} == {(8, 7), (4, 7)}
    for d in diag:
        assert all(e < 0.1 for e in d["root_error"])
        assert all(lam > 0 for lam in d["lambda_max"])
        assert d["step"] == 4


def test_nonfinite_gradient_is_skipped_without_touching_state():
    p = torch.nn.Parameter(torch.randn(5, 4))
    opt = Shampoo([p], lr=0.1, precondition_frequency=1, block_size=5)
    p.grad = torch.randn(5, 4)
    opt.step()
    assert "stats" in opt.state[p]
    before_p = p.detach().clone()
    before = {
        k: [[t.clone() for t in c] for c in v] if isinstance(v, list) else v.clone()
        for k, v in opt.state[p].items()
    }
    p.grad = torch.randn(5, 4)
    p.grad[2, 1] = float("nan")
    opt.step()
    assert torch.equal(p, before_p)
    for k, v in opt.state[p].items():
        if isinstance(v, list):
            assert all(torch.equal(a, b) for ca, cb in zip(v, before[k]) for a, b in zip(ca, cb))
        else:
            assert torch.equal(v, before[k])
    assert opt.skipped_steps == 1
    opt_r = Shampoo([p], lr=0.1, nonfinite="raise")
    with pytest.raises(FloatingPointError):
        opt_r.step()


# ------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(1.0, 0.9)), "betas"),
        (dict(betas=(0.9, 1.1)), "betas"),
        (dict(betas=(-0.1, 0.9)), "betas"),
        (dict(eps=0.0), "eps"),
        (dict(eps=-1e-6), "eps"),
        (dict(block_size=0), "block_size"),
        (dict(block_size=2.5), "block_size"),
        (dict(precondition_frequency=0), "precondition_frequency"),
        (dict(start_preconditioning_step=0), "start_preconditioning_step"),
        (dict(graft="lion"), "graft"),
        (dict(graft_eps=0.0), "graft_eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(exponent_override=0), "exponent_override"),
        (dict(root_method="svd"), "root_method"),
        (dict(nesterov="yes"), "nesterov"),
        (dict(nonfinite="ignore"), "nonfinite"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_argument(kwargs, name):
    p = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises((ValueError, TypeError), match=name):
        Shampoo([p], **kwargs)


def test_bad_param_group_override_raises():
    p, q = torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(3))
    opt = Shampoo([p], lr=0.1)
    with pytest.raises(ValueError, match="block_size"):
        opt.add_param_group({"params": [q], "block_size": 0})
    assert len(opt.param_groups) == 1


def test_beta2_one_is_a_running_sum():
    p = torch.nn.Parameter(torch.zeros(4, 3))
    opt = Shampoo([p], lr=0.0, betas=(0.0, 1.0), graft="adagrad", block_size=4)
    gs = [torch.randn(4, 3) for _ in range(3)]
    for g in gs:
        p.grad = g
        opt.step()
    st = opt.state[p]
    # statistics are stored as scale^2 * S_hat (overflow-safe); the true sum is their product
    true = st["stat_scale"][0][0][0].double() ** 2 * st["stats"][0][0][0].double()
    ref = sum(g.double() @ g.double().T for g in gs)
    # each entry: 3 steps of 3-term dot products plus the rescalings, a few fp32 roundings
    tol = 16 * torch.finfo(torch.float32).eps * ref.abs().max().item()
    torch.testing.assert_close(true, ref, rtol=0, atol=tol)


def test_sparse_and_complex_gradients_raise_before_any_change():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = Shampoo([p], lr=0.1)
    p.grad = torch.randn(4, 3).to_sparse()
    before = p.detach().clone()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert torch.equal(p, before) and not opt.state[p]
    with pytest.raises(TypeError, match="complex"):
        Shampoo([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])


def test_step_returns_closure_loss_and_skips_params_without_grad():
    p, q = torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(3, 3))
    opt = Shampoo([p, q], lr=0.1)
    q0 = q.detach().clone()

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert torch.equal(q, q0) and q not in opt.state


def test_public_api():
    assert secondorder.Shampoo is Shampoo
    assert issubclass(Shampoo, torch.optim.Optimizer)


def test_bf16_matmuls_follow_the_fp32_run():
    torch.manual_seed(0)
    w = torch.randn(24, 20)
    target = torch.randn(24, 20)
    ps, opts = {}, {}
    for mdt in (None, torch.bfloat16):
        ps[mdt] = torch.nn.Parameter(w.clone())
        opts[mdt] = Shampoo(
            [ps[mdt]], lr=0.05, precondition_frequency=2, block_size=24, matmul_dtype=mdt
        )
    for _ in range(40):
        for mdt, p in ps.items():
            p.grad = (p - target) @ torch.diag(torch.linspace(0.1, 3, 20))
            opts[mdt].step()
    assert opts[torch.bfloat16].state[ps[torch.bfloat16]]["roots"][0][0].dtype == torch.bfloat16
    gap = (ps[None] - ps[torch.bfloat16]).norm() / (ps[None] - w).norm()
    assert gap < 0.05, gap
    assert (ps[torch.bfloat16] - target).norm() < 0.5 * (w - target).norm()


def test_root_method_auto_uses_eigh_on_cpu(monkeypatch):
    import secondorder.optim.shampoo as mod

    seen = []
    real = mod.inverse_root

    def spy(a, p_, **kw):
        seen.append(kw["method"])
        return real(a, p_, **kw)

    monkeypatch.setattr(mod, "inverse_root", spy)
    p = torch.nn.Parameter(torch.randn(6, 5))
    opt = Shampoo([p], lr=0.1, precondition_frequency=1, block_size=6)
    p.grad = torch.randn(6, 5)
    opt.step()
    assert seen and set(seen) == {"eigh"}
