"""The machinery every ``secondorder`` optimizer shares.

Subclasses implement :meth:`SecondOrderOptimizer._validate_group` (raise on bad
hyperparameters) and :meth:`SecondOrderOptimizer._update` (the math). This base class owns
the behaviour users rely on being identical across optimizers:

* every param group (including ``add_param_group`` later) is validated when it is added;
* ``params`` may be ``model.named_parameters()`` (or groups of ``(name, tensor)`` pairs), as
  in torch.optim: the names go to each group's ``param_names`` and into the state dict.
  All groups are named or none is. On load, a checkpoint's names replace ours and a
  checkpoint without names keeps ours; names never decide which state goes to which
  parameter (position does, as in torch.optim). Done here, so older torch versions that
  lack named parameters behave the same;
* any real-valued hyperparameter may be a 1-element tensor (torch.optim documents this for
  ``lr`` and ``betas``). ``_update`` sees such values as 0-d views of the user's tensor,
  so ``p.add_(d, alpha=-group["lr"])`` works for every shape; the group keeps the tensor
  itself (schedulers change it in place; ``state_dict`` saves it as given);
* torch.optim flags this library does not implement (``maximize``, ``capturable``,
  ``differentiable``) set to true in a group raise ``ValueError``; ``foreach``/``fused``
  are performance hints, accepted and ignored (``foreach`` is honoured by the subclasses
  that take it as an argument and validate it, see :mod:`secondorder.kernels.foreach`);
* ``step(closure)`` evaluates the closure with grad enabled and returns its loss;
  torch.optim's step pre/post hooks (per optimizer and global) run around every step,
  a skipped one included;
* parameters whose ``grad`` is ``None`` and empty parameters are skipped (no state created);
* sparse and complex gradients raise ``TypeError`` before anything is modified;
* **non-finite gradients** (NaN/Inf anywhere in the step) follow ``nonfinite``:
  ``"skip"`` (default) leaves every parameter and every state tensor bit-identical and
  counts the skipped step; ``"raise"`` raises ``FloatingPointError`` before anything is
  modified. The check costs one reduction and one host read per step;
* ``load_state_dict`` keeps the dtype of every saved state tensor (``torch.optim`` would cast
  float32 statistics to a bfloat16 parameter's dtype), copies it (the loaded dict is never
  aliased), and rejects with a clear ``ValueError``, changing nothing, a state dict whose
  groups, parameter shapes (``param_shapes``, recorded by ``state_dict``) or state tensors
  do not fit, or that another optimizer wrote (``optimizer``, recorded by ``state_dict``).
  The checkpoint's hyperparameters replace the constructor's (as in ``torch.optim``);
  ones it lacks (older checkpoints) take the constructor's values; all are validated, and
  :meth:`SecondOrderOptimizer._check_loaded_state` sees them in ``self.param_groups``.
  A ``step`` saved as a Python number (older torch, other tools) becomes a tensor, as
  torch.optim converts it; one that is not a whole number >= 0 is rejected at load;
* torch.optim's state-dict hooks run once each, pre-hooks before everything and
  post-hooks on the final result;
* **DTensor parameters** (FSDP2 ``fully_shard``, HSDP) are checked at construction
  (``ValueError`` naming the parameter for placements other than ``Replicate()`` /
  ``Shard(0)``) and, during ``step``, ``state_dict``, ``load_state_dict`` and
  ``diagnostics``, presented to the subclass as plain tensors holding this rank's shard
  (:class:`secondorder.placement.LocalView`): state is kept per shard, the non-finite
  check agrees across shards (one extra collective per step), and ``state_dict`` expresses
  sharded state as DTensors (keys in ``_param_shaped_keys`` / ``_flat_state_keys``) or
  per-shard entries, so that ``torch.distributed.checkpoint`` saves and reshards it;
* ``copy.deepcopy`` / pickling keep every attribute except torch's hook registries and
  the subclass's ``_transient_attrs`` (thread pools, scratch buffers, process groups).

The contract suite ``tests/test_contract.py`` checks all of this for every optimizer.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from .._validation import (
    UNSUPPORTED_FLAGS,
    check_choice,
    check_grad,
    check_loaded_step,
    check_param_names,
    check_params_dtype,
    check_unsupported_flags,
    split_named_params,
)
from ..placement import (
    LocalView,
    ParamPlacement,
    build_view,
    param_name,
    placement_of,
    state_to_global,
    state_to_local,
)

NONFINITE_POLICIES = ("skip", "raise")


class SecondOrderOptimizer(torch.optim.Optimizer):
    """Base class; see the module docstring for the shared contract."""

    def __init__(
        self, params: Iterable[Any], defaults: dict[str, Any], *, nonfinite: str = "skip"
    ) -> None:
        check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        # torch.optim flags the subclass implements (it has them in its defaults). Kept
        # apart: torch's ``__setstate__`` adds ``differentiable`` to ``defaults`` on load.
        self._implemented_flags = frozenset(f for f in UNSUPPORTED_FLAGS if f in defaults)
        self._check_group(dict(defaults))
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups
    def _validate_group(self, group: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, as ``torch.optim.Optimizer.add_param_group`` does, after validating it.

        ``params`` may hold tensors or ``(name, tensor)`` pairs (``model.named_parameters()``);
        names go to the group's ``param_names``, as in torch.optim. This is done here, not
        left to torch, so it works on every supported torch version (older ones reject
        pairs). Nothing is added if any check fails.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group["params"]
        if not isinstance(params, set):  # torch.optim raises its own error for sets
            # Materialize once: a generator (``model.parameters()``) must not be consumed
            # by our checks and then reach torch.optim empty.
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            params, names = split_named_params(params)
            param_group["params"] = params
            if names is not None:
                param_group["param_names"] = names
            check_param_names(param_group)
            self._check_names_like_other_groups(param_group)
        check_params_dtype(params, type(self).__name__)
        gi = len(self.param_groups)
        for pi, p in enumerate(params if not isinstance(params, set) else []):
            name = param_name(param_group, gi, pi)
            sharded = placement_of(p, name) is not None
            if sharded and not type(self)._supports_dtensor:
                raise ValueError(self._dtensor_refusal(name))
            if sharded and getattr(self, "distributed", False):
                # splitting whole tensors' work across ranks presumes every rank holds them
                raise ValueError(
                    f"distributed=True splits the work on whole tensors across data-parallel "
                    f"ranks, but {name} is a DTensor (FSDP2 / HSDP): each rank already holds "
                    "and preconditions its own shard; use distributed=False"
                )
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._check_group(merged)
        super().add_param_group(param_group)

    def _check_names_like_other_groups(self, param_group: dict[str, Any]) -> None:
        """All groups are named or none is (torch.optim's rule, checked on every version)."""
        named = "param_names" in param_group
        for group in self.param_groups:
            if ("param_names" in group) != named:
                which = "with names" if named else "without names"
                raise ValueError(
                    "all optimizer param groups should be with/without names (from "
                    f"named_parameters()): cannot add a param group {which} to "
                    f"{type(self).__name__}, whose groups are "
                    f"{'without' if named else 'with'} names"
                )

    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate a group (defaults merged in): torch.optim flags, then the subclass."""
        implemented = self.__dict__.get("_implemented_flags", frozenset())
        check_unsupported_flags(group, implemented, type(self).__name__)
        self._validate_group(group)

    # --------------------------------------------------------------- placement
    def _local_view(self) -> LocalView | None:
        """The view of DTensor parameters as local shards (``None`` when there are none)."""
        cached = self.__dict__.get("_placement_view")
        if cached is not None and cached[1] is not None and cached[1].active:
            return cached[1]  # param_groups hold the proxies now
        self.__dict__["_placement_view"] = cached = build_view(self, cached)
        return cached[1]

    def _on_local_shards(self) -> Any:
        """Context in which ``param_groups`` and ``state`` hold local shards (re-entrant)."""
        view = self._local_view()
        if view is None or view.active:
            return nullcontext(view)
        return _entered(self, view)

    def _placement(self, p: torch.Tensor) -> ParamPlacement | None:
        """Inside a step: the placement of a (proxy) parameter, ``None`` for a plain one.

        Subclasses whose math couples entries across a whole tensor use it to reduce over
        the shards (:meth:`ParamPlacement.all_reduce_`)."""
        cached = self.__dict__.get("_placement_view")
        return None if cached is None or cached[1] is None else cached[1].placement(p)

    def _dtensor_refusal(self, name: str) -> str:
        """The message of the ``ValueError`` refusing DTensor parameter ``name`` (when
        ``_supports_dtensor`` is false); a subclass may say more precisely why and what to do.
        """
        # the math of this optimizer spans whole tensors (norms, Gram matrices,
        # orthogonalisation, layer hooks): on shards it would silently differ
        return (
            f"{type(self).__name__} does not support DTensor (FSDP2 / HSDP) parameters "
            f"yet, but {name} is one: keep this parameter unsharded, or use an optimizer "
            "that steps shards (docs/distributed.md lists what each secondorder optimizer "
            "computes on FSDP2 / HSDP)"
        )

    #: whether the optimizer's step is defined on DTensor (FSDP2 / HSDP) shards; subclasses
    #: whose math reduces over whole tensors opt in only once they reduce over the shards
    _supports_dtensor = False

    #: whether ranks holding an empty shard of a non-empty parameter still step it (needed
    #: when the subclass's step takes part in collectives over the shards)
    _steps_empty_shards = False

    # -------------------------------------------------------------------- step
    def _params_with_grad(self) -> list[tuple[dict[str, Any], list[torch.Tensor]]]:
        name = type(self).__name__
        out = []
        for group in self.param_groups:
            ps = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.numel() == 0:
                    pl = self._placement(p)
                    if not (self._steps_empty_shards and pl and pl.global_shape.numel()):
                        continue
                check_grad(p, name)
                ps.append(p)
            out.append((group, ps))
        return out

    @staticmethod
    def _all_finite(grads: list[torch.Tensor]) -> bool:
        if not grads:
            return True
        # One fused reduction per device, one host read in total.
        flags = []
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        for dev, dev_grads in by_device.items():
            if dev.type == "cpu":  # _foreach_norm is a slow per-tensor fallback on CPU
                sums = [x for g in dev_grads for x in torch.aminmax(g)]
            else:
                sums = (
                    torch._foreach_norm(dev_grads, ord=float("inf"))
                    if len(dev_grads) > 1
                    else [dev_grads[0].abs().max()]
                )
            flags.append(torch.isfinite(torch.stack([s.float() for s in sums])).all().cpu())
        return bool(torch.stack(flags).all())

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; returns the closure's loss (or ``None``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with self._on_local_shards() as view:
            self._step_local(view)
        return loss

    def _step_local(self, view: LocalView | None) -> None:
        work = self._params_with_grad()
        grads = [p.grad for _, ps in work for p in ps if p.numel()]  # empty shards: no check
        finite = self._all_finite(grads)
        if view is not None:
            finite = view.all_agree(finite)  # every shard skips, or none
        finite = self._ranks_agree(finite)
        if not finite:
            if self.nonfinite == "raise":
                raise FloatingPointError(
                    f"{type(self).__name__}: non-finite gradient (NaN or Inf); parameters and "
                    "optimizer state were left unchanged (nonfinite='raise')"
                )
            self.skipped_steps += 1
            return
        with self._zero_dim_hparams():
            self._update(work)

    @contextmanager
    def _zero_dim_hparams(self) -> Iterator[None]:
        """Let the update see 1-element tensor hyperparameters as 0-d tensors.

        torch.optim accepts ``lr=torch.tensor([1e-3])`` (any 1-element tensor, also in
        ``betas``) and squeezes it where it is used. Here each group's values are swapped
        for 0-d views (same storage) for the duration of the update and put back after, so
        every subclass gets it, the group keeps the user's tensor (schedulers ``fill_`` it)
        and ``state_dict`` saves it as given.
        """
        swapped = []
        for group in self.param_groups:
            for key, value in group.items():
                if key in ("params", "param_names"):
                    continue
                view = _zero_dim(value)
                if view is not value:
                    swapped.append((group, key, value, view))
        for group, key, _, view in swapped:
            group[key] = view
        try:
            yield
        finally:
            for group, key, value, _ in swapped:
                group[key] = value

    def _update(self, work: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> None:
        raise NotImplementedError  # pragma: no cover - abstract

    def _ranks_agree(self, finite: bool) -> bool:
        """Whether to step, given this process's non-finite check: a subclass whose step
        communicates with other processes makes them all decide alike (this one: as is)."""
        return finite

    # ------------------------------------------------------------- state dict
    @contextmanager
    def _hooks_paused(self, *names: str) -> Iterator[dict[str, Any]]:
        """Run torch.optim's (de)serialisation without the named hook registries, which
        we run ourselves around the whole of our version: once, and seeing the final
        result. The registries are put back unchanged (handles stay valid)."""
        saved = {n: getattr(self, n) for n in names}
        for n in names:
            setattr(self, n, OrderedDict())
        try:
            yield saved
        finally:
            for n, v in saved.items():
                setattr(self, n, v)

    def state_dict(self) -> dict[str, Any]:
        with self._hooks_paused("_optimizer_state_dict_post_hooks") as hooks:
            sd = super().state_dict()
        sd["skipped_steps"] = self.skipped_steps
        # Which optimizer wrote it: loading it into another one fails at load time, not
        # with a KeyError at the next step.
        sd["optimizer"] = type(self).__name__
        # Shapes of all parameters, in order: lets load_state_dict reject a checkpoint of
        # another model even where no state tensor would reveal it.
        sd["param_shapes"] = [[list(p.shape) for p in g["params"]] for g in self.param_groups]
        for hook in hooks["_optimizer_state_dict_post_hooks"].values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; on any mismatch raise ``ValueError`` and change nothing.

        Load hooks behave as in torch.optim: pre-hooks first (they may return a new dict,
        which is what gets checked and loaded), post-hooks last (they see the final state).
        """
        state_dict = dict(state_dict)
        for pre_hook in list(self._optimizer_load_state_dict_pre_hooks.values()):
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = dict(result)
        skipped = state_dict.pop("skipped_steps", 0)
        shapes = state_dict.pop("param_shapes", None)  # absent in older checkpoints
        writer = state_dict.pop("optimizer", None)  # absent in older or torch.optim dicts
        lineage = [c.__name__ for c in type(self).__mro__]
        if writer is not None and writer not in lineage:
            raise ValueError(
                f"loaded state dict was saved by {writer}, not by {type(self).__name__}: "
                "optimizer state cannot be carried over between optimizers"
            )
        groups = state_dict.get("param_groups", [])
        # Step counters saved as Python numbers (older torch, other tools) become tensors
        # now, as torch.optim converts them, instead of failing at the next step.
        saved_state = {
            pid: _with_step_tensor(st, f"state[{pid!r}]['step']")
            for pid, st in state_dict.get("state", {}).items()
        }
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(groups)} parameter groups, this optimizer has "
                f"{len(self.param_groups)}"
            )
        # Map saved ids to our params to check that every state tensor fits its parameter.
        id_to_param = {}
        for saved, ours in zip(groups, self.param_groups):
            if len(saved["params"]) != len(ours["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match the size "
                    f"of this optimizer's group ({len(saved['params'])} vs {len(ours['params'])})"
                )
            id_to_param.update(zip(saved["params"], ours["params"]))
            check_param_names(saved)
        if shapes is not None:
            for gi, (saved_shapes, ours) in enumerate(zip(shapes, self.param_groups)):
                for pi, (shape, p) in enumerate(zip(saved_shapes, ours["params"])):
                    if tuple(shape) != tuple(p.shape):
                        names = groups[gi].get("param_names") or ours.get("param_names")
                        at = f"param_groups[{gi}]['params'][{pi}]"
                        at += f" ({names[pi]!r})" if names else ""
                        raise ValueError(
                            f"loaded state dict was saved for a parameter of shape "
                            f"{tuple(shape)} at {at}, but this optimizer's parameter there "
                            f"has shape {tuple(p.shape)}: the state dict does not match these "
                            "parameters"
                        )
        # Hyperparameters missing from an older checkpoint take this optimizer's defaults
        # (torch.optim would drop them and fail at the next step); all are validated.
        # Names: the checkpoint's replace ours; a checkpoint without names keeps ours (as
        # torch.optim does, done here so that every torch version behaves the same).
        new_groups = []
        for saved, ours in zip(groups, self.param_groups):
            merged = {**self.defaults, **{k: v for k, v in saved.items() if k != "params"}}
            if "param_names" not in merged and "param_names" in ours:
                merged["param_names"] = list(ours["param_names"])
            self._check_group(merged)
            new_groups.append({**merged, "params": saved["params"]})
        # The loaded hyperparameters replace ours (torch.optim semantics), so the state is
        # checked against them: ``_check_loaded_state`` sees them in ``self.param_groups``.
        ours_groups = self.param_groups
        self.param_groups = [
            {**new, "params": ours["params"]} for new, ours in zip(new_groups, ours_groups)
        ]
        try:
            for pid, st in saved_state.items():
                p = id_to_param.get(pid)
                if p is None:
                    raise ValueError(f"loaded state dict has state for unknown parameter id {pid}")
                self._check_loaded_state(p, st)
        finally:
            self.param_groups = ours_groups
        state_dict["param_groups"] = new_groups
        state_dict["state"] = saved_state
        with self._hooks_paused(
            "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"
        ) as hooks:
            super().load_state_dict(state_dict)
        # torch.optim casts floating state to the parameter's dtype; restore saved dtypes.
        for pid, st in saved_state.items():
            p = id_to_param[pid]
            self.state[p] = _tree_to_device(st, p)
        self.skipped_steps = int(skipped)
        self._after_load_state_dict()
        for post_hook in hooks["_optimizer_load_state_dict_post_hooks"].values():
            post_hook(self)

    def _check_loaded_state(self, p: torch.Tensor, st: dict[str, Any]) -> None:
        """Raise ``ValueError`` if ``st`` cannot belong to ``p``; subclasses may extend.

        While it runs, ``self.param_groups`` holds the *loaded* hyperparameters (with this
        optimizer's parameters): those are the ones the state will be used with.
        """
        for key, value in st.items():
            if (
                isinstance(value, torch.Tensor)
                and value.dim() > 0
                and key in self._param_shaped_keys
            ):
                if value.shape != p.shape:
                    raise ValueError(
                        f"state {key!r} has shape {tuple(value.shape)} but its parameter has "
                        f"shape {tuple(p.shape)}: the state dict does not match these parameters"
                    )

    # ------------------------------------------------------------- pickling
    def __getstate__(self) -> dict[str, Any]:
        # torch.optim keeps only defaults/state/param_groups, so ``copy.deepcopy`` and
        # pickling would lose ``nonfinite``, ``skipped_steps`` and subclass attributes
        # (caches set in ``__init__``). Keep every attribute but the hook registries.
        # Attributes named in ``_transient_attrs`` (thread pools, scratch buffers) are left
        # out; the subclass recreates them lazily or in ``_after_load_state_dict``.
        return {
            k: v
            for k, v in self.__dict__.items()
            if not (k.startswith("_optimizer_") and k.endswith("_hooks"))
            and k not in self._transient_attrs
            and k != "_placement_view"
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("nonfinite", "skip")
        self.__dict__.setdefault("skipped_steps", 0)
        if "defaults" in state:  # unpickling; torch's load_state_dict passes state/groups only
            self._after_load_state_dict()

    #: instance attributes that are not pickled / deep-copied (e.g. a background worker)
    _transient_attrs: tuple[str, ...] = ()

    #: state keys whose tensors have the parameter's shape (checked on load; DTensors
    #: laid out like a sharded parameter in its checkpoints)
    _param_shaped_keys: tuple[str, ...] = ()

    #: state keys whose tensors are ``(k, numel)``, laid out along the flattened parameter
    #: (DTensors sharded like the parameter in checkpoints)
    _flat_state_keys: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in _ON_SHARDS:
            fn = cls.__dict__.get(name)
            if fn is not None and not getattr(fn, "_on_shards", False):
                setattr(cls, name, _on_shards(fn, name))

    def state_bytes(self) -> int:
        """Bytes of the tensors held in the optimizer state (nested lists and dicts included;
        with sharded or distributed state, this rank's share)."""
        return sum(tree_bytes(st) for st in self.state.values())

    def _after_load_state_dict(self) -> None:
        """Hook for subclasses to rebuild derived (non-checkpointed) caches.

        Called after ``load_state_dict`` and after unpickling / ``copy.deepcopy``.
        """


def _zero_dim(value: Any) -> Any:
    """``value`` with 1-element tensors (also inside a tuple/list) as 0-d views; the same
    object when there are none."""
    if isinstance(value, torch.Tensor):
        return value.view(()) if value.dim() > 0 and value.numel() == 1 else value
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        views = [_zero_dim(v) for v in value]
        if any(v is not u for v, u in zip(views, value)):
            return type(value)(views)
    return value


def _with_step_tensor(st: Any, where: str) -> Any:
    """A loaded per-parameter state with its ``step`` checked and, if a number, a tensor."""
    if isinstance(st, dict) and "step" in st:
        step = check_loaded_step(st["step"], where)
        if step is not st["step"]:
            return {**st, "step": step}
    return st


@contextmanager
def _entered(
    opt: SecondOrderOptimizer, view: LocalView, grads: bool = True
) -> Iterator[LocalView]:
    view.enter(opt, grads)
    try:
        yield view
    finally:
        view.exit(opt)


#: public methods that run on local shards (wrapped in every subclass that defines them)
_ON_SHARDS = ("state_dict", "load_state_dict", "diagnostics")


def _on_shards(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """Run ``fn`` on local shards; convert state dicts between local and global form."""

    @functools.wraps(fn)
    def wrapper(self: SecondOrderOptimizer, *args: Any, **kwargs: Any) -> Any:
        view = self._local_view()
        if view is None or view.active:
            return fn(self, *args, **kwargs)
        keys = (self._param_shaped_keys, self._flat_state_keys)
        if name == "load_state_dict":
            sd = kwargs.pop("state_dict") if "state_dict" in kwargs else args[0]
            args = (state_to_local(sd, self.param_groups, view, *keys),)
        with _entered(self, view, grads=False):
            out = fn(self, *args, **kwargs)
        if name == "state_dict":
            out = state_to_global(out, self.param_groups, view, *keys)
        return out

    wrapper._on_shards = True  # type: ignore[attr-defined]
    return wrapper


for _name in _ON_SHARDS:
    if _name in SecondOrderOptimizer.__dict__:
        _fn = SecondOrderOptimizer.__dict__[_name]
        setattr(SecondOrderOptimizer, _name, _on_shards(_fn, _name))
del _name, _fn


def tree_bytes(x: Any) -> int:
    """Bytes of every tensor in a nested structure of dicts, lists and tuples."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(tree_bytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(tree_bytes(v) for v in x)
    return 0


def _tree_to_device(x: Any, p: torch.Tensor) -> Any:
    """Copy a saved state tree onto ``p``'s device, keeping every tensor's dtype."""
    if isinstance(x, torch.Tensor):
        # 0-d CPU tensors (step counters) stay on the CPU, as torch.optim keeps them.
        if x.dim() == 0 and x.device.type == "cpu":
            return x.clone()
        return x.to(device=p.device, copy=True)
    if isinstance(x, dict):
        return {k: _tree_to_device(v, p) for k, v in x.items()}
    if isinstance(x, list):
        return [_tree_to_device(v, p) for v in x]
    if isinstance(x, tuple):
        return tuple(_tree_to_device(v, p) for v in x)
    return x
