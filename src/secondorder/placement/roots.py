"""Root scheduling: when and how the due preconditioner roots are solved and installed.

An optimizer that keeps per-block factors (Shampoo) decides *which* factors are due and
*what* a root is (a ``solve`` function of a stack of matrices); a scheduler here decides
*when* and *in what pieces* they are solved, and installs the results through the
optimizer's own hook. Two schedulers share one interface:

* :class:`RootScheduler` (synchronous): :meth:`~RootScheduler.submit` solves the due factors
  in the step, bucketed by equal size and settings (one batched call each) and cut into
  chunks whose solver workspace fits ``budget`` bytes; :meth:`~RootScheduler.collect` has
  nothing to do; there are never pending jobs.
* :class:`AsyncRootScheduler`: :meth:`~RootScheduler.submit` snapshots the due statistics and
  hands them to an :class:`~secondorder.placement.async_roots.AsyncRootWorker`;
  :meth:`~RootScheduler.collect` installs finished jobs at the start of a later step;
  :meth:`~RootScheduler.pending_records` lists unfinished jobs for a checkpoint and
  :meth:`~RootScheduler.restore` queues them again after a load. Its
  :meth:`~RootScheduler.solve_now` is the synchronous path (a tensor's first roots).

The scheduler holds no reference to the optimizer: every call receives it as ``client``,
which provides ``state``, ``param_groups`` and three hooks:
``client._store_root(state, cls, axis, root, err, lam, ok, lo, hi, group)`` (swap in the
roots of blocks ``lo:hi`` where ``ok``; ``root=None``: the solve raised),
``client._warn_once(kind, message)`` and ``client._contained(kind, consequence)`` (a
context manager that catches, warns once and counts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..kernels import kron
from ..kernels.roots import RootResult, absolute_ridge_units, root_workspace_bytes
from .async_roots import AsyncRootWorker, Snapshot, snapshot

__all__ = [
    "DEFAULT_ROOT_MEMORY_BUDGET",
    "IDLE",
    "RootFailureError",
    "store_root",
    "AsyncRootScheduler",
    "DueFactor",
    "RootScheduler",
    "make_root_scheduler",
    "scaled_root",
]

#: ``solve(spec, matrix, scale) -> RootResult``: ``spec`` is ``(exponent, device, method,
#: eps, failure_threshold)``; must not reference the optimizer (it runs in worker threads)
Solve = Callable[[tuple[Any, ...], torch.Tensor, "torch.Tensor | None"], RootResult]


#: default ``root_memory_budget``: bytes of solver workspace alive at once during a refresh
DEFAULT_ROOT_MEMORY_BUDGET = 256 * 2**20


class RootFailureError(RuntimeError):
    """Raised (with ``on_root_failure="raise"``) once a factor's roots failed
    ``max_consecutive_root_failures`` times in a row. The step that raises has been applied
    completely (with the previous roots); the optimizer stays usable."""


#: :meth:`RootScheduler.diagnostics` without a worker
IDLE = dict(
    submitted=0, installed=0, exceptions=0, waits=0, wait_seconds=0.0, max_staleness=0, in_flight=0
)


@dataclass
class DueFactor:
    """One factor stack (all blocks of one size class and axis of a parameter) due a new root."""

    state: dict[str, Any]
    cls: int
    axis: int
    matrix: torch.Tensor  # (B, n, n) bias-corrected statistics
    exponent: int
    key: int = -1  # index of the parameter over all param groups
    group: dict[str, Any] | None = None  # its param group (root settings)
    scale: torch.Tensor | None = None  # (B,) statistics scale: true statistics = scale^2 * matrix
    bc: float = 1.0  # bias correction: the root is of ``scale^2 * matrix / bc``
    first: bool = False  # the tensor's first roots: solved in the step even when async

    @property
    def size(self) -> int:
        """``n`` of the factor's ``n x n`` matrices (``matrix`` may be packed)."""
        m = self.matrix.shape[-1]
        return m if self.matrix.dim() == 3 else kron.packed_dim(m)


