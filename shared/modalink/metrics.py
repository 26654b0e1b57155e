"""Prometheus metrics of the gateway (and of anything else that calls the services through ``modalink.remote``).

They live in the default registry, so one ``/metrics`` shows the gRPC and HTTP APIs and the encoder calls.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Histogram

REQUESTS = Counter("modalink_requests", "Requests answered, by API, method and status code.", ["api", "method", "code"])
LATENCY = Histogram("modalink_request_seconds", "Time to the last response message.", ["api", "method"])
ENCODER_CALLS = Histogram("modalink_encoder_call_seconds", "Calls to encoder services.", ["modality"])


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
