"""``foreach=True`` (multi-tensor ``torch._foreach_*`` calls) and ``foreach=False`` (one tensor
at a time) give bit-identical parameters and state, for every optimizer that takes the flag,
on several shapes and dtypes (bfloat16 included, mixed dtypes in one group), with weight
decay, momentum and the code paths of each optimizer's options; ``None`` picks the
multi-tensor path on the CPU; the flag is a per-group hyperparameter.

On the CPU torch runs a ``_foreach_*`` call as the single-tensor operations, so the two paths
must agree exactly: any difference means the two paths do not compute the same thing.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import secondorder
from secondorder.kernels import foreach as F

SHAPES = [(7,), (5, 3), (4, 2, 3), (16, 8), (1,), (3, 1, 2, 2), ()]

#: (optimizer, hyperparameters): each optimizer's option paths
CASES: list[tuple[str, dict[str, Any]]] = [
    ("SONew", dict(lr=0.01, weight_decay=0.1, band=1)),
    ("SONew", dict(lr=0.01, weight_decay=0.1, band=3, state_dtype=torch.float32, graft=None,
                   damping="absolute", eps=1e-2)),  # fmt: skip
    ("SONew", dict(lr=0.01, weight_decay=0.1, band=0, precondition_1d=False, betas=(0.0, 1.0))),
    ("SOAP", dict(lr=0.01, weight_decay=0.1, block_size=4, precondition_frequency=2)),
    ("SOAP", dict(lr=0.01, betas=(0.0, 1.0), block_size=8, precondition_frequency=2,
                  precondition_1d=True, start_preconditioning_step=3)),  # fmt: skip
    ("Muon", dict(lr=0.01, weight_decay=0.1)),
    ("Muon", dict(lr=0.01, weight_decay=0.1, nesterov=False, scaling="spectral")),
    ("SCALE", dict(lr=0.01, weight_decay=0.1)),
    ("SCALE", dict(lr=0.01, weight_decay=0.0, norm="l2", momentum=0.0)),
    ("AdaGradNorm", dict(lr=0.1, weight_decay=0.1)),
    ("AdaGradNorm", dict(lr=0.1, weight_decay=0.0, mode="row")),
]
IDS = [f"{n}-{i}" for i, (n, _) in enumerate(CASES)]


def make_params(shapes, dtypes) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(1)
    return [
        torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(d))
        for s, d in zip(shapes, dtypes)
    ]


def groups_for(name: str, params: list[torch.Tensor], foreach: Any) -> list[dict[str, Any]]:
    """One group (SCALE: three, so that the output layer keeps momentum)."""
    if name != "SCALE":
        return [{"params": params, "foreach": foreach}]
    mats = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    out = [{"params": rest, "foreach": foreach}] if rest else []
    if mats:
        out.append({"params": mats[:1], "role": "output", "foreach": foreach})
    if len(mats) > 1:
        out.append({"params": mats[1:], "role": "hidden", "foreach": foreach})
    return out


def run(name, hparams, shapes, dtypes, foreach, steps=5):
    params = make_params(shapes, dtypes)
    opt = getattr(secondorder, name)(groups_for(name, params, foreach), **hparams)
    gen = torch.Generator().manual_seed(2)
    for t in range(steps):
        for i, p in enumerate(params):
            if t == 2 and i == 1:  # a step without a gradient for one tensor
                p.grad = None
                continue
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        opt.step()
    return params, opt


def assert_same(x: Any, y: Any, where: str = "") -> None:
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and x.dtype == y.dtype, where
        assert torch.equal(x, y), f"{where}: max diff {(x.double() - y.double()).abs().max()}"
    elif isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for k in x:
            assert_same(x[k], y[k], f"{where}[{k!r}]")
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            assert_same(u, v, f"{where}[{i}]")
    else:
        assert x == y, where


def assert_runs_equal(a, b) -> None:
    (pa, oa), (pb, ob) = a, b
    assert_same([p.detach() for p in pa], [p.detach() for p in pb], "params")
    assert_same(oa.state_dict()["state"], ob.state_dict()["state"], "state")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(("name", "hparams"), CASES, ids=IDS)
def test_foreach_matches_per_tensor(name, hparams, dtype):
    dtypes = [dtype] * len(SHAPES)
    on = run(name, hparams, SHAPES, dtypes, True)
    off = run(name, hparams, SHAPES, dtypes, False)
    assert_runs_equal(on, off)
    # the update did something (a test that cannot fail would compare two no-ops)
    start = make_params(SHAPES, dtypes)
    assert any(not torch.equal(p.detach(), q) for p, q in zip(on[0], start))


@pytest.mark.parametrize(("name", "hparams"), CASES, ids=IDS)
def test_mixed_dtypes_in_one_group(name, hparams):
    """A group holding float32, bfloat16 and float64 tensors: the multi-tensor path groups
    them by dtype and still matches the per-tensor path."""
    dtypes = [torch.float32, torch.bfloat16, torch.float64] * 3
    on = run(name, hparams, SHAPES, dtypes, True)
    off = run(name, hparams, SHAPES, dtypes, False)
    assert_runs_equal(on, off)


@settings(max_examples=15, deadline=None)
@given(
    case=st.sampled_from(range(len(CASES))),
    shapes=st.lists(
        st.lists(st.integers(1, 6), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4
    ),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_foreach_matches_per_tensor_any_shapes(case, shapes, dtype):
    name, hparams = CASES[case]
    dtypes = [dtype] * len(shapes)
    assert_runs_equal(
        run(name, hparams, shapes, dtypes, True, steps=3),
        run(name, hparams, shapes, dtypes, False, steps=3),
    )


def _spy(monkeypatch) -> dict[str, int]:
    """Count the ``torch._foreach_*`` calls the list operations make."""
    calls: dict[str, int] = {}
    for attr in dir(torch):
        if attr.startswith("_foreach_") and callable(getattr(torch, attr)):
            fn = getattr(torch, attr)

            def counted(*a, _fn=fn, _name=attr, **k):
                calls[_name] = calls.get(_name, 0) + 1
                return _fn(*a, **k)

            monkeypatch.setattr(torch, attr, counted)
    return calls


@pytest.mark.parametrize(("name", "hparams"), CASES, ids=IDS)
def test_flag_selects_the_path(name, hparams, monkeypatch):
    """``False`` makes no multi-tensor call for the elementwise work, ``True`` and ``None``
    (auto, on for CPU tensors) the same ones."""
    calls = _spy(monkeypatch)
    counts = {}
    for flag in (False, True, None):
        calls.clear()
        run(name, hparams, SHAPES, [torch.float32] * len(SHAPES), flag, steps=2)
        # SONew advances its statistics bounds with one copy for all tensors either way
        counts[flag] = {k: v for k, v in calls.items() if k != "_foreach_copy_"}
    assert counts[False] == {}
    assert counts[True] and counts[None] == counts[True]


def test_auto_resolution():
    cpu = [torch.zeros(2), torch.nn.Parameter(torch.zeros(3))]
    assert F.resolve_foreach(None, cpu) is True
    assert F.resolve_foreach(False, cpu) is False
    assert F.resolve_foreach(True, [torch.zeros(2, device="meta")]) is True
    assert F.resolve_foreach(None, [*cpu, torch.zeros(2, device="meta")]) is False

    class Sub(torch.Tensor):
        pass

    assert F.resolve_foreach(None, [torch.zeros(2).as_subclass(Sub)]) is False


@pytest.mark.parametrize("bad", ["yes", 1, 0, "auto"])
def test_invalid_flag_raises_before_anything_changes(bad):
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(TypeError, match="foreach"):
        secondorder.SONew([p], foreach=bad)
    opt = secondorder.SOAP([p])
    with pytest.raises(TypeError, match="foreach"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "foreach": bad})
    assert len(opt.param_groups) == 1


def test_per_group_flag():
    """Groups with different flags in one optimizer: each takes its own path, and the whole
    equals the single-flag runs."""
    params = make_params(SHAPES, [torch.float32] * len(SHAPES))
    ref = make_params(SHAPES, [torch.float32] * len(SHAPES))
    half = len(params) // 2
    opt = secondorder.Muon([{"params": params[:half], "foreach": False},
                            {"params": params[half:], "foreach": True}], lr=0.01)  # fmt: skip
    opt_ref = secondorder.Muon(ref, lr=0.01, foreach=False)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        for p, q in zip(params, ref):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        opt_ref.step()
    assert_same([p.detach() for p in params], [q.detach() for q in ref], "params")


def test_list_ops_match_single_tensor_ops():
    """Each list operation against the single-tensor torch call it stands for, on a list
    mixing dtypes (two foreach groups) and an empty tensor."""
    gen = torch.Generator().manual_seed(4)

    def fresh():
        return [torch.randn(s, generator=gen, dtype=torch.float64).to(d)
                for s, d in (((3, 2), torch.float32), ((4,), torch.bfloat16), ((0,), torch.float32),
                             ((2, 2, 2), torch.bfloat16))]  # fmt: skip

    xs, ys, zs = fresh(), fresh(), fresh()
    zs = [z.abs().add_(0.5) for z in zs]
    scal = [0.5, -1.5, 2.0, 0.25]
    for foreach in (True, False):
        a = [x.clone() for x in xs]
        F.mul_(a, scal, foreach)
        assert_same(a, [x * s for x, s in zip(xs, scal)])
        a = [x.clone() for x in xs]
        F.lerp_(a, ys, 0.3, foreach)
        assert_same(a, [torch.lerp(x, y, 0.3) for x, y in zip(xs, ys)])
        a = [x.clone() for x in xs]
        F.addcmul_(a, ys, zs, scal, foreach)
        assert_same(a, [torch.addcmul(x, y, z, value=s) for x, y, z, s in zip(xs, ys, zs, scal)])
        a = [x.clone() for x in xs]
        F.addcdiv_(a, ys, zs, 0.7, foreach)
        assert_same(a, [torch.addcdiv(x, y, z, value=0.7) for x, y, z in zip(xs, ys, zs)])
        assert_same(F.sqrt(zs, foreach), [z.sqrt() for z in zs])
        assert_same(F.div_tensors(xs, zs, foreach), [x / z for x, z in zip(xs, zs)])
        assert_same(F.add(xs, ys, -0.5, foreach), [torch.add(x, y, alpha=-0.5)
                                                   for x, y in zip(xs, ys)])  # fmt: skip
        assert_same(F.clamp_max(xs, 0.1, foreach), [x.clamp_max(0.1) for x in xs])
        assert_same(F.lerp(xs, ys, 0.9, foreach), [torch.lerp(x, y, 0.9) for x, y in zip(xs, ys)])


def test_adagradnorm_row_mode_leaves_grad_untouched():
    """Row mode without weight decay divides a float32 gradient by its rows' scales: into a
    new tensor, never into ``p.grad`` (which the gradient cast may return as is)."""
    for foreach in (True, False):
        p = torch.nn.Parameter(torch.ones(3, 4))
        p.grad = torch.arange(12.0).view(3, 4)
        before = p.grad.clone()
        secondorder.AdaGradNorm([p], mode="row", foreach=foreach).step()
        assert torch.equal(p.grad, before)
