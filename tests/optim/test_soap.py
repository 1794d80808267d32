"""SOAP against a dense float64 reference written here, block by block with explicit loops.

The reference merges and blocks the shape itself (greedy merge, slicing), keeps per block
float64 factors, bases and rotated second moments, and follows the documented step: rotate
the gradient and momentum, Adam, rotate back, decoupled weight decay, factors, then the
basis refresh (Rayleigh-quotient reordering of the old columns and of the second moment;
first basis and ``basis_method="eigh"`` by a full eigendecomposition, ``"qr"`` by one
subspace-iteration step).

Eigenvectors are only defined up to sign and within repeated eigenvalues. The update is
invariant to column signs, and the test data make every factor full rank with distinct
eigenvalues when its first basis is built (``start_preconditioning_step`` leaves enough
steps). The tolerance scales with float32 rounding, the block size, the number of steps and
the inverse of the smallest relative eigenvalue gap the reference met.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import secondorder
from secondorder import SOAP

EPS32 = torch.finfo(torch.float32).eps


# ============================================================== the dense reference
def ref_merge(shape, block_size):
    dims = [d for d in shape if d != 1]
    out = []
    for d in dims:
        if out and out[-1] * d <= block_size:
            out[-1] *= d
        else:
            out.append(d)
    return out


def mode(x, mat, axis):
    """``x x_axis mat``: ``mat`` multiplies every mode-``axis`` fibre from the left."""
    return torch.movedim(torch.tensordot(mat, x, dims=([1], [axis])), 0, axis)


TIE_BREAK = 1e-4  # the documented graded diagonal added to a factor for its refresh


def tie_broken(L):
    n = L.shape[0]
    ramp = 1.0 + torch.arange(n, dtype=L.dtype) / n
    return L + torch.diag(torch.trace(L) * TIE_BREAK / n * ramp)


def unfold(x, axis):
    return torch.movedim(x, axis, 0).reshape(x.shape[axis], -1)


class RefSOAP:
    """One parameter's SOAP, float64, one block at a time."""

    def __init__(self, p0, *, lr, betas, eps, weight_decay, block_size, freq, start,
                 shampoo_beta=None, method="qr", precondition_1d=False):  # fmt: skip
        self.p = p0.detach().double().clone()
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.sb = betas[1] if shampoo_beta is None else shampoo_beta
        self.freq, self.start, self.method = freq, start, method
        self.merged = ref_merge(p0.shape, block_size)
        nonunit = sum(d != 1 for d in p0.shape)
        k = len(self.merged)
        self.rotated = k >= 2 or (k == 1 and (nonunit >= 2 or precondition_1d))
        self.m = torch.zeros(self.merged, dtype=torch.float64)
        self.blocks = []  # per block: slices, factors, bases, v
        starts = [range(0, d, block_size) for d in self.merged]
        for corner in itertools.product(*starts):
            sl = tuple(slice(s, min(s + block_size, d)) for s, d in zip(corner, self.merged))
            bs = [s.stop - s.start for s in sl]
            self.blocks.append(
                dict(
                    sl=sl,
                    L=[torch.zeros(n, n, dtype=torch.float64) for n in bs],
                    Q=[torch.eye(n, dtype=torch.float64) for n in bs],
                    v=torch.zeros(bs, dtype=torch.float64),
                )
            )
        self.t = 0
        self.refreshed = False
        self.min_gap = math.inf  # smallest relative eigenvalue gap met at a refresh

    def step(self, grad):
        self.t += 1
        t = self.t
        g = grad.double().reshape(self.merged)
        self.m = self.b1 * self.m + (1 - self.b1) * g
        bc1 = 1 - self.b1**t if self.b1 > 0 else 1.0
        bc2 = 1 - self.b2**t if 0 < self.b2 < 1 else 1.0
        w2 = 1.0 if self.b2 == 1 else 1 - self.b2
        d = torch.zeros_like(g)
        use_q = self.rotated and t >= self.start
        for b in self.blocks:
            gb, mb = g[b["sl"]], self.m[b["sl"]]
            if use_q:
                for i, q in enumerate(b["Q"]):
                    gb, mb = mode(gb, q.T, i), mode(mb, q.T, i)
            b["v"] = self.b2 * b["v"] + w2 * gb * gb
            n = (mb / bc1) / ((b["v"] / bc2).sqrt() + self.eps)
            if use_q:
                for i, q in enumerate(b["Q"]):
                    n = mode(n, q, i)
            d[b["sl"]] = n
        self.p = self.p * (1 - self.lr * self.wd) - self.lr * d.reshape(self.p.shape)
        if not self.rotated:
            return
        first = self.start - 1
        due = t >= first and (t - first) % self.freq == 0
        for b in self.blocks:
            gb = g[b["sl"]]
            sw = 1.0 if self.sb == 1 else 1 - self.sb
            for i in range(gb.dim()):
                u = unfold(gb, i)
                b["L"][i] = self.sb * b["L"][i] + sw * u @ u.T
            if not due:
                continue
            for i, (L, Q) in enumerate(zip(b["L"], b["Q"])):
                L = tie_broken(L)
                est = torch.diag(Q.T @ L @ Q)
                perm = torch.argsort(est, descending=True, stable=True)
                b["v"] = b["v"].index_select(i, perm)
                if not self.refreshed or self.method == "eigh":
                    w, V = torch.linalg.eigh(L)
                    b["Q"][i] = V.flip(-1)
                else:
                    b["Q"][i] = torch.linalg.qr(L @ Q[:, perm]).Q
                    w = torch.linalg.eigvalsh(L)
                gaps = (w[1:] - w[:-1]) / w[-1]
                self.min_gap = min(self.min_gap, gaps.min().item() if len(gaps) else 1.0)
        if due:
            self.refreshed = True


