"""Shampoo under faults: injected failures, rejected roots, huge gradients, memory budget.

* A step is all or nothing: with a failure injected into any function the step calls (at its
  1st, 2nd, ... call), either the step completes (every step counter advanced once) or
  parameters and state are bit-identical to before, and a retry then equals a clean step.
* Failures are never silent: each kind warns once with the exception's text; a factor
  failing ``max_consecutive_root_failures`` times in a row triggers ``on_root_failure``.
* Statistics are kept with a per-block scale, so gradients scaled by a power of two
  (up to 2^100 ~ 1e30, or down to 2^-100) give the same training run: exactly the same
  scaled statistics, and the true scale enters through exact power-of-two factors.
* Root refreshes solved in chunks under ``root_memory_budget`` give the same roots.
"""

from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch

import secondorder.blocking as blocking
import secondorder.kernels.kron as kron
import secondorder.kernels.roots as roots
import secondorder.optim.shampoo as mod
import secondorder.optim.shampoo_steps as steps
from secondorder import Shampoo
from secondorder.optim.shampoo import RootFailureError

KW = dict(lr=0.05, block_size=6, precondition_frequency=2, start_preconditioning_step=2)


def _model(seed=0, bias=True):
    torch.manual_seed(seed)
    # (13, 9) is cut into 6x6 blocks (3 size classes); (5, 13) too; biases are graft-only
    return torch.nn.Sequential(
        torch.nn.Linear(9, 13, bias=bias),
        torch.nn.Tanh(),
        torch.nn.Linear(13, 5, bias=bias),
        torch.nn.Linear(5, 4, bias=bias),
    )


def _grads(model, step, scale=1.0):
    gen = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(32, 9, generator=gen), torch.randn(32, 4, generator=gen)
    model.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    for p in model.parameters():
        p.grad.mul_(scale)


def _train(model, opt, steps, first=0, scale=1.0):
    for s in range(first, first + steps):
        _grads(model, s, scale)
        opt.step()


