"""Parameter roles: which tensors of a model are hidden matrices, embeddings, the output
layer, or vectors. SCALE and Muon treat each role differently; this module finds them.

Roles (the values of a param group's ``role`` key):

``"hidden"``     weight matrices inside the network (linear, attention, conv kernels)
``"embedding"``  input embedding tables (``nn.Embedding`` / ``nn.EmbeddingBag`` weights and
                 any extra tables named by ``embeddings=``), shape ``(vocab, width)``
``"output"``     the weight of the output layer (the classifier / language-model head)
``"vector"``     every tensor with fewer than two dims (biases, norm gains, scalars)
``"auto"``       for plain parameter lists: ``"hidden"`` for tensors with >= 2 dims,
                 ``"vector"`` otherwise (no output layer or embedding is assumed)

The output layer is ``output`` when given (a module, a parameter, or a module or parameter
name), else ``model.get_output_embeddings()`` (Hugging Face models), else the last
``nn.Linear`` in module order. A model without any of these raises ``ValueError`` naming
``output``. When the output weight *is* an embedding table (tied weights) it can only have
one role: it is kept as an embedding and a warning says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

#: roles a param group may declare (``"auto"`` resolves per tensor)
ROLES = ("auto", "hidden", "embedding", "output", "vector")
#: roles that need tensors with at least two dims
MATRIX_ROLES = ("hidden", "embedding", "output")


def resolve_role(role: str, p: torch.Tensor) -> str:
    """The concrete role of ``p`` in a group with ``role`` (``"auto"`` decided by ``p.dim()``)."""
    if role == "auto":
        return "hidden" if p.dim() >= 2 else "vector"
    return role


def check_group_roles(role: Any, params: Iterable[torch.Tensor], optimizer: str) -> None:
    """Raise ``ValueError`` if ``role`` is unknown or a matrix role holds a tensor with < 2 dims."""
    if role not in ROLES:
        raise ValueError(
            f"{optimizer}: role must be one of {', '.join(map(repr, ROLES))}; got {role!r} "
            "(every param group needs a role; build the groups with "
            "secondorder.roles.scale_param_groups / muon_param_groups or use 'auto')"
        )
    if role in MATRIX_ROLES:
        for i, p in enumerate(params):
            if p.dim() < 2:
                raise ValueError(
                    f"{optimizer}: role={role!r} needs tensors with at least 2 dims, but "
                    f"params[{i}] has shape {tuple(p.shape)}; put it in a group with "
                    "role='vector' or role='auto'"
                )


def _named_modules_and_params(model: nn.Module):
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    return modules, params


def _resolve_target(model: nn.Module, target: Any, arg: str) -> torch.Tensor:
    """The weight tensor that ``target`` (module, parameter or name) designates."""
    modules, params = _named_modules_and_params(model)
    if isinstance(target, str):
        if target in params:
            target = params[target]
        elif target in modules:
            target = modules[target]
        else:
            raise ValueError(
                f"{arg}={target!r} is neither a module nor a parameter name of the model; "
                f"parameter names: {', '.join(list(params)[:12])}"
                + (", ..." if len(params) > 12 else "")
            )
    if isinstance(target, nn.Module):
        w = getattr(target, "weight", None)
        if not isinstance(w, torch.Tensor):
            raise ValueError(f"{arg}: module {type(target).__name__} has no weight parameter")
        target = w
    if isinstance(target, torch.Tensor):
        if not any(target is p for p in params.values()):
            raise ValueError(f"{arg}: the given tensor is not a parameter of the model")
        if target.dim() < 2:
            raise ValueError(f"{arg}: needs a weight with >= 2 dims, got {tuple(target.shape)}")
        return target
    raise TypeError(
        f"{arg} must be a module, a parameter or a module/parameter name, got "
        f"{type(target).__name__}"
    )


def find_output_layer(model: nn.Module, output: Any = None) -> torch.Tensor:
    """The output layer's weight: ``output`` if given, else ``get_output_embeddings()``,
    else the last ``nn.Linear``; ``ValueError`` naming ``output`` if there is none."""
    if output is not None:
        return _resolve_target(model, output, "output")
    get = getattr(model, "get_output_embeddings", None)
    module = get() if callable(get) else None
    if module is None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        module = linears[-1] if linears else None
    if module is None:
        raise ValueError(
            "output: the model has no get_output_embeddings() and no nn.Linear, so its output "
            "layer cannot be found; pass output=<module, parameter, or its name>"
        )
    return _resolve_target(model, module, "output")


def param_roles(
    model: nn.Module, output: Any = None, embeddings: Iterable[Any] = ()
) -> dict[str, dict[str, torch.nn.Parameter]]:
    """Split the trainable parameters of ``model`` by role.

    Returns ``{"hidden": {...}, "embedding": {...}, "output": {...}, "vector": {...}}``, each
    mapping parameter names to parameters in module order (shared parameters once; frozen
    ones, ``requires_grad=False``, left out). ``output`` names the output layer (see the
    module docstring); ``embeddings`` adds tables (modules, parameters or names) to the
    embedding role, e.g. a learned position table.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(embeddings, (str, nn.Module, torch.Tensor)):
        embeddings = [embeddings]
    out_w = find_output_layer(model, output)
    emb_ids = {
        id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
    }
    emb_ids |= {id(_resolve_target(model, e, "embeddings")) for e in embeddings}
    roles: dict[str, dict[str, torch.nn.Parameter]] = {
        "hidden": {},
        "embedding": {},
        "output": {},
        "vector": {},
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2:
            role = "vector"
        elif id(p) in emb_ids:
            role = "embedding"
        elif p is out_w:
            role = "output"
        else:
            role = "hidden"
        roles[role][name] = p
    if id(out_w) in emb_ids:
        warnings.warn(
            "the output layer's weight is tied to an embedding table; it can take one role "
            "only and is treated as an embedding (normalised over the vocabulary axis, no "
            "output-layer momentum in SCALE); untie the weights or pass output= to choose",
            UserWarning,
            stacklevel=2,
        )
    return roles


def _groups(
    roles: dict[str, dict[str, torch.nn.Parameter]], lr_roles: tuple[str, ...], adamw_lr: Any
) -> list[dict[str, Any]]:
    groups = []
    for role, named in roles.items():
        if not named:
            continue
        group: dict[str, Any] = {"params": list(named.values()), "role": role}
        if adamw_lr is not None and role in lr_roles:
            group["lr"] = adamw_lr
        groups.append(group)
    return groups


def scale_param_groups(
    model: nn.Module, output: Any = None, embeddings: Iterable[Any] = (), adamw_lr: Any = None
) -> list[dict[str, Any]]:
    """Param groups for :class:`secondorder.SCALE`, one per non-empty role.

    ``adamw_lr`` (optional) becomes the ``lr`` of the ``"vector"`` group, which SCALE updates
    with AdamW; the other groups take the optimizer's ``lr``. LR schedulers scale every
    group's ``lr`` by the same factor, so the ratio of the two stays fixed over training.
    """
    return _groups(param_roles(model, output, embeddings), ("vector",), adamw_lr)


def muon_param_groups(
    model: nn.Module, output: Any = None, embeddings: Iterable[Any] = (), adamw_lr: Any = None
) -> list[dict[str, Any]]:
    """Param groups for :class:`secondorder.Muon`, one per non-empty role.

    Muon orthogonalises the ``"hidden"`` group and updates the others (embeddings, output
    layer, vectors) with AdamW; ``adamw_lr`` (optional) becomes their ``lr``.
    """
    return _groups(
        param_roles(model, output, embeddings), ("embedding", "output", "vector"), adamw_lr
    )