# ====================================================================== comparisons
CASES = {
    # name: (shape, block_size, start, precondition_1d)
    "matrix": ((6, 5), 8, 3, False),
    "blocked": ((10, 7), 4, 3, False),  # classes (4,4) (4,3) (2,4) (2,3)
    "conv": ((3, 2, 3, 3), 8, 3, False),  # merged (6, 3, 3)
    "conv_blocked": ((5, 4, 3, 3), 4, 3, False),  # order 4, dims 5 > 4 cut into blocks
    "merged_to_1d": ((3, 2), 8, 7, False),  # one factor over the merged dim 6
    "vector_1d": ((7,), 4, 6, True),  # precondition_1d: blocks (4,) and (3,)
}


def run_both(shape, block_size, start, p1d, *, steps=9, method="eigh", freq=1, wd=0.1,
             betas=(0.9, 0.95), shampoo_beta=None, dtype=torch.float32, seed=0):  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    p0 = torch.randn(shape, generator=g).to(dtype)
    kw = dict(lr=0.01, betas=betas, eps=1e-8, weight_decay=wd, block_size=block_size,
              precondition_frequency=freq, start_preconditioning_step=start,
              shampoo_beta=shampoo_beta, basis_method=method, precondition_1d=p1d)  # fmt: skip
    p = torch.nn.Parameter(p0.clone())
    opt = SOAP([p], **kw)
    ref = RefSOAP(p0, freq=freq, start=start, method=method, precondition_1d=p1d,
                  **{k: kw[k] for k in ("lr", "betas", "eps", "weight_decay", "block_size",
                                        "shampoo_beta")})  # fmt: skip
    for _ in range(steps):
        grad = torch.randn(shape, generator=g).to(dtype)
        p.grad = grad
        opt.step()
        ref.step(grad)
    return p, ref, opt


def tolerance(ref, steps, n_max):
    """float32 rounding x block size x steps, amplified by the eigenvector conditioning."""
    return ref.lr * steps * 10 * EPS32 * n_max / min(ref.min_gap, 1.0)


