"""LLM service: the frozen chat LLM behind gRPC ``modalink.v1.LLM``, reading prefix embeddings.

    modalink serve llm [--port 50061]

Prompts arrive as segments (chat-templated text, or float32 [n, d_llm] embeddings from an encoder
service). Concurrent requests decode together (``modalink.batching.DynamicBatcher``: continuous batching with the
transformers engine; a request that arrives mid-batch joins it between decode steps). A request may name the
LoRA its projector was trained with (``"audio@v3"``); it is loaded from the adapter registry on first use.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import grpc

from modalink import methods, ports
from modalink.aio import server_tls
from modalink.batching import DynamicBatcher
from modalink.config import Settings, get_settings
from modalink.engine import Engine
from modalink.engines import load_engine
from modalink.registry import AdapterRegistry
from modalink.rpc import abort_on_input_error, make_server
from modalink.v1 import common_pb2, llm_pb2, llm_pb2_grpc
from modalink.wire import params_from_msg, segments_from_msg

log = logging.getLogger("modalink.llm")
SERVICE = "modalink.v1.LLM"


class LLMService(llm_pb2_grpc.LLMServicer):
    def __init__(
        self, engine: Engine, registry: AdapterRegistry, model: str, max_batch: int = 32, max_wait_ms: float = 10.0
    ):
        self.engine, self.registry, self.model = engine, registry, model
        self.batcher = DynamicBatcher(engine, max_batch, max_wait_ms)
        self._adapter_lock = threading.Lock()

    def _adapter(self, names: list[str]) -> str | None:
        @contextlib.contextmanager
        def between_batches():
            with self._adapter_lock, self.batcher.between_batches():
                yield

        return methods.choose(self.engine, self.registry, names, between_batches)

    def Generate(self, request: llm_pb2.LLMRequest, context: grpc.ServicerContext):
        try:
            prompt = segments_from_msg(request.segments)  # plain_text: a client's text, read as plain text
            req = self.batcher.submit(prompt, params_from_msg(request.params), self._adapter(list(request.adapters)))
        except Exception as e:  # noqa: BLE001
            abort_on_input_error(context, e)
        context.add_callback(req.cancelled.set)  # client cancel or deadline: stop generating for it
        n = 0
        for ev in self.batcher.events(req):
            n += ev.token_id >= 0
            usage = None
            if ev.finish_reason:
                usage = common_pb2.Usage(prompt_tokens=req.prompt_tokens, completion_tokens=n,
                                         total_tokens=req.prompt_tokens + n)  # fmt: skip
            yield llm_pb2.Token(id=ev.token_id, text=ev.text, finish_reason=ev.finish_reason or "", usage=usage)

    def Info(self, request: llm_pb2.InfoRequest, context: grpc.ServicerContext) -> llm_pb2.InfoResponse:
        return llm_pb2.InfoResponse(
            model=self.model, hidden_size=self.engine.hidden_size, max_context=self.engine.max_context,
            adapters=sorted(self.engine.adapters), batches=self.batcher.stats.batches,
            batched_requests=self.batcher.stats.requests, generated_tokens=self.batcher.stats.generated_tokens,
        )  # fmt: skip


def serve(settings: Settings | None = None, port: int = ports.LLM_GRPC, host: str = "[::]", max_batch: int = 32,
          max_wait_ms: float = 10.0, http_port: int = ports.LLM_HTTP, http_host: str = "0.0.0.0") -> None:  # fmt: skip
    """gRPC on ``port`` and TGI's HTTP API on ``http_port`` (0 = off), one batcher behind both, until SIGTERM/SIGINT;
    then generations in flight are drained (``MODALINK_SHUTDOWN_GRACE_S``)."""
    from modalink_services.llm.tgi import build_app

    settings = settings or get_settings()
    engine = load_engine(settings)
    service = LLMService(engine, AdapterRegistry(settings.adapters_dir), settings.llm, max_batch, max_wait_ms)
    served = make_server(port, [(llm_pb2_grpc.add_LLMServicer_to_server, service)], [SERVICE], host, workers=96,
                         settings=settings)  # fmt: skip
    log.info("%s ready on %s:%d (engine %s)", SERVICE, host, served.port, engine.runtime)
    app = build_app(service.batcher, settings.llm, settings) if http_port else None
    tls = server_tls(settings)
    if app is not None:
        log.info("TGI HTTP API on %s://%s:%d", "https" if tls else "http", http_host, http_port)
    served.serve_until_signal(settings.shutdown_grace_s, app, http_host, http_port, tls)
