"""Prometheus metrics of the gateway (and of anything else that calls the services through ``modalink.remote``).

They live in the default registry, so one ``/metrics`` shows the gRPC and HTTP APIs and the encoder calls.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("modalink_requests", "Requests answered, by API, method and status code.", ["api", "method", "code"])
LATENCY = Histogram("modalink_request_seconds", "Time to the last response message.", ["api", "method"])
ENCODER_CALLS = Histogram("modalink_encoder_call_seconds", "Calls to encoder services.", ["modality"])
# the media embedding cache (modalink.embed_cache), by tier: local (this process's LRU) or redis (shared)
EMBED_CACHE_HITS = Counter("modalink_embed_cache_hits", "Media embeddings served from the cache.", ["tier"])
EMBED_CACHE_MISSES = Counter("modalink_embed_cache_misses", "Media embedding lookups not in a tier.", ["tier"])
EMBED_CACHE_BYTES = Gauge("modalink_embed_cache_bytes", "Bytes of embeddings held by this process's tier.", ["tier"])
EMBED_CACHE_EVICTIONS = Counter("modalink_embed_cache_evictions", "Entries evicted to stay in bounds.", ["tier"])
EMBED_CACHE_ERRORS = Counter("modalink_embed_cache_errors", "Tier failures answered as misses.", ["tier"])
EMBED_CACHE_SAVED = Counter("modalink_embed_cache_saved_seconds", "Encoder time the cache's hits did not spend.")


@contextmanager
def track(api: str, method: str, context=None) -> Iterator[None]:
    """Count and time one request; the status comes from the gRPC context (aborts included) or the exception."""
    t0, code = time.perf_counter(), "OK"
    try:
        yield
    except BaseException:
        code = "ERROR"
        raise
    finally:
        status = context.code() if context is not None else None
        if status is not None:
            code = status.name
        REQUESTS.labels(api, method, code).inc()
        LATENCY.labels(api, method).observe(time.perf_counter() - t0)