@pytest.mark.parametrize("method,freq", [("eigh", 1), ("qr", 1), ("qr", 2), ("eigh", 3)])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_dense_reference(case, method, freq):
    shape, block_size, start, p1d = CASES[case]
    steps = 9
    p, ref, opt = run_both(shape, block_size, start, p1d, steps=steps, method=method, freq=freq)
    assert ref.rotated and ref.min_gap > 1e-4, "test data must give distinct eigenvalues"
    assert "factors" in opt.state[p]
    tol = tolerance(ref, steps, max(ref.merged + [block_size]))
    err = (p.detach().double() - ref.p).abs().max().item()
    assert err <= tol, f"{case}/{method}/f{freq}: max error {err:.3g} > tolerance {tol:.3g}"


@pytest.mark.parametrize("case", list(CASES))
def test_rotation_is_not_a_no_op(case):
    """The reference with rotation differs from the same reference without it by far more
    than the tolerance: the comparison above could fail."""
    shape, block_size, start, p1d = CASES[case]
    _, rotated, _ = run_both(shape, block_size, start, p1d, steps=14)
    _, adam_like, _ = run_both(shape, block_size, 10**6, p1d, steps=14)
    tol = tolerance(rotated, 14, max(rotated.merged + [block_size]))
    assert (rotated.p - adam_like.p).abs().max().item() > 20 * tol


@pytest.mark.parametrize("beta1", [0.0, 0.9])
def test_1d_and_0d_tensors_run_adamw(beta1):
    """Without precondition_1d, vectors and scalars are updated exactly as torch's AdamW."""
    for shape in [(7,), (), (1, 5, 1)]:
        g = torch.Generator().manual_seed(1)
        init = torch.randn(shape, generator=g)
        a, b = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
        kw = dict(lr=0.01, betas=(beta1, 0.95), eps=1e-8, weight_decay=0.1)
        opt, ref = SOAP([a], **kw), torch.optim.AdamW([b], **kw)
        for _ in range(6):
            grad = torch.randn(shape, generator=g)
            a.grad, b.grad = grad.clone(), grad.clone()
            opt.step()
            ref.step()
        assert "factors" not in opt.state[a]
        # elementwise float32 Adam: the two differ only in rounding order, a few float32
        # roundings of |p| (+ lr * |direction| <= lr / sqrt(1 - beta2)) per step
        scale = init.abs().max().item() + kw["lr"] / (1 - 0.95) ** 0.5
        torch.testing.assert_close(a, b, rtol=0, atol=6 * 4 * EPS32 * scale)


def test_shampoo_beta_and_running_sums():
    """``shampoo_beta`` drives the factors, ``betas[1] = 1`` makes ``v`` a running sum."""
    shape, block_size, start, p1d = CASES["blocked"]
    p, ref, _ = run_both(
        shape, block_size, start, p1d, betas=(0.0, 1.0), shampoo_beta=0.7, method="qr"
    )
    tol = tolerance(ref, 9, block_size)
    assert (p.detach().double() - ref.p).abs().max().item() <= tol


