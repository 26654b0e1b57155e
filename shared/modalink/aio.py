"""Bridging blocking iterators (gRPC streams, the batcher's queues) into asyncio HTTP handlers, and reading a
request body no further than a limit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import TypeVar

from modalink.errors import InputError

T = TypeVar("T")
_DONE = object()


async def iterate_in_thread(it: Iterator[T]) -> AsyncIterator[T]:
    """Each ``next`` runs in a worker thread, so a slow producer never blocks the event loop."""
    while (item := await asyncio.to_thread(next, it, _DONE)) is not _DONE:
        yield item  # type: ignore[misc]


async def read_json(request, limit: int):
    """A request's JSON body, read no further than ``limit`` bytes: a ``Content-Length`` over it is refused before
    anything is read, a streamed (chunked) body as soon as it passes the limit; the memory a refused body costs
    is bounded by the limit, not by what the caller sends."""
    import json

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise InputError(f"request body of {declared} bytes exceeds the limit of {limit} (MODALINK_MAX_MESSAGE_MB)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InputError(f"request body exceeds the limit of {limit} bytes (MODALINK_MAX_MESSAGE_MB)")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"request body is not UTF-8 JSON: {e}") from None
