"""Hutchinson estimates of the Hessian diagonal, and their spatial averaging.

For a Rademacher probe ``z`` (independent entries ``±1``) and the Hessian-vector product
``Hz``, the product ``d = z ⊙ Hz`` has

* ``E[d_i] = H_ii`` (the signed estimate is unbiased for the diagonal), and
* ``E[d_i²] = Σ_j H_ij²`` (its second moment is the squared *row norm* of ``H``, not
  ``H_ii²``): an RMS average of ``|d|`` converges to the row norms of ``H``.

``Hz`` is taken by differentiating ``gᵀz`` through the graph that
``loss.backward(create_graph=True)`` kept: one extra backward pass per probe.

Probes are reproducible: :func:`probe_seed` mixes a user seed, a step and a parameter index
into a generator seed, so that every process of a data-parallel job draws the same ``z``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "AVERAGE_MODES",
    "hessian_vector_products",
    "hutchinson_diag",
    "probe_seed",
    "rademacher",
    "spatial_average",
]

#: the named spatial averaging modes (an int ``b >= 1`` means blocks of ``b`` elements)
AVERAGE_MODES = ("none", "conv", "row")

_MASK64 = (1 << 64) - 1


def probe_seed(seed: int, step: int, index: int, probe: int = 0) -> int:
    """A 63-bit generator seed from (user seed, step, parameter index, probe number).

    A splitmix64-style mix, so that nearby inputs give unrelated seeds; pure Python ints,
    identical on every machine and process.
    """
    x = 0
    for v in (seed, step, index, probe):
        x = (x ^ (v & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
        x ^= x >> 31
    return x >> 1


def rademacher(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A tensor of ``like``'s shape, dtype and device with independent ``±1`` entries."""
    z = torch.randint(0, 2, like.shape, generator=generator, device=like.device, dtype=like.dtype)
    return z.mul_(2).sub_(1)


def hessian_vector_products(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    vectors: Sequence[torch.Tensor],
    *,
    retain_graph: bool = False,
) -> list[torch.Tensor]:
    """``H v`` for the Hessian of the loss whose gradients ``grads`` (of ``params``) were
    computed with ``create_graph=True``; one backward pass.

    ``vectors[i]`` has ``params[i]``'s shape. Gradients that do not depend on any
    parameter (no ``grad_fn``: the loss is linear in that parameter) contribute nothing;
    parameters the graph does not reach get zero rows. Raises ``RuntimeError`` when no
    gradient carries a graph (``backward()`` was called without ``create_graph=True``).
    """
    outs, vs = [], []
    for g, v in zip(grads, vectors):
        if g.requires_grad:
            outs.append(g)
            vs.append(v)
    if not outs:
        raise RuntimeError(
            "Hessian-vector products need the graph of the gradients, but no gradient has "
            "one: call loss.backward(create_graph=True) (or check optimizer.create_graph) "
            "before step()"
        )
    with torch.enable_grad():
        hv = torch.autograd.grad(
            outs, list(params), grad_outputs=vs, retain_graph=retain_graph, allow_unused=True
        )
    return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, hv)]


