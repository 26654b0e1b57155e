"""The Python client of the gateway's gRPC API: ``modalink_client`` (``clients/python``, the ``modalink-client``
distribution: grpcio, protobuf and numpy only, no torch), re-exported here for the code that says
``modalink.client``.

    from modalink.client import Client, image
    with Client("localhost:50051") as c:
        for delta in c.generate([image("cat.png"), "What is this?"]):
            print(delta, end="")

``params`` may be a ``modalink.engine.GenerationParams`` (any object with its fields) or keyword arguments.
Parts built with the main package's stubs (``modalink.v1.common_pb2.Part``) are the client's own: both stubs
register the same proto files, so their message classes are one and the same.
"""

from modalink_client import (
    AsyncClient,
    Client,
    Embedding,
    PartLike,
    Turns,
    adapters_dict,
    audio,
    image,
    imu,
    job_dict,
    media,
    video,
)

__all__ = ["AsyncClient", "Client", "Embedding", "PartLike", "Turns", "adapters_dict", "audio", "image", "imu",
           "job_dict", "media", "video"]  # fmt: skip
