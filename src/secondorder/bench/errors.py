"""Errors that ``secondorder bench`` reports as one clear line instead of a traceback."""

from __future__ import annotations


class BenchUsageError(ValueError):
    """A mistake in what the user asked for (names, values)."""
