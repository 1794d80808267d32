"""Splitting Shampoo's per-block work across ``torch.distributed`` ranks.

The math: docs/algorithms.md#distributed-roots. Old import path: :mod:`secondorder.distributed`.

With data parallelism every rank sees the same (all-reduced) gradient, so every rank could
compute every block's statistics, roots and preconditioned direction -- the same work
``world_size`` times. Instead each block is *owned* by one rank:

* :func:`assign_blocks` gives every block to a rank, balancing the cost of the roots
  (``sum_i n_i^3`` for a block of shape ``(n_1, ..., n_k)``) with the greedy
  longest-processing-time rule. It depends only on the parameters' shapes and settings, so
  every rank computes the same assignment without talking to the others.
* :class:`BlockLayout` is that assignment for one optimizer: for every preconditioned
  parameter and block size class, the global indices of the blocks each rank owns.
* :class:`Communicator` holds the process group and the communication dtype (float32 by
  default, bfloat16 to halve the traffic) and does the two exchanges Shampoo needs:
  :meth:`Communicator.exchange` (all-gather of the owned blocks' directions, once per step,
  one collective for all parameters) and :meth:`Communicator.gather_state` (all-gather of
  the owned blocks' optimizer state, for a checkpoint in the single-process format).

Everything is device agnostic: tensors are communicated on the device they live on (gloo
on the CPU, NCCL on GPUs). Without an initialised process group (or with one rank) nothing
is communicated and every block is local.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "BlockLayout",
    "Communicator",
    "assign_blocks",
    "block_cost",
    "is_block_state",
]

COMMUNICATION_DTYPES = (torch.float32, torch.bfloat16)

# newer torch deprecates all_gather_into_tensor for all_gather_single; use what exists
_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(
    dist, "all_gather_into_tensor", None
)


def check_process_group(process_group: Any) -> Any:
    """``None`` or a ``torch.distributed.ProcessGroup``; anything else raises ``TypeError``."""
    if process_group is None:
        return None
    group_type = getattr(dist, "ProcessGroup", None) if dist.is_available() else None
    if group_type is None or not isinstance(process_group, group_type):
        raise TypeError(
            "process_group must be a torch.distributed.ProcessGroup or None, got "
            f"{type(process_group).__name__} ({process_group!r})"
        )
    return process_group


def block_cost(block_shape: Sequence[int]) -> int:
    """Cost of a block's roots: ``sum_i n_i^3`` (one ``n_i x n_i`` factor per axis)."""
    return sum(int(n) ** 3 for n in block_shape)