def _snapshot(model, opt):
    def clone(x):
        if isinstance(x, torch.Tensor):
            return x.detach().clone()
        if isinstance(x, dict):
            return {k: clone(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(clone(v) for v in x)
        return x

    params = list(model.parameters())
    return dict(
        params=[p.detach().clone() for p in params],
        state=[clone(dict(opt.state.get(p, {}))) for p in params],
        clock=opt._clock,
    )


def _identical(a, b):
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(_identical(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_identical(x, y) for x, y in zip(a, b))
    return a == b


# Every function of the library that a step calls, as (owner, attribute). Functions the
# optimizer imported by name are patched where it looks them up.
TARGETS = [
    (mod, "inverse_root"),
    (mod, "bias_correction"),
    (steps, "graft_direction"),
    (steps, "update_second_moment"),
    (steps, "graft_rescale"),
    (steps, "bias_correction"),
    (steps, "graft_directions"),
    (steps, "update_second_moments"),
    (steps, "cut"),
    (kron, "update_scaled_statistics"),
    (kron, "precondition"),
    (kron, "precondition_scaled"),
    (roots, "_eigh"),
    (roots, "power_iteration"),
    (blocking.BlockPlan, "split"),
    (blocking.BlockPlan, "merge"),
]

SETTINGS = {
    "sync": dict(KW),
    "newton-nograft": dict(KW, root_method="newton", graft=None, betas=(0.0, 0.99)),
    "async": dict(KW, async_roots=True, async_deterministic_delay=1),
}


def _failing(real, fail_at):
    calls = [0, False]  # number of calls; whether the failure was raised in this thread

    def f(*a, **kw):
        calls[0] += 1
        if calls[0] == fail_at:
            calls[1] = threading.current_thread() is threading.main_thread()
            raise RuntimeError(f"injected failure at call {fail_at}")
        return real(*a, **kw)

    return f, calls


@pytest.mark.parametrize(
    "setting",
    [
        "sync",
        pytest.param("newton-nograft", marks=pytest.mark.slow),
        pytest.param("async", marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"{t[0].__name__}.{t[1]}")
def test_a_step_with_an_injected_failure_is_all_or_nothing(monkeypatch, target, setting):
    owner, name = target
    kw = SETTINGS[setting]
    # steps 1 (fresh state), 2 (first roots), 3 (plain), 4 (refresh: async job submitted)
    for fail_step in (1, 2, 3, 4):
        for fail_at in (1, 2, 3, 7):
            model = _model()
            opt = Shampoo(model.parameters(), **kw)
            _train(model, opt, fail_step - 1)
            clean_model, clean_opt = copy.deepcopy(model), None
            if setting != "async":  # the async worker's queue is not copied
                clean_opt = Shampoo(clean_model.parameters(), **kw)
                clean_opt.load_state_dict(opt.state_dict())
            before = _snapshot(model, opt)
            _grads(model, fail_step)
            real = getattr(owner, name)
            fake, calls = _failing(real, fail_at)
            monkeypatch.setattr(owner, name, fake)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    opt.step()
                    raised = None
                except RuntimeError as e:
                    raised = e
            monkeypatch.setattr(owner, name, real)
            after = _snapshot(model, opt)
            where = f"{name} failing at call {fail_at} of step {fail_step} ({setting})"
            if raised is not None:
                assert "injected" in str(raised), where
                assert _identical(before, after), f"{where}: raised but changed the state"
                opt.step()  # retry with the same gradients: equals a step that never failed
                if clean_opt is not None:
                    _grads(clean_model, fail_step)
                    clean_opt.step()
                    for a, b in zip(model.parameters(), clean_model.parameters()):
                        assert torch.equal(a, b), where
            else:
                steps = [
                    (sb.get("step", torch.tensor(0.0)).item(), sa["step"].item())
                    for sb, sa in zip(before["state"], after["state"])
                ]
                assert all(b + 1 == a for b, a in steps), f"{where}: step counters {steps}"
                assert after["clock"] == before["clock"] + 1
                assert all(torch.isfinite(p).all() for p in model.parameters()), where
                if calls[1]:  # the failure happened in the step and was contained: warned
                    assert any("injected" in str(w.message) for w in caught), where
            opt.close()
            if clean_opt is not None:
                clean_opt.close()


# ------------------------------------------------------------------ warnings, escalation


def _boom(*a, **kw):
    raise RuntimeError("solver exploded: code 42")


def test_root_exception_warns_once_with_its_text_and_counts(monkeypatch):
    model = _model()
    opt = Shampoo(model.parameters(), **dict(KW, precondition_frequency=1))
    _train(model, opt, 2)
    roots_before = [
        [r.clone() for c in opt.state[p]["roots"] for r in c]
        for p in model.parameters()
        if "roots" in opt.state[p]
    ]
    monkeypatch.setattr(mod, "inverse_root", _boom)
    with pytest.warns(RuntimeWarning) as record:
        _train(model, opt, 3, first=2)
    texts = [str(w.message) for w in record if "code 42" in str(w.message)]
    assert len(texts) == 1 and "RuntimeError" in texts[0]
    diag = opt.diagnostics()
    assert all(f == 3 for d in diag for f in d["failures"])
    assert all(s == 3 for d in diag for s in d["streak"])
    roots_after = [
        [r for c in opt.state[p]["roots"] for r in c]
        for p in model.parameters()
        if "roots" in opt.state[p]
    ]
    assert all(
        torch.equal(a, b) for ra, rb in zip(roots_before, roots_after) for a, b in zip(ra, rb)
    )
    monkeypatch.undo()
    _train(model, opt, 1, first=5)
    assert all(s == 0 for d in opt.diagnostics() for s in d["streak"])  # recovered


def test_rejected_root_warns_once_with_the_reason(monkeypatch):
    model = _model()
    opt = Shampoo(model.parameters(), **dict(KW, precondition_frequency=1))
    real = mod.inverse_root

    def inaccurate(*a, **kw):
        res = real(*a, **kw)
        return res._replace(error=torch.full_like(res.error, 0.5), ok=torch.zeros_like(res.ok))

    monkeypatch.setattr(mod, "inverse_root", inaccurate)
    with pytest.warns(RuntimeWarning) as record:
        _train(model, opt, 4)
    texts = [str(w.message) for w in record if "rejected" in str(w.message)]
    assert len(texts) == 1 and "0.5" in texts[0] and "inverse_failure_threshold" in texts[0]


def test_on_root_failure_raise_after_n_consecutive_failures(monkeypatch):
    model = _model()
    opt = Shampoo(
        model.parameters(),
        **dict(KW, precondition_frequency=1),
        max_consecutive_root_failures=3,
        on_root_failure="raise",
    )
    _train(model, opt, 2)
    monkeypatch.setattr(mod, "inverse_root", _boom)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _train(model, opt, 2, first=2)  # two failures: below the limit
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(RootFailureError, match="3 times in a row"):
            _train(model, opt, 1, first=4)
    # the step that raised was applied completely
    assert all(st["step"].item() == 5 for st in opt.state.values())
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_on_root_failure_graft_takes_the_graft_direction(monkeypatch):
    """Roots failing from the first refresh on, with limit 1 and ``"graft"``: every block
    takes the graft (Adam) direction, i.e. exactly the graft-only optimizer."""
    monkeypatch.setattr(mod, "inverse_root", _boom)
    m1, m2 = _model(), _model()
    o1 = Shampoo(m1.parameters(), **KW, max_consecutive_root_failures=1, on_root_failure="graft")
    o2 = Shampoo(m2.parameters(), **dict(KW, start_preconditioning_step=10**6))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for s in range(6):
            _grads(m1, s)
            _grads(m2, s)
            o1.step()
            o2.step()
    assert any("on_root_failure='graft'" in str(w.message) for w in caught)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_async_job_exception_warns_with_text_and_escalates(monkeypatch):
    import threading

    model = _model()
    opt = Shampoo(
        model.parameters(),
        **dict(KW, async_roots=True, async_deterministic_delay=1, precondition_frequency=1),
        max_consecutive_root_failures=2,
        on_root_failure="raise",
    )
    _train(model, opt, 2)  # first roots, in the step
    real = mod.inverse_root

    def failing(*a, **kw):
        if threading.current_thread().name.startswith("secondorder-roots"):
            raise ValueError("worker solver failed: code 7")
        return real(*a, **kw)

    monkeypatch.setattr(mod, "inverse_root", failing)
    with pytest.warns(RuntimeWarning, match="code 7"):
        _train(model, opt, 2, first=2)  # job of step 3 fails, installed at step 4 (1 failure)
        with pytest.raises(RootFailureError):
            _train(model, opt, 1, first=4)  # job of step 4 fails: 2 in a row
    opt.close()


# ---------------------------------------------------------------------- huge gradients


@pytest.mark.parametrize("exponent", [60, -100])
def test_gradients_scaled_by_huge_or_tiny_powers_of_two_give_the_same_run(exponent):
    """``graft=None`` Shampoo of 2-d blocks (``P_i = S_i^(-1/4)``) is invariant to the
    gradient scale: ``(c g) x (c^2 S)^(-1/4) x (c^2 S)^(-1/4) = g x S^(-1/4) x S^(-1/4)``.
    With ``c = 2^k`` the scaled statistics are bit-identical and the scale enters through
    powers of two (``pow`` of an exact power of two times the unscaled factor), so the
    runs agree to a few ulps; a plain float32 ``G G^T`` would underflow to zero for
    ``k = -100``. Gradient entries beyond ``2^63`` saturate (Shampoo clamps them so that the
    graft's second moment stays finite), so larger scales are not invariant by design; the
    scaled statistics themselves are checked up to 1e30 in ``tests/kernels/test_kron.py``."""
    kw = dict(KW, graft=None, precondition_frequency=1, start_preconditioning_step=1)
    m1, m2 = _model(bias=False), _model(bias=False)  # every tensor preconditioned
    o1, o2 = Shampoo(m1.parameters(), **kw), Shampoo(m2.parameters(), **kw)
    c = 2.0**exponent
    for s in range(6):
        _grads(m1, s)
        _grads(m2, s, scale=c)
        o1.step()
        o2.step()
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        st1, st2 = o1.state[p1], o2.state[p2]
        if "stats" in st2:
            for a, b in zip(st1["stats"], st2["stats"]):
                assert all(torch.equal(x, y) for x, y in zip(a, b))  # scale-free: identical
            lam = [x for cls in st2["lambda_max"] for t in cls for x in t.tolist()]
            assert all(torch.isfinite(torch.tensor(lam, dtype=torch.float64)))
            ref = [x * c * c for cls in st1["lambda_max"] for t in cls for x in t.tolist()]
            torch.testing.assert_close(
                torch.tensor(lam, dtype=torch.float64),
                torch.tensor(ref, dtype=torch.float64),
                rtol=1e-12,
                atol=0,
            )
        # 6 steps of a few float32 roundings each on O(1) values
        tol = 64 * torch.finfo(torch.float32).eps * p1.abs().max().item()
        torch.testing.assert_close(p2, p1, rtol=0, atol=tol)
    assert all(f == 0 for d in o2.diagnostics() for f in d["failures"])


def test_gradients_times_1e20_keep_statistics_finite_and_roots_accepted():
    model = _model()
    opt = Shampoo(model.parameters(), **dict(KW, precondition_frequency=1))
    _train(model, opt, 5, scale=1e20)
    for st in opt.state.values():
        for name in ("stats", "lambda_max", "roots", "stat_scale"):
            for cls in st.get(name, []):
                assert all(torch.isfinite(t).all() for t in cls), name
    diag = opt.diagnostics()
    assert diag and all(f == 0 for d in diag for f in d["failures"])
    assert all(1e30 < lam < float("inf") for d in diag for lam in d["lambda_max"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------- memory budget


@pytest.mark.parametrize("root_method", ["eigh", "newton"])
def test_chunked_refresh_matches_one_batch_and_respects_the_budget(root_method):
    """A budget of one byte solves one matrix per call. Per-matrix results of eigh (LAPACK
    per matrix) and of the Newton iteration (each matrix iterates and stops on its own) do
    not depend on the batch, so the roots agree to float32 rounding of the batched
    matmuls (a few ulps of the O(1)-scaled roots, times the root's dimension)."""
    kw = dict(KW, precondition_frequency=1, root_method=root_method)
    m1, m2 = _model(), _model()
    o1 = Shampoo(m1.parameters(), **kw, root_memory_budget=None)
    o2 = Shampoo(m2.parameters(), **kw, root_memory_budget=1)
    # compare the first roots (step 2), computed from identical statistics: later ones
    # see parameters that differ by rounding, which nearly singular statistics amplify
    _train(m1, o1, 2)
    _train(m2, o2, 2)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        for a, b in zip(o1.state[p1].get("roots", []), o2.state[p2].get("roots", [])):
            for x, y in zip(a, b):
                tol = 8 * x.shape[-1] * torch.finfo(torch.float32).eps * x.abs().max().item()
                torch.testing.assert_close(y, x, rtol=0, atol=tol)
    d1, d2 = o1.memory_diagnostics(), o2.memory_diagnostics()
    # one 6x6 matrix per chunk: its workspace alone
    assert d2["peak_root_workspace_bytes"] == roots.root_workspace_bytes(6, root_method, 1)
    assert d2["root_chunks"] > d1["root_chunks"]
    assert d1["peak_root_workspace_bytes"] > d2["peak_root_workspace_bytes"]
    assert d2["state_bytes"] == o2.state_bytes()
    assert d2["statistics"] + d2["roots"] + d2["moments"] + d2["other"] == d2["state_bytes"]


def test_budget_bounds_the_chunk_size():
    p = torch.nn.Parameter(torch.randn(40, 40))
    n, per = 8, roots.root_workspace_bytes(8, "eigh", 1)
    opt = Shampoo(
        [p],
        block_size=n,
        precondition_frequency=1,
        start_preconditioning_step=1,
        root_method="eigh",
        root_memory_budget=3 * per + 1,
    )
    p.grad = torch.randn(40, 40)
    opt.step()
    d = opt.memory_diagnostics()
    # 25 blocks x 2 axes = 50 matrices of 8x8, at most 3 per chunk
    assert d["peak_root_workspace_bytes"] == 3 * per
    assert d["root_chunks"] == -(-50 // 3)


# ------------------------------------------------------------------- packed statistics


def test_pack_unpack_round_trip_is_exact():
    a = torch.randn(5, 7, 7, dtype=torch.float64)
    a = a + a.transpose(1, 2)
    p = kron.pack_symmetric(a)
    assert p.shape == (5, kron.packed_size(7)) == (5, 28)
    assert torch.equal(kron.unpack_symmetric(p), a)
    assert kron.packed_dim(28) == 7
    with pytest.raises(ValueError):
        kron.packed_dim(27)


@pytest.mark.parametrize("matmul_dtype", [None, torch.bfloat16])
def test_packed_statistics_follow_full_statistics(monkeypatch, matmul_dtype):
    """Same values, half the memory. The Gram products are the same bmm; only the fused
    ``baddbmm`` of the full path rounds the accumulation differently (one rounding per
    entry per step), so the statistics agree to a few ulps (relative ``8 eps``). The first
    roots (step 2) of ``S + ridge * lambda_max I`` have condition at most ``1 / ridge``;
    a relative perturbation ``d`` of ``S`` moves ``S^(-1/p)`` by at most
    ``cond * d / p`` relative to its largest entry."""
    monkeypatch.setattr(kron, "GRAM_CHUNK_BYTES", 1)  # one block per Gram product
    ridge = 1e-3
    kw = dict(KW, matmul_dtype=matmul_dtype, root_method="eigh", eps=ridge)
    m1, m2 = _model(), _model()
    o1 = Shampoo(m1.parameters(), **kw)
    o2 = Shampoo(m2.parameters(), **kw, packed_statistics=True)
    _train(m1, o1, 2)
    _train(m2, o2, 2)
    eps = torch.finfo(torch.float32).eps
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        st1, st2 = o1.state[p1], o2.state[p2]
        if "stats" not in st1:
            continue
        for a, b in zip(st1["stats"], st2["stats"]):
            for full, packed in zip(a, b):
                assert packed.dim() == 2 and packed.numel() <= full.numel()
                tol = 8 * eps * full.abs().max().item()
                torch.testing.assert_close(kron.unpack_symmetric(packed), full, rtol=0, atol=tol)
        for a, b in zip(st1["roots"], st2["roots"]):
            for x, y in zip(a, b):
                tol = 8 * eps / ridge / 2 * x.float().abs().max().item()  # p >= 2
                torch.testing.assert_close(y.float(), x.float(), rtol=0, atol=tol)
    full_bytes = o1.memory_diagnostics()["statistics"]
    packed_bytes = o2.memory_diagnostics()["statistics"]
    assert packed_bytes < 0.75 * full_bytes  # 6x6 blocks: 21 of 36 entries
