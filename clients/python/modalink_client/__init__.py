"""A Python client of the modalink gateway's gRPC API (``modalink.v1.Assistant``), sync and asyncio.

    from modalink_client import Client, image
    with Client("localhost:50051") as c:
        for delta in c.generate([image("cat.png"), "What is this?"], max_new_tokens=32):
            print(delta, end="")

Parts are built with ``image``/``audio``/``imu``/``video`` (a path, bytes or an array), ``media(name, ...)`` for
any other modality the gateway has (a plugin's), or given as plain strings. Calls carry a deadline, are retried
on UNAVAILABLE (gRPC retry policy, before any response arrived), and send ``x-api-key`` metadata when an API key
is set. Needs only grpcio, protobuf and numpy; the generated stubs are
``modalink_client.v1.{common,assistant}_pb2[_grpc]``.

The names are loaded on first use, so ``modalink_client.options`` (channel options, which the modalink services
use too) is importable without loading the stubs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_WHERE = {
    **dict.fromkeys(["AsyncClient", "Client", "Embedding", "PartLike", "Turns", "adapters_dict", "audio",
                     "call_status", "image", "imu", "job_dict", "media", "video"], "client"),
    **dict.fromkeys(["from_tensor_msg", "params_to_msg", "to_tensor_msg"], "convert"),
    **dict.fromkeys(["imu_array", "load_npy"], "imu_data"),
    **dict.fromkeys(["CHANNEL_OPTIONS", "DEFAULT_ADDRESS", "HTTP_STATUS", "RETRY_SERVICE_CONFIG"], "options"),
}  # fmt: skip
__all__ = ["CHANNEL_OPTIONS", "DEFAULT_ADDRESS", "HTTP_STATUS", "RETRY_SERVICE_CONFIG", "AsyncClient", "Client",
           "Embedding", "PartLike", "Turns", "adapters_dict", "audio", "call_status", "from_tensor_msg", "image", "imu",
           "imu_array", "job_dict", "load_npy", "media", "params_to_msg", "to_tensor_msg", "video"]  # fmt: skip

if TYPE_CHECKING:
    from modalink_client.client import (
        AsyncClient,
        Client,
        Embedding,
        PartLike,
        Turns,
        adapters_dict,
        audio,
        call_status,
        image,
        imu,
        job_dict,
        video,
    )
    from modalink_client.convert import from_tensor_msg, params_to_msg, to_tensor_msg
    from modalink_client.imu_data import imu_array
    from modalink_client.options import CHANNEL_OPTIONS, DEFAULT_ADDRESS, HTTP_STATUS, RETRY_SERVICE_CONFIG


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'modalink_client' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"modalink_client.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