def assign_blocks(costs: Sequence[int], world_size: int) -> list[int]:
    """Owner rank of every block: greedy longest-processing-time load balancing.

    Blocks are taken by decreasing cost (ties: lower index first) and each goes to the rank
    with the smallest total cost so far (ties: lower rank). Deterministic, so every rank
    computes the same answer. The most loaded rank carries at most ``4/3`` of the optimum.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    owners = [0] * len(costs)
    heap = [(0, r) for r in range(world_size)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(heap)
        owners[i] = r
        heapq.heappush(heap, (load + costs[i], r))
    return owners


class BlockLayout:
    """Which rank owns which block of every preconditioned parameter.

    Args:
        entries: one ``(key, block_shapes, counts)`` per preconditioned parameter (``key``
            is any hashable, e.g. the parameter's index; ``block_shapes``/``counts`` as in
            :class:`~secondorder.blocking.BlockPlan`), in the same order on every rank.
        world_size, rank: of the process group.

    Attributes:
        loads: total cost assigned to each rank.
    """

    def __init__(
        self,
        entries: Sequence[tuple[Any, Sequence[Sequence[int]], Sequence[int]]],
        world_size: int,
        rank: int,
    ) -> None:
        self.world_size, self.rank = world_size, rank
        flat, costs = [], []
        for key, shapes, counts in entries:
            for c, (bs, n) in enumerate(zip(shapes, counts)):
                for j in range(n):
                    flat.append((key, c, j))
                    costs.append(block_cost(bs))
        owners = assign_blocks(costs, world_size)
        self.loads = [0] * world_size
        # _owned[key][c][r]: sorted global block indices of class c owned by rank r
        self._owned: dict[Any, list[list[list[int]]]] = {}
        for key, _, counts in entries:
            self._owned[key] = [[[] for _ in range(world_size)] for _ in counts]
        for (key, c, j), r, cost in zip(flat, owners, costs):
            self._owned[key][c][r].append(j)
            self.loads[r] += cost
        self._index_cache: dict[tuple[Any, int, int, torch.device], torch.Tensor] = {}

    def owned(self, key: Any, cls: int, rank: int | None = None) -> list[int]:
        """Global indices (within size class ``cls``) of the blocks ``rank`` owns."""
        return self._owned[key][cls][self.rank if rank is None else rank]

    def index(self, key: Any, cls: int, device: torch.device, rank: int | None = None):
        """:meth:`owned` as a long tensor on ``device`` (cached)."""
        r = self.rank if rank is None else rank
        k = (key, cls, r, device)
        if k not in self._index_cache:
            self._index_cache[k] = torch.tensor(self.owned(key, cls, r), device=device).long()
        return self._index_cache[k]

    def shared(self, key: Any) -> bool:
        """Whether ``key``'s blocks are spread over the ranks (their directions are
        exchanged); always, here (see :class:`~secondorder.placement.fsdp.ExactLayout`)."""
        return True

    def owns_all(self, key: Any, cls: int) -> bool:
        owned = self._owned[key][cls]
        return len(owned[self.rank]) == sum(len(o) for o in owned)

    def local(self, key: Any, cls: int, x: torch.Tensor) -> torch.Tensor:
        """The rows of a full block stack ``x`` (leading dim = blocks) that this rank owns."""
        if self.owns_all(key, cls):
            return x
        return x.index_select(0, self.index(key, cls, x.device))


def is_block_state(value: Any) -> bool:
    """Whether a state entry is per block: a list (size classes) of lists of stacks."""
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(
            isinstance(c, list) and all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in c)
            for c in value
        )
    )


def localize_state(state: dict[str, Any], layout: BlockLayout, key: Any) -> dict[str, Any]:
    """A copy of a full (single-process format) parameter state keeping only owned blocks."""
    out = {}
    for name, value in state.items():
        if is_block_state(value):
            value = [[layout.local(key, c, t).clone() for t in cls] for c, cls in enumerate(value)]
        out[name] = value
    return out


class Communicator:
    """A process group and a communication dtype; a no-op with one rank.

    Args:
        process_group: the group to use (``None``: the default group, if one is
            initialised; otherwise a single process).
        dtype: dtype of the communicated directions, ``torch.float32`` or
            ``torch.bfloat16``. State (for checkpoints) is always sent exactly.
    """

    def __init__(self, process_group: Any = None, dtype: torch.dtype = torch.float32) -> None:
        if dtype not in COMMUNICATION_DTYPES:
            raise ValueError(
                f"communication_dtype must be one of {COMMUNICATION_DTYPES}, got {dtype!r}"
            )
        self.dtype = dtype
        self.group = process_group
        if dist.is_available() and dist.is_initialized():
            self.world_size = dist.get_world_size(process_group)
            self.rank = dist.get_rank(process_group)
        else:
            if process_group is not None:
                raise ValueError(
                    "a process_group was given but torch.distributed is not initialised"
                )
            self.world_size, self.rank = 1, 0

    def exchange(
        self, layout: BlockLayout, items: Sequence[tuple[Any, int, torch.Tensor, int]]
    ) -> list[torch.Tensor]:
        """All-gather owned block stacks into full stacks.

        ``items`` lists ``(key, cls, local, count)``: ``local`` holds this rank's owned
        blocks of that class (``(len(owned), *block_shape)``), ``count`` the class's block
        count. Every rank must pass the same keys in the same order. Returns the full
        ``(count, *block_shape)`` stacks, assembled from what every rank sent (also this
        rank's own blocks, so that all ranks hold bit-identical results, whatever the
        communication dtype). One collective for all items.
        """
        if not items:
            return []
        if self.world_size == 1:
            return [local for _, _, local, _ in items]
        ref = items[0][2]
        device, dtype = ref.device, ref.dtype
        block_numels = [math.prod(local.shape[1:]) for _, _, local, _ in items]
        sizes = [
            sum(
                len(layout.owned(key, c, r)) * bn for (key, c, _, _), bn in zip(items, block_numels)
            )
            for r in range(self.world_size)
        ]
        width = max(sizes)
        send = torch.zeros(width, dtype=self.dtype, device=device)
        if sizes[self.rank]:
            flat = torch.cat([local.reshape(-1).to(device) for _, _, local, _ in items])
            send[: flat.numel()] = flat
        recv = torch.empty(self.world_size * width, dtype=self.dtype, device=device)
        _all_gather_single(recv, send, group=self.group)
        recv = recv.view(self.world_size, width)
        outs = [
            torch.empty(count, *local.shape[1:], dtype=dtype, device=local.device)
            for _, _, local, count in items
        ]
        for r in range(self.world_size):
            offset = 0
            for (key, c, _, _), out, bn in zip(items, outs, block_numels):
                idx = layout.owned(key, c, r)
                if not idx:
                    continue
                chunk = recv[r, offset : offset + len(idx) * bn].view(len(idx), *out.shape[1:])
                offset += len(idx) * bn
                out.index_copy_(0, layout.index(key, c, out.device, r), chunk.to(out))
        return outs

    def gather_state(
        self, layout: BlockLayout, states: dict[Any, dict[str, Any]]
    ) -> dict[Any, dict[str, Any]]:
        """Full (single-process format) copies of parameter states held block-wise.

        ``states`` maps ``key`` to a parameter state whose per-block entries
        (:func:`is_block_state`) hold this rank's owned blocks only; every rank must pass the
        same keys. Returns new dicts (the live state is not touched) where those entries are
        the full stacks, identical on every rank. Other entries are taken from this rank.
        """
        if self.world_size == 1:
            return states
        mine = {
            key: {
                name: [[t.detach().cpu() for t in cls] for cls in v]
                for name, v in st.items()
                if is_block_state(v)
            }
            for key, st in states.items()
        }
        every: list[Any] = [None] * self.world_size
        dist.all_gather_object(every, mine, group=self.group)
        out = {}
        for key, st in states.items():
            full = dict(st)
            for name, v in st.items():
                if not is_block_state(v):
                    continue
                stacks = []
                for c, cls in enumerate(v):
                    row = []
                    for i, t in enumerate(cls):
                        count = sum(len(layout.owned(key, c, r)) for r in range(self.world_size))
                        f = torch.empty(count, *t.shape[1:], dtype=t.dtype, device=t.device)
                        for r in range(self.world_size):
                            part = every[r][key][name][c][i]
                            if part.shape[0]:
                                f.index_copy_(0, layout.index(key, c, t.device, r), part.to(t))
                        row.append(f)
                    stacks.append(row)
                full[name] = stacks
            out[key] = full
        return out

    def share(self, tensors: Sequence[torch.Tensor], owners: Sequence[int]) -> None:
        """Copy every tensor's value from its owner rank into the other ranks' copies.

        ``tensors`` (the same list, in the same order, on every rank) are updated in place;
        ``owners[j]`` is the rank whose ``tensors[j]`` is the truth. Values are sent in their
        own dtype (exact), one all-gather per dtype and device.
        """
        if self.world_size == 1 or not tensors:
            return
        groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for j, t in enumerate(tensors):
            groups.setdefault((t.dtype, t.device), []).append(j)
        for (dtype, device), idx in groups.items():
            sizes = [
                sum(tensors[j].numel() for j in idx if owners[j] == r)
                for r in range(self.world_size)
            ]
            width = max(sizes)
            if width == 0:
                continue
            send = torch.zeros(width, dtype=dtype, device=device)
            mine = [tensors[j].reshape(-1) for j in idx if owners[j] == self.rank]
            if mine:
                send[: sizes[self.rank]] = torch.cat(mine)
            recv = torch.empty(self.world_size * width, dtype=dtype, device=device)
            _all_gather_single(recv, send, group=self.group)
            recv = recv.view(self.world_size, width)
            offsets = [0] * self.world_size
            for j in idx:
                r, n = owners[j], tensors[j].numel()
                if r != self.rank:
                    tensors[j].copy_(recv[r, offsets[r] : offsets[r] + n].view(tensors[j].shape))
                offsets[r] += n

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        every: list[Any] = [None] * self.world_size
        dist.all_gather_object(every, obj, group=self.group)
        return every
