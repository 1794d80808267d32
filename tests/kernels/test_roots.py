"""Tests for secondorder.kernels.roots against fp64 eigh references."""

from __future__ import annotations

import math

import pytest
import torch

from secondorder.kernels.roots import (
    RootResult,
    inverse_root,
    inverse_root_eigh,
    inverse_root_newton,
    power_iteration,
)

CONDS = [1e2, 1e4, 1e6, 1e8]
PS = [2, 4, 6, 8]
NS = [1, 2, 7, 64]


@pytest.fixture(autouse=True)
def _one_thread():
    """Small matrices: one thread is faster and immune to oversubscribed CI machines."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_spd(n: int, cond: float, batch: int = 1, seed: int = 0, scale: float = 1.0):
    """fp64 SPD batch with eigenvalues log-spaced in [scale/cond, scale], random eigvecs."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=torch.float64))
    ev = scale * torch.logspace(0, -math.log10(cond), n, dtype=torch.float64)
    A = (Q * ev.unsqueeze(-2)) @ Q.transpose(-2, -1)
    return (A + A.transpose(-2, -1)) / 2


def reference_root(A: torch.Tensor, p: int, ridge_epsilon: float = 1e-6) -> torch.Tensor:
    """fp64 ``(A + ridge_epsilon * lambda_max * I)^(-1/p)`` via eigh."""
    A = A.to(torch.float64)
    lam_max = torch.linalg.eigvalsh(A)[..., -1].clamp_min(0)
    eps = (ridge_epsilon * lam_max).clamp_min(1e-30)
    L, Q = torch.linalg.eigh(A + eps[..., None, None] * torch.eye(A.shape[-1], dtype=A.dtype))
    return (Q * L.pow(-1.0 / p).unsqueeze(-2)) @ Q.transpose(-2, -1)


