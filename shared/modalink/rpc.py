"""gRPC plumbing shared by the services and the client: server setup, status mapping, channel options."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from modalink_client.options import CHANNEL_OPTIONS, MAX_MESSAGE_BYTES  # noqa: F401  (written once, in the client)

from modalink.auth import KeyRing, RateLimiter, key_from_headers
from modalink.config import get_settings
from modalink.errors import BackendError, BackendTimeout, BackendUnavailable, InputError, NotFound, status_of

log = logging.getLogger(__name__)

OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _deny(code: grpc.StatusCode, message: str, trailers: tuple = ()):
    def deny(request, context):
        if trailers:
            context.set_trailing_metadata(trailers)
        context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(deny)


class AuthInterceptor(grpc.ServerInterceptor):
    """API key (``x-api-key`` or ``authorization: Bearer``) and a per-caller rate limit on every call except
    health checks and reflection. Without keys every caller is let in and the limit is per peer address."""

    def __init__(self, keys: KeyRing, limiter: RateLimiter | None = None):
        self.keys, self.limiter = keys, limiter
        message = "missing or unknown API key (x-api-key or authorization: Bearer metadata)"
        self._unauthenticated = _deny(grpc.StatusCode.UNAUTHENTICATED, message)

    def intercept_service(self, continuation, details):
        if details.method.startswith(OPEN_METHODS):
            return continuation(details)
        if not self.keys:  # open: the limit is per peer address, which only the call's context knows
            return self._per_peer(continuation(details)) if self.limiter else continuation(details)
        metadata = {k.lower(): v for k, v in details.invocation_metadata if isinstance(v, str)}
        caller = self.keys.identify(key_from_headers(metadata))
        if caller is None:
            return self._unauthenticated
        if wait := self._wait(caller):
            return _deny(grpc.StatusCode.RESOURCE_EXHAUSTED, self._limited("API key", wait),
                         (("retry-after", f"{wait:.3f}"),))  # fmt: skip
        return continuation(details)

    def _wait(self, caller: str) -> float:
        return self.limiter.acquire(caller) if self.limiter else 0.0

    def _limited(self, who: str, wait: float) -> str:
        return (f"rate limit of {self.limiter.rate:g} requests/s (burst {self.limiter.burst}) for this {who} "
                f"exceeded; retry in {wait:.2f} s")  # fmt: skip

    def _per_peer(self, handler):
        """The handler, refusing a call whose peer address (not its port) is over the limit."""

        @contextlib.contextmanager
        def check(request, context):
            if wait := self._wait(peer_host(context.peer())):
                context.set_trailing_metadata((("retry-after", f"{wait:.3f}"),))
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self._limited("caller address", wait))
            yield

        return wrap_handler(handler, check)


def wrap_handler(handler, around: Callable):
    """``handler`` with its behavior run inside ``around(request, context)``, a context manager: what every
    interceptor here needs of a call (check it first, count it while it runs). Unary requests, streamed responses
    or not (no method here streams its requests); others are returned as they are."""
    if handler is None or handler.request_streaming:
        return handler
    if handler.response_streaming:
        behavior = handler.unary_stream

        def unary_stream(request, context):
            with around(request, context):
                yield from behavior(request, context)

        return handler._replace(unary_stream=unary_stream)
    behavior = handler.unary_unary

    def unary_unary(request, context):
        with around(request, context):
            return behavior(request, context)

    return handler._replace(unary_unary=unary_unary)


def peer_host(peer: str) -> str:
    """``ipv4:127.0.0.1:5000`` / ``ipv6:[::1]:5000`` -> the address without its port (a caller's identity)."""
    address = peer.split(":", 1)[-1]
    return address.rsplit(":", 1)[0].strip("[]") if ":" in address else address


def caller_of(context: grpc.ServicerContext, keys: KeyRing) -> str:
    """Who is calling, for quotas: the API key's id, or with no keys configured the peer's address."""
    if keys:
        metadata = {k.lower(): v for k, v in context.invocation_metadata() if isinstance(v, str)}
        return "key:" + (keys.identify(key_from_headers(metadata)) or "?")
    return "address:" + peer_host(context.peer())


def server_credentials(settings) -> grpc.ServerCredentials | None:
    """mTLS for a service's gRPC port when ``MODALINK_TLS_CERT``/``_KEY`` are set: clients must present a
    certificate signed by ``MODALINK_TLS_CA``."""
    if not (settings.tls_cert and settings.tls_key):
        return None
    ca = settings.tls_ca.read_bytes() if settings.tls_ca else None
    return grpc.ssl_server_credentials([(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
                                       root_certificates=ca, require_client_auth=ca is not None)  # fmt: skip


def channel(address: str, settings, options=CHANNEL_OPTIONS) -> grpc.Channel:
    """A channel from one service to another: mTLS with the service's own certificate when configured."""
    if not settings.tls_ca:
        return grpc.insecure_channel(address, options=options)
    creds = grpc.ssl_channel_credentials(settings.tls_ca.read_bytes(),
                                         settings.tls_key.read_bytes() if settings.tls_key else None,
                                         settings.tls_cert.read_bytes() if settings.tls_cert else None)  # fmt: skip
    return grpc.secure_channel(address, creds, options=options)


class Gate(grpc.ServerInterceptor):
    """Counts calls in flight, and once closed (SIGTERM) refuses new ones with UNAVAILABLE and a retry hint, while
    the server still answers: left to grpc's own shutdown, a call that races it may end CANCELLED instead."""

    def __init__(self):
        self.closed, self.active, self._idle = False, 0, threading.Condition()
        self._refuse = _deny(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry in 1 s",
                             (("retry-after", "1"),))  # fmt: skip

    def close(self) -> None:
        self.closed = True

    def wait_idle(self, timeout_s: float) -> bool:
        """True once no call is in flight; False if some still are after ``timeout_s``."""
        with self._idle:
            return self._idle.wait_for(lambda: self.active == 0, timeout_s)

    def _count(self, delta: int) -> None:
        with self._idle:
            self.active += delta
            self._idle.notify_all()

    def intercept_service(self, continuation, details):
        if details.method.startswith(OPEN_METHODS):
            return continuation(details)
        if self.closed:
            return self._refuse
        return wrap_handler(continuation(details), self._counted)

    @contextlib.contextmanager
    def _counted(self, request, context):
        self._count(+1)
        try:
            yield
        finally:
            self._count(-1)


@dataclass
class Served:
    """A started gRPC server, the port it got, its health servicer and the gate that drains it."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    services: tuple[str, ...]
    gate: Gate

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in [*self.services, ""]:
            self.health.set(name, status)

    def serve_until_signal(self, grace_s: float, app=None, http_host: str = "0.0.0.0", http_port: int = 0,
                           http_tls: dict | None = None) -> None:  # fmt: skip
        """Serve (gRPC, and the ASGI ``app`` on ``http_port`` if given) until SIGTERM or SIGINT, then drain: health
        turns NOT_SERVING at once, new calls get UNAVAILABLE, calls in flight get up to ``grace_s`` to finish
        (Kubernetes sends SIGTERM and waits terminationGracePeriodSeconds)."""
        drained = threading.Event()

        def drain(*_) -> None:
            if not drained.is_set():
                drained.set()
                log.info("shutting down: draining calls in flight (up to %.0f s)", grace_s)
                self.health.enter_graceful_shutdown()
                self.gate.close()

        # (uvicorn restores the handlers it found and raises the signal again when it is done: they must be these)
        signal.signal(signal.SIGTERM, drain)
        signal.signal(signal.SIGINT, drain)
        t0 = time.monotonic()
        if app is None:
            drained.wait()
            t0 = time.monotonic()
        else:
            import uvicorn

            class Server(uvicorn.Server):
                def handle_exit(self, sig, frame):
                    nonlocal t0
                    t0 = time.monotonic()
                    drain()
                    super().handle_exit(sig, frame)

            config = uvicorn.Config(app, host=http_host, port=http_port, log_level="warning",
                                    timeout_graceful_shutdown=max(1, int(grace_s)), **(http_tls or {}))  # fmt: skip
            Server(config).run()  # returns once its HTTP requests in flight are done (or the grace is over)
            drain()
        if not self.gate.wait_idle(max(0.0, grace_s - (time.monotonic() - t0))):
            log.warning("%d calls still in flight after %.0f s: stopping them", self.gate.active, grace_s)
        self.server.stop(1).wait(5)
        log.info("stopped")


def make_server(
    port: int, add: Sequence[tuple[Callable, object]], services: Sequence[str], host: str = "[::]", workers: int = 32,
    settings=None, public: bool = False,
) -> Served:  # fmt: skip
    """A started gRPC server with health checking and reflection (so grpcurl works).

    From ``settings``: the message size limit; for an internal service mTLS (``tls_*``); for the ``public`` one
    (the gateway) the API keys and the per-key rate limit instead (its clients have no certificates from the
    services' CA; TLS to the outside is the ingress's).
    """
    settings = settings or get_settings()
    limit = settings.max_message_mb << 20
    gate = Gate()
    interceptors: list[grpc.ServerInterceptor] = [gate, MalformedRequestInterceptor()]
    if public:
        keys = KeyRing.from_settings(settings)
        limiter = RateLimiter(settings.rate_limit_rps, settings.rate_limit_burst)
        if keys or limiter:
            interceptors.append(AuthInterceptor(keys, limiter))
    options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), interceptors=interceptors, options=options)
    for add_fn, servicer in add:
        add_fn(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*services, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    creds = None if public else server_credentials(settings)
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    if not bound:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    served = Served(server, bound, health_servicer, tuple(services), gate)
    served.set_serving(True)
    return served


def abort_on_input_error(context: grpc.ServicerContext, e: Exception) -> None:
    """Abort the call with ``errors.status_of(e)``: bad input -> INVALID_ARGUMENT with its message, a backend that
    timed out -> DEADLINE_EXCEEDED, one that cannot be reached -> UNAVAILABLE with a retry hint, anything
    unexpected -> INTERNAL with a fixed message (logged; the server keeps serving)."""
    if isinstance(e, grpc.RpcError) and hasattr(e, "code"):  # a gRPC call this service made itself
        e = upstream_error(e, "a service behind this one")
    code, message = status_of(e)
    if code == "INTERNAL":
        log.error("request failed", exc_info=e)
    if code == "UNAVAILABLE":
        unavailable(context, message)
    context.abort(getattr(grpc.StatusCode, code, grpc.StatusCode.INTERNAL), message)


def upstream_error(e: grpc.RpcError, who: str) -> Exception:
    """A failed call to another service as modalink's own error, its message naming ``who`` ("the LLM service")
    in words: no addresses, no exception types (the details are logged). The callee's verdict on the input
    (INVALID_ARGUMENT, NOT_FOUND, ...) passes on with its own message."""
    code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return BackendTimeout(f"{who} did not answer before the deadline")
    if code == grpc.StatusCode.UNAVAILABLE:
        log.warning("%s is unavailable: %s", who, details)
        return BackendUnavailable(f"{who} is unavailable")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InputError(details)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(details)
    if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED):
        return BackendError(f"{who}: {details}", code.name)
    log.error("%s failed: %s %s", who, code.name, details)
    return BackendError(f"{who} failed", "INTERNAL")


NO_DEADLINE_S = 1e7  # grpc reports a call without a deadline as ~9.2e18 s remaining (115 days is "none" too)


def time_left(context: grpc.ServicerContext, settings=None) -> float | None:
    """Seconds the services behind this call may take: what is left of the caller's deadline, or, when the caller
    set none (grpcurl, Go, Java and Node stubs by default), ``MODALINK_UPSTREAM_TIMEOUT_S`` (None: no limit).

    Passing grpc's "no deadline" value on as a timeout would overflow into an already-expired deadline.
    """
    remaining = context.time_remaining()
    if remaining is None or remaining > NO_DEADLINE_S:
        return upstream_timeout(settings)
    return max(remaining, 0.001)


def upstream_timeout(settings=None) -> float | None:
    """The server-side bound of a call that came without a deadline (``MODALINK_UPSTREAM_TIMEOUT_S``; 0: none)."""
    return (settings or get_settings()).upstream_timeout_s or None


def unavailable(context: grpc.ServicerContext, message: str, retry_after_s: float = 1.0) -> None:
    """UNAVAILABLE with a retry hint (``retry-after`` trailing metadata, seconds): a backend is down or restarting,
    and the same request may succeed shortly (modalink.client retries it by itself)."""
    context.set_trailing_metadata((("retry-after", f"{retry_after_s:g}"),))
    context.abort(grpc.StatusCode.UNAVAILABLE, f"{message}; retry in {retry_after_s:g} s")


class _Malformed:
    """What the wrapped deserializer returns for a request that does not parse (the reason, for the abort)."""

    def __init__(self, reason: str):
        self.reason = reason


class MalformedRequestInterceptor(grpc.ServerInterceptor):
    """A request that does not parse (bad protobuf, invalid UTF-8 in a string field) -> INVALID_ARGUMENT saying so.

    grpc-python otherwise answers INTERNAL "Exception deserializing request", which blames the server. The
    handler's deserializer is wrapped to return a ``_Malformed`` instead of raising, and its behavior aborts
    on one before the servicer sees it. Unary requests only (no method here streams its requests).
    """

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or handler.request_deserializer is None or handler.request_streaming:
            return handler
        deserialize, method = handler.request_deserializer, details.method

        def safe_deserialize(data: bytes):
            try:
                return deserialize(data)
            except Exception:  # noqa: BLE001  (DecodeError; anything else is as malformed to the caller)
                return _Malformed(_why(method, data))

        @contextlib.contextmanager
        def parsed(request, context):
            if isinstance(request, _Malformed):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            yield

        return wrap_handler(handler._replace(request_deserializer=safe_deserialize), parsed)


def _why(method: str, data: bytes) -> str:
    """The reason ``data`` is no request of ``method`` ("/pkg.Service/Method"), from the descriptor pool."""
    from google.protobuf import descriptor_pool

    from modalink.wire import malformed

    try:
        desc = descriptor_pool.Default().FindMethodByName(method.lstrip("/").replace("/", ".")).input_type
    except KeyError:
        return f"malformed request for {method} ({len(data)} bytes)"
    return malformed(desc, data)
