"""What every HTTP port shares: bridging blocking iterators (gRPC streams, the batcher's queues) into asyncio
handlers, reading a request body no further than a limit, API keys and the per-caller rate limit, and TLS."""

from __future__ import annotations

import asyncio
import math
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

from modalink.auth import KeyRing, RateLimiter, key_from_headers
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


def guard(app, settings, protected: Callable[[str], bool], error: Callable[[int, str, str], object]) -> None:
    """API keys and the rate limit on an HTTP app's ``protected`` paths, as the gRPC ports have them: with keys
    configured (``modalink.auth``) a request needs ``Authorization: Bearer <key>`` or ``x-api-key`` (401 without);
    the rate limit is per key, or per caller address when no keys are configured, and answers 429 with
    ``Retry-After``. ``error(status, message, kind)`` makes the API's own error response."""
    keys = KeyRing.from_settings(settings)
    limiter = RateLimiter(settings.rate_limit_rps, settings.rate_limit_burst)

    @app.middleware("http")
    async def authenticate(request, call_next):
        if protected(request.url.path):
            caller = keys.identify(key_from_headers(request.headers)) if keys else (request.client or ("?",))[0]
            if caller is None:
                return error(401, "missing or unknown API key", "authentication_error")
            if limiter and (wait := limiter.acquire(caller)):
                who = "API key" if keys else "caller address"
                response = error(429, f"rate limit of {limiter.rate:g} requests/s (burst {limiter.burst}) for this "
                                      f"{who} exceeded; retry in {wait:.2f} s", "rate_limit_error")  # fmt: skip
                response.headers["Retry-After"] = str(max(1, math.ceil(wait)))
                return response
        return await call_next(request)


def server_tls(settings) -> dict:
    """uvicorn's TLS options for an internal service's HTTP port: the same certificate as its gRPC port, and a
    client certificate signed by ``MODALINK_TLS_CA`` required (mTLS), when ``MODALINK_TLS_CERT``/``_KEY`` are set;
    else none (plain HTTP)."""
    if not (settings.tls_cert and settings.tls_key):
        return {}
    tls = {"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key)}
    if settings.tls_ca:
        tls |= {"ssl_ca_certs": str(settings.tls_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return tls
