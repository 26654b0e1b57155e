"""Conversions between the protobuf contracts (``protos/modalink/v1``) and the library's types.

Every service and the client go through here, so a tensor or a part is checked the same way
everywhere: dtype from a short list, shape against the byte count, a size limit, finite values.
Tensors are raw little-endian bytes; nothing is ever unpickled.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from modalink.engine import GenerationParams
from modalink.errors import InputError

try:
    from modalink.v1 import assistant_pb2, common_pb2, llm_pb2
except ImportError as e:  # pragma: no cover - depends on the build step
    raise ImportError("gRPC stubs are missing: run `make stubs` (python -m grpc_tools.protoc, see the Makefile)") from e

__all__ = ["assistant_pb2", "common_pb2", "llm_pb2"]

DTYPES = {"float32": "<f4", "float16": "<f2", "float64": "<f8", "int64": "<i8", "int32": "<i4", "uint8": "u1"}
MAX_TENSOR_BYTES = 256 << 20


def to_tensor_msg(x: np.ndarray | torch.Tensor) -> common_pb2.Tensor:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    name = arr.dtype.name
    if name not in DTYPES:
        raise InputError(f"tensor dtype {name} not supported; use one of {', '.join(DTYPES)}")
    data = np.ascontiguousarray(arr, dtype=np.dtype(DTYPES[name])).tobytes()
    return common_pb2.Tensor(dtype=name, shape=list(arr.shape), data=data)


def from_tensor_msg(
    msg: common_pb2.Tensor, what: str = "tensor", dtypes: Sequence[str] = ("float32",), ndim: int | None = None
) -> np.ndarray:
    """A checked numpy array from a Tensor message; InputError says what is wrong."""
    if msg.dtype not in dtypes:
        raise InputError(f"{what}: dtype must be {' or '.join(dtypes)}, got {msg.dtype or '(empty)'!r}")
    shape = tuple(int(d) for d in msg.shape)
    if ndim is not None and len(shape) != ndim:
        raise InputError(f"{what}: expected {ndim} dimensions, got shape {list(shape)}")
    if any(d < 0 for d in shape):
        raise InputError(f"{what}: negative dimension in shape {list(shape)}")
    if len(msg.data) > MAX_TENSOR_BYTES:
        raise InputError(f"{what}: {len(msg.data)} bytes exceeds the limit of {MAX_TENSOR_BYTES}")
    dt = np.dtype(DTYPES[msg.dtype])
    if int(np.prod(shape, dtype=np.int64)) * dt.itemsize != len(msg.data):
        raise InputError(f"{what}: shape {list(shape)} of {msg.dtype} needs {int(np.prod(shape)) * dt.itemsize} "
                         f"bytes, got {len(msg.data)}")  # fmt: skip
    arr = np.frombuffer(msg.data, dtype=dt).reshape(shape)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputError(f"{what}: contains NaN or Inf")
    return arr.astype(arr.dtype.newbyteorder("="))


def params_from_msg(msg: common_pb2.GenerationParams, default_max_new_tokens: int = 128) -> GenerationParams:
    """Zero values mean defaults (proto3 has no 'unset' for scalars); the result is validated."""
    p = GenerationParams(
        max_new_tokens=msg.max_new_tokens or default_max_new_tokens,
        temperature=msg.temperature,
        top_p=msg.top_p or 1.0,
        top_k=msg.top_k,
        repetition_penalty=msg.repetition_penalty or 1.0,
        stop=list(msg.stop),
        seed=msg.seed if msg.HasField("seed") else None,
    )
    p.validate()
    return p


def params_to_msg(p: GenerationParams) -> common_pb2.GenerationParams:
    msg = common_pb2.GenerationParams(
        max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
        repetition_penalty=p.repetition_penalty, stop=list(p.stop),
    )  # fmt: skip
    if p.seed is not None:
        msg.seed = p.seed
    return msg


def wav_bytes(pcm: np.ndarray, sample_rate: int) -> bytes:
    """PCM float32 [n] or [channels, n] as a float WAV file (lossless), the encoders' audio input."""
    import soundfile as sf

    if sample_rate <= 0 or sample_rate > 384_000:
        raise InputError(f"audio sample_rate must be in 1..384000 Hz, got {sample_rate}")
    if pcm.ndim == 2:
        pcm = pcm.T  # soundfile wants [n, channels]
    elif pcm.ndim != 1:
        raise InputError(f"audio pcm must be [n] or [channels, n], got shape {list(pcm.shape)}")
    buf = io.BytesIO()
    sf.write(buf, pcm.astype(np.float32), sample_rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def part_input(part: common_pb2.Part) -> tuple[str, Any]:
    """(modality, raw input the encoders decode) for a media part; ("text", str) for text."""
    kind = part.WhichOneof("kind")
    if kind is None:
        raise InputError("empty part: set one of text, image, audio, imu, video")
    if kind == "text":
        return "text", part.text
    if kind == "image":
        return "image", part.image.data
    if kind == "audio":
        a = part.audio
        if a.HasField("pcm"):
            return "audio", wav_bytes(from_tensor_msg(a.pcm, "audio.pcm"), a.sample_rate)
        return "audio", a.data
    if kind == "imu":
        return "imu", from_tensor_msg(part.imu.data, "imu.data", ndim=2)
    v = part.video
    if v.frames:
        return "video", [f.data for f in v.frames]
    return "video", v.data


def text_and_inputs(parts: Sequence[common_pb2.Part]) -> tuple[str, list[tuple[str, Any]]]:
    """The user turn as ``Assistant.stream`` takes it: (text parts joined by spaces, media inputs in order).

    As in ``modalink ask``, media follow the text (AnyMAL order, how the adapters were trained) unless the
    text places them with tags (``<image>``), as ``place_media`` does.
    """
    texts, inputs = [], []
    for part in parts:
        modality, raw = part_input(part)
        if modality == "text":
            texts.append(raw)
        else:
            inputs.append((modality, raw))
    return " ".join(t for t in texts if t), inputs
