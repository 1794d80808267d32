"""Shampoo(async_roots=True): roots computed in a background pool.

The math: docs/algorithms.md#asynchronous-roots.

The deterministic mode is checked exactly against a synchronous Shampoo that installs every
root ``k`` steps late (built here by deferring ``_store_root``, independently of the worker,
the snapshots and the step clock).
"""

from __future__ import annotations

import copy
import gc
import pickle
import threading
import time

import pytest
import torch

import secondorder.optim.shampoo as mod
from secondorder import Shampoo
from secondorder.optim.async_roots import AsyncRootWorker, snapshot

KW = dict(lr=0.05, block_size=6, precondition_frequency=2, start_preconditioning_step=2)


class DelayedSync(Shampoo):
    """Synchronous Shampoo whose roots computed at step ``t`` are installed at the start of
    step ``t + delay`` (a tensor's first roots, at ``start_preconditioning_step``, at once)."""

    def __init__(self, params, *, delay, **kw):
        super().__init__(params, **kw)
        self.delay, self.steps, self.queue = delay, 0, []

    def _update(self, work):
        self.steps += 1
        while self.queue and self.queue[0][0] <= self.steps:
            self.queue.pop(0)[1]()
        super()._update(work)

    def _store_root(self, state, *args):
        def store(*a):
            return Shampoo._store_root(self, *a)

        if int(state["step"]) == self.param_groups[0]["start_preconditioning_step"]:
            store(state, *args)
        else:
            frozen = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
            self.queue.append((self.steps + self.delay, lambda: store(state, *frozen)))


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(9, 13), torch.nn.Tanh(), torch.nn.Linear(13, 5), torch.nn.Linear(5, 4)
    )


