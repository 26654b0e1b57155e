"""Playground: chat with images, audio, IMU and video in a browser, run captioning jobs, manage adapters.

    modalink serve playground [--port 7860 --gateway localhost:50051]

A static page (``static/``: plain HTML/JS, no build step, nothing fetched from outside) over a small JSON API
that is a client of the gateway like any other: every call goes through ``modalink.client`` over gRPC with
the API key the page sends (``x-api-key``). Answers stream to the page as server-sent events.
Files for captioning jobs are written under ``MODALINK_JOBS_DIR/playground/``, which the workers share.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from modalink import MODALITIES, client
from modalink.aio import iterate_in_thread
from modalink.config import Settings, get_settings
from modalink.errors import HTTP_STATUS, InputError, status_of
from modalink.remote import parse_addresses

log = logging.getLogger("modalink.playground")
STATIC = Path(__file__).parent / "static"
EXTENSIONS = {
    "image": (".png", ".jpg", ".jpeg", ".webp", ".bmp"),
    "audio": (".wav", ".flac", ".ogg"),
    "imu": (".npy", ".csv"),
    "video": (".gif", ".mp4", ".webm", ".mov"),
}
MAIN_METRICS = ("val_accuracy", "accuracy", "val_loss")  # the first one a version has is plotted
MAX_BODY_BYTES = 64 << 20


def modality_of(name: str) -> str:
    suffix = Path(name).suffix.lower()
    for modality, suffixes in EXTENSIONS.items():
        if suffix in suffixes:
            return modality
    known = ", ".join(s for ss in EXTENSIONS.values() for s in ss)
    raise InputError(f"{name}: unknown file type {suffix or '(none)'}; expected one of {known}")


def decode_b64(data: str, what: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise InputError(f"{what}: data is not valid base64") from None


def media_part(kind: str, name: str, raw: bytes):
    """A gateway Part for an uploaded file (IMU files are decoded here: the API takes an array)."""
    if kind == "image":
        return client.image(raw)
    if kind == "audio":
        return client.audio(raw)
    if kind == "video":
        return client.video(raw)
    if kind == "imu":
        return client.imu(imu_array(name, raw))
    raise InputError(f"unknown part type {kind!r}; expected text, image, audio, imu or video")


def imu_array(name: str, raw: bytes) -> np.ndarray:
    from modalink.encoders.imu import decode_imu

    return decode_imu(raw, get_settings().imu_channels).numpy()


def media_of(p, where: str):
    """A gateway Part from the page's ``{type, name, data (base64)}``."""
    if not isinstance(p, dict) or not isinstance(p.get("type"), str):
        raise InputError(f"{where}: expected an object with a type")
    name = str(p.get("name") or p["type"])
    return media_part(p["type"], name, decode_b64(p.get("data") or "", f"{where} ({name})"))


def parse_chat(body: dict) -> tuple[list, list[tuple[str, str]], dict]:
    """(parts, history, generation kwargs) from the page's request; InputError names what is wrong."""
    if not isinstance(body, dict):
        raise InputError("request body must be a JSON object")
    parts = []
    for i, p in enumerate(body.get("parts") or []):
        is_text = isinstance(p, dict) and p.get("type") == "text"
        parts.append(str(p.get("text") or "") if is_text else media_of(p, f"parts[{i}]"))
    history = []
    for i, t in enumerate(body.get("history") or []):
        if not isinstance(t, dict) or t.get("role") not in ("user", "assistant") or not isinstance(t.get("text"), str):
            raise InputError(f"history[{i}]: expected {{role: user|assistant, text, media?}}")
        history.append((t["role"], t["text"], [media_of(p, f"history[{i}].media[{j}]")
                                               for j, p in enumerate(t.get("media") or [])]))  # fmt: skip
    try:
        params = {"max_new_tokens": int(body.get("max_new_tokens") or 128),
                  "temperature": float(body.get("temperature") or 0.0)}  # fmt: skip
    except (TypeError, ValueError):
        raise InputError("max_new_tokens must be an integer and temperature a number") from None
    return parts, history, params


