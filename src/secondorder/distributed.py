"""Old import path of :mod:`secondorder.placement.ddp` (block ownership across DDP ranks)."""

from .placement.ddp import (
    COMMUNICATION_DTYPES,
    BlockLayout,
    Communicator,
    assign_blocks,
    block_cost,
    check_process_group,
    is_block_state,
    localize_state,
)

__all__ = [
    "COMMUNICATION_DTYPES",
    "BlockLayout",
    "Communicator",
    "assign_blocks",
    "block_cost",
    "check_process_group",
    "is_block_state",
    "localize_state",
]
