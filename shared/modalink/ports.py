"""Default ports of every service, written once: ``modalink up``, the options of ``modalink serve``, the services'
own defaults and the settings' defaults (``MODALINK_ENCODERS``, ``MODALINK_LLM_ADDRESS``, ``MODALINK_REDIS_URL``)
are built from this table. The gateway's gRPC port is the client's default address (``modalink_client.options``,
which cannot import this package). Compose and the Helm chart write the same numbers (``tests/test_deploy.py``).
"""

from __future__ import annotations

import random
import socket

from modalink_client.options import GATEWAY_PORT

from modalink.modality import ports as modality_ports

GATEWAY_GRPC = GATEWAY_PORT  # modalink.v1.Assistant
GATEWAY_HTTP = 8080  # the OpenAI-compatible route
LLM_GRPC = 50061  # modalink.v1.LLM
LLM_HTTP = 8081  # the LLM service's TGI-compatible API
REDIS_PORT = 6379
PLAYGROUND = 7860
# Triton's HTTP port of each encoder service; its gRPC port is the next one, its metrics the one after. The
# built-ins' are 8000, 8010, 8020, 8030; plugin modalities take 8040, 8050... in name order (modalink.modality).
ENCODER_HTTP = modality_ports()
REPLICA_STEP = 100  # replica i of a modality (``modalink up --replicas``) adds 100 * i


def encoder_grpc(modality: str, replica: int = 0) -> int:
    """The Triton gRPC port of an encoder service (the one the gateway and the workers call)."""
    return ENCODER_HTTP[modality] + REPLICA_STEP * replica + 1


def encoder_addresses(host: str = "localhost") -> str:
    """``MODALINK_ENCODERS`` for one encoder service per modality on ``host``."""
    return ",".join(f"{m}={host}:{encoder_grpc(m)}" for m in ENCODER_HTTP)


# Ports for tests and benchmarks come from below the kernel's ephemeral range (32768-60999 by default on Linux):
# a port the kernel handed out with bind(0) is free only until some process's outgoing connection or bind(0)
# takes it, which a fresh-clone CI run hit (a Triton server took a port meant for the LLM service's HTTP API).
_FREE_RANGE = (20000, 32000)
HANDED_OUT: set[int] = set()  # ports this process gave to a server it starts (maybe not listening yet)


def port_is_free(port: int) -> bool:
    """Nothing listens on ``port`` (every interface or loopback) and this process has not handed it out."""
    if port in HANDED_OUT:
        return False
    try:
        for host in ("0.0.0.0", "127.0.0.1"):
            with socket.socket() as s:
                s.bind((host, port))
    except OSError:
        return False
    return True


def free_port() -> int:
    """A TCP port for a server a test or benchmark starts: free now, outside the ephemeral range, never handed
    out before by this process."""
    for _ in range(1000):
        port = random.randint(*_FREE_RANGE)
        if port_is_free(port):
            HANDED_OUT.add(port)
            return port
    raise RuntimeError(f"no free port in {_FREE_RANGE}")