class RootScheduler:
    """Synchronous root scheduling (see the module docstring).

    Args:
        solve: the optimizer's root function (see :data:`Solve`).
        budget: bytes of solver workspace alive at once (``None``: one chunk per bucket).
        label: the optimizer's name, the prefix of warnings.

    Attributes: ``peak_bytes`` / ``last_bytes`` (largest / latest estimated workspace of one
    chunk), ``chunks`` (solver calls so far).
    """

    asynchronous = False

    def __init__(self, solve: Solve, budget: int | None, label: str = "Shampoo") -> None:
        self.solve, self.budget, self.label = solve, budget, label
        self.peak_bytes = self.last_bytes = self.chunks = 0

    # ----------------------------------------------------------------- interface
    def submit(self, client: Any, rt: Any, due: list[DueFactor], clock: int) -> None:
        """Schedule the roots of ``due`` (synchronous: solved and installed now)."""
        if due:
            self.solve_now(client, due)

    def collect(self, client: Any, rt: Any, clock: int) -> None:
        """Install what is due at the start of step ``clock`` (synchronous: nothing)."""

    def pending_records(self, client: Any, rt: Any, gather: bool) -> list[dict[str, Any]]:
        """Unfinished jobs for a checkpoint (synchronous: none)."""
        return []

    def restore(self, client: Any, rt: Any, records: list[dict[str, Any]], full: bool) -> None:
        """Take back a checkpoint's pending records (synchronous: install them now)."""
        for _step, meta, res in _records_to_jobs(rt, records, full):
            self.install(client, rt.params, [(meta, [res])])

    def clear(self) -> None:
        """Forget pending jobs (a state dict is being loaded)."""

    def diagnostics(self) -> dict[str, Any]:
        """Counters of the root jobs (see ``Shampoo.async_diagnostics``)."""
        return dict(IDLE)

    def close(self) -> None:
        """Stop background threads, drop pending jobs (synchronous: nothing)."""

    # ------------------------------------------------------------------- solving
    def buckets(self, due: list[DueFactor]) -> list[tuple[tuple[Any, ...], list[DueFactor]]]:
        """Group due factors of equal size, exponent and settings (one batched solve each)."""
        buckets: dict[tuple[Any, ...], list[DueFactor]] = {}
        for f in due:
            group = f.group
            method = group["root_method"]
            if method == "auto":
                # async roots are computed on the host from host snapshots: eigh
                on_host = f.matrix.device.type == "cpu" or self.asynchronous
                method = "eigh" if on_host else "newton"
            key = (
                f.size,
                f.exponent,
                f.matrix.device,
                method,
                group["eps"],
                group["inverse_failure_threshold"],
                group.get("ridge", "relative"),
            )
            buckets.setdefault(key, []).append(f)
        return list(buckets.items())

    def chunk_rows(self, spec: tuple[Any, ...]) -> int | None:
        """Matrices per solver call under ``budget`` (None: unbounded)."""
        if self.budget is None:
            return None
        n, method = spec[0], spec[3]
        return max(1, self.budget // root_workspace_bytes(n, method))

    def solve_now(self, client: Any, due: list[DueFactor]) -> None:
        """Compute all due roots now, batching factors of equal size, exponent and settings.

        Each bucket is solved in chunks that fit ``budget``; a chunk's workspace is freed
        before the next one starts. A solver exception rejects the chunk's roots (previous
        roots kept, warned once, counted) instead of propagating.
        """
        for spec, factors in self.buckets(due):
            rows = self.chunk_rows(spec)
            for pieces in _chunks(factors, rows):
                rows_here = sum(hi - lo for _, lo, hi in pieces)
                ws = root_workspace_bytes(spec[0], spec[3], rows_here)
                self.peak_bytes = max(self.peak_bytes, ws)
                self.last_bytes = ws
                self.chunks += 1
                try:
                    stacked = _stack_pieces(pieces)
                    scale = torch.cat([f.scale[lo:hi] for f, lo, hi in pieces])
                    res = self.solve(spec[1:], stacked, scale)
                    del stacked
                except Exception as e:  # noqa: BLE001 - contained: a rejected root
                    client._warn_once(
                        ("root-exception", type(e).__name__),
                        f"{self.label}: a root computation raised {type(e).__name__}: {e}. The "
                        "affected factors keep their previous roots (counted as failures).",
                    )
                    res = None
                with client._contained("roots", "new roots were not stored"):
                    _store_pieces(client, pieces, res)

    def install(
        self, client: Any, params: list[torch.Tensor], finished: list[tuple[Any, Any]]
    ) -> None:
        """Install finished root jobs; a job that raised counts a failure for its blocks."""
        for meta, result in finished:
            failed = isinstance(result, BaseException)
            if failed:
                client._warn_once(
                    ("async-exception", type(result).__name__),
                    f"{self.label}: an async root job raised {type(result).__name__}: "
                    f"{result}. The affected factors keep their previous roots (counted as "
                    "failures).",
                )
            for b, bucket in enumerate(meta):
                if failed:
                    for key, c, i, n in bucket:
                        st = client.state[params[key]]
                        device = st["roots"][c][i].device
                        ok = torch.zeros(n, dtype=torch.bool, device=device)
                        group = _group_of(client, params[key])
                        client._store_root(st, c, i, None, None, None, ok, 0, n, group)
                    continue
                res = result[b]
                device = client.state[params[bucket[0][0]]]["roots"][bucket[0][1]][0].device
                res = type(res)(*(x.to(device, non_blocking=True) for x in res))
                offset = 0
                for key, c, i, n in bucket:
                    st = client.state[params[key]]
                    part = [x[offset : offset + n] for x in res]
                    offset += n
                    client._store_root(st, c, i, *part, 0, n, _group_of(client, params[key]))


class AsyncRootScheduler(RootScheduler):
    """Root jobs in a background thread pool (see the module docstring and
    :mod:`secondorder.placement.async_roots` for the timing modes).

    Args (beyond :class:`RootScheduler`'s): ``workers`` (threads), ``delay`` (deterministic
    mode: install exactly this many steps after submission; ``None``: bounded staleness).
    The worker is started by :meth:`start` (again after :meth:`close`).
    """

    asynchronous = True

    def __init__(
        self,
        solve: Solve,
        budget: int | None,
        label: str = "Shampoo",
        *,
        workers: int = 1,
        delay: int | None = None,
    ) -> None:
        super().__init__(solve, budget, label)
        self.workers, self.delay = workers, delay
        self.worker: AsyncRootWorker | None = None

    def start(self, staleness: int) -> None:
        """Create the worker (threads start on the first job) unless it exists."""
        if self.worker is None:
            self.worker = AsyncRootWorker(self.workers, staleness, self.delay)

    def submit(self, client: Any, rt: Any, due: list[DueFactor], clock: int) -> None:
        """Solve a tensor's first roots now (training should not run on identity roots for
        a whole interval); hand the others to the worker (a failure to start the job is
        contained: the factors keep their roots until the next refresh)."""
        first = [f for f in due if f.first]
        if first:
            self.solve_now(client, first)
        later = [f for f in due if not f.first]
        if later:
            with client._contained("async-submit", "this step's async root job was not started"):
                self._start_job(later, clock)

    def _start_job(self, due: list[DueFactor], clock: int) -> None:
        """Snapshot the due statistics and hand them to the root worker."""
        payload, meta = [], []
        for spec, factors in self.buckets(due):
            pieces = [(f, 0, f.matrix.shape[0]) for f in factors]
            stacked = _stack_pieces(pieces)  # a fresh copy: the live statistics go on changing
            scale = torch.cat([f.scale for f in factors])
            snap = Snapshot(stacked) if stacked.device.type == "cpu" else snapshot(stacked)
            payload.append((spec[1:], snap, scale.cpu(), self.chunk_rows(spec)))
            meta.append([(f.key, f.cls, f.axis, f.matrix.shape[0]) for f in factors])
        self.worker.submit(clock, _solve_snapshots, self.solve, payload, meta=meta)

    def collect(self, client: Any, rt: Any, clock: int) -> None:
        if self.worker is not None and len(self.worker):
            with client._contained("install", "finished async roots were not installed"):
                self.install(client, rt.params, self.worker.collect(clock))

    def pending_records(self, client: Any, rt: Any, gather: bool) -> list[dict[str, Any]]:
        """Pending root jobs, one record per factor, with full (all-rank) block stacks
        (``gather``, a collective when distributed) or this rank's blocks only."""
        records = []
        for step, meta, result in self.worker.pending() if self.worker is not None else []:
            for b, bucket in enumerate(meta):
                offset = 0
                for key, c, i, n in bucket:
                    if isinstance(result, BaseException):
                        dim = client.state[rt.params[key]]["roots"][c][i].shape[-1]
                        part = dict(
                            root=torch.zeros(n, dim, dim),
                            error=torch.full((n,), float("inf")),
                            lambda_max=torch.zeros(n),
                            ok=torch.zeros(n, dtype=torch.bool),
                        )
                    else:
                        part = {
                            name: getattr(result[b], name)[offset : offset + n].cpu()
                            for name in ("root", "error", "lambda_max", "ok")
                        }
                    offset += n
                    blocks = list(range(n)) if rt.layout is None else rt.layout.owned(key, c)
                    records.append(dict(step=step, param=key, cls=c, axis=i, blocks=blocks, **part))
        if rt.sharded and gather:  # merge the ranks' parts of each factor
            merged: dict[tuple[int, ...], dict[str, Any]] = {}
            for part in (r for rank in rt.comm.all_gather_object(records) for r in rank):
                k = (part["step"], part["param"], part["cls"], part["axis"])
                merged.setdefault(k, []).append(part)
            records = []
            for parts in merged.values():
                order = torch.tensor([j for p_ in parts for j in p_["blocks"]]).argsort()
                rec = {k: parts[0][k] for k in ("step", "param", "cls", "axis")}
                for name in ("root", "error", "lambda_max", "ok"):
                    rec[name] = torch.cat([p_[name] for p_ in parts])[order]
                records.append(rec)
        for rec in records:
            rec.pop("blocks", None)
        return records

    def restore(self, client: Any, rt: Any, records: list[dict[str, Any]], full: bool) -> None:
        """Queue a checkpoint's pending records to be installed at their original step."""
        for step, meta, res in _records_to_jobs(rt, records, full):
            self.worker.add_finished(step, [res], meta=meta)

    def clear(self) -> None:
        if self.worker is not None:
            self.worker.clear()

    def diagnostics(self) -> dict[str, Any]:
        w = self.worker
        if w is None:
            return super().diagnostics()
        return {**w.counters, "in_flight": len(w)}

    def close(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
            self.worker = None


def scaled_root(
    inverse_root: Callable[..., RootResult],
    spec: tuple[Any, ...],
    matrix: torch.Tensor,
    scale: torch.Tensor | None = None,
) -> RootResult:
    """Roots of ``scale^2 * matrix`` (``matrix``: statistics divided by their block scale^2)
    by ``inverse_root`` (:func:`secondorder.kernels.roots.inverse_root` or a stand-in);
    ``spec`` is ``(exponent, device, method, eps, failure_threshold, ridge)``.

    The solve sees the scaled matrix, whose entries are bounded whatever the gradients'
    magnitude; the root and ``lambda_max`` are brought back to true units
    (``root * scale^(-2/p)``, ``lambda_max * scale^2`` in float64) where the scale is > 0.
    """
    exponent, _, method, eps, threshold, ridge = spec
    if ridge == "absolute":  # eps * I on the true statistics: see absolute_ridge_units
        matrix, scale, eps = absolute_ridge_units(matrix, scale, eps)
    res = inverse_root(
        matrix, exponent, method=method, ridge_epsilon=eps, ridge=ridge,
        failure_threshold=threshold,
    )  # fmt: skip
    if scale is None:
        return res
    s = scale.to(device=res.root.device, dtype=torch.float64)
    s = torch.where(s > 0, s, torch.ones_like(s))
    root = res.root * s.pow(-2.0 / exponent).to(res.root.dtype)[:, None, None]
    lam = res.lambda_max.double() * s.square()
    return res._replace(root=root, lambda_max=lam)


def make_root_scheduler(
    solve: Solve,
    budget: int | None,
    asynchronous: bool,
    *,
    workers: int = 1,
    delay: int | None = None,
    label: str = "Shampoo",
) -> RootScheduler:
    """The synchronous or the asynchronous scheduler."""
    if asynchronous:
        return AsyncRootScheduler(solve, budget, label, workers=workers, delay=delay)
    return RootScheduler(solve, budget, label)


def store_root(
    rt: Any,
    state: dict[str, Any],
    cls: int,
    axis: int,
    root: torch.Tensor | None,
    err: torch.Tensor | None,
    lam: torch.Tensor | None,
    ok: torch.Tensor,
    lo: int = 0,
    hi: int | None = None,
    group: dict[str, Any] | None = None,
) -> None:
    """Swap in new roots of blocks ``lo:hi`` where ``ok``; elsewhere keep the old ones,
    count a failure, and warn once per kind of failure (one host read per call).

    ``state`` holds per-block stacks ``roots``, ``root_error``, ``lambda_max``,
    ``root_failures`` and ``root_streak`` (consecutive failures, created if missing);
    ``rt`` (a :class:`~secondorder.placement.runtime.Runtime`) warns and collects the
    escalations that ``group``'s ``max_consecutive_root_failures`` calls for.
    """
    sl = slice(lo, hi)
    old = state["roots"][cls][axis][sl]
    if root is not None:
        finite_root = torch.isfinite(root).flatten(1).all(1)
        ok = ok & finite_root
        old.copy_(torch.where(ok[:, None, None], root.to(old.dtype), old))
        state["root_error"][cls][axis][sl].copy_(err.float())
        lam_old = state["lambda_max"][cls][axis][sl]
        lam = lam.to(lam_old.dtype)
        lam_old.copy_(torch.where(torch.isfinite(lam), lam, lam_old))
    else:
        state["root_error"][cls][axis][sl].fill_(float("inf"))
    state["root_failures"][cls][axis][sl].add_((~ok).long())
    streaks = state.get("root_streak")
    if streaks is None:  # checkpoint from before streaks were kept
        streaks = state["root_streak"] = [
            [torch.zeros_like(f) for f in cls_] for cls_ in state["root_failures"]
        ]
    streak = streaks[cls][axis][sl]
    streak.copy_(torch.where(ok, torch.zeros_like(streak), streak + 1))
    if bool(ok.all()):
        return
    if root is not None:  # (a solver exception was warned about where it was caught)
        if not bool(finite_root.all()):
            kind, why = "non-finite", "is not finite"
        else:
            kind = "residual"
            threshold = group["inverse_failure_threshold"] if group else "?"
            why = (
                f"has a residual of {err.float().max().item():.3g} >= "
                f"inverse_failure_threshold ({threshold})"
            )
        rt.warn_once(
            ("root-rejected", kind),
            f"{rt.label}: a computed inverse root {why}; it was rejected and the previous "
            "root kept (counted in diagnostics()['failures']).",
        )
    if group is not None:
        limit = group["max_consecutive_root_failures"]
        worst = int(streak.max().item())
        if worst >= limit:
            rt.escalations.append((group["on_root_failure"], worst, limit))


# ------------------------------------------------------------------------ helpers
def _group_of(client: Any, p: torch.Tensor) -> dict[str, Any]:
    return next(g for g in client.param_groups if any(q is p for q in g["params"]))


def _records_to_jobs(rt: Any, records: list[dict[str, Any]], full: bool) -> list[tuple]:
    """``(step, meta, RootResult)`` of saved pending records; ``full`` records (gathered,
    single-process format) keep only this rank's blocks."""
    out = []
    for rec in records:
        key, c, i = rec["param"], rec["cls"], rec["axis"]
        if rt.owners is not None and rt.owners[key] != rt.comm.rank:
            continue  # shard_optimizer_state: another rank's parameter
        parts = [rec[name] for name in ("root", "error", "lambda_max", "ok")]
        if rt.layout is not None and full:
            parts = [rt.layout.local(key, c, x) for x in parts]
        n = parts[0].shape[0]
        if n == 0:
            continue
        out.append((int(rec["step"]), [[(key, c, i, n)]], RootResult(*parts)))
    return out


def _store_pieces(client: Any, pieces: list[tuple[DueFactor, int, int]], res: Any) -> None:
    """Install a solved chunk; ``res=None`` (the solver raised) rejects all its roots."""
    offset = 0
    for f, lo, hi in pieces:
        n = hi - lo
        if res is None:
            ok = torch.zeros(n, dtype=torch.bool, device=f.matrix.device)
            client._store_root(f.state, f.cls, f.axis, None, None, None, ok, lo, hi, f.group)
        else:
            part = [x[offset : offset + n] for x in res]
            client._store_root(f.state, f.cls, f.axis, *part, lo, hi, f.group)
        offset += n


def _chunks(factors: list[DueFactor], rows: int | None) -> list[list[tuple[DueFactor, int, int]]]:
    """Cut the blocks of ``factors`` into chunks of at most ``rows`` matrices (None: one
    chunk): each chunk is a list of ``(factor, lo, hi)`` block ranges."""
    out: list[list[tuple[DueFactor, int, int]]] = [[]]
    room = rows
    for f in factors:
        lo, n = 0, f.matrix.shape[0]
        while lo < n:
            if room == 0:
                out.append([])
                room = rows
            hi = n if room is None else min(n, lo + room)
            out[-1].append((f, lo, hi))
            if room is not None:
                room -= hi - lo
            lo = hi
    return [c for c in out if c]


def _stack_pieces(pieces: list[tuple[DueFactor, int, int]]) -> torch.Tensor:
    """The bias-corrected (scaled) statistics of a chunk, as one new ``(B, n, n)`` tensor."""
    f0 = pieces[0][0]
    rows = sum(hi - lo for _, lo, hi in pieces)
    n = f0.size
    out = torch.empty(rows, n, n, dtype=f0.matrix.dtype, device=f0.matrix.device)
    offset = 0
    for f, lo, hi in pieces:
        part = out[offset : offset + hi - lo]
        if f.matrix.dim() == 2:  # packed statistics
            kron.unpack_symmetric(f.matrix[lo:hi], out=part)
            if f.bc != 1.0:
                part.div_(f.bc)
        else:
            torch.div(f.matrix[lo:hi], f.bc, out=part)
        offset += hi - lo
    return out


def _solve_snapshots(solve: Solve, payload: list[tuple[Any, ...]]) -> list[RootResult]:
    """Worker side of the async scheduler: solve each snapshotted bucket (in chunks of at
    most ``rows`` matrices); reject non-finite roots.

    A module function that sees only ``solve`` and the snapshots, so the optimizer can be
    collected while it runs.
    """
    out = []
    for spec, snap, scale, rows in payload:
        matrix = snap.get()
        step = matrix.shape[0] if rows is None else rows
        parts = [
            solve(spec, matrix[lo : lo + step], scale[lo : lo + step])
            for lo in range(0, matrix.shape[0], step)
        ]
        res = RootResult(*(torch.cat(x) for x in zip(*parts))) if len(parts) > 1 else parts[0]
        finite = torch.isfinite(res.root).flatten(1).all(1)
        out.append(res._replace(ok=res.ok & finite))
    return out
