"""OpenAI-compatible HTTP on the gateway: ``POST /v1/chat/completions`` with image and audio content parts.

Content parts: ``text``, ``image_url`` (a ``data:`` URL; remote URLs are refused, the gateway fetches
nothing), ``input_audio`` (base64 WAV/FLAC/OGG). Media may appear in the last user message; earlier turns
are text. Streaming (SSE, ending with ``data: [DONE]``) and non-streaming; the ``openai`` client works
unchanged. Also ``GET /healthz`` and ``GET /metrics`` (Prometheus). Bad input -> 400 with OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
import uuid

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import generate_latest

from modalink.aio import iterate_in_thread
from modalink.engine import GenerationParams
from modalink.errors import InputError
from modalink.metrics import LATENCY, REQUESTS
from modalink.prompt import Message
from modalink.remote import RemoteAssistant

MAX_BODY_BYTES = 64 << 20


def _data_url(url: str) -> bytes:
    if not url.startswith("data:"):
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


def parse_messages(messages) -> tuple[list[Message], str, list[tuple[str, bytes]]]:
    """(history, last user text, its media) from OpenAI chat messages."""
    if not isinstance(messages, list) or not messages:
        raise InputError("`messages` must be a non-empty list")
    history: list[Message] = []
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
                texts.append(str(part.get("text", "")))
            elif kind == "image_url":
                url = part.get("image_url")
                media.append(("image", _data_url(url.get("url", "") if isinstance(url, dict) else str(url))))
            elif kind == "input_audio":
                audio = part.get("input_audio") or {}
                media.append(("audio", _b64(str(audio.get("data", "")), "input_audio.data")))
            else:
                raise InputError(
                    f"messages[{i}]: unsupported content part type {kind!r} (text, image_url, input_audio)"
                )
        if media and i != len(messages) - 1:
            raise InputError(f"messages[{i}]: media go in the last user message")
        history.append(Message(m["role"], ["".join(texts)]))
        last_media = media
    if history[-1].role != "user":
        raise InputError("the last message must be from the user")
    return history[:-1], history[-1].content[0], last_media


def _params(body: dict) -> GenerationParams:
    temperature = body.get("temperature")
    stop = body.get("stop") or []
    params = GenerationParams(
        max_new_tokens=int(body.get("max_completion_tokens") or body.get("max_tokens") or 256),
        temperature=float(temperature) if temperature is not None else 0.0,  # greedy unless asked
        top_p=float(body.get("top_p") or 1.0),
        stop=[stop] if isinstance(stop, str) else list(stop),
        seed=body.get("seed"),
    )
    params.validate()
    return params


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status_code=status)


def build_app(remote: RemoteAssistant, model_id: str = "modalink", api_keys: str = "") -> FastAPI:
    """``api_keys`` (comma-separated): when set, /v1 routes need ``Authorization: Bearer <key>`` or ``x-api-key``."""
    app = FastAPI(title="modalink gateway (OpenAI-compatible)")
    keys = {k.strip() for k in api_keys.split(",") if k.strip()}

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if keys and request.url.path.startswith("/v1/"):
            auth = request.headers.get("authorization", "")
            key = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key")
            if key not in keys:
                return _error(401, "missing or unknown API key", "authentication_error")
        return await call_next(request)

    latency = LATENCY.labels("http", "chat.completions")

    def count(status: str) -> None:
        REQUESTS.labels("http", "chat.completions", status).inc()

    @app.exception_handler(InputError)
    async def bad_input(request: Request, e: InputError):
        count("400")
        return _error(400, str(e))

    @app.exception_handler(grpc.RpcError)
    async def upstream(request: Request, e: grpc.RpcError):
        bad = e.code() == grpc.StatusCode.INVALID_ARGUMENT
        count("400" if bad else "502")
        return _error(
            400 if bad else 502, f"llm service: {e.details()}", "invalid_request_error" if bad else "api_error"
        )

    @app.exception_handler(Exception)
    async def failure(request: Request, e: Exception):
        count("500")
        return _error(500, f"{type(e).__name__}: {e}", "api_error")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise InputError(f"request body of {len(raw)} bytes exceeds {MAX_BODY_BYTES}")
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as e:
            raise InputError(f"request body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise InputError("request body must be a JSON object")
        history, text, media = parse_messages(body.get("messages"))
        params = _params(body)
        t0 = time.perf_counter()
        # Encoding the media blocks on the encoder services: off the event loop.
        stream, versions = await asyncio.to_thread(remote.stream, text, media, params, None, history)
        fingerprint = ",".join(f"{m}@{v}" for m, v in versions.items()) or "text"  # the adapters used
        base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": body.get("model") or model_id, "system_fingerprint": fingerprint}  # fmt: skip
        if body.get("stream"):

            async def chunks():
                try:
                    async for tok in iterate_in_thread(stream):
                        finish = tok.finish_reason or None
                        chunk = {**base, "object": "chat.completion.chunk", "choices": [{
                            "index": 0, "delta": {"role": "assistant", "content": tok.text}, "logprobs": None,
                            "finish_reason": finish}]}  # fmt: skip
                        if finish:
                            chunk["usage"] = _usage(tok.usage)
                        yield f"data: {json.dumps(chunk)}\n\n"
                    yield "data: [DONE]\n\n"
                    count("200")
                    latency.observe(time.perf_counter() - t0)
                finally:
                    stream.cancel()  # the client left: stop the generation

            return StreamingResponse(chunks(), media_type="text/event-stream")
        text_out, last = [], None
        async for tok in iterate_in_thread(stream):
            text_out.append(tok.text)
            last = tok
        count("200")
        latency.observe(time.perf_counter() - t0)
        return {**base, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": "".join(text_out)}, "logprobs": None,
            "finish_reason": last.finish_reason or "stop"}], "usage": _usage(last.usage)}  # fmt: skip

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prom():
        return Response(generate_latest(), media_type="text/plain; version=0.0.4")  # gRPC + HTTP + encoder calls

    return app


def _usage(u) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens}
