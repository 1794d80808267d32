"""Old import path of :mod:`secondorder.placement.async_roots` (the background root worker)."""

from ..placement.async_roots import AsyncRootWorker, Snapshot, snapshot

__all__ = ["AsyncRootWorker", "Snapshot", "snapshot"]
