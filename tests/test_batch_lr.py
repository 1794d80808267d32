"""The learning rate's factor of the batch size: closed forms of the rules, the cap, the
ramp after a growth (counted in examples), and the loop setting exactly that lr."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secondorder import AdaptiveBatchSize
from secondorder.batching import (
    AdaptiveBatchLoop,
    BatchLRScaling,
    SampleCountedLR,
    batch_lr_scale,
    linear_warmup_decay,
    ramp,
)
from secondorder.kernels.batch_tests import stats_from_samples

RULES = {"none": lambda x: 1.0, "linear": lambda x: x, "sqrt": math.sqrt}


# ------------------------------------------------------------------ the pure pieces
@settings(max_examples=60, deadline=None)
@given(
    b0=st.integers(1, 64),
    growth=st.integers(1, 4096),
    rule=st.sampled_from(sorted(RULES)),
    cap=st.one_of(st.just(math.inf), st.floats(1.0, 100.0)),
)
def test_scale_is_the_rule_of_the_ratio_capped(b0, growth, rule, cap):
    b = b0 * growth  # an integer ratio: the closed form is exact
    assert batch_lr_scale(b, b0, rule, cap) == min(cap, RULES[rule](float(growth)))
    assert batch_lr_scale(b0, b0, rule, cap) == 1.0  # the starting batch keeps the base lr


def test_scale_known_values():
    assert batch_lr_scale(32, 8, "sqrt") == 2.0
    assert batch_lr_scale(72, 8, "sqrt") == 3.0
    assert batch_lr_scale(64, 8, "linear") == 8.0
    assert batch_lr_scale(64, 8, "linear", 4.0) == 4.0
    assert batch_lr_scale(12, 8, "linear") == 1.5
    assert batch_lr_scale(10_000, 8, "none", 2.0) == 1.0


@settings(max_examples=60, deadline=None)
@given(
    start=st.integers(0, 1000),
    length=st.integers(1, 1000),
    begin=st.floats(0.5, 10.0),
    end=st.floats(0.5, 10.0),
    frac=st.floats(0.0, 1.0),
)
def test_ramp_is_linear_between_its_ends(start, length, begin, end, frac):
    assert ramp(start, start, begin, end, length) == begin
    assert ramp(start + length, start, begin, end, length) == end
    assert ramp(start + 10 * length, start, begin, end, length) == end
    x = start + frac * length
    want = begin + (end - begin) * frac
    # x = start + frac * length and x - start are rounded at the scale of x, i.e. the
    # fraction is known to ~2 ulp(x) / length; the rest is a few ulps of the values
    frac_err = 2 * math.ulp(start + length) / length + 4 * 2**-52
    tol = abs(end - begin) * frac_err + 4 * math.ulp(max(begin, end))
    assert abs(ramp(x, start, begin, end, length) - want) <= tol


def test_ramp_of_length_zero_is_a_step():
    assert ramp(5, 5, 1.0, 3.0, 0) == 3.0
    assert ramp(0, 5, 1.0, 3.0, 0) == 3.0


# ---------------------------------------------------------------- the stateful policy
def test_one_growth_ramps_from_one_to_the_target():
    s = BatchLRScaling(8, "sqrt", lr_warmup=40)
    assert [s(n, 8) for n in (0, 8, 96)] == [1.0, 1.0, 1.0]
    # 8 -> 32 at 100 examples: sqrt(4) = 2, reached 40 examples later
    assert [s(n, 32) for n in (100, 110, 120, 130, 140, 500)] == [1.0, 1.25, 1.5, 1.75, 2.0, 2.0]


def test_a_growth_during_a_ramp_starts_from_the_current_factor():
    # 8 -> 32 at 100 (target 2), then -> 128 at 120 (target 4, or the cap 3)
    for cap, tail in ((math.inf, [1.5, 2.75, 4.0, 4.0]), (3.0, [1.5, 2.25, 3.0, 3.0])):
        s = BatchLRScaling(8, "sqrt", lr_max_scale=cap, lr_warmup=40)
        assert s(0, 8) == 1.0 and s(100, 32) == 1.0
        assert [s(n, 128) for n in (120, 140, 160, 1000)] == tail


def test_without_warmup_the_factor_follows_the_batch_at_once():
    s = BatchLRScaling(4, "linear", lr_max_scale=6.0)
    got = [s(n, b) for n, b in [(0, 4), (4, 4), (8, 12), (20, 16), (36, 40), (76, 40)]]
    assert got == [1.0, 1.0, 3.0, 4.0, 6.0, 6.0]


@settings(max_examples=40, deadline=None)
@given(
    growths=st.lists(st.tuples(st.integers(1, 50), st.integers(0, 30)), min_size=1, max_size=8),
    warmup=st.integers(1, 200),
    rule=st.sampled_from(["linear", "sqrt"]),
)
def test_the_factor_is_continuous_and_settles_on_the_target(growths, warmup, rule):
    """No jumps: over ``step`` examples the factor moves by at most |target - anchor| x
    step / warm-up, for the ramp in force (anchor: the factor when the batch last changed),
    and never past its target; ``warmup`` examples after the last growth it is the target."""
    s = BatchLRScaling(2, rule, lr_max_scale=math.inf, lr_warmup=warmup)
    n, b, prev = 0, 2, s(0, 2)
    anchor, target = 1.0, 1.0
    for step, extra in growths:
        n, b = n + step, b + extra
        now = s(n, b)
        assert min(anchor, target) - 1e-12 <= now <= max(anchor, target) + 1e-12
        assert abs(now - prev) <= abs(target - anchor) * step / warmup + 1e-12
        new_target = batch_lr_scale(b, 2, rule)
        if new_target != target:  # a new ramp starts here, from the factor now
            anchor, target = now, new_target
        prev = now
    assert s(n + warmup, b) == batch_lr_scale(b, 2, rule)


def test_state_dict_round_trip():
    a = BatchLRScaling(8, "sqrt", lr_warmup=40)
    a(0, 8), a(100, 32), a(110, 32)
    b = BatchLRScaling(8, "sqrt", lr_warmup=40)
    b.load_state_dict(a.state_dict())
    assert [b(n, 32) for n in (120, 140)] == [a(n, 32) for n in (120, 140)] == [1.5, 2.0]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr_scaling="cube"), "lr_scaling"),
        (dict(lr_scaling=None), "lr_scaling"),
        (dict(lr_max_scale=0.5), "lr_max_scale"),
        (dict(lr_max_scale=math.nan), "lr_max_scale"),
        (dict(lr_max_scale="2"), "lr_max_scale"),
        (dict(lr_warmup=-1), "lr_warmup"),
        (dict(lr_warmup=1.5), "lr_warmup"),
        (dict(initial_batch=0), "initial_batch"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    args = {"initial_batch": 8, "lr_scaling": "sqrt", **kwargs}
    with pytest.raises((ValueError, TypeError), match=name):
        BatchLRScaling(**args)


def test_unknown_rule_lists_the_valid_ones():
    with pytest.raises(ValueError, match="'none', 'linear', 'sqrt'"):
        BatchLRScaling(8, "quadratic")


# ------------------------------------------------------------ setting the optimizer's lr
def _two_groups(tensor_lr: bool) -> torch.optim.Optimizer:
    lr0 = torch.tensor(0.5) if tensor_lr else 0.5
    return torch.optim.SGD(
        [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr0},
         {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.125}],
        lr=0.1,
    )  # fmt: skip


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_sample_counted_lr_times_the_batch_factor(tensor_lr):
    opt = _two_groups(tensor_lr)
    factor = linear_warmup_decay(16, 1024)
    sched = SampleCountedLR(opt, factor, BatchLRScaling(8, "linear", lr_max_scale=4.0))
    for samples, batch, scale in [(0, 8, 1.0), (8, 8, 1.0), (16, 24, 3.0), (40, 64, 4.0)]:
        sched.update(samples, batch)
        f = factor(samples) * scale
        assert [float(g["lr"]) for g in opt.param_groups] == [
            float(torch.tensor(0.5 * f)) if tensor_lr else 0.5 * f, 0.125 * f
        ]
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) is tensor_lr


def test_sample_counted_lr_needs_the_batch_when_it_scales():
    opt = _two_groups(False)
    sched = SampleCountedLR(opt, lambda n: 1.0, BatchLRScaling(8, "sqrt"))
    sched.update(8, 32)
    before = [g["lr"] for g in opt.param_groups]
    with pytest.raises(ValueError, match="batch_size"):
        sched.update(16)
    assert [g["lr"] for g in opt.param_groups] == before == [1.0, 0.25]
    with pytest.raises(TypeError, match="batch_scaling"):
        SampleCountedLR(opt, lambda n: 1.0, "sqrt")


def test_the_loop_sets_the_lr_of_the_next_batch():
    """After each step the optimizer's lr is base x schedule(examples) x the factor of the
    batch the controller chose for the next step, ramped over ``lr_warmup`` examples from
    the factor in force when the batch grew."""
    data = torch.utils.data.TensorDataset(torch.arange(400.0))
    c = AdaptiveBatchSize(4, 64, "norm", eta=0.5)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.25)
    warm = 24
    sched = SampleCountedLR(opt, lambda n: 1.0, BatchLRScaling(4, "sqrt", lr_warmup=warm))
    loop = AdaptiveBatchLoop(data, c, seed=0, lr_schedule=sched)
    assert opt.param_groups[0]["lr"] == 0.25
    start, begin, target = 0, 1.0, 1.0  # the test's own bookkeeping of the ramp
    for k in range(8):
        loop.next_step()
        g = torch.randn(10, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
        b = loop.finish_step(stats=stats_from_samples(g + 0.3 / (k + 1)))
        n = loop.samples
        new = min(8.0, math.sqrt(b / 4))
        if new != target:
            begin = begin + (target - begin) * min(1.0, (n - start) / warm)
            start, target = n, new
        want = begin + (target - begin) * min(1.0, (n - start) / warm)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.25 * want, rel=8 * 2**-52)
    assert c.batch_size > 4  # the batch did grow, so the ramp was exercised
