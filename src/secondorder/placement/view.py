"""The optimizer's parameters as plain local tensors, for the span of one call.

An optimizer's math is written for ordinary tensors. For DTensor parameters (FSDP2, HSDP)
:class:`LocalView` swaps, while a ``step`` / ``state_dict`` / ``load_state_dict`` /
``diagnostics`` call runs, every DTensor parameter in ``param_groups`` for a *proxy*: a
plain tensor that shares storage with the parameter's local shard, whose ``grad`` is the
local shard of the parameter's gradient, and under which the parameter's state is kept.
The optimizer therefore reads and updates shards as if they were whole tensors of the
shard's shape (in place, so the DTensor parameter changes with them), keeps state of the
shard's size, and never mixes DTensors and tensors. When the call returns, parameters and
state keys are put back: outside optimizer calls ``param_groups`` and ``state`` are keyed
by the real parameters, as torch.optim (and ``torch.distributed.checkpoint``) expect.

Proxies are persistent objects (their identity is stable, so caches keyed by ``id`` keep
working) re-pointed at the current local shard on every entry: FSDP2 may move a shard to
new storage between optimizer construction and the first forward pass.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .params import ParamPlacement, is_dtensor, placement_of

__all__ = ["LocalView", "build_view", "param_name"]


class LocalView:
    """See the module docstring. Built by :func:`build_view`; re-entrant (nested calls of
    the optimizer's public methods enter it once)."""

    def __init__(self, params: list[torch.Tensor], placements: list[ParamPlacement | None]):
        self.active = False
        self._pairs: list[tuple[torch.Tensor, torch.Tensor, ParamPlacement]] = []
        self._by_proxy: dict[int, ParamPlacement] = {}
        self._by_param: dict[int, ParamPlacement] = {}
        for p, pl in zip(params, placements):
            if pl is None:
                continue
            # a private tensor, re-pointed at the local shard on every entry
            proxy = torch.empty(0, dtype=p.dtype, device=p.to_local().device)
            self._pairs.append((p, proxy, pl))
            self._by_proxy[id(proxy)] = pl
            self._by_param[id(p)] = pl
        # collectives that make every rank take the same skip decision: one per shard group
        groups: dict[tuple[Any, int], ParamPlacement] = {}
        for _, _, pl in self._pairs:
            if pl.sharded:
                groups.setdefault((pl.mesh, pl.shard_dim), pl)
        self._shard_groups = list(groups.values())
        self._saved: list[list[torch.Tensor]] = []

    # ---------------------------------------------------------------- queries
    def placement(self, t: torch.Tensor) -> ParamPlacement | None:
        """The placement of a proxy (inside the view) or of a real parameter."""
        return self._by_proxy.get(id(t)) or self._by_param.get(id(t))

    def seen_shape(self, pl: ParamPlacement) -> torch.Size:
        """The shape the optimizer sees for a parameter of placement ``pl``: its local
        shard's (a view showing whole tensors overrides this)."""
        return pl.local_shape

    @property
    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor, ParamPlacement]]:
        """``(parameter, proxy, placement)`` for every DTensor parameter."""
        return self._pairs

    @property
    def sharded(self) -> bool:
        return bool(self._shard_groups)

    def all_agree(self, flag: bool) -> bool:
        """``True`` iff ``flag`` holds on every rank holding a shard (a collective when any
        parameter is sharded; replicas of one shard hold identical gradients)."""
        if not self._shard_groups:
            return flag
        pl = self._shard_groups[0]
        t = torch.tensor([1 if flag else 0], device=pl.mesh.device_type, dtype=torch.int32)
        for pl in self._shard_groups:
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=pl.group())
        return bool(t.item())

    # ------------------------------------------------------------- swapping
    def enter(self, opt: torch.optim.Optimizer, grads: bool = True) -> None:
        """Swap the proxies in; with ``grads`` their ``grad`` is the local gradient (a
        gradient laid out unlike its parameter raises ``ValueError``)."""
        assert not self.active
        proxies = {}
        with torch.no_grad():
            for p, proxy, pl in self._pairs:
                proxy.set_(p.to_local().detach())
                g = p.grad if grads else None
                if g is None:
                    proxy.grad = None
                else:
                    if not is_dtensor(g) or tuple(g.placements) != pl.placements:
                        got = tuple(g.placements) if is_dtensor(g) else "a plain tensor"
                        raise ValueError(
                            f"the gradient of {pl.name} has placements {got} but the "
                            f"parameter has {pl.placements}: expected a gradient laid out "
                            "like its parameter (as FSDP2 produces it)"
                        )
                    proxy.grad = g.to_local().detach()
                proxies[id(p)] = proxy
        self._saved = [g["params"] for g in opt.param_groups]
        for g in opt.param_groups:
            g["params"] = [proxies.get(id(p), p) for p in g["params"]]
        _rekey(opt, proxies)
        self.active = True

    def exit(self, opt: torch.optim.Optimizer) -> None:
        back = {id(proxy): p for p, proxy, _ in self._pairs}
        _rekey(opt, back)
        for g, saved in zip(opt.param_groups, self._saved):
            g["params"] = saved
        for _, proxy, _ in self._pairs:
            proxy.grad = None
        self._saved = []
        self.active = False


def _rekey(opt: torch.optim.Optimizer, mapping: dict[int, torch.Tensor]) -> None:
    """Re-key ``opt.state`` (in place, keeping its order) through ``mapping`` (by ``id``)."""
    items = list(opt.state.items())
    if not any(id(k) in mapping for k, _ in items):
        return
    opt.state.clear()
    for k, v in items:
        opt.state[mapping.get(id(k), k)] = v


def build_view(
    opt: torch.optim.Optimizer,
    cached: tuple[tuple[int, ...], LocalView | None] | None,
    view_class: type[LocalView] = LocalView,
) -> tuple[tuple[int, ...], LocalView | None]:
    """``(key, view)`` for ``opt``'s current parameters: ``cached`` while the parameters
    are the same (``key``: their ids), else a new ``view_class`` view; the view is ``None``
    when no parameter is a DTensor. Raises ``ValueError`` for unsupported placements."""
    params = [p for g in opt.param_groups for p in g["params"]]
    key = tuple(id(p) for p in params)
    if cached is not None and cached[0] == key:
        return cached
    if not any(is_dtensor(p) for p in params):
        return key, None
    placements = [
        placement_of(p, param_name(g, gi, pi))
        for gi, g in enumerate(opt.param_groups)
        for pi, p in enumerate(g["params"])
    ]
    return key, view_class(params, placements)


def param_name(group: dict[str, Any], gi: int, pi: int) -> str:
    """How messages name parameter ``pi`` of group ``gi`` (its name when the group has
    ``param_names``)."""
    names = group.get("param_names")
    if names and pi < len(names):
        return f"parameter {names[pi]!r}"
    return f"param_groups[{gi}]['params'][{pi}]"
