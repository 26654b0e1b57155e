"""OpenAI-compatible HTTP on the gateway: ``POST /v1/chat/completions`` with image and audio content parts.

Content parts: ``text``, ``image_url`` (a ``data:`` URL; remote URLs are refused, the gateway fetches
nothing), ``input_audio`` (base64 WAV/FLAC/OGG) and modalink's ``input_media`` (any registered modality by name,
a plugin's too: ``{"modality", "data": base64 file or .npy}``), in any user message: a chat front end sends the whole
conversation with its pictures every turn, and they are read where they were sent, as the gRPC API's history
reads them. Streaming (SSE, ending with ``data: [DONE]``; ``stream_options.include_usage`` adds the usage
chunk) and non-streaming; ``GET /v1/models`` and ``/v1/models/{id}``; the ``openai`` client works unchanged.
Also ``GET /healthz`` and ``GET /metrics`` (Prometheus). Errors carry OpenAI's error shape, with the status of
``modalink.errors.status_of`` (bad input 400, a backend that is down 503 + Retry-After, one that timed out 504).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
import uuid

import grpc
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from modalink_client import load_npy
from prometheus_client import generate_latest

from modalink import check_modality
from modalink.aio import guard, iterate_in_thread, read_json
from modalink.auth import KeyRing, key_from_headers
from modalink.config import Settings, get_settings
from modalink.embed_cache import salted
from modalink.engine import GenerationParams
from modalink.errors import HTTP_STATUS, BackendError, InputError, status_of
from modalink.metrics import LATENCY, REQUESTS
from modalink.modality import get as get_modality
from modalink.pipeline import Turn
from modalink.prompt import Message
from modalink.remote import RemoteAssistant
from modalink.rpc import upstream_error, upstream_timeout
from modalink.wire import check_history, check_turn

log = logging.getLogger("modalink.gateway.http")


def _data_url(url) -> bytes:
    if not isinstance(url, str) or not url.startswith("data:"):
        raise InputError("image_url must be a data: URL (data:image/png;base64,...); the gateway fetches no URLs")
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise InputError("image_url data: URL must be base64-encoded")
    return _b64(payload, "image_url")


def _b64(data: str, what: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{what}: not valid base64") from None


def input_media(spec, what: str) -> tuple[str, bytes | np.ndarray]:
    """modalink's content part for media of any registered modality (a plugin's too):
    ``{"type": "input_media", "input_media": {"modality": "power", "data": "<base64>"}}``, ``data`` being the file
    (a tensor modality's: a float32 ``.npy`` of its rank, read without pickle)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("modality"), str):
        raise InputError(f"{what}: expected {{modality, data (base64)}}")
    m = get_modality(check_modality(spec["modality"]))
    raw = _b64(str(spec.get("data", "")), f"{what}.data")
    if not raw:
        raise InputError(f"{what}.data is empty")
    if m.input == "file":
        return m.name, raw
    try:  # its header checked against its bytes before anything is allocated
        arr = load_npy(raw, f"{what}.data", m.tensor_rank, "")
    except ValueError as e:
        raise InputError(str(e)) from None
    if arr.dtype.kind != "f" or not np.isfinite(arr).all():
        raise InputError(f"{what}.data: {m.name} takes a finite float array of {m.tensor_rank} axes, got "
                         f"{arr.dtype} of shape {list(arr.shape)}")  # fmt: skip
    return m.name, arr.astype(np.float32)


def parse_messages(messages) -> tuple[list[Message], list[list[tuple[str, bytes]]], str, list[tuple[str, bytes]]]:
    """(earlier turns, each earlier turn's media, last user text, its media) from OpenAI chat messages; the
    media limits are the gRPC API's (``wire.check_turn``, ``wire.check_history``)."""
    if not isinstance(messages, list) or not messages:
        raise InputError("`messages` must be a non-empty list")
    turns: list[Message] = []
    turn_media: list[list[tuple[str, bytes]]] = []
    n_parts = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise InputError(f"messages[{i}]: needs a role of system, user or assistant")
        content = m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise InputError(f"messages[{i}].content must be a string or a list of content parts")
        texts, media = [], []
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise InputError(f"messages[{i}]: a text content part needs a string `text`")
                texts.append(part["text"])
            elif kind == "image_url":
                url = part.get("image_url")
                media.append(("image", _data_url(url.get("url") if isinstance(url, dict) else url)))
            elif kind == "input_audio":
                audio = part.get("input_audio") or {}
                media.append(("audio", _b64(str(audio.get("data", "")), "input_audio.data")))
            elif kind == "input_media":
                media.append(input_media(part.get("input_media"), f"messages[{i}].input_media"))
            else:
                raise InputError(f"messages[{i}]: unsupported content part type {kind!r} (text, image_url, "
                                 "input_audio, input_media)")  # fmt: skip
        if media and m["role"] != "user":
            raise InputError(f"messages[{i}]: only user messages carry media")
        turns.append(Message(m["role"], ["".join(texts)]))
        turn_media.append(media)
        n_parts = len(parts)
    if turns[-1].role != "user":
        raise InputError("the last message must be from the user")
    check_turn(turns[-1].content[0], len(turn_media[-1]), n_parts)
    check_history(turns[:-1], turn_media[:-1], "messages")
    return turns[:-1], turn_media[:-1], turns[-1].content[0], turn_media[-1]


def _params(body: dict) -> GenerationParams:
    temperature = body.get("temperature")
    stop = body.get("stop") or []
    params = GenerationParams(
        max_new_tokens=body.get("max_completion_tokens") or body.get("max_tokens") or 256,
        temperature=temperature if temperature is not None else 0.0,  # greedy unless asked
        top_p=body.get("top_p") or 1.0,
        stop=[stop] if isinstance(stop, str) else stop,
        seed=body.get("seed"),
    )
    params.validate()  # also the JSON types: a string where a number belongs is a 400, not a 500
    return params


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status_code=status)


