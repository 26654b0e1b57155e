"""Channel options and the retry policy of gRPC clients of modalink (also the services' channels to each other:
``modalink.rpc`` imports them from here)."""

from __future__ import annotations

import json

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
