"""Bridging blocking iterators (gRPC streams, the batcher's queues) into asyncio HTTP handlers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


async def iterate_in_thread(it: Iterator[T]) -> AsyncIterator[T]:
    """Each ``next`` runs in a worker thread, so a slow producer never blocks the event loop."""
    while (item := await asyncio.to_thread(next, it, _DONE)) is not _DONE:
        yield item  # type: ignore[misc]