def build_app(remote: RemoteAssistant, model_id: str = "modalink", settings: Settings | None = None) -> FastAPI:
    """With API keys configured (``modalink.auth``), /v1 routes need ``Authorization: Bearer <key>`` or
    ``x-api-key``; the per-key rate limit answers 429 with ``Retry-After``."""
    settings = settings or get_settings()
    app = FastAPI(title="modalink gateway (OpenAI-compatible)")
    guard(app, settings, lambda path: path.startswith("/v1/"), _error)

    latency = LATENCY.labels("http", "chat.completions")
    keys = KeyRing.from_settings(settings) if settings.embed_cache_salt else None

    def salt(request: Request) -> str:
        """The embedding cache's salt: the API key's id, as the gRPC API's (``caller_of``) (issue 24)."""
        return f"key:{keys.identify(key_from_headers(request.headers)) or '?'}" if keys else ""

    def count(status: str) -> None:
        REQUESTS.labels("http", "chat.completions", status).inc()

    async def failure(request: Request, e: Exception):
        """Every error as OpenAI's error shape, with the status of ``errors.status_of`` (one table for all APIs)."""
        if isinstance(e, grpc.RpcError) and hasattr(e, "code"):
            e = upstream_error(e, "the LLM service")
        code, message = status_of(e)
        status = HTTP_STATUS.get(code, 500)
        if code == "INTERNAL":
            log.error("chat completion failed", exc_info=e)
        count(str(status))
        kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
        response = _error(status, message if code != "UNAVAILABLE" else f"{message}; retry in 1 s", kind)
        if code == "UNAVAILABLE":
            response.headers["Retry-After"] = "1"
        return response

    # (each class by name: Starlette re-raises what only the catch-all ``Exception`` handler caught, as a crash)
    for kind in (InputError, BackendError, ConnectionError, TimeoutError, PermissionError, grpc.RpcError, Exception):
        app.add_exception_handler(kind, failure)

    model = {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "modalink"}

    @app.get("/v1/models")
    async def models():
        """The one model this gateway serves (chat front ends and OpenAI clients list models on start)."""
        return {"object": "list", "data": [model]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str):
        if name != model_id:
            return _error(
                404, f"the model {name!r} does not exist; this gateway serves {model_id!r}", "not_found_error"
            )
        return model

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_json(request, settings.max_message_mb << 20)
        if not isinstance(body, dict):
            raise InputError("request body must be a JSON object")
        history, history_media, text, media = parse_messages(body.get("messages"))
        params = _params(body)
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise InputError("stream_options must be an object")
        include_usage = bool(options.get("include_usage"))
        t0 = time.perf_counter()
        turn = Turn(text, media, params, history, history_media)
        # encoding the media blocks on the encoder services: off the event loop
        with salted(salt(request)):  # (to_thread runs in a copy of this context)
            reply = await asyncio.to_thread(remote.pipeline.start, turn, upstream_timeout(settings))
        fingerprint = ",".join(f"{m}@{v}" for m, v in reply.versions.items()) or "text"  # the adapters used
        base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": body.get("model") or model_id, "system_fingerprint": fingerprint}  # fmt: skip
        if body.get("stream"):

            async def chunks():
                try:
                    async for ev in iterate_in_thread(iter(reply)):
                        chunk = {**base, "object": "chat.completion.chunk", "choices": [{
                            "index": 0, "delta": {"role": "assistant", "content": ev.text}, "logprobs": None,
                            "finish_reason": ev.finish_reason or None}]}  # fmt: skip
                        if include_usage:  # OpenAI: null on every chunk, then one chunk with the usage
                            chunk["usage"] = None
                        yield f"data: {json.dumps(chunk)}\n\n"
                        if ev.usage and include_usage:
                            last = {
                                **base,
                                "object": "chat.completion.chunk",
                                "choices": [],
                                "usage": ev.usage.as_dict(),
                            }
                            yield f"data: {json.dumps(last)}\n\n"
                    yield "data: [DONE]\n\n"
                    count("200")
                    latency.observe(time.perf_counter() - t0)
                finally:
                    reply.cancel()  # the client left (or the answer is done): stop the generation

            return StreamingResponse(chunks(), media_type="text/event-stream")
        answer = await asyncio.to_thread(reply.answer)
        count("200")
        latency.observe(time.perf_counter() - t0)
        return {**base, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": answer.text}, "logprobs": None,
            "finish_reason": answer.finish_reason or "stop"}], "usage": answer.usage}  # fmt: skip

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prom():
        return Response(generate_latest(), media_type="text/plain; version=0.0.4")  # gRPC + HTTP + encoder calls

    return app
