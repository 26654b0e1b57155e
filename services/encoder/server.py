"""Encoder service: one modality's frozen encoder + trained projector on Triton (PyTriton).

    modalink serve encoder --modality image [--http-port 8000 --grpc-port 8001 --metrics-port 8002]

Serves model ``<modality>_encoder`` (contract in ``modalink.triton``) with dynamic batching: concurrent
requests are concatenated into one forward pass. Stock ``tritonclient`` (gRPC or HTTP) talks to it.
The projector follows the adapter registry's ``CURRENT`` pointer between batches (hot reload).
"""

from __future__ import annotations

import logging
import signal

import numpy as np
from pytriton.decorators import batch
from pytriton.exceptions import PyTritonBadParameterError
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig
from tritonclient.utils import InferenceServerException

from modalink.config import Settings, get_settings
from modalink.embedder import Embedder
from modalink.errors import InputError
from modalink.ports import ENCODER_HTTP
from modalink.triton import INVALID_INPUT, EncoderModel, input_spec, model_name

log = logging.getLogger("modalink.encoder")

# PyTriton's model instances after the first read their config from the first's Unix socket, waiting only for the
# socket file: one that connects between that socket's bind and listen is refused and fails the model's load
# (seen on a loaded machine while several services start). Triton is then started again.
HANDSHAKE = "get_config_from_handshake_server"
START_ATTEMPTS = 4


def tls_config(settings: Settings) -> dict:
    """mTLS on Triton's gRPC port (the gateway's tritonclient presents its certificate); Triton's HTTP port has
    no client authentication, so with TLS on, bind the service to an address only its pod reaches."""
    if not (settings.tls_cert and settings.tls_key):
        return {}
    return {"grpc_use_ssl": True, "grpc_use_ssl_mutual": settings.tls_ca is not None,
            "grpc_server_cert": settings.tls_cert, "grpc_server_key": settings.tls_key,
            "grpc_root_cert": settings.tls_ca}  # fmt: skip


def serve(
    modality: str, settings: Settings | None = None, http_port: int | None = None, grpc_port: int | None = None,
    metrics_port: int | None = None, max_batch_size: int = 32, max_queue_delay_us: int = 2000, host: str = "0.0.0.0",
    adapter_version: str | None = None, dynamic_batching: bool = True, instances: int = 2,
) -> None:  # fmt: skip
    """Run until SIGINT/SIGTERM. ``adapter_version`` pins a version; by default the registry's current one is
    served and followed (hot reload). Without ``dynamic_batching`` Triton runs every request on its own (the
    baseline `bench/serving.py` compares against).

    ``instances``: Triton model instances, each a thread of this process on the same weights (no extra memory).
    With one, the model idles while a finished batch's answers go out and the next batch comes in through
    PyTriton, and while it decodes a batch's files on one core; with two, one instance computes meanwhile
    (measured: +8 to 17% items/s under 16 clients on 2 cores, `bench/serving.py`)."""
    base = ENCODER_HTTP[modality]
    settings = settings or get_settings()
    model = EncoderModel(Embedder(settings, {modality: adapter_version} if adapter_version else None), modality)

    @batch
    def infer(data: np.ndarray) -> dict[str, np.ndarray]:
        try:
            return model.infer(data)
        except InputError as e:
            raise PyTritonBadParameterError(INVALID_INPUT + str(e)) from None
        except Exception:  # the caller hears INTERNAL and "its log has the details": here they are
            log.exception("%s: a batch of %d failed", model_name(modality), len(data))
            raise

    dtype, shape = input_spec(modality)
    # On SIGTERM Triton stops taking requests and finishes those in flight for up to exit_timeout_secs.
    config = TritonConfig(
        http_address=host, grpc_address=host, metrics_address=host,
        http_port=http_port or base, grpc_port=grpc_port or base + 1, metrics_port=metrics_port or base + 2,
        exit_timeout_secs=max(1, int(settings.shutdown_grace_s)),
        **tls_config(settings),
    )  # fmt: skip
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # else tritonserver lingers after a SIGTERM
    model_spec = dict(
        model_name=model_name(modality),
        infer_func=[infer] * instances,
        inputs=[Tensor(name="data", dtype=dtype, shape=shape)],
        outputs=[
            Tensor(name="embeddings", dtype=np.float32, shape=(model.n_tokens, model.d_llm)),
            Tensor(name="tokens", dtype=np.int32, shape=(1,)),
            Tensor(name="adapter_version", dtype=np.bytes_, shape=(1,)),
            Tensor(name="error", dtype=np.bytes_, shape=(1,)),
        ],
        config=ModelConfig(
            max_batch_size=max_batch_size,
            batcher=DynamicBatcher(max_queue_delay_microseconds=max_queue_delay_us) if dynamic_batching else None,
        ),
        strict=True,
    )
    for attempt in range(1, START_ATTEMPTS + 1):
        with Triton(config=config) as triton:
            try:
                triton.bind(**model_spec)
            except InferenceServerException as e:
                if HANDSHAKE not in str(e) or attempt == START_ATTEMPTS:
                    raise
                log.warning("%s: PyTriton's model instances raced at start (attempt %d): starting Triton again",
                            model_name(modality), attempt)  # fmt: skip
                continue  # leaving the block stops this Triton
            log.info("%s ready: HTTP %s, gRPC %s (%d instances)", model_name(modality), config.http_port,
                     config.grpc_port, instances)  # fmt: skip
            try:
                triton.serve()
            except KeyboardInterrupt:
                pass
            return