def test_bfloat16_parameters_keep_float32_state():
    """A bf16 parameter's state is the float32 state of the same run on a float32 copy
    (the state depends on the gradients only), and the bf16 values follow the float32 ones
    to within bf16 rounding per step."""
    shape = (10, 7)
    g = torch.Generator().manual_seed(4)
    init = torch.randn(shape, generator=g).bfloat16()
    a = torch.nn.Parameter(init.clone())
    b = torch.nn.Parameter(init.float())
    kw = dict(lr=0.01, block_size=4, precondition_frequency=2, weight_decay=0.0)
    oa, ob = SOAP([a], **kw), SOAP([b], **kw)
    steps = 7
    for _ in range(steps):
        grad = torch.randn(shape, generator=g).bfloat16()
        a.grad, b.grad = grad, grad.float()
        oa.step()
        ob.step()
    assert a.dtype == torch.bfloat16
    for key, value in oa.state[a].items():
        other = ob.state[b][key]
        flat = value if isinstance(value, list) else [value]
        flat_o = other if isinstance(other, list) else [other]
        for x, y in zip(flat, flat_o):
            for u, w in zip(x if isinstance(x, list) else [x], y if isinstance(y, list) else [y]):
                assert u.dtype == w.dtype and u.dtype in (torch.float32, torch.int64), key
                assert torch.equal(u, w), key
    # each step rounds the bf16 parameter once (relative 2^-8) and adds lr * |d| of error
    bound = steps * (2.0**-8 * b.detach().abs().max().item() + 2.0**-8 * 0.01 * 10)
    assert (a.float() - b).abs().max().item() <= bound


def test_zero_gradients_only_decay_the_weights():
    """Closed form: with zero gradients every direction is 0, so ``p = p0 (1 - lr wd)^t``."""
    p0 = torch.randn(6, 5)
    p = torch.nn.Parameter(p0.clone())
    opt = SOAP([p], lr=0.1, weight_decay=0.5, block_size=4, precondition_frequency=1)
    for _ in range(5):
        p.grad = torch.zeros(6, 5)
        opt.step()
    expect = p0.double() * (1 - 0.1 * 0.5) ** 5
    torch.testing.assert_close(p.detach().double(), expect, rtol=8 * EPS32, atol=0)


def test_diagnostics_and_state_bytes():
    shape, block_size, start, p1d = CASES["blocked"]
    steps, freq = 8, 3  # the last step refreshes: the eigenvalues are of the current factors
    p, ref, opt = run_both(shape, block_size, start, p1d, steps=steps, method="eigh", freq=freq)
    recs = opt.diagnostics()
    # classes (4,4) (4,3) (2,4) (2,3): two factors each
    assert [(r["block_shape"], r["axis"]) for r in recs] == [
        ((4, 4), 0), ((4, 4), 1), ((4, 3), 0), ((4, 3), 1),
        ((2, 4), 0), ((2, 4), 1), ((2, 3), 0), ((2, 3), 1),
    ]  # fmt: skip
    last_refresh = max(t for t in range(1, steps + 1) if t >= start - 1
                       and (t - start + 1) % freq == 0)  # fmt: skip
    for r in recs:
        assert r["step"] == steps and r["basis_age"] == steps - last_refresh
        assert r["failures"] == [0] * r["num_blocks"]
        assert max(r["orthogonality_error"]) <= 10 * EPS32 * r["size"]
    # eigenvalue range = the reference factors' spectrum at the last refresh
    # (the reference keeps factors in one list of blocks, row-major like BlockPlan's classes)
    st = opt.state[p]
    for c, stack in enumerate(st["factors"]):
        for i, f in enumerate(stack):
            w = torch.stack([torch.linalg.eigvalsh(tie_broken(x.double())) for x in f])
            lam = st["eigenvalues"][c][i].double()
            atol = 10 * EPS32 * w.abs().max().item() * f.shape[-1]
            torch.testing.assert_close(lam, w.flip(-1), rtol=0, atol=atol)
    # state_bytes: the closed-form count of every state tensor
    assert opt.state[p]["factors"][0][0].shape[0] == 2
    n = 10 * 7
    classes = [((4, 4), 2), ((4, 3), 2), ((2, 4), 1), ((2, 3), 1)]
    floats = 2 * n + 3  # momentum, v (rotated: same sizes), step, basis_step, scale_exp
    ints = 0
    for bs, c in classes:
        for d in bs:
            floats += 2 * c * d * d + c * d  # factor, basis, eigenvalues
            ints += c  # failure counters
    assert opt.state_bytes() == 4 * floats + 8 * ints


