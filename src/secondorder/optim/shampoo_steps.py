"""Shampoo's per-parameter step: momentum, graft, preconditioned direction and update.

The part of :class:`~secondorder.optim.shampoo.Shampoo` that touches parameter-sized data
every step (steps 1 and 4-6 of its docstring), kept apart from the class that validates,
owns the state and orders a step. Single-process steps run it in *pieces* of whole block
rows under ``root_memory_budget`` (:mod:`secondorder.optim.pieces`) with multi-tensor
operations, so no more than a bounded amount of temporaries is alive at once; the
distributed path computes whole-tensor directions for the placement layer to exchange.

The Kronecker product runs in scaled units (:func:`secondorder.kernels.kron.precondition_scaled`)
and grafting absorbs the scale, so huge momentum meeting the roots of tiny statistics cannot
overflow float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..blocking import BlockPlan
from ..kernels import kron
from ..kernels.grafting import (
    bias_correction,
    block_norms,
    graft_direction,
    graft_directions,
    graft_rescale,
    update_second_moment,
    update_second_moments,
)
from ..placement.ddp import BlockLayout
from ..placement.fsdp import ExactLayout, UsedEntries
from .pieces import Piece, cut

#: gradient entries are saturated at this magnitude (see the step)
_GRAD_LIMIT = 2.0**63
#: added to the norm of the Shampoo direction before grafting divides by it
_GRAFT_TINY = 1e-16
#: elementwise work on a piece of n elements keeps at most about this many n-sized float32
#: temporaries alive (gradient, momentum, graft denominator and direction, blocks of the
#: Kronecker product and its result): pieces have ``root_memory_budget / (4 * this)``
#: elements at most
_PIECE_TEMPORARIES = 8
#: ... but not fewer elements than this (or one block row): a tiny budget must not turn a
#: large tensor into a million pieces of Python overhead
_MIN_PIECE_ELEMENTS = 2**16


@dataclass
class _Item:
    """One parameter's share of a step, prepared before anything is modified."""

    group: dict[str, Any]
    p: torch.Tensor
    state: dict[str, Any]
    fresh: bool  # its state is new: installed in self.state when the step commits
    plan: BlockPlan | None
    t: int
    key: int
    a: torch.Tensor | None  # graft direction, set while stage 2 preconditions this tensor
    due: bool = False
    new: dict[str, Any] = field(default_factory=dict)  # state entries created by this step

    @property
    def g(self) -> torch.Tensor:
        """The gradient this step uses (see :func:`_step_gradient`), built anew at each use:
        nothing gradient-sized is kept for a parameter between the stages of a step."""
        return _step_gradient(self.group, self.p.grad, self.p)


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _add_update(p: torch.Tensor, direction: torch.Tensor, lr: Any) -> None:
    """``p <- p - lr * direction`` (direction rounded to ``p``'s dtype first).

    For bfloat16/float16 ``p`` the sum is formed in float32 and rounded once: torch's
    low-precision ``add_`` rounds the elements at the tail of a tensor differently from the
    rest, which would make the result depend on how a step cuts the tensor into pieces.
    """
    d = direction.to(p.dtype)
    if p.dtype in _LOW_PRECISION:
        p.copy_(p.float().add_(d.float(), alpha=-lr))
    else:
        p.add_(d, alpha=-lr)


def _step_gradients(
    group: dict[str, Any], grads: list[torch.Tensor], ps: list[torch.Tensor]
) -> list[torch.Tensor]:
    """:func:`_step_gradient` for lists (multi-tensor ops for float32 gradients and a plain
    number ``weight_decay``; the same values)."""
    wd = group["weight_decay"]
    if isinstance(wd, torch.Tensor) or any(g.dtype != torch.float32 for g in grads):
        return [_step_gradient(group, g, p) for g, p in zip(grads, ps)]
    gs = torch._foreach_clamp_min(grads, -_GRAD_LIMIT)
    torch._foreach_clamp_max_(gs, _GRAD_LIMIT)
    if wd != 0 and not group["decoupled_weight_decay"]:
        p32 = [p.float() if p.dtype != torch.float32 else p for p in ps]
        torch._foreach_add_(gs, p32, alpha=wd)
    return gs


