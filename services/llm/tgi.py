"""TGI's HTTP API over the same batcher as the gRPC service, so the ``text-generation`` client works unchanged.

Routes: ``POST /generate``, ``POST /generate_stream`` (SSE), ``POST /`` (what the client posts to, with
``stream``), ``POST /v1/chat/completions`` (OpenAI-style, streaming or not), ``GET /info``, ``GET /health``,
``GET /metrics`` (Prometheus). The port is guarded as the gateway's are: with API keys configured every route but
``/health`` and ``/metrics`` needs a key, the rate limit applies, and with ``MODALINK_TLS_*`` set it serves HTTPS
that requires a client certificate, as the gRPC port does (``modalink.aio.guard``/``server_tls``). It skips the
gateway's safety filters: an internal port, which compose publishes on loopback only and the chart's NetworkPolicy
closes to all but the gateway and workers. ``inputs`` are raw prompt text, as TGI's are: their special tokens are
control tokens (the gateway never sends a client's text here; it sends it over gRPC as ``plain_text``); the chat
route's messages are client text, read as plain text. Text only: prefix embeddings travel over gRPC. Errors are TGI's
``{"error", "error_type"}`` with the status of ``modalink.errors.status_of`` (the table every HTTP API uses),
except that a bad request is 422 ("validation"), as TGI answers it.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from modalink.aio import guard, iterate_in_thread, read_json
from modalink.batching import DynamicBatcher
from modalink.config import Settings, get_settings
from modalink.engine import FINISH_LENGTH, GenerationParams, TokenEvent
from modalink.errors import HTTP_STATUS, BackendError, InputError, status_of
from modalink.prompt import Message, build_prompt

VERSION = "2.0.0-modalink"  # the TGI API version these routes follow
# TGI's contract where it departs from the shared table: a bad request is 422, and errors carry TGI's error_type.
TGI_STATUS = {**HTTP_STATUS, "INVALID_ARGUMENT": 422}
ERROR_TYPE = {"INVALID_ARGUMENT": "validation", "RESOURCE_EXHAUSTED": "overloaded"}  # else "generation"
log = logging.getLogger("modalink.llm.tgi")


class BatcherCollector:
    """Prometheus view of the batcher (batches, requests, tokens, the batch-size distribution) and of its engine's
    KV prefix cache (``modalink.prefix_cache``), where it has one."""

    def __init__(self, batcher: DynamicBatcher):
        self.stats = batcher.stats
        self.prefix = getattr(getattr(batcher.engine, "prefix_cache", None), "stats", None)

    def collect(self):
        st = self.stats
        yield CounterMetricFamily("modalink_llm_batches", "Batches decoded.", value=st.batches)
        yield CounterMetricFamily("modalink_llm_requests", "Requests decoded in batches.", value=st.requests)
        yield CounterMetricFamily("modalink_llm_generated_tokens", "Tokens delivered.", value=st.generated_tokens)
        buckets, acc = [], 0
        for edge in (1, 2, 4, 8, 16, 32, 64):
            acc = sum(n for size, n in st.sizes.items() if size <= edge)
            buckets.append((str(edge), acc))
        buckets.append(("+Inf", st.batches))
        total = sum(size * n for size, n in st.sizes.items())
        yield HistogramMetricFamily("modalink_llm_batch_size", "Requests per batch.", buckets=buckets, sum_value=total)
        if (pc := self.prefix) is not None:
            yield CounterMetricFamily("modalink_llm_prefix_cache_hits", "Prompts that reused cached keys and values.",
                                      value=pc.hits)  # fmt: skip
            yield CounterMetricFamily("modalink_llm_prefix_cache_misses", "Prompts with no cached prefix to reuse.",
                                      value=pc.misses)  # fmt: skip
            yield CounterMetricFamily("modalink_llm_prefix_cache_evictions", "Entries evicted to stay in bounds.",
                                      value=pc.evictions)  # fmt: skip
            yield CounterMetricFamily("modalink_llm_prefix_cache_reused_tokens",
                                      "Prompt positions not prefilled again (the prefill the cache saved).",
                                      value=pc.tokens_reused)  # fmt: skip
            yield GaugeMetricFamily("modalink_llm_prefix_cache_bytes", "Bytes of keys and values held.", value=pc.bytes)


def _params(p: dict) -> GenerationParams:
    """TGI parameters -> ours. Sampling when ``do_sample`` or any sampling knob is set, as TGI does."""
    if not isinstance(p, dict):
        raise InputError("parameters must be an object")
    sampling = bool(p.get("do_sample")) or any(p.get(k) is not None for k in ("temperature", "top_k", "top_p"))
    params = GenerationParams(
        max_new_tokens=int(p.get("max_new_tokens") or 20),  # TGI's default
        temperature=float(p.get("temperature") or 1.0) if sampling else 0.0,
        top_p=float(p.get("top_p") or 1.0),
        top_k=int(p.get("top_k") or 0),
        repetition_penalty=float(p.get("repetition_penalty") or 1.0),
        stop=list(p.get("stop") or []),
        seed=p.get("seed"),
    )
    params.validate()
    return params


def _token(tok, ev: TokenEvent, eos: set[int]) -> dict:
    return {"id": ev.token_id, "text": tok.decode([ev.token_id]) if ev.token_id >= 0 else "", "logprob": None,
            "special": ev.token_id in eos}  # fmt: skip


def _finish(ev: TokenEvent, eos: set[int]) -> str:
    if ev.finish_reason == FINISH_LENGTH:
        return "length"
    return "eos_token" if ev.token_id in eos else "stop_sequence"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": kind}, status_code=status)


def build_app(batcher: DynamicBatcher, model_id: str, settings: Settings | None = None) -> FastAPI:
    """The largest request body read is ``MODALINK_MAX_MESSAGE_MB``, as on the gRPC port."""
    settings = settings or get_settings()
    limit = settings.max_message_mb << 20
    engine = batcher.engine
    tok, eos = engine.tokenizer, getattr(engine, "eos_ids", set())
    app = FastAPI(title="modalink LLM (TGI API)", version=VERSION)
    metrics = CollectorRegistry()
    metrics.register(BatcherCollector(batcher))
    guard(app, settings, lambda path: path not in ("/health", "/metrics"), error)

    async def events(prompt, params) -> AsyncIterator[TokenEvent]:
        """Token events of one request, without blocking the event loop; cancelled when the client leaves."""
        req = batcher.submit(prompt, params)
        try:
            async for ev in iterate_in_thread(batcher.events(req)):
                yield ev
        finally:
            req.cancelled.set()

    async def parse(request: Request) -> tuple[str, GenerationParams, dict, bool]:
        body = await read_json(request, limit)
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), str) or not body["inputs"]:
            raise InputError("`inputs` must be a non-empty string")
        p = body.get("parameters") or {}
        return body["inputs"], _params(p), p, bool(body.get("stream"))

    async def generate_json(inputs: str, params: GenerationParams, p: dict) -> dict:
        text, tokens, last = [], [], None
        async for ev in events([inputs], params):
            text.append(ev.text)
            tokens.append(_token(tok, ev, eos))
            last = ev
        out = {"generated_text": (inputs if p.get("return_full_text") else "") + "".join(text)}
        if p.get("details"):
            out["details"] = {"finish_reason": _finish(last, eos), "generated_tokens": len(tokens),
                              "seed": params.seed, "prefill": [], "tokens": tokens, "top_tokens": None}  # fmt: skip
        return out

    def sse(inputs: str, params: GenerationParams) -> StreamingResponse:
        async def body():
            text, n = [], 0
            async for ev in events([inputs], params):
                n += 1
                text.append(ev.text)
                final = ev.finish_reason is not None
                yield "data:" + json.dumps({
                    "index": n, "token": _token(tok, ev, eos), "top_tokens": None,
                    "generated_text": "".join(text) if final else None,
                    "details": {"finish_reason": _finish(ev, eos), "generated_tokens": n, "seed": params.seed}
                    if final else None,
                }) + "\n\n"  # fmt: skip

        return StreamingResponse(body(), media_type="text/event-stream")

    async def failure(request: Request, e: Exception):
        code, message = status_of(e)
        if code == "INTERNAL":
            log.error("TGI request failed", exc_info=e)
        return error(TGI_STATUS.get(code, 500), message, ERROR_TYPE.get(code, "generation"))

    # (each class by name: Starlette re-raises what only the catch-all ``Exception`` handler caught, as a crash)
    for kind in (InputError, BackendError, ConnectionError, TimeoutError, PermissionError, Exception):
        app.add_exception_handler(kind, failure)

    @app.post("/generate")
    async def generate(request: Request):
        inputs, params, p, _ = await parse(request)
        return await generate_json(inputs, params, p)

    @app.post("/generate_stream")
    async def generate_stream(request: Request):
        inputs, params, _, _ = await parse(request)
        engine.check([inputs], params)  # refuse before the 200 of a stream
        return sse(inputs, params)

    @app.post("/")
    async def compat(request: Request):
        inputs, params, p, stream = await parse(request)
        if stream:
            engine.check([inputs], params)
            return sse(inputs, params)
        return [await generate_json(inputs, params, p)]

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_json(request, limit)
        msgs = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(msgs, list) or not msgs:
            raise InputError("`messages` must be a non-empty list")
        messages = []
        for m in msgs:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # text content parts
                content = "".join(c.get("text", "") for c in content if isinstance(c, dict) and c.get("type") == "text")
            if not isinstance(content, str):
                raise InputError("each message needs a role and text content (media go through the gateway)")
            messages.append(Message(m.get("role", "user"), [content]))
        prompt = build_prompt(tok, messages)
        params = _params({"max_new_tokens": body.get("max_tokens") or body.get("max_completion_tokens") or 128,
                          "temperature": body.get("temperature") or None, "top_p": body.get("top_p"),
                          "seed": body.get("seed"), "stop": body.get("stop"),
                          "do_sample": bool(body.get("temperature"))})  # fmt: skip
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": cid, "created": created, "model": model_id, "system_fingerprint": VERSION}
        prompt_tokens = engine.check(prompt, params)
        if body.get("stream"):

            async def chunks():
                n = 0
                async for ev in events(prompt, params):
                    n += 1
                    finish = ("length" if ev.finish_reason == FINISH_LENGTH else "stop") if ev.finish_reason else None
                    chunk = {**base, "object": "chat.completion.chunk", "choices": [{
                        "index": 0, "delta": {"role": "assistant", "content": ev.text, "tool_calls": None},
                        "logprobs": None, "finish_reason": finish}]}  # fmt: skip
                    if finish:
                        chunk["usage"] = usage(prompt_tokens, n)
                    yield "data:" + json.dumps(chunk) + "\n\n"

            return StreamingResponse(chunks(), media_type="text/event-stream")
        text, n, last = [], 0, None
        async for ev in events(prompt, params):
            text.append(ev.text)
            n += 1
            last = ev
        return {**base, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": "".join(text)}, "logprobs": None,
            "finish_reason": "length" if last.finish_reason == FINISH_LENGTH else "stop"}],
            "usage": usage(prompt_tokens, n)}  # fmt: skip

    @app.get("/info")
    async def info():
        return {"model_id": model_id, "model_dtype": str(getattr(engine, "dtype", "")).replace("torch.", ""),
                "model_device_type": str(getattr(engine, "device", "cpu")), "max_input_tokens": engine.max_context - 1,
                "max_total_tokens": engine.max_context, "max_best_of": 1, "max_stop_sequences": 16,
                "max_batch_size": batcher.max_batch, "version": VERSION, "router": "modalink",
                "hidden_size": engine.hidden_size}  # fmt: skip

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/metrics")
    async def prom():
        return Response(generate_latest(metrics), media_type="text/plain; version=0.0.4")

    return app
