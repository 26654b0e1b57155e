"""The gateway's gRPC API (``modalink.v1.Assistant``) from Python, blocking (``Client``) and asyncio
(``AsyncClient``). Calls carry a deadline, are retried on UNAVAILABLE (gRPC retry policy, before any response
arrived), and send ``x-api-key`` metadata when an API key is set."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from modalink_client.convert import from_tensor_msg, params_to_msg, to_tensor_msg
from modalink_client.options import CLIENT_OPTIONS, DEFAULT_ADDRESS
from modalink_client.v1 import assistant_pb2, assistant_pb2_grpc, common_pb2

PartLike = common_pb2.Part | str
# grpc.health.v1.HealthCheckResponse.ServingStatus, by number
HEALTH_STATUS = ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")

# Earlier turns, oldest first: (role "user" | "assistant", text), or (role, text, that user turn's media parts).
Turns = Sequence[tuple]


def _bytes(src: str | Path | bytes) -> bytes:
    return src if isinstance(src, bytes) else Path(src).read_bytes()


def image(src: str | Path | bytes, mime: str = "") -> common_pb2.Part:
    """An image file (PNG, JPEG, ...) as a path or its bytes."""
    return common_pb2.Part(image=common_pb2.Image(data=_bytes(src), mime=mime))


def audio(src: str | Path | bytes | np.ndarray, sample_rate: int = 16000, mime: str = "") -> common_pb2.Part:
    """An audio file (path/bytes), or PCM samples (float32 [n] or [channels, n]) at ``sample_rate``."""
    if isinstance(src, np.ndarray):
        pcm = to_tensor_msg(src.astype(np.float32))
        return common_pb2.Part(audio=common_pb2.Audio(pcm=pcm, sample_rate=sample_rate))
    return common_pb2.Part(audio=common_pb2.Audio(data=_bytes(src), mime=mime))


def imu(src: str | Path | np.ndarray) -> common_pb2.Part:
    """IMU window float32 [channels, time], or a .npy file of one."""
    arr = src if isinstance(src, np.ndarray) else np.load(src, allow_pickle=False)
    return common_pb2.Part(imu=common_pb2.Imu(data=to_tensor_msg(np.asarray(arr, dtype=np.float32))))


def video(src: str | Path | bytes | Sequence[str | Path | bytes], mime: str = "") -> common_pb2.Part:
    """A video file (GIF/MP4/WebM), or its frames as image files/bytes in order."""
    if isinstance(src, (list, tuple)):
        return common_pb2.Part(video=common_pb2.Video(frames=[common_pb2.Image(data=_bytes(f)) for f in src]))
    return common_pb2.Part(video=common_pb2.Video(data=_bytes(src), mime=mime))


def media(modality: str, src: str | Path | bytes | np.ndarray, mime: str = "") -> common_pb2.Part:
    """Media of any modality the gateway has, by name (a plugin's, e.g. ``"power"``): an array (or a ``.npy`` file)
    for a modality that takes a tensor, else a file as a path or its bytes."""
    if isinstance(src, np.ndarray) or (isinstance(src, (str, Path)) and str(src).endswith(".npy")):
        arr = src if isinstance(src, np.ndarray) else np.load(src, allow_pickle=False)
        tensor = to_tensor_msg(np.asarray(arr, dtype=np.float32))
        return common_pb2.Part(media=common_pb2.Media(modality=modality, tensor=tensor))
    return common_pb2.Part(media=common_pb2.Media(modality=modality, data=_bytes(src), mime=mime))


def _part(p) -> common_pb2.Part:
    if isinstance(p, str):
        return common_pb2.Part(text=p)
    if isinstance(p, common_pb2.Part):
        return p
    if getattr(getattr(p, "DESCRIPTOR", None), "full_name", None) == "modalink.v1.Part":
        return common_pb2.Part.FromString(p.SerializeToString())  # a Part of other stubs of the same contract
    raise TypeError(f"a part is a str or a modalink.v1.Part (image(), audio(), ...), got {type(p).__name__}")


def _parts(parts: Sequence[PartLike] | PartLike) -> list[common_pb2.Part]:
    if isinstance(parts, str) or hasattr(parts, "DESCRIPTOR"):
        parts = [parts]
    return [_part(p) for p in parts]


def _request(parts, params: Any = None, history: Turns = (), **kw) -> assistant_pb2.GenerateRequest:
    turns = [assistant_pb2.Turn(role=t[0], text=t[1], media=_parts(t[2]) if len(t) > 2 else []) for t in history]
    return assistant_pb2.GenerateRequest(parts=_parts(parts), params=params_to_msg(params, **kw), history=turns)


def job_dict(job: assistant_pb2.Job) -> dict:
    """A job's state as plain data."""
    return {"job_id": job.job_id, "state": job.state, "total": job.total, "done": job.done, "errors": job.errors,
            "progress": round(job.progress, 4), "results": job.results, "items": dict(job.items)}  # fmt: skip


def adapters_dict(msg: assistant_pb2.AdapterList) -> dict:
    """{modality: {"current", "versions": [{"version", "current", "metrics"}]}}, versions oldest first."""
    return {m: {"current": a.current, "versions": [{"version": v.version, "current": v.current,
                                                    "metrics": dict(v.metrics)} for v in a.versions]}
            for m, a in sorted(msg.modalities.items())}  # fmt: skip


def call_status(e: BaseException) -> tuple[str, str] | None:
    """(gRPC status name, message) of a failed call (a ``grpc.RpcError``), else None: what an HTTP front end of the
    gateway answers with (``modalink_client.options.HTTP_STATUS``)."""
    if not (isinstance(e, grpc.RpcError) and hasattr(e, "code")):
        return None
    return e.code().name, e.details() or e.code().name


@dataclass
class Embedding:
    embeddings: np.ndarray  # float32 [n_tokens, d_llm]
    adapter_version: str
    modality: str


class _Base:
    def __init__(self, address: str = DEFAULT_ADDRESS, api_key: str | None = None, timeout: float = 120.0):
        self.address, self.timeout = address, timeout
        self.metadata = (("x-api-key", api_key),) if api_key else ()
        self.options = list(CLIENT_OPTIONS)


class Client(_Base):
    """Blocking client; ``generate`` yields text deltas as they are generated."""

    def __init__(self, address: str = DEFAULT_ADDRESS, api_key: str | None = None, timeout: float = 120.0):
        super().__init__(address, api_key, timeout)
        self.channel = grpc.insecure_channel(address, options=self.options)
        self.stub = assistant_pb2_grpc.AssistantStub(self.channel)
        self.last: assistant_pb2.GenerateResponse | None = None  # the final message (finish_reason, usage)
        self.versions: dict[str, str] = {}  # adapter versions the last generate used

    def generate(self, parts, params: Any = None, **kw) -> Iterator[str]:
        """Text deltas. Generation parameters as keywords (max_new_tokens=32, temperature, top_p, top_k,
        repetition_penalty, stop, seed) or ``params`` (an object with those attributes, such as
        ``modalink.engine.GenerationParams``); ``history=[("user", "..."), ("assistant", "...")]`` continues a
        conversation."""
        call = self.stub.Generate(_request(parts, params, **kw), timeout=self.timeout, metadata=self.metadata)
        try:
            for msg in call:
                self.last = msg
                if msg.adapter_versions:
                    self.versions = dict(msg.adapter_versions)
                if msg.text:
                    yield msg.text
        finally:
            call.cancel()  # a caller that stops reading stops the generation

    def ask(self, parts, params: Any = None, **kw) -> str:
        return "".join(self.generate(parts, params, **kw))

    def embed(self, part: common_pb2.Part) -> Embedding:
        req = assistant_pb2.EmbedRequest(part=_part(part))
        res = self.stub.Embed(req, timeout=self.timeout, metadata=self.metadata)
        return Embedding(from_tensor_msg(res.embeddings, "embeddings"), res.adapter_version, res.modality)

    def caption(self, part: common_pb2.Part, max_new_tokens: int = 48) -> str:
        params = common_pb2.GenerationParams(max_new_tokens=max_new_tokens)
        req = assistant_pb2.CaptionRequest(part=_part(part), params=params)
        return self.stub.Caption(req, timeout=self.timeout, metadata=self.metadata).caption

    # -- offline captioning jobs -------------------------------------------------------------------------------
    def submit_caption_job(self, manifest_jsonl: str = "", manifest_path: str = "", batch_size: int = 0,
                           prompt: str = "", max_new_tokens: int = 0) -> dict:  # fmt: skip
        """Queue a job from JSONL rows (paths relative to the gateway's jobs dir) or a manifest file it can read."""
        req = assistant_pb2.SubmitCaptionJobRequest(
            prompt=prompt, batch_size=batch_size, params=common_pb2.GenerationParams(max_new_tokens=max_new_tokens),
            **({"manifest_jsonl": manifest_jsonl} if manifest_jsonl else {"manifest_path": manifest_path}),
        )  # fmt: skip
        return job_dict(self.stub.SubmitCaptionJob(req, timeout=self.timeout, metadata=self.metadata))

    def job(self, job_id: str) -> dict:
        req = assistant_pb2.JobRequest(job_id=job_id)
        return job_dict(self.stub.GetJob(req, timeout=self.timeout, metadata=self.metadata))

    def cancel_job(self, job_id: str) -> dict:
        req = assistant_pb2.JobRequest(job_id=job_id)
        return job_dict(self.stub.CancelJob(req, timeout=self.timeout, metadata=self.metadata))

    # -- the adapter registry ----------------------------------------------------------------------------------
    def adapters(self, modality: str = "") -> dict:
        req = assistant_pb2.ListAdaptersRequest(modality=modality)
        return adapters_dict(self.stub.ListAdapters(req, timeout=self.timeout, metadata=self.metadata))

    def promote(self, modality: str, version: str = "", rollback: bool = False) -> dict:
        """Make ``version`` current (or roll back); the gateway needs an API key configured and sent."""
        req = assistant_pb2.PromoteAdapterRequest(modality=modality, version=version, rollback=rollback)
        return adapters_dict(self.stub.PromoteAdapter(req, timeout=self.timeout, metadata=self.metadata))

    def health(self, timeout: float = 2.0) -> str:
        """The gateway's gRPC health (``grpc.health.v1``): "SERVING", "NOT_SERVING", ...; "UNREACHABLE" when it does
        not answer. (Bytes on the wire: the request is empty and the answer one enum field, so no extra stubs.)"""
        check = self.channel.unary_unary("/grpc.health.v1.Health/Check")
        try:
            raw = check(b"", timeout=timeout, metadata=self.metadata)
        except grpc.RpcError:
            return "UNREACHABLE"
        status = raw[1] if len(raw) > 1 and raw[0] == 0x08 else 0  # field 1, varint; absent: 0 (UNKNOWN)
        return HEALTH_STATUS[status] if status < len(HEALTH_STATUS) else str(status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Base):
    """asyncio client (grpc.aio): ``async for delta in client.generate([...])``."""

    def __init__(self, address: str = DEFAULT_ADDRESS, api_key: str | None = None, timeout: float = 120.0):
        super().__init__(address, api_key, timeout)
        self.channel = grpc.aio.insecure_channel(address, options=self.options)
        self.stub = assistant_pb2_grpc.AssistantStub(self.channel)

    async def generate(self, parts, params: Any = None, **kw) -> AsyncIterator[str]:
        call = self.stub.Generate(_request(parts, params, **kw), timeout=self.timeout, metadata=self.metadata)
        try:
            async for msg in call:
                if msg.text:
                    yield msg.text
        finally:
            call.cancel()

    async def ask(self, parts, params: Any = None, **kw) -> str:
        return "".join([d async for d in self.generate(parts, params, **kw)])

    async def embed(self, part: common_pb2.Part) -> Embedding:
        req = assistant_pb2.EmbedRequest(part=_part(part))
        res = await self.stub.Embed(req, timeout=self.timeout, metadata=self.metadata)
        return Embedding(from_tensor_msg(res.embeddings, "embeddings"), res.adapter_version, res.modality)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