def _data(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(32, 9, generator=gen), torch.randn(32, 4, generator=gen)


def _train(model, opt, steps, data=None):
    x, y = data or _data()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _assert_same(m1, m2):
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("delay", [1, 3])
def test_deterministic_mode_equals_sync_with_the_same_delay(delay):
    m1, m2 = _model(), _model()
    ref = DelayedSync(m1.parameters(), delay=delay, **KW)
    opt = Shampoo(m2.parameters(), async_roots=True, async_deterministic_delay=delay, **KW)
    _train(m1, ref, 12)
    _train(m2, opt, 12)
    _assert_same(m1, m2)
    d = opt.async_diagnostics()
    jobs = [4, 6, 8, 10, 12]  # first roots at step 2 are computed in the step
    assert d["submitted"] == 5 and d["installed"] == sum(s + delay <= 12 for s in jobs)
    assert d["exceptions"] == 0 and d["max_staleness"] == delay
    # and it is not just synchronous Shampoo
    m3 = _model()
    _train(m3, Shampoo(m3.parameters(), **KW), 12)
    assert any(not torch.equal(a, b) for a, b in zip(m2.parameters(), m3.parameters()))
    opt.close()


def test_bounded_staleness_waits_only_for_jobs_older_than_the_bound(monkeypatch):
    real = mod.inverse_root

    def slow(*a, **kw):
        if threading.current_thread().name.startswith("secondorder-roots"):
            time.sleep(0.3)
        return real(*a, **kw)

    monkeypatch.setattr(mod, "inverse_root", slow)
    m = _model()
    opt = Shampoo(m.parameters(), async_roots=True, async_staleness=3, **KW)
    _train(m, opt, 12)
    d = opt.async_diagnostics()
    assert d["waits"] >= 1 and 1 <= d["max_staleness"] <= 3  # never older than the bound
    assert all(torch.isfinite(p).all() for p in m.parameters())
    opt.close()


def test_fast_jobs_are_installed_at_the_next_step_without_waiting():
    w = AsyncRootWorker(workers=1, max_staleness=100)
    w.submit(1, lambda: 42, meta="a")
    time.sleep(0.2)
    assert w.collect(2) == [("a", 42)]
    assert w.counters["waits"] == 0
    w.submit(2, time.sleep, 0.5, meta="b")
    assert w.collect(3) == []  # not done, not too old: training goes on
    assert w.collect(102)[0][0] == "b" and w.counters["waits"] == 1
    w.shutdown()


def test_deterministic_worker_holds_early_results_back_and_keeps_order():
    w = AsyncRootWorker(workers=2, delay=2)
    w.submit(1, time.sleep, 0.2, meta=1)
    w.submit(2, lambda: None, meta=2)
    time.sleep(0.05)
    assert w.collect(2) == []
    assert [m for m, _ in w.collect(3)] == [1]
    assert [m for m, _ in w.collect(4)] == [2]
    w.shutdown()


def test_snapshot_is_a_copy():
    x = torch.ones(3)
    s = snapshot(x)
    x.add_(1)
    assert torch.equal(s.get(), torch.ones(3))


def test_no_thread_leak_after_del_and_gc(monkeypatch):
    real = mod.inverse_root

    def slow(*a, **kw):
        if threading.current_thread().name.startswith("secondorder-roots"):
            time.sleep(0.2)
        return real(*a, **kw)

    monkeypatch.setattr(mod, "inverse_root", slow)
    gc.collect()
    baseline = threading.active_count()
    m = _model()
    opt = Shampoo(m.parameters(), async_roots=True, **KW)
    _train(m, opt, 5)  # a job is in flight now
    assert threading.active_count() > baseline
    assert opt.async_diagnostics()["in_flight"] >= 1
    del opt
    gc.collect()
    assert threading.active_count() == baseline


def test_close_joins_threads_and_optimizer_stays_usable():
    gc.collect()
    baseline = threading.active_count()
    m = _model()
    opt = Shampoo(m.parameters(), async_roots=True, **KW)
    _train(m, opt, 6)
    opt.close()
    assert threading.active_count() == baseline
    _train(m, opt, 4)
    opt.close()
    assert threading.active_count() == baseline


def test_injected_worker_exception_is_survived_and_counted(monkeypatch):
    m = _model()
    opt = Shampoo(m.parameters(), async_roots=True, async_deterministic_delay=1, **KW)
    _train(m, opt, 2)  # first roots, computed in the step
    before = {
        n: [r.clone() for cls in opt.state[p]["roots"] for r in cls]
        for n, p in enumerate(m.parameters())
        if "roots" in opt.state[p]
    }
    real = mod.inverse_root

    def failing(*a, **kw):
        if threading.current_thread().name.startswith("secondorder-roots"):
            raise RuntimeError("injected failure")
        return real(*a, **kw)

    monkeypatch.setattr(mod, "inverse_root", failing)
    _train(m, opt, 4)  # the job of step 4 fails (installed at 5), the one of step 6 runs
    assert all(torch.isfinite(p).all() for p in m.parameters())
    d = opt.async_diagnostics()
    assert d["exceptions"] == 1 and d["in_flight"] == 1
    for n, p in enumerate(m.parameters()):
        if n in before:
            after = [r for cls in opt.state[p]["roots"] for r in cls]
            assert all(torch.equal(a, b) for a, b in zip(before[n], after))
    diag = opt.diagnostics()
    assert diag and all(f == 1 for d_ in diag for f in d_["failures"])
    opt.state_dict()  # waits for the in-flight job (computed with the failing function)
    monkeypatch.setattr(mod, "inverse_root", real)
    _train(m, opt, 4)  # recovers: later jobs succeed
    assert opt.async_diagnostics()["exceptions"] == 2
    after = [r for cls in opt.state[next(iter(m.parameters()))]["roots"] for r in cls]
    assert not all(torch.equal(a, b) for a, b in zip(before[0], after))
    opt.close()


def test_injected_nonfinite_root_is_rejected_and_counted(monkeypatch):
    m = _model()
    opt = Shampoo(m.parameters(), async_roots=True, async_deterministic_delay=1, **KW)
    _train(m, opt, 2)
    p0 = next(iter(m.parameters()))
    before = [r.clone() for r in opt.state[p0]["roots"][0]]
    real = mod.inverse_root

    def nan_roots(*a, **kw):
        res = real(*a, **kw)
        if threading.current_thread().name.startswith("secondorder-roots"):
            return res._replace(root=torch.full_like(res.root, float("nan")))  # ok stays True
        return res

    monkeypatch.setattr(mod, "inverse_root", nan_roots)
    _train(m, opt, 3)  # job of step 4 installed at step 5
    assert all(torch.equal(a, b) for a, b in zip(before, opt.state[p0]["roots"][0]))
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert all(f == 1 for d in opt.diagnostics() for f in d["failures"])
    opt.close()


@pytest.mark.parametrize("delay", [1, 3])
def test_checkpoint_with_pending_jobs_resumes_exactly(delay):
    kw = dict(KW, async_roots=True, async_deterministic_delay=delay)
    m1 = _model()
    opt1 = Shampoo(m1.parameters(), **kw)
    _train(m1, opt1, 8)  # the job of step 8 (and with delay 3, of step 6) is pending
    sd = opt1.state_dict()
    assert len(sd["async_roots"]["pending"]) > 0
    sd = pickle.loads(pickle.dumps(sd))
    m2 = _model(seed=5)
    m2.load_state_dict(m1.state_dict())
    opt2 = Shampoo(m2.parameters(), **kw)
    opt2.load_state_dict(sd)
    _train(m1, opt1, 6)
    _train(m2, opt2, 6)
    _assert_same(m1, m2)
    opt1.close()
    opt2.close()


def test_async_and_sync_checkpoints_load_into_each_other():
    m1 = _model()
    opt1 = Shampoo(m1.parameters(), async_roots=True, async_deterministic_delay=1, **KW)
    _train(m1, opt1, 5)
    sync = Shampoo(_model().parameters(), **KW)
    sync.load_state_dict(opt1.state_dict())  # pending roots installed right away
    assert "async_roots" not in sync.state_dict()
    back = Shampoo(_model().parameters(), async_roots=True, **KW)
    back.load_state_dict(sync.state_dict())
    for a, b in zip(sync.state.values(), back.state.values()):
        for x, y in zip(a.get("roots", []), b.get("roots", [])):
            assert all(torch.equal(u, v) for u, v in zip(x, y))
    opt1.close()
    back.close()


def test_deepcopy_and_pickle_of_an_async_optimizer():
    m = _model()
    opt = Shampoo(m.parameters(), async_roots=True, **KW)
    _train(m, opt, 5)
    m2, opt2 = copy.deepcopy((m, opt))
    assert opt2.async_roots and opt2.async_diagnostics()["in_flight"] == 0
    _train(m2, opt2, 3)
    opt3 = pickle.loads(pickle.dumps(opt))
    assert opt3.async_roots
    for o in (opt, opt2, opt3):
        o.close()


def test_async_matches_sync_loosely_in_bounded_mode():
    m1, m2 = _model(), _model()
    sync = Shampoo(m1.parameters(), **KW)
    opt = Shampoo(m2.parameters(), async_roots=True, **KW)
    x, y = _data()
    l0 = torch.nn.functional.mse_loss(m1(x), y).item()
    _train(m1, sync, 20)
    _train(m2, opt, 20)
    l1 = torch.nn.functional.mse_loss(m1(x), y).item()
    l2 = torch.nn.functional.mse_loss(m2(x), y).item()
    assert l2 < 0.5 * l0 and l2 < 1.5 * l1  # stale roots still train about as well
    opt.close()


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        (dict(async_roots=1), TypeError),
        (dict(async_staleness=0), ValueError),
        (dict(async_deterministic_delay=0), ValueError),
        (dict(async_workers=0), ValueError),
    ],
)
def test_bad_async_arguments_raise(kwargs, exc):
    name = next(iter(kwargs))
    with pytest.raises(exc, match=name):
        Shampoo([torch.nn.Parameter(torch.zeros(3, 3))], **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_snapshots_go_through_pinned_memory_and_roots_come_back():
    torch.manual_seed(0)
    m = _model().cuda()
    x, y = (t.cuda() for t in _data())
    opt = Shampoo(m.parameters(), async_roots=True, async_deterministic_delay=1, **KW)
    _train(m, opt, 7, (x, y))
    s = snapshot(torch.ones(4, device="cuda"))
    assert s.tensor.is_pinned() and s.event is not None
    assert opt.async_diagnostics()["installed"] >= 2
    assert all(
        r.is_cuda for st in opt.state.values() if "roots" in st for c in st["roots"] for r in c
    )
    opt.close()
