"""MKOR kernels against dense float64 references: Sherman-Morrison vs explicit inverses
(single steps and whole factor trajectories of both update rules), the Kronecker identity vs
``torch.kron``, the norm-preserving rescale, and the layer statistics vs ``F.unfold`` and
explicit per-row loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from secondorder.kernels import mkor as K

EPS64 = torch.finfo(torch.float64).eps


def spd(d: int, cond: float, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.logspace(0, math.log10(cond), d, dtype=torch.float64)) @ q.T


def assert_close_cond(a, b, cond, d, steps=1):
    """Agreement to (float64 eps) x (size) x (condition) x (steps), relative to ``|b|``."""
    tol = 10 * EPS64 * d * cond * steps
    err = (a - b).abs().max() / b.abs().max()
    assert err <= tol, f"relative error {err:.3g} > {tol:.3g}"


@settings(max_examples=25, deadline=None)
@given(d=st.integers(1, 16), seed=st.integers(0, 10_000), c=st.sampled_from([1.0, 0.05, 3.0]))
def test_sherman_morrison_equals_dense_inverse(d, seed, c):
    g = torch.Generator().manual_seed(seed)
    m = spd(d, 30.0, g)
    v = torch.randn(d, generator=g, dtype=torch.float64)
    got = K.sherman_morrison(m, v, c)
    want = torch.linalg.inv(torch.linalg.inv(m) + c * torch.outer(v, v))
    assert_close_cond(got, want, 30.0 * (1 + c * v.dot(v).item()), d)


def test_sherman_morrison_batches_over_a_stack():
    g = torch.Generator().manual_seed(1)
    ms = torch.stack([spd(5, 10.0, g) for _ in range(3)])
    vs = torch.randn(3, 5, generator=g, dtype=torch.float64)
    got = K.sherman_morrison(ms, vs)
    for i in range(3):
        want = torch.linalg.inv(torch.linalg.inv(ms[i]) + torch.outer(vs[i], vs[i]))
        assert_close_cond(got[i], want, 10.0 * (1 + vs[i].dot(vs[i]).item()), 5)


@pytest.mark.parametrize("rule", ["official", "paper"])
@pytest.mark.parametrize("d", [1, 4, 9])
def test_factor_trajectory_matches_dense_recursion(rule, d):
    """Ten rank-1 updates from the identity equal the dense recursion with explicit
    inverses: official ``P <- inv(inv(d P + (1 - d) I) + v v^T)``, paper
    ``P <- inv(d inv(P) + (1 - d) v v^T)``."""
    g = torch.Generator().manual_seed(d)
    decay = 0.9
    p = torch.eye(d, dtype=torch.float64)
    dense = p.clone()
    eye = torch.eye(d, dtype=torch.float64)
    for t in range(10):
        v = torch.randn(d, generator=g, dtype=torch.float64)
        if rule == "official":
            p = K.official_update(p, v, decay)
            dense = torch.linalg.inv(torch.linalg.inv(decay * dense + (1 - decay) * eye)
                                     + torch.outer(v, v))  # fmt: skip
        else:
            p = K.ema_update(p, v, decay)
            dense = torch.linalg.inv(decay * torch.linalg.inv(dense)
                                     + (1 - decay) * torch.outer(v, v))  # fmt: skip
        cond = torch.linalg.cond(dense).item()
        assert_close_cond(p, dense, cond, d, steps=t + 1)


def test_stabiliser_pieces():
    p = torch.tensor([[1.0, 3.0], [3.0, 1.0]], dtype=torch.float64)
    assert bool(K.too_large(p, 2.0)) and not bool(K.too_large(p, 3.0))
    torch.testing.assert_close(K.blend_identity(p, 1.0), torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(K.blend_identity(p, 0.25), 0.75 * p + 0.25 * torch.eye(2).double())


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 7), n=st.integers(1, 7), seed=st.integers(0, 10_000))
def test_kronecker_identity(m, n, seed):
    """vec(P_L G P_R) = (P_R^T kron P_L) vec(G), vec stacking columns."""
    g = torch.Generator().manual_seed(seed)
    left = torch.randn(m, m, generator=g, dtype=torch.float64)
    right = torch.randn(n, n, generator=g, dtype=torch.float64)
    grad = torch.randn(m, n, generator=g, dtype=torch.float64)
    got = K.kron_precondition(left, grad, right).T.reshape(-1)
    want = torch.kron(right.T.contiguous(), left) @ grad.T.reshape(-1)
    scale = left.abs().sum(1).max() * right.abs().sum(0).max() * grad.abs().max()
    assert (got - want).abs().max() <= 4 * EPS64 * (m + n) * scale


def test_norm_preserving_rescale():
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(6, 5, generator=g, dtype=torch.float64)
    pre = 7.0 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    for bias in (True, False):
        s = K.norm_preserving_scale(K.weight_bias_norms(grad, bias), K.weight_bias_norms(pre, bias))
        w_norm = (grad[:, :-1] if bias else grad).norm() + (grad[:, -1].norm() if bias else 0)
        got = (pre * s)[:, :-1].norm() + (pre * s)[:, -1].norm() if bias else (pre * s).norm()
        torch.testing.assert_close(got, w_norm, rtol=1e-12, atol=0)
    zero = torch.zeros(3, 4)
    s = K.norm_preserving_scale(K.weight_bias_norms(zero, True), K.weight_bias_norms(zero, True))
    assert s.item() == 0.0  # zero gradient: no NaN, a zero update


# ----------------------------------------------------------------------------- statistics
def _manual_rows_mean(rows: torch.Tensor, clip: float, bias: bool) -> torch.Tensor:
    out = []
    for j in range(rows.shape[1]):
        out.append(sum(min(max(float(r[j]), -clip), clip) for r in rows) / rows.shape[0])
    if bias:
        out.append(min(1.0, clip))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 5)])
@pytest.mark.parametrize("clip", [100.0, 0.5])
def test_linear_statistics_match_manual_rows(shape, clip):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    gout = torch.randn(*shape[:-1], 4, generator=g, dtype=torch.float64) * 0.2
    rows = x.reshape(-1, 5)
    torch.testing.assert_close(
        K.linear_input_stat(x, True, clip), _manual_rows_mean(rows, clip, True)
    )
    torch.testing.assert_close(
        K.linear_input_stat(x, False, clip), _manual_rows_mean(rows, clip, False)
    )
    grows = gout.reshape(-1, 4)
    want = _manual_rows_mean(grows * grows.shape[0], clip, False)
    torch.testing.assert_close(K.linear_output_stat(gout, clip), want)


CONVS = [
    dict(kernel_size=3),
    dict(kernel_size=3, padding=1),
    dict(kernel_size=(2, 3), stride=2, padding=(1, 0)),
    dict(kernel_size=3, dilation=2, padding=2, stride=(1, 2)),
    dict(kernel_size=(3, 2), padding="same"),
    dict(kernel_size=(4, 4), padding="same", dilation=(1, 2)),
    dict(kernel_size=2, padding="valid", bias=False),
]


@pytest.mark.parametrize("clip", [100.0, 0.3])
@pytest.mark.parametrize("kw", CONVS, ids=str)
def test_conv2d_statistics_match_unfold(kw, clip):
    g = torch.Generator().manual_seed(4)
    conv = torch.nn.Conv2d(2, 3, **kw).double()
    x = torch.randn(4, 2, 7, 8, generator=g, dtype=torch.float64)
    out = conv(x)
    geom = K.conv_geometry(conv)
    # Reference: F.unfold on the explicitly padded input (string paddings included).
    left, right, top, bottom = geom.padding
    cols = F.unfold(F.pad(x, (left, right, top, bottom)), conv.kernel_size,
                    dilation=conv.dilation, stride=conv.stride)  # fmt: skip
    assert cols.shape[2] == out.shape[2] * out.shape[3]
    per_example = cols.mean(2)  # (N, C kh kw)
    bias = conv.bias is not None
    want = _manual_rows_mean(per_example, clip, bias)
    torch.testing.assert_close(K.conv2d_input_stat(x, geom, bias, clip), want)
    gout = torch.randn(out.shape, generator=g, dtype=torch.float64) * 0.1
    n, positions = out.shape[0], out.shape[2] * out.shape[3]
    want_g = _manual_rows_mean(gout.sum((2, 3)) * n / positions, clip, False)
    torch.testing.assert_close(K.conv2d_output_stat(gout, clip), want_g)
