"""Playground: chat with images, audio, IMU and video in a browser, run captioning jobs, manage adapters.

    modalink serve playground [--port 7860 --gateway localhost:50051]

A static page (``static/``: plain HTML/JS, no build step, nothing fetched from outside) over a small JSON API
that is a client of the gateway like any other: every call goes through ``modalink_client`` over gRPC with
the API key the page sends (``x-api-key``), and nothing else of modalink is imported (fastapi, numpy and the
standard library besides). Answers stream to the page as server-sent events. Files for captioning jobs are written
under ``<jobs dir>/playground/``, which the gateway and the workers share; the gateway checks the manifests.
``modalink serve playground`` passes the settings it needs (jobs dir, encoder modalities, IMU channels) and the
plugin modalities' specs (``plugins``: file types and input), since this process does not import their packages.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import modalink_client as client
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from modalink_client import HTTP_STATUS, call_status, imu_array
from modalink_client.options import INTERNAL_MESSAGE

log = logging.getLogger("modalink.playground")
STATIC = Path(__file__).parent / "static"
EXTENSIONS = {
    "image": (".png", ".jpg", ".jpeg", ".webp", ".bmp"),
    "audio": (".wav", ".flac", ".ogg"),
    "imu": (".npy", ".csv"),
    "video": (".gif", ".mp4", ".webm", ".mov"),
}
MODALITIES = tuple(EXTENSIONS)
NAME_RE = re.compile(r"[a-z][a-z0-9]{0,31}")  # a modality's name (modalink.modality.NAME_RE)
MAIN_METRICS = ("val_accuracy", "accuracy", "val_loss")  # the first one a version has is plotted
MAX_BODY_BYTES = 64 << 20


class BadRequest(ValueError):
    """The page's request is unusable (INVALID_ARGUMENT, 400); the message says why."""


def check_plugins(plugins: Mapping[str, Mapping] | None) -> dict[str, dict]:
    """The plugin modalities' specs in the form ``media_part`` reads; a malformed one fails at start (ValueError)
    rather than on the first upload."""
    out = {}
    for name, spec in (plugins or {}).items():
        if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name in (*MODALITIES, "text"):
            raise ValueError(f"plugin modality {name!r}: not a lower-case identifier, or a built-in's name")
        types = tuple(str(s).lower() for s in spec.get("file_types") or ())
        if not all(len(s) > 1 and s.startswith(".") for s in types):
            raise ValueError(f"plugin modality {name!r}: file_types must be suffixes such as '.npy', got {types}")
        if (kind := spec.get("input", "file")) not in ("file", "tensor"):
            raise ValueError(f"plugin modality {name!r}: input must be file or tensor, got {kind!r}")
        rank = spec.get("tensor_rank", 2)
        if not isinstance(rank, int) or not 1 <= rank <= 8:
            raise ValueError(f"plugin modality {name!r}: tensor_rank must be an integer from 1 to 8, got {rank!r}")
        out[name] = {"file_types": types, "input": kind, "tensor_rank": rank, "mime": str(spec.get("mime") or "")}
    return out


def file_types(plugins: Mapping[str, Mapping] | None = None) -> dict[str, tuple[str, ...]]:
    """Every modality's file suffixes: the built-ins', then the plugins'."""
    return {**EXTENSIONS, **{m: tuple(p.get("file_types") or ()) for m, p in (plugins or {}).items()}}


def modality_of(name: str, plugins: Mapping[str, Mapping] | None = None, running: Sequence[str] = ()) -> str:
    """A file's modality by its suffix. A suffix that several take (``.npy``: IMU and tensor plugins) goes to the
    first of them whose encoder is ``running``, else to the first (a job's manifest can name another)."""
    suffix = Path(name).suffix.lower()
    kinds = [m for m, suffixes in file_types(plugins).items() if suffix in suffixes]
    if kinds:
        return next((m for m in kinds if m in running), kinds[0])
    known = ", ".join(dict.fromkeys(s for ss in file_types(plugins).values() for s in ss))
    raise BadRequest(f"{name}: unknown file type {suffix or '(none)'}; expected one of {known}")