def _step_gradient(group: dict[str, Any], grad: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """float32 ``grad`` (a new tensor) with entries saturated at ``2**63`` and, for
    ``decoupled_weight_decay=False``, the L2 term ``weight_decay * p`` added.

    Entries beyond 2**63 (~9.2e18) saturate: their squares (graft second moment) would
    overflow float32, and momentum and graft must see the same gradient so that the graft's
    ratio m / sqrt(v) stays bounded. Finite gradients never make inf state. ``grad`` and
    ``p`` may be pieces (views) of the parameter's gradient and of the parameter.
    """
    g = grad.float() if grad.dtype != torch.float32 else grad
    g = g.clamp(-_GRAD_LIMIT, _GRAD_LIMIT)
    wd = group["weight_decay"]
    if wd != 0 and not group["decoupled_weight_decay"]:
        g = g.add(p.float() if p.dtype != torch.float32 else p, alpha=wd)
    return g


class ShampooSteps:
    """Mixin of :class:`~secondorder.optim.shampoo.Shampoo`: the per-parameter work of a step."""

    #: the elementwise state: the parameter's shape, or compact (:meth:`_used`)
    _moment_keys = ("exp_avg", "graft_v")

    # ------------------------------------------------- compact moments (exact mode)
    def _used(self, p: torch.Tensor) -> UsedEntries | None:
        """``fsdp_mode="exact"``, a sharded parameter (seen whole): the entries its moments
        keep on this rank (its rows and owned blocks, :class:`UsedEntries`). ``None``: the
        moments have the parameter's shape."""
        rt = self.__dict__.get("_rt")
        if rt is None or not isinstance(rt.layout, ExactLayout):
            return None
        key = rt.keys.get(id(p))
        return None if key is None else rt.layout.used(key)

    def _moment_shape(self, p: torch.Tensor) -> tuple[int, ...]:
        used = self._used(p)
        return tuple(p.shape) if used is None else (used.count,)

    def _loaded_moments(self, p: torch.Tensor, st: dict[str, Any]) -> dict[str, Any]:
        """Check a loaded state's moments against :meth:`_used`: compact, or of the whole
        shape (a single-process state dict, or an exact-mode checkpoint of an older version;
        sliced by :meth:`_compact_moments`). Returns ``st`` without the compact ones (the
        base class checks the rest against the parameter's shape)."""
        used = self._used(p)
        if used is None:
            return st
        out = dict(st)
        for k in self._moment_keys:
            v = st.get(k)
            if not isinstance(v, torch.Tensor) or v.shape == p.shape:
                continue
            if tuple(v.shape) != (used.count,):
                raise ValueError(
                    f"state {k!r} has shape {tuple(v.shape)}, but its sharded parameter of "
                    f"shape {tuple(p.shape)} keeps {used.count} entries on this rank "
                    f"(fsdp_mode='exact': shape ({used.count},), or the whole shape to be "
                    "sliced): the state dict does not match these parameters and shards"
                )
            del out[k]
        return out

    def _compact_moments(self) -> None:
        """After a load: moments of the whole shape are cut to this rank's used entries."""
        for p, st in self.state.items():
            used = self._used(p)
            for k in self._moment_keys if used is not None else ():
                v = st.get(k)
                whole = isinstance(v, torch.Tensor) and v.shape == p.shape
                if whole and tuple(p.shape) != (used.count,):  # else already the compact one
                    st[k] = used.gather(v)

    @staticmethod
    def _momentum_hat(group: dict[str, Any], m: torch.Tensor, g: torch.Tensor, t: int):
        """Bias-corrected momentum (Nesterov look-ahead with ``nesterov``) from the new EMA."""
        beta1 = group["betas"][0]
        if group["nesterov"]:
            mhat = m * (beta1 / bias_correction(beta1, t + 1))
            return mhat.add_(g, alpha=(1.0 - beta1) / bias_correction(beta1, t))
        return m / bias_correction(beta1, t)

    def _direction(
        self, it: _Item, layout: BlockLayout | None
    ) -> torch.Tensor | list[torch.Tensor]:
        """Commit momentum and graft accumulator; return the update direction of ``it.p``.

        Returns a tensor of ``p``'s shape or, for a preconditioned tensor, the block stacks of
        the direction (one per size class; only the rank's own blocks when distributed).
        A preconditioning failure falls back to the graft direction (warned once). In
        ``fsdp_mode="exact"`` the moments of a sharded parameter are compact
        (:meth:`_used`): the elementwise work runs on the used entries of the gradient, and
        the momentum estimate and graft direction go back to ``p``'s shape for the blocks.
        """
        group, state, g, plan, t = it.group, it.state, it.g, it.plan, it.t
        beta1, beta2 = group["betas"]
        preconditioned = plan is not None and t >= self._start(group)
        kind = self._graft_kind(group, preconditioned)
        used = self._used(it.p)  # exact mode: moments of this rank's entries only

        def whole(x: torch.Tensor) -> torch.Tensor:
            return x if used is None else used.scatter(x, it.p.shape)

        try:
            if used is not None:
                g = used.gather(g)
            if beta1 > 0:
                m = state["exp_avg"]
                m.lerp_(g, 1.0 - beta1)
                mhat = self._momentum_hat(group, m, g, t)
            else:
                mhat = g
            v = state.get("graft_v")
            if v is not None and kind is not None:
                update_second_moment(kind, v, g, beta2)
            a = (
                None
                if kind is None
                else graft_direction(kind, mhat, v, t, beta2, group["graft_eps"])
            )
            if not preconditioned:
                return whole(a)
            it.a = None if a is None else whole(a)
            d = self._precondition(it, whole(mhat), kind, layout)
            it.a = None
            return d if layout is not None else plan.merge(d)
        except Exception as e:  # noqa: BLE001 - contained: the graft direction is used
            self._warn_once(
                ("direction", type(e).__name__),
                f"Shampoo: computing a tensor's update raised {type(e).__name__}: {e}. It took "
                "the graft direction for this step (the step itself was applied).",
            )
            fallback, it.a = it.a, None
            if fallback is None and kind is None:  # no graft: the momentum, or the gradient
                fallback = state["exp_avg"] if beta1 > 0 else g
                fallback = fallback if fallback.shape == it.p.shape else whole(fallback)
            elif fallback is None:  # the graft direction itself failed: no update this step
                fallback = torch.zeros(it.p.shape, dtype=torch.float32, device=it.p.device)
            if layout is None or not preconditioned:
                return fallback
            return [layout.local(it.key, c, x).float() for c, x in enumerate(plan.split(fallback))]

    def _precondition(
        self, it: _Item, mhat: torch.Tensor, kind: str | None, layout: BlockLayout | None
    ) -> list[torch.Tensor]:
        """The Shampoo direction of this rank's blocks of ``it.p`` (distributed path)."""
        group, state, plan, key = it.group, it.state, it.plan, it.key
        a_blocks = plan.split(it.a) if kind is not None else None
        d_blocks = []
        for c, (x, roots) in enumerate(zip(plan.split(mhat), state["roots"])):
            if layout is not None:
                x = layout.local(key, c, x)
            if x.shape[0] == 0:  # distributed: no local blocks in this class
                d_blocks.append(torch.zeros(x.shape, dtype=torch.float32, device=x.device))
                continue
            ab = None
            if kind is not None:
                ab = a_blocks[c] if layout is None else layout.local(key, c, a_blocks[c])
            streaks = state.get("root_streak")
            d_blocks.append(
                self._precondition_blocks(group, x, roots, kind, ab, streaks and streaks[c])
            )
        return d_blocks

    @staticmethod
    def _precondition_blocks(
        group: dict[str, Any],
        x: torch.Tensor,
        roots: list[torch.Tensor],
        kind: str | None,
        ab: torch.Tensor | None,
        streaks: list[torch.Tensor] | None,
    ) -> torch.Tensor:
        """Shampoo direction of a stack of blocks ``x`` (momentum), grafted to ``ab``.

        The Kronecker product runs in scaled units (:func:`kron.precondition_scaled`): its
        result ``d`` is ``D / 2**e`` per block, with entries below 2, so neither the product
        nor its norm overflows even when huge momentum meets the roots of tiny statistics.
        Grafting only needs ``D``'s direction: ``D * ||a|| / (||D|| + tiny)`` equals
        ``d * ||a|| / (||d|| + tiny / 2**e)``, and in the normal range (powers of two scale
        exactly) bit for bit. Without a graft ``D`` itself is used, saturated at ``2**63``.
        """
        d, scale = kron.precondition_scaled(x, roots)
        if kind is None:
            d = kron.unscale(d, scale)
        else:
            # (D + tiny) / scale, exactly where it matters (a zero block stays zero anyway)
            tiny = (_GRAFT_TINY / scale).float().view(-1, *([1] * (d.dim() - 1)))
            a_norms = None
            if kind == "sgd":  # a is the momentum itself: its squares may overflow float32
                sa = kron.pow2_floor(kron.block_amax(ab)).view(-1, *([1] * (ab.dim() - 1)))
                a_norms = block_norms(ab / sa).mul_(sa)
            graft_rescale(d, ab, tiny, a_norms=a_norms)
        if group["on_root_failure"] == "graft" and streaks is not None:
            # blocks whose roots keep failing take the graft direction
            limit = group["max_consecutive_root_failures"]
            bad = torch.stack([s >= limit for s in streaks]).any(0)
            fallback = ab if ab is not None else x.float()
            d = torch.where(bad.view(-1, *([1] * (d.dim() - 1))), fallback, d)
        return d

    @staticmethod
    def _apply_direction(group: dict[str, Any], p: torch.Tensor, direction: torch.Tensor) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        if wd != 0 and group["decoupled_weight_decay"]:
            p.mul_(1.0 - lr * wd)
        _add_update(p, direction, lr)

    # ------------------------------------------------- elementwise work, in pieces
    def _piece_elements(self) -> int | None:
        """Elements of a piece of elementwise work (None: whole tensors, unbounded)."""
        if self.root_memory_budget is None:
            return None
        return max(_MIN_PIECE_ELEMENTS, self.root_memory_budget // (4 * _PIECE_TEMPORARIES))

    def _update_local(self, items: list[_Item]) -> None:
        """Steps 4-6 for every item (single process): momentum, graft, direction, update.

        The work is done in pieces (:mod:`secondorder.optim.pieces`): a tensor larger than
        :meth:`_piece_elements` in runs of whole block rows, and runs of small tensors of the
        same group, step and kind together, up to the same size, with one multi-tensor
        (``torch._foreach_*``) call per operation. Every operation is elementwise or per
        block, so the result does not depend on the cut; the temporaries of the step are
        those of one piece.
        """
        cap = self._piece_elements()
        chunk: list[Piece] = []
        size, key = 0, None
        for it in items:
            pre = it.plan is not None and it.t >= self._start(it.group)
            k = (id(it.group), it.t, pre, it.p.device)
            st = it.state
            own = [it.p, it.p.grad] + [st[n] for n in ("exp_avg", "graft_v") if n in st]
            try:
                cuts = cut(it, own, cap)
            except Exception as e:  # noqa: BLE001 - contained: the whole tensor at once
                self._warn_once(
                    ("pieces", type(e).__name__),
                    f"Shampoo: cutting a tensor's update into pieces raised "
                    f"{type(e).__name__}: {e}; it was updated whole (the step was applied).",
                )
                cuts = [Piece(it, None, it.p.numel())]
            for pc in cuts:
                if chunk and (k != key or (cap is not None and size + pc.numel > cap)):
                    self._update_pieces(chunk)
                    chunk, size = [], 0
                chunk.append(pc)
                size += pc.numel
                key = k
        if chunk:
            self._update_pieces(chunk)

    def _update_pieces(self, chunk: list[Piece]) -> None:
        """Momentum, graft, direction and update of pieces of the same group, step and kind.

        Failures are contained (warned once, counted): when the momentum or graft stage
        raises, these pieces are not updated this step; when a Kronecker product raises, its
        piece takes the graft direction.
        """
        it0 = chunk[0].item
        group, t = it0.group, it0.t
        beta1, beta2 = group["betas"]
        preconditioned = it0.plan is not None and t >= self._start(group)
        kind = self._graft_kind(group, preconditioned)
        try:
            ps = [pc.view(pc.item.p) for pc in chunk]
            gs = _step_gradients(group, [pc.view(pc.item.p.grad) for pc in chunk], ps)
            if beta1 > 0:
                ms = [pc.view(pc.item.state["exp_avg"]) for pc in chunk]
                if isinstance(beta1, torch.Tensor):
                    for m, g in zip(ms, gs):
                        m.lerp_(g, 1.0 - beta1)
                else:
                    torch._foreach_lerp_(ms, gs, 1.0 - beta1)
                mh = self._momentum_hats(group, ms, gs, t)
                del ms
            else:
                mh = gs
            vs = None
            if kind is not None and "graft_v" in it0.state:
                vs = [pc.view(pc.item.state["graft_v"]) for pc in chunk]
                update_second_moments(kind, vs, gs, beta2)
            eps = group["graft_eps"]
            # mh (a new tensor, or gs: this step's own copy) is needed later only when it is
            # to be preconditioned
            inplace = not preconditioned
            a = None if kind is None else graft_directions(kind, mh, vs, t, beta2, eps, inplace)
            del gs, vs
        except Exception as e:  # noqa: BLE001 - contained: the step must complete
            self._warn_once(
                ("direction", type(e).__name__),
                f"Shampoo: computing a tensor's update raised {type(e).__name__}: {e}. It was "
                "not updated this step (the step itself was applied).",
            )
            return
        if preconditioned:
            ds = [
                self._precondition_piece(pc, x, None if a is None else a[i], kind)
                for i, (pc, x) in enumerate(zip(chunk, mh))
            ]
        else:
            ds = a
        del mh, a
        with self._contained("update", "some parameters were not updated this step"):
            self._apply_directions(group, ps, ds)

    @staticmethod
    def _momentum_hats(
        group: dict[str, Any], ms: list[torch.Tensor], gs: list[torch.Tensor], t: int
    ) -> list[torch.Tensor]:
        """:meth:`_momentum_hat` for lists (one multi-tensor call per operation)."""
        beta1 = group["betas"][0]
        if isinstance(beta1, torch.Tensor):
            return [ShampooSteps._momentum_hat(group, m, g, t) for m, g in zip(ms, gs)]
        if group["nesterov"]:
            mh = torch._foreach_mul(ms, beta1 / bias_correction(beta1, t + 1))
            torch._foreach_add_(mh, gs, alpha=(1.0 - beta1) / bias_correction(beta1, t))
            return mh
        return torch._foreach_div(ms, bias_correction(beta1, t))

    def _precondition_piece(
        self, pc: Piece, x: torch.Tensor, a: torch.Tensor | None, kind: str | None
    ) -> torch.Tensor:
        """The grafted Shampoo direction of one piece (``x``: its momentum, ``a``: its graft
        direction), of the piece's shape. A failure here takes the graft direction (warned)."""
        it = pc.item
        state = it.state
        try:
            rb = pc.blocks()
            xb = rb.split(x)
            ab = rb.split(a) if a is not None else [None] * len(xb)
            streaks = state.get("root_streak")
            out = []
            for j, (c, lo, hi) in enumerate(rb.classes):
                roots = [r[lo:hi] for r in state["roots"][c]]
                sj = None if streaks is None else [s[lo:hi] for s in streaks[c]]
                out.append(self._precondition_blocks(it.group, xb[j], roots, kind, ab[j], sj))
            del xb, ab
            return rb.merge(out)
        except Exception as e:  # noqa: BLE001 - contained: the graft direction is used
            self._warn_once(
                ("direction", type(e).__name__),
                f"Shampoo: computing a tensor's update raised {type(e).__name__}: {e}. It took "
                "the graft direction for this step (the step itself was applied).",
            )
            return a if a is not None else x

    @staticmethod
    def _apply_directions(
        group: dict[str, Any], ps: list[torch.Tensor], ds: list[torch.Tensor]
    ) -> None:
        """:meth:`_apply_direction` for lists (one multi-tensor call per operation)."""
        lr, wd = group["lr"], group["weight_decay"]
        if isinstance(lr, torch.Tensor) or isinstance(wd, torch.Tensor):
            for p, d in zip(ps, ds):
                ShampooSteps._apply_direction(group, p, d)
            return
        if wd != 0 and group["decoupled_weight_decay"]:
            torch._foreach_mul_(ps, 1.0 - lr * wd)
        wide = [(p, d.to(p.dtype)) for p, d in zip(ps, ds) if p.dtype not in _LOW_PRECISION]
        if wide:
            torch._foreach_add_([p for p, _ in wide], [d for _, d in wide], alpha=-lr)
        for p, d in zip(ps, ds):
            if p.dtype in _LOW_PRECISION:
                _add_update(p, d, lr)