def test_basis_refresh_schedule():
    """Bases change exactly after steps start-1, start-1+f, ...; between them they stay."""
    p = torch.nn.Parameter(torch.randn(6, 5))
    opt = SOAP([p], block_size=8, precondition_frequency=3, start_preconditioning_step=4)
    g = torch.Generator().manual_seed(2)
    changed = []
    for _ in range(11):
        before = opt.state[p]["bases"][0][0].clone() if opt.state.get(p) else None
        p.grad = torch.randn(6, 5, generator=g)
        opt.step()
        now = opt.state[p]["bases"][0][0]
        changed.append(before is None and not torch.equal(now[0], torch.eye(6)) or
                       before is not None and not torch.equal(before, now))  # fmt: skip
    assert [t for t, c in zip(range(1, 12), changed) if c] == [3, 6, 9]


def test_nonfinite_factors_keep_the_old_basis_and_warn():
    """Factors out of float32 range give a non-finite basis: it is not used, counted, and
    the user is warned once; the parameters stay finite."""
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = SOAP([p], block_size=8, precondition_frequency=1)
    p.grad = torch.randn(4, 4)
    opt.step()
    opt.state[p]["factors"][0][0].fill_(float("inf"))
    p.grad = torch.randn(4, 4)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert opt.diagnostics()[0]["failures"] == [1]
    assert torch.isfinite(opt.state[p]["bases"][0][0]).all()
    assert torch.isfinite(p).all()


def test_exported_and_in_bench_registry():
    from secondorder.bench.errors import BenchUsageError
    from secondorder.bench.optimizers import build_optimizer, parse_spec, resolve

    assert "SOAP" in secondorder.__all__ and resolve("soap") is SOAP
    model = torch.nn.Linear(4, 3)
    built = build_optimizer(parse_spec("soap:basis_method='eigh',block_size=2"), model)
    assert isinstance(built.optimizer, SOAP) and built.optimizer.defaults["block_size"] == 2
    with pytest.raises(BenchUsageError, match="basis_method"):
        build_optimizer(parse_spec("soap:basis_method='svd'"), model)


@pytest.mark.parametrize("method", ["qr", "eigh"])
def test_scale_equivariance_is_exact(method):
    """Adam's direction is unchanged when gradients and eps are both multiplied by ``s``.
    With ``s = 2**40`` the gradients' squares would overflow float32; the scale-aware state
    divides by exact powers of two, so the run is bit-identical to the unscaled one."""
    shape, block_size = (10, 7), 4
    g = torch.Generator().manual_seed(6)
    init = torch.randn(shape, generator=g)
    grads = [torch.randn(shape, generator=g) * 2.0 ** (k % 3) for k in range(8)]
    runs = []
    for s in (1.0, 2.0**40, 2.0**90):
        p = torch.nn.Parameter(init.clone())
        opt = SOAP([p], lr=0.01, eps=1e-8 * s, block_size=block_size, precondition_frequency=2,
                   basis_method=method)  # fmt: skip
        for grad in grads:
            p.grad = grad * s
            opt.step()
        runs.append(p.detach().clone())
        if s > 1:
            assert opt.state[p]["scale_exp"].item() > 0  # the scaled path ran
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_huge_and_tiny_gradients_keep_everything_finite():
    """1e30 gradients (squares overflow float32), then 1e-30 (squares underflow)."""
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(6, 10), (10,), ()]]
    opt = SOAP(params, block_size=8, precondition_frequency=2, precondition_1d=True)
    g = torch.Generator().manual_seed(7)
    for decade in [30, 30, 30, -30, -30, 30, 0, 0]:
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 10.0**decade
        opt.step()
        for p in params:
            assert torch.isfinite(p).all()
            for v in opt.state[p].values():
                for t in v if isinstance(v, list) else [v]:
                    for u in t if isinstance(t, list) else [t]:
                        assert not u.is_floating_point() or torch.isfinite(u).all()
    assert all(r["failures"] == [0] * r["num_blocks"] for r in opt.diagnostics())