def decode_b64(data: str, what: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise BadRequest(f"{what}: data is not valid base64") from None


def media_part(kind: str, name: str, raw: bytes, imu_channels: int = 6, plugins: Mapping[str, Mapping] | None = None):
    """A gateway Part for an uploaded file (IMU files and tensor plugins' .npy are decoded here: the API takes an
    array); ``plugins``: the plugin modalities' specs (``check_plugins``)."""
    if kind == "image":
        return client.image(raw)
    if kind == "audio":
        return client.audio(raw)
    if kind == "video":
        return client.video(raw)
    if kind == "imu":
        return client.imu(imu_window(raw, imu_channels))
    if (spec := (plugins or {}).get(kind)) is not None:
        if spec.get("input") == "tensor":
            return client.media(kind, npy_tensor(raw, f"{name} ({kind})", spec.get("tensor_rank", 2)))
        return client.media(kind, raw, spec.get("mime") or "")
    expected = ", ".join(["text", *MODALITIES, *(plugins or {})])
    raise BadRequest(f"unknown part type {kind!r}; expected one of {expected}")


def npy_tensor(raw: bytes, what: str, rank: int) -> np.ndarray:
    """A tensor plugin's .npy upload as float32, checked before it goes out by the client package's reader (never
    unpickled; its header checked against the bytes that follow it before anything is allocated), then for
    emptiness and finiteness in float32."""
    try:
        arr = client.load_npy(raw, what, rank, f" ({rank} axes)")
    except ValueError as e:
        raise BadRequest(str(e)) from None
    if arr.size == 0:
        raise BadRequest(f"{what}: the array is empty (shape {list(arr.shape)})")
    with np.errstate(over="ignore"):  # out of float32's range: refused just below, as infinite
        arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():  # after float32: 1e300 is finite in float64 only
        raise BadRequest(f"{what}: the array has NaN or infinite values (in float32)")
    return arr


def imu_window(raw: bytes, channels: int) -> np.ndarray:
    """An IMU file's [channels, time] window, checked as the IMU encoder checks it (``modalink_client.imu_array``)."""
    try:
        return imu_array(raw, channels)
    except ValueError as e:
        raise BadRequest(str(e)) from None


def media_of(p, where: str, imu_channels: int = 6, plugins: Mapping[str, Mapping] | None = None):
    """A gateway Part from the page's ``{type, name, data (base64)}``."""
    if not isinstance(p, dict) or not isinstance(p.get("type"), str):
        raise BadRequest(f"{where}: expected an object with a type")
    name = str(p.get("name") or p["type"])
    return media_part(p["type"], name, decode_b64(p.get("data") or "", f"{where} ({name})"), imu_channels, plugins)


def parse_chat(
    body: dict, imu_channels: int = 6, plugins: Mapping[str, Mapping] | None = None
) -> tuple[list, list[tuple[str, str]], dict]:
    """(parts, history, generation kwargs) from the page's request; BadRequest names what is wrong."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    parts = []
    for i, p in enumerate(body.get("parts") or []):
        is_text = isinstance(p, dict) and p.get("type") == "text"
        parts.append(str(p.get("text") or "") if is_text else media_of(p, f"parts[{i}]", imu_channels, plugins))
    history = []
    for i, t in enumerate(body.get("history") or []):
        if not isinstance(t, dict) or t.get("role") not in ("user", "assistant") or not isinstance(t.get("text"), str):
            raise BadRequest(f"history[{i}]: expected {{role: user|assistant, text, media?}}")
        history.append((t["role"], t["text"], [media_of(p, f"history[{i}].media[{j}]", imu_channels, plugins)
                                               for j, p in enumerate(t.get("media") or [])]))  # fmt: skip
    try:
        params = {"max_new_tokens": int(body.get("max_new_tokens") or 128),
                  "temperature": float(body.get("temperature") or 0.0)}  # fmt: skip
    except (TypeError, ValueError):
        raise BadRequest("max_new_tokens must be an integer and temperature a number") from None
    return parts, history, params


def error_response(e: Exception) -> JSONResponse:
    """The gateway's status (or the playground's own error) as an HTTP status, with its message; the page shows
    the message."""
    if called := call_status(e):
        code, message = called
        if code == "UNAVAILABLE" and "failed to connect" in message.lower():
            message = "the gateway is unreachable"
    elif isinstance(e, BadRequest):
        code, message = "INVALID_ARGUMENT", str(e)
    else:
        code, message = "INTERNAL", INTERNAL_MESSAGE
        log.error("playground request failed", exc_info=e)
    return JSONResponse({"error": message, "code": code}, status_code=HTTP_STATUS.get(code, 502))


def event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def build_app(
    gateway: str,
    jobs_dir: Path,
    modalities: Sequence[str] | None = None,
    imu_channels: int = 6,
    plugins: Mapping[str, Mapping] | None = None,
) -> FastAPI:
    """``jobs_dir``: the gateway's (``MODALINK_JOBS_DIR``, shared); ``modalities``: those with an encoder service
    (the page says which it cannot send; default: all); ``imu_channels``: what the IMU encoder takes
    (``MODALINK_IMU_CHANNELS``); ``plugins``: the plugin modalities, ``{name: {file_types, input, tensor_rank}}``."""
    plugins = check_plugins(plugins)
    modalities = list((*MODALITIES, *plugins) if modalities is None else modalities)
    app = FastAPI(title="modalink playground")
    jobs_dir = Path(jobs_dir)
    jobs_root = jobs_dir / "playground"

    def gateway_client(request: Request) -> client.Client:
        return client.Client(gateway, api_key=request.headers.get("x-api-key") or None, timeout=300)

    async def body_json(request: Request) -> dict:
        """The JSON body, read no further than MAX_BODY_BYTES: a declared length over it is refused unread, a
        streamed (chunked) body as soon as it passes it (as ``modalink.aio.read_json`` does on the services)."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise BadRequest(f"request body of {declared} bytes exceeds the limit of {MAX_BODY_BYTES}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise BadRequest(f"request body exceeds the limit of {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"request body is not JSON: {e}") from None

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
        def check() -> str:
            with client.Client(gateway) as c:
                return c.health(timeout=2)

        return {"gateway": await asyncio.to_thread(check), "address": gateway, "modalities": modalities,
                "file_types": {m: list(p["file_types"]) for m, p in plugins.items()}}  # fmt: skip

    @app.post("/api/chat")
    async def chat(request: Request):
        try:
            parts, history, params = parse_chat(await body_json(request), imu_channels, plugins)
        except BadRequest as e:
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

        # a blocking iterator: Starlette takes each event from it in a worker thread, off the event loop
        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip

    @app.post("/api/imu/preview")
    async def imu_preview(request: Request):
        try:
            body = await body_json(request)
            name = str(body.get("name") or "imu.npy")
            arr = imu_window(decode_b64(body.get("data") or "", name), imu_channels)
        except BadRequest as e:
            return error_response(e)
        step = max(1, arr.shape[1] // 600)
        labels = ["acc x", "acc y", "acc z", "gyro x", "gyro y", "gyro z"][: arr.shape[0]]
        return {"channels": arr[:, ::step].round(4).tolist(), "labels": labels, "steps": int(arr.shape[1])}

    @app.post("/api/jobs")
    async def submit_job(request: Request):
        try:
            body = await body_json(request)
            rows = job_rows(body, jobs_root, plugins, modalities)
        except BadRequest as e:
            return error_response(e)
        manifest = "".join(r + "\n" for r in rows)
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
        if not path.resolve().is_relative_to(jobs_dir.resolve()):  # only what this app may serve
            return JSONResponse({"error": "results are outside the jobs dir", "code": "PERMISSION_DENIED"}, 403)
        return FileResponse(path, media_type="application/jsonl", filename=f"{job_id}.captions.jsonl")

    @app.get("/api/adapters")
    async def adapters(request: Request):
        return await call(request, lambda c: with_main_metric(c.adapters()))

    @app.post("/api/adapters/{modality}/promote")
    async def promote(modality: str, request: Request):
        try:
            version = str((await body_json(request)).get("version") or "")
        except BadRequest as e:
            return error_response(e)
        return await call(request, lambda c: with_main_metric(c.promote(modality, version)))

    @app.post("/api/adapters/{modality}/rollback")
    async def rollback(modality: str, request: Request):
        return await call(request, lambda c: with_main_metric(c.promote(modality, rollback=True)))

    return app


def job_rows(
    body: dict, jobs_root: Path, plugins: Mapping[str, Mapping] | None = None, running: Sequence[str] = ()
) -> list[str]:
    """Write the uploaded files into a new folder under the jobs dir; the job's manifest lines: one per file (its
    modality by ``modality_of``), or the uploaded manifest's, whose relative paths name uploaded files (the gateway
    checks the manifest)."""
    files = body.get("files") or []
    manifest = str(body.get("manifest") or "")
    if not files and not manifest.strip():
        raise BadRequest("upload some files or a manifest")
    folder = jobs_root / uuid.uuid4().hex[:12]
    rel = folder.relative_to(jobs_root.parent)
    rows, names = [], set()
    for i, f in enumerate(files):
        name = Path(str(f.get("name") or f"file{i}")).name  # no folders: nothing lands outside the job's folder
        if not name or name in names:
            raise BadRequest(f"files[{i}]: file names must be unique and not empty, got {name!r}")
        names.add(name)
        raw = decode_b64(f.get("data") or "", name)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(raw)
        if not manifest.strip():
            modality = modality_of(name, plugins, running)
            rows.append(json.dumps({"id": name, "modality": modality, "path": str(rel / name)}))
    if manifest.strip():
        rows = [in_folder(line, folder) for line in manifest.splitlines()]
    return rows


def in_folder(line: str, folder: Path) -> str:
    """A manifest line with its relative ``path`` made absolute in ``folder`` (where the uploaded files are); any
    other line as it is, for the gateway to accept or refuse (by its line number, which this keeps)."""
    try:
        row = json.loads(line)
    except ValueError:
        return line
    if not isinstance(row, dict) or not isinstance(row.get("path"), str):
        return line
    try:
        row["path"] = str((folder / row["path"]).resolve())
    except ValueError:  # a NUL byte: the gateway says so
        return line
    return json.dumps(row)


def with_main_metric(table: dict) -> dict:
    """The adapters table plus, per modality, the metric the page plots across versions."""
    out = {}
    for m, entry in table.items():
        names = {k for v in entry["versions"] for k in v["metrics"]}
        main = next((k for k in MAIN_METRICS if k in names), "")
        out[m] = {**entry, "main_metric": main}
    return {"modalities": out}


def serve(
    gateway: str,
    port: int,
    host: str,
    jobs_dir: Path,
    modalities: Sequence[str],
    imu_channels: int,
    plugins: Mapping[str, Mapping] | None = None,
) -> None:
    """Serve the page until stopped (``modalink serve playground`` passes its options, the settings and the plugin
    modalities' specs)."""
    import uvicorn

    app = build_app(gateway, jobs_dir, modalities, imu_channels, plugins)
    log.info("playground on http://%s:%d (gateway %s)", host, port, gateway)
    uvicorn.run(app, host=host, port=port, log_level="warning")
