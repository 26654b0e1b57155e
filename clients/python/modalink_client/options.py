"""What the client and the modalink services share, written once here (``modalink.rpc``, ``modalink.ports`` and
``modalink.errors`` import it): the gateway's default address, the channel options and retry policy of gRPC clients
(also the services' channels to each other), and the HTTP status of each gRPC status for HTTP front ends."""

from __future__ import annotations

import json

GATEWAY_PORT = 50051  # the gateway's gRPC port (modalink.v1.Assistant) unless told otherwise
DEFAULT_ADDRESS = f"localhost:{GATEWAY_PORT}"

MAX_MESSAGE_BYTES = 64 << 20  # default of MODALINK_MAX_MESSAGE_MB: a few images or seconds of audio per request
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # a backend that went away is retried within a second or two of coming back (gRPC's default backoff grows
    # to 120 s, which would keep a recovered LLM service unused for minutes)
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 3000),
]

# Calls to the gateway are retried on UNAVAILABLE (a backend restarting, a draining replica) before any response
# arrived: gRPC's own retry policy, so a stream that already yielded text is never replayed.
RETRY_SERVICE_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [{"service": "modalink.v1.Assistant"}],
        "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.2s", "maxBackoff": "2s", "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"]},
    }]
})  # fmt: skip
CLIENT_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.enable_retries", 1), ("grpc.service_config", RETRY_SERVICE_CONFIG)]

# gRPC status name -> HTTP status, for the HTTP APIs in front of the gateway or beside it (the OpenAI-compatible route,
# the LLM service's TGI API, the playground): one table, so a refusal reads the same everywhere.
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404,
               "RESOURCE_EXHAUSTED": 429, "INTERNAL": 500, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}  # fmt: skip
INTERNAL_MESSAGE = "internal error; the service logged the details"  # what an unexpected failure answers