def hutchinson_diag(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor] | None = None,
    *,
    n_probes: int = 1,
    seed: int = 0,
    step: int = 0,
    probes: Sequence[Sequence[torch.Tensor]] | None = None,
    retain_graph: bool = False,
    absolute: bool = False,
) -> list[torch.Tensor]:
    """The signed Hutchinson estimate ``mean_k z_k ⊙ H z_k`` for each parameter.

    Args:
        params: the parameters (leaves of the graph).
        grads: their gradients, computed with ``create_graph=True`` (default: ``p.grad``).
        n_probes: number of Rademacher probes averaged (one backward pass each).
        seed, step: the probe of parameter ``i`` in probe ``k`` is drawn from a generator
            seeded with ``probe_seed(seed, step, i, k)``: the same on every process.
        probes: explicit probes instead (``probes[k][i]`` for probe ``k``, parameter
            ``i``); ``n_probes`` is then ``len(probes)``.
        retain_graph: keep the graph after the last probe (it is always kept between
            probes).
        absolute: return ``|mean_k z_k ⊙ H z_k|`` instead. With one probe that is ``|Hz|``
            (``|z_i| = 1``), taken without forming the product (one pass fewer, the same
            values bit for bit).

    Returns a list of tensors shaped like ``params`` (each ``E = diag H``; its elementwise
    square has expectation ``diag H² + (row_norm² - diag H²) / n_probes``).
    """
    params = list(params)
    grads = [p.grad for p in params] if grads is None else list(grads)
    if probes is None:
        if n_probes < 1:
            raise ValueError(f"n_probes must be an int >= 1, got {n_probes!r}")
        gens: dict[torch.device, torch.Generator] = {}
        probes = []
        for k in range(n_probes):
            zs = []
            for i, p in enumerate(params):
                gen = gens.get(p.device)
                if gen is None:
                    gen = gens[p.device] = torch.Generator(device=p.device)
                gen.manual_seed(probe_seed(seed, step, i, k))
                zs.append(rademacher(p, gen))
            probes.append(zs)
    n = len(probes)
    out: list[torch.Tensor] | None = None
    for k, zs in enumerate(probes):
        hz = hessian_vector_products(
            params, grads, zs, retain_graph=retain_graph or k < n - 1
        )
        if absolute and n == 1:
            # |z ⊙ Hz| = |Hz| exactly (out of place: autograd may hand back a tensor it
            # was given, such as a probe)
            return [h.abs() for h in hz]
        d = [z * h for z, h in zip(zs, hz)]
        out = d if out is None else [o.add_(x) for o, x in zip(out, d)]
    assert out is not None
    if n > 1:
        for o in out:
            o.div_(n)
    return [o.abs_() for o in out] if absolute else out


def _check_mode(mode: str | int) -> None:
    if isinstance(mode, bool) or not (
        mode in AVERAGE_MODES or (isinstance(mode, int) and mode >= 1)
    ):
        raise ValueError(
            f"spatial_average must be one of {', '.join(map(repr, AVERAGE_MODES))} or an "
            f"int block length >= 1; got {mode!r}"
        )


def spatial_average(
    d: torch.Tensor, mode: str | int, abs_first: bool = True, *, nonnegative: bool = False
) -> torch.Tensor:
    """Average a Hessian-diagonal estimate over groups of entries; returns ``|.|``, shaped
    like ``d``.

    Modes:
        ``"none"``: no averaging.
        ``"conv"``: 4-d tensors (conv kernels ``out × in × kh × kw``) are averaged over
            each ``kh × kw`` window; other tensors are not averaged.
        ``"row"``: tensors with 2 or more dims are averaged over all dims but the first
            (one value per output unit, i.e. per row of the ``(shape[0], -1)`` matrix).
        ``b`` (int): contiguous blocks of ``b`` elements of the flattened tensor (row-major);
            the last block, if shorter, is averaged over its own length.

    ``abs_first=True`` averages ``|d|`` (the usual choice); ``False`` averages the signed
    ``d`` and takes the absolute value afterwards (signs can cancel within a block).
    ``nonnegative=True`` says ``d`` is already ``>= 0`` (e.g. ``|Hz|``): with
    ``abs_first=True`` no absolute value is taken and, in mode ``"none"``, ``d`` itself is
    returned (no copy).
    """
    _check_mode(mode)
    x = d if (abs_first and nonnegative) else d.abs() if abs_first else d
    if mode == "none" or d.numel() == 0:
        return x if abs_first else x.abs()
    if mode == "conv":
        if d.dim() == 4:
            x = x.mean(dim=(2, 3), keepdim=True).expand_as(d)
    elif mode == "row":
        if d.dim() >= 2:
            x = x.reshape(d.shape[0], -1).mean(dim=1).view(-1, *([1] * (d.dim() - 1)))
            x = x.expand_as(d)
    else:
        b = int(mode)
        flat = x.reshape(-1)
        n = flat.numel()
        full = (n // b) * b
        parts = []
        if full:
            means = flat[:full].view(-1, b).mean(dim=1, keepdim=True)
            parts.append(means.expand(-1, b).reshape(-1))
        if full < n:
            parts.append(flat[full:].mean().expand(n - full))
        x = torch.cat(parts).view(d.shape)
    return x.contiguous() if abs_first else x.abs().contiguous()