def error_response(e: Exception) -> JSONResponse:
    """The gateway's status (or the playground's own error) as an HTTP status, with its message; the page shows
    the message."""
    if isinstance(e, grpc.RpcError) and hasattr(e, "code"):
        code, message = e.code().name, e.details() or e.code().name
        if code == "UNAVAILABLE" and "failed to connect" in message.lower():
            message = "the gateway is unreachable"
    else:
        code, message = status_of(e)
        if code == "INTERNAL":
            log.error("playground request failed", exc_info=e)
    return JSONResponse({"error": message, "code": code}, status_code=HTTP_STATUS.get(code, 502))


def event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def build_app(gateway: str, settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(title="modalink playground")
    jobs_root = settings.jobs_dir / "playground"

    def gateway_client(request: Request) -> client.Client:
        return client.Client(gateway, api_key=request.headers.get("x-api-key") or None, timeout=300)

    async def body_json(request: Request) -> dict:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise InputError(f"request of {len(raw)} bytes exceeds the limit of {MAX_BODY_BYTES}")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise InputError(f"request body is not JSON: {e}") from None

    async def call(request: Request, fn):
        """Run a blocking gateway call off the event loop; errors become JSON with an HTTP status."""
        try:
            with gateway_client(request) as c:
                return JSONResponse(await asyncio.to_thread(fn, c))
        except Exception as e:  # noqa: BLE001
            return error_response(e)

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/health")
    async def health():
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        def check() -> str:
            with grpc.insecure_channel(gateway) as ch:
                try:
                    res = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
                    return health_pb2.HealthCheckResponse.ServingStatus.Name(res.status)
                except grpc.RpcError:
                    return "UNREACHABLE"

        modalities = [m for m in MODALITIES if m in parse_addresses(settings.encoders)]
        return {"gateway": await asyncio.to_thread(check), "address": gateway, "modalities": modalities}

    @app.post("/api/chat")
    async def chat(request: Request):
        try:
            parts, history, params = parse_chat(await body_json(request))
        except InputError as e:
            return error_response(e)
        c = gateway_client(request)

        def stream() -> Iterator[str]:
            t0, ttft = time.perf_counter(), None
            try:
                for delta in c.generate(parts, history=history, **params):
                    ttft = ttft or (time.perf_counter() - t0) * 1000
                    yield event({"delta": delta})
                last = c.last
                usage = {"prompt_tokens": last.usage.prompt_tokens, "completion_tokens": last.usage.completion_tokens}
                yield event({"done": True, "finish_reason": last.finish_reason, "adapter_versions": c.versions,
                             "ttft_ms": round(ttft or (time.perf_counter() - t0) * 1000, 1),
                             "total_ms": round((time.perf_counter() - t0) * 1000, 1), "usage": usage})  # fmt: skip
            except Exception as e:  # noqa: BLE001  (after the headers went out: an error event)
                yield event(json.loads(error_response(e).body))
            finally:
                c.close()

        return StreamingResponse(iterate_in_thread(stream()), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip

    @app.post("/api/imu/preview")
    async def imu_preview(request: Request):
        try:
            body = await body_json(request)
            name = str(body.get("name") or "imu.npy")
            arr = imu_array(name, decode_b64(body.get("data") or "", name))
        except InputError as e:
            return error_response(e)
        step = max(1, arr.shape[1] // 600)
        labels = ["acc x", "acc y", "acc z", "gyro x", "gyro y", "gyro z"][: arr.shape[0]]
        return {"channels": arr[:, ::step].round(4).tolist(), "labels": labels, "steps": int(arr.shape[1])}

    @app.post("/api/jobs")
    async def submit_job(request: Request):
        try:
            body = await body_json(request)
            rows = job_rows(body, jobs_root)
        except InputError as e:
            return error_response(e)
        manifest = "".join(json.dumps(r) + "\n" for r in rows)
        batch = int(body.get("batch_size") or 0)
        prompt = str(body.get("prompt") or "")
        return await call(request, lambda c: c.submit_caption_job(manifest_jsonl=manifest, batch_size=batch,
                                                                   prompt=prompt))  # fmt: skip

    @app.get("/api/jobs/{job_id}")
    async def job(job_id: str, request: Request):
        return await call(request, lambda c: c.job(job_id))

    @app.post("/api/jobs/{job_id}/cancel")
    async def cancel(job_id: str, request: Request):
        return await call(request, lambda c: c.cancel_job(job_id))

    @app.get("/api/jobs/{job_id}/results")
    async def results(job_id: str, request: Request):
        try:
            with gateway_client(request) as c:
                job = await asyncio.to_thread(c.job, job_id)
        except Exception as e:  # noqa: BLE001
            return error_response(e)
        path = Path(job["results"])
        if job["state"] == "running" or not path.is_file():
            return JSONResponse({"error": f"job {job_id} is {job['state']}; no results file yet", "code": "NOT_FOUND"},
                                status_code=404)  # fmt: skip
        if not path.resolve().is_relative_to(settings.jobs_dir.resolve()):  # only what this app may serve
            return JSONResponse({"error": "results are outside the jobs dir", "code": "PERMISSION_DENIED"}, 403)
        return FileResponse(path, media_type="application/jsonl", filename=f"{job_id}.captions.jsonl")

    @app.get("/api/adapters")
    async def adapters(request: Request):
        return await call(request, lambda c: with_main_metric(c.adapters()))

    @app.post("/api/adapters/{modality}/promote")
    async def promote(modality: str, request: Request):
        try:
            version = str((await body_json(request)).get("version") or "")
        except InputError as e:
            return error_response(e)
        return await call(request, lambda c: with_main_metric(c.promote(modality, version)))

    @app.post("/api/adapters/{modality}/rollback")
    async def rollback(modality: str, request: Request):
        return await call(request, lambda c: with_main_metric(c.promote(modality, rollback=True)))

    return app


def job_rows(body: dict, jobs_root: Path) -> list[dict]:
    """Write the uploaded files into a new folder under the jobs dir; manifest rows for them (and for the
    uploaded manifest's rows, whose relative paths name uploaded files)."""
    files = body.get("files") or []
    manifest = str(body.get("manifest") or "")
    if not files and not manifest.strip():
        raise InputError("upload some files or a manifest")
    folder = jobs_root / uuid.uuid4().hex[:12]
    rel = folder.relative_to(jobs_root.parent)
    rows, names = [], set()
    for i, f in enumerate(files):
        name = Path(str(f.get("name") or f"file{i}")).name  # no folders: nothing lands outside the job's folder
        if not name or name in names:
            raise InputError(f"files[{i}]: file names must be unique and not empty, got {name!r}")
        names.add(name)
        raw = decode_b64(f.get("data") or "", name)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(raw)
        if not manifest.strip():
            rows.append({"id": name, "modality": modality_of(name), "path": str(rel / name)})
    if manifest.strip():
        from modalink.jobs import parse_manifest

        rows = parse_manifest(manifest, folder, "manifest")  # relative paths name the uploaded files
    return rows


def with_main_metric(table: dict) -> dict:
    """The adapters table plus, per modality, the metric the page plots across versions."""
    out = {}
    for m, entry in table.items():
        names = {k for v in entry["versions"] for k in v["metrics"]}
        main = next((k for k in MAIN_METRICS if k in names), "")
        out[m] = {**entry, "main_metric": main}
    return {"modalities": out}


def serve(gateway: str = "localhost:50051", port: int = 7860, host: str = "0.0.0.0") -> None:
    import uvicorn

    log.info("playground on http://%s:%d (gateway %s)", host, port, gateway)
    uvicorn.run(build_app(gateway), host=host, port=port, log_level="warning")
