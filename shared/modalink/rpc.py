"""gRPC plumbing shared by the services and the client: server setup, status mapping, channel options."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from modalink.errors import InputError, NotFound

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 << 20  # a few images or seconds of audio per request; larger is refused
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class APIKeyInterceptor(grpc.ServerInterceptor):
    """Requires ``x-api-key`` metadata from the given set on every call except health checks and reflection."""

    OPEN = ("/grpc.health.v1.Health/", "/grpc.reflection.")

    def __init__(self, keys: set[str]):
        self.keys = keys

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key (x-api-key metadata)")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, details):
        if details.method.startswith(self.OPEN):
            return continuation(details)
        if dict(details.invocation_metadata).get("x-api-key") in self.keys:
            return continuation(details)
        return self._deny


def make_server(
    port: int, add: Sequence[tuple[Callable, object]], services: Sequence[str], host: str = "[::]", workers: int = 32,
    api_keys: str = "",
) -> tuple[grpc.Server, int]:  # fmt: skip
    """A started gRPC server with health checking and reflection (so grpcurl works); returns (server, port).

    ``api_keys`` (comma-separated): when set, calls need one of them as ``x-api-key`` metadata.
    """
    keys = {k.strip() for k in api_keys.split(",") if k.strip()}
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=CHANNEL_OPTIONS,
                         interceptors=[APIKeyInterceptor(keys)] if keys else [])  # fmt: skip
    for add_fn, servicer in add:
        add_fn(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in [*services, ""]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*services, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    return server, bound


def abort_on_input_error(context: grpc.ServicerContext, e: Exception) -> None:
    """Bad input -> INVALID_ARGUMENT with its message; an upstream service's status is passed on; a backend
    that cannot be reached -> UNAVAILABLE; anything else -> INTERNAL (logged; the server keeps serving)."""
    if isinstance(e, NotFound):
        context.abort(grpc.StatusCode.NOT_FOUND, str(e))
    if isinstance(e, InputError):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    if isinstance(e, grpc.RpcError) and hasattr(e, "code"):
        context.abort(e.code(), f"upstream: {e.details()}")
    if isinstance(e, (ConnectionError, TimeoutError)):
        context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
    log.exception("request failed")
    context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