def rel_err(X: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-matrix relative Frobenius error."""
    X = X.to(torch.float64)
    return torch.linalg.matrix_norm(X - ref) / torch.linalg.matrix_norm(ref)


# --------------------------------------------------------------------------- power iteration


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("cond", [1e2, 1e6])
def test_power_iteration_matches_eigvalsh(n, cond):
    A = (
        random_spd(n, cond, batch=3, seed=n)
        * torch.tensor([1.0, 1e-3, 1e3]).double()[:, None, None]
    )
    want = torch.linalg.eigvalsh(A)[:, -1]
    got = power_iteration(A.float())
    assert got.shape == (3,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=0)


def test_power_iteration_random_gram_and_2d_input():
    g = torch.Generator().manual_seed(1)
    G = torch.randn(50, 20, generator=g, dtype=torch.float64)
    A = G @ G.T  # rank 20, PSD
    got = power_iteration(A)
    assert got.dim() == 0 and got.dtype == torch.float64
    torch.testing.assert_close(got, torch.linalg.eigvalsh(A)[-1], rtol=1e-5, atol=0)


def test_power_iteration_top_eigvec_orthogonal_to_ones():
    A = torch.tensor([[2.0, -1.0], [-1.0, 2.0]])  # top eigvec (1, -1), eigenvalue 3
    torch.testing.assert_close(power_iteration(A), torch.tensor(3.0), rtol=1e-5, atol=0)


def test_power_iteration_zero_and_nan():
    A = torch.zeros(3, 4, 4)
    A[1] = torch.nan
    A[2] = torch.eye(4) * 5
    got = power_iteration(A)
    assert got[0] == 0 and torch.isnan(got[1]) and torch.isclose(got[2], torch.tensor(5.0))


def test_power_iteration_batched_equals_single():
    A = torch.cat([random_spd(16, c, seed=i) for i, c in enumerate(CONDS)]).float()
    batched = power_iteration(A)
    single = torch.stack([power_iteration(a) for a in A])
    torch.testing.assert_close(batched, single, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- roots vs reference


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("cond", CONDS)
@pytest.mark.parametrize("method", ["newton", "eigh"])
def test_inverse_root_fp32_matches_fp64_reference(method, cond, p, n):
    A = random_spd(n, cond, batch=2, seed=7 * n + p)
    res = inverse_root(A.float(), p, method=method)
    assert isinstance(res, RootResult)
    assert res.root.dtype == torch.float32 and res.root.shape == (2, n, n)
    assert res.ok.all()
    ref = reference_root(A, p)
    # fp32 can resolve the ridged matrix (condition <= 1 + 1/eps = 1e6) to about
    # 1e6 * 6e-8 ~ 6e-2 in the smallest eigenvalue, damped by the 1/p power; Newton does
    # much better than that bound in practice, eigh in fp32 gets close to it.
    tol = 1e-2 if method == "newton" else 0.2 / p
    assert (rel_err(res.root, ref) < tol).all(), rel_err(res.root, ref)
    assert (res.error < 1e-4).all(), res.error


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("cond", CONDS)
@pytest.mark.parametrize("method", ["newton", "eigh"])
def test_inverse_root_fp64_is_accurate(method, cond, p):
    A = random_spd(32, cond, batch=2, seed=p)
    res = inverse_root(A, p, method=method, tol=1e-10)
    assert res.root.dtype == torch.float64 and res.ok.all()
    tol = 1e-6 if method == "newton" else 1e-8
    assert (rel_err(res.root, reference_root(A, p)) < tol).all()


@pytest.mark.parametrize("p", PS)
def test_newton_and_eigh_agree(p):
    A = random_spd(48, 1e4, batch=3, seed=p).float()
    Areg = A + 1e-3 * torch.eye(48)
    h_newton, e_newton = inverse_root_newton(Areg, p)
    h_eigh, e_eigh = inverse_root_eigh(Areg, p)
    assert (e_newton < 1e-4).all() and (e_eigh < 1e-4).all()
    assert (rel_err(h_newton, h_eigh.double()) < 1e-3).all()


def test_newton_invariant_and_small_cases():
    # 1x1: exact scalar root; diagonal: elementwise roots
    h, e = inverse_root_newton(torch.tensor([[[16.0]]]), 4)
    torch.testing.assert_close(h, torch.tensor([[[0.5]]]), rtol=1e-5, atol=0)
    assert e.shape == (1,) and e[0] < 1e-5
    D = torch.diag(torch.tensor([1.0, 4.0, 9.0, 100.0], dtype=torch.float64))
    h, e = inverse_root_newton(D, 2, tol=1e-12)
    torch.testing.assert_close(h, torch.diag(torch.tensor([1.0, 0.5, 1 / 3, 0.1]).double()))
    h, e = inverse_root_newton(D, 1, tol=1e-12)
    torch.testing.assert_close(h, torch.linalg.inv(D))


def test_newton_keeps_last_good_iterate_when_diverging():
    # An indefinite matrix makes the iteration blow up; the guard e_new > 1.2 e_prev must
    # stop it and return the last finite iterate (here the start H_0 = z^(1/p) I = I).
    D = torch.stack([torch.diag(torch.tensor([1.0, -1.0, 0.5])), torch.eye(3) * 4])
    h, e = inverse_root_newton(D, 2)
    assert torch.isfinite(h).all() and torch.isfinite(e).all()
    torch.testing.assert_close(h[0], torch.eye(3))
    assert e[0] >= 0.1  # rejected by inverse_root's default threshold
    torch.testing.assert_close(h[1], torch.eye(3) / 2)  # the good one is unaffected
    assert e[1] < 1e-5


def test_relative_ridge_handles_singular_gram_matrix():
    g = torch.Generator().manual_seed(3)
    G = torch.randn(64, 5, generator=g, dtype=torch.float64) * 1e3
    A = G @ G.T  # rank 5 of 64: singular without the ridge
    for method in ("newton", "eigh"):
        res = inverse_root(A.float(), 4, method=method)
        assert res.ok.all()
        assert rel_err(res.root, reference_root(A, 4)).max() < (
            1e-2 if method == "newton" else 0.05
        )


def test_zero_matrices_work():
    for method in ("newton", "eigh"):
        res = inverse_root(torch.zeros(2, 6, 6), 4, method=method)
        assert res.ok.all() and (res.lambda_max == 0).all()
        assert torch.isfinite(res.root).all()


# --------------------------------------------------------------------------- batching


@pytest.mark.parametrize("method", ["newton", "eigh"])
def test_batched_equals_per_matrix(method):
    A = torch.cat([random_spd(24, c, seed=i, scale=10.0**i) for i, c in enumerate(CONDS)])
    A = torch.cat([A, torch.zeros(1, 24, 24, dtype=torch.float64)]).float()
    batched = inverse_root(A, 4, method=method)
    for i in range(A.shape[0]):
        single = inverse_root(A[i : i + 1], 4, method=method)
        torch.testing.assert_close(batched.root[i], single.root[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batched.error[i], single.error[0], rtol=1e-3, atol=1e-6)
        assert batched.ok[i] == single.ok[0]
        torch.testing.assert_close(batched.lambda_max[i], single.lambda_max[0])


@pytest.mark.parametrize("method", ["newton", "eigh"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_bad_matrix_rejected_without_raising(method, bad):
    A = random_spd(8, 1e3, batch=3, seed=11).float()
    A[1, 2, 3] = bad
    A[1, 3, 2] = bad
    res = inverse_root(A, 4, method=method, retries=2)
    assert res.ok.tolist() == [True, False, True]
    assert not torch.isfinite(res.error[1])
    good = reference_root(A[[0, 2]].double(), 4)
    assert (rel_err(res.root[[0, 2]], good) < 1e-2).all()


def test_retries_increase_ridge_for_failed_only():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(32, 4, generator=g, dtype=torch.float64)
    singular = (G @ G.T).float()  # rank 4: a 1e-9 ridge is too small for fp32
    good = random_spd(32, 1e2, seed=1).float()[0]
    A = torch.stack([good, singular])
    first = inverse_root(A, 4, ridge_epsilon=1e-9)
    assert first.ok.tolist() == [True, False]
    again = inverse_root(A, 4, ridge_epsilon=1e-9, retries=4)
    assert again.ok.tolist() == [True, True]
    torch.testing.assert_close(again.root[0], first.root[0], rtol=0, atol=0)


def test_eigh_per_matrix_floor_and_unbatched():
    A = torch.diag(torch.tensor([1.0, 1e-4])).expand(2, 2, 2)
    root, err = inverse_root_eigh(A, 2, eps=torch.tensor([1e-2, 0.0]))
    torch.testing.assert_close(root[0], torch.diag(torch.tensor([1.0, 10.0])))
    torch.testing.assert_close(root[1], torch.diag(torch.tensor([1.0, 100.0])))
    assert (err < 1e-6).all()
    r2, e2 = inverse_root_eigh(A[0], 2)
    assert r2.shape == (2, 2) and e2.dim() == 0
    # eps = 0 on a singular matrix: non-finite root is reported, not raised
    _, e_sing = inverse_root_eigh(torch.zeros(1, 3, 3), 2)
    assert not torch.isfinite(e_sing).any()


# --------------------------------------------------------------------------- dtypes, validation


def test_dtypes():
    A = random_spd(16, 1e3, batch=2)
    for dtype, out in [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ]:
        for method in ("newton", "eigh"):
            res = inverse_root(A.to(dtype), 2, method=method)
            assert res.root.dtype == out and res.error.dtype == out and res.ok.dtype == torch.bool
            assert res.ok.all()
        assert inverse_root_newton(A.to(dtype), 2)[0].dtype == out
        assert inverse_root_eigh(A.to(dtype), 2)[0].dtype == out


@pytest.mark.parametrize("p", [0, -2, 2.0, True, "4"])
def test_invalid_p(p):
    A = torch.eye(3)
    for fn in (inverse_root, inverse_root_newton, inverse_root_eigh):
        with pytest.raises(ValueError, match=r"\bp\b"):
            fn(A, p)


def test_invalid_method_and_shapes():
    with pytest.raises(ValueError, match="method.*newton.*eigh"):
        inverse_root(torch.eye(3), 2, method="svd")
    with pytest.raises(ValueError, match="shape"):
        inverse_root(torch.ones(2, 3, 4), 2)
    with pytest.raises(ValueError, match="retries"):
        inverse_root(torch.eye(3), 2, retries=-1)


def test_eigh_falls_back_to_fp64(monkeypatch):
    """fp32 eigh raising, or returning NaN for one matrix, is redone in fp64 (only there)."""
    real_eigh = torch.linalg.eigh
    A = random_spd(8, 1e3, batch=3, seed=5).float()  # a multiple of 4: eigh sees it unpadded
    want, _ = inverse_root_eigh(A, 2)
    calls = []

    def raising(x):
        calls.append((x.dtype, tuple(x.shape)))
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated failure")
        return real_eigh(x)

    monkeypatch.setattr(torch.linalg, "eigh", raising)
    root, err = inverse_root_eigh(A, 2)
    assert calls == [(torch.float32, (3, 8, 8)), (torch.float64, (3, 8, 8))]
    assert root.dtype == torch.float32 and (err < 1e-5).all()
    torch.testing.assert_close(root, want, rtol=1e-3, atol=1e-5)

    calls.clear()

    def nan_for_second(x):
        calls.append((x.dtype, tuple(x.shape)))
        L, Q = real_eigh(x)
        if x.dtype == torch.float32:
            L = L.clone()
            L[1] = torch.nan
        return L, Q

    monkeypatch.setattr(torch.linalg, "eigh", nan_for_second)
    root, err = inverse_root_eigh(A, 2)
    assert calls == [(torch.float32, (3, 8, 8)), (torch.float64, (1, 8, 8))]
    assert (err < 1e-5).all()
    torch.testing.assert_close(root, want, rtol=1e-3, atol=1e-5)

    def always_raising(x):
        raise torch.linalg.LinAlgError("simulated failure")

    monkeypatch.setattr(torch.linalg, "eigh", always_raising)
    res = inverse_root(A, 2, method="eigh")
    assert not res.ok.any() and not torch.isfinite(res.error).any()


def test_p_accepts_integral_types():
    np = pytest.importorskip("numpy")
    res = inverse_root(torch.eye(2) * 16, np.int64(4))
    torch.testing.assert_close(res.root, torch.eye(2) / 2)


def test_eigh_pipeline_needs_no_power_iteration_and_its_probe_check_catches_bad_eigvecs(
    monkeypatch,
):
    import secondorder.kernels.roots as R

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 12, 30, generator=g, dtype=torch.float64)
    a = (x @ x.mT).float()

    def no_power(*args, **kwargs):
        raise AssertionError("power iteration is redundant on the eigh path")

    monkeypatch.setattr(R, "power_iteration", no_power)
    good = R.inverse_root(a, 4, method="eigh")
    assert bool(good.ok.all()) and float(good.error.max()) < 1e-5
    torch.testing.assert_close(good.lambda_max, torch.linalg.eigvalsh(a)[:, -1])

    real_eigh = R._eigh

    def scrambled(m):
        lam, q = real_eigh(m)
        return lam, q.roll(1, dims=-1)  # eigenvectors paired with the wrong eigenvalues

    monkeypatch.setattr(R, "_eigh", scrambled)
    bad = R.inverse_root(a, 4, method="eigh")
    assert not bool(bad.ok.any())
    assert float(bad.error.min()) > 0.1
