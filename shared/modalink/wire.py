"""Conversions between the protobuf contracts (``protos/modalink/v1``) and the library's types.

Every service goes through here, so a tensor or a part is checked the same way everywhere: dtype from a short
list, shape against the byte count, a size limit, finite values. Tensors and generation parameters are converted by
the client's own functions (``modalink_client.convert``; its ValueError is an InputError here), so both sides of
the wire read them alike. Tensors are raw little-endian bytes; nothing is ever unpickled.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from modalink_client import convert
from modalink_client.convert import DTYPES, MAX_TENSOR_BYTES, MAX_TENSOR_DIMS, params_to_msg

from modalink import check_modality
from modalink.config import get_settings
from modalink.engine import GenerationParams
from modalink.errors import InputError
from modalink.modality import get as get_modality

if TYPE_CHECKING:
    from modalink.pipeline import Turn

try:
    from modalink.v1 import assistant_pb2, common_pb2, llm_pb2
except ImportError as e:  # pragma: no cover - depends on the build step
    raise ImportError("gRPC stubs are missing: run `make stubs` (python -m grpc_tools.protoc, see the Makefile)") from e

__all__ = ["DTYPES", "MAX_TENSOR_BYTES", "MAX_TENSOR_DIMS", "assistant_pb2", "common_pb2", "llm_pb2", "params_to_msg"]


def to_tensor_msg(x: np.ndarray | torch.Tensor) -> common_pb2.Tensor:
    """The client's ``to_tensor_msg`` (``modalink_client.convert``), with InputError for what it refuses."""
    try:
        return convert.to_tensor_msg(x)
    except ValueError as e:
        raise InputError(str(e)) from None


def from_tensor_msg(
    msg: common_pb2.Tensor, what: str = "tensor", dtypes: Sequence[str] = ("float32",), ndim: int | None = None
) -> np.ndarray:
    """A checked numpy array from a Tensor message (the client's checks: dtype, shape against the byte count, a size
    limit, finite values); InputError says what is wrong."""
    try:
        return convert.from_tensor_msg(msg, what, dtypes, ndim)
    except ValueError as e:
        raise InputError(str(e)) from None


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


def segments_to_msg(prompt: Sequence) -> list[llm_pb2.Segment]:
    """A prompt's segments as the LLM service's: a ``prompt.Text``'s plain spans (what clients wrote) as
    ``plain_text`` segments between the template's ``text``, so the service reads them as plain text too."""
    out = []
    for seg in prompt:
        if not isinstance(seg, str):
            out.append(llm_pb2.Segment(embeddings=to_tensor_msg(seg)))
            continue
        pos = 0
        for a, b in [*getattr(seg, "plain", ()), (len(seg), len(seg))]:
            if pos < a:
                out.append(llm_pb2.Segment(text=str.__getitem__(seg, slice(pos, a))))
            if a < b:
                out.append(llm_pb2.Segment(plain_text=str.__getitem__(seg, slice(a, b))))
            pos = b
    return out


def segments_from_msg(segments: Sequence[llm_pb2.Segment]) -> list:
    """The prompt of an ``LLMRequest``: adjacent ``text`` and ``plain_text`` segments joined into one text (a
    ``prompt.Text`` whose plain spans are the ``plain_text``), embeddings as float32 [n, d] tensors."""
    from modalink.prompt import Text

    prompt: list = []
    run: list[str] = []  # the text segments since the last embeddings, joined once (not one copy per segment)
    spans: list[tuple[int, int]] = []
    size = 0

    def flush() -> None:
        if run:
            prompt.append(Text("".join(run), spans) if spans else "".join(run))
            run.clear()
            spans.clear()

    for i, seg in enumerate(segments):
        kind = seg.WhichOneof("kind")
        if kind == "embeddings":
            flush()
            size = 0
            prompt.append(torch.from_numpy(from_tensor_msg(seg.embeddings, "embeddings segment", ndim=2)))
        elif kind is None:
            raise InputError(f"segments[{i}] is empty: set text, plain_text or embeddings")
        else:
            text = seg.text if kind == "text" else seg.plain_text
            if kind == "plain_text":
                spans.append((size, size + len(text)))
            run.append(text)
            size += len(text)
    flush()
    return prompt


def parse_message(cls: type[Message], data: bytes) -> Message:
    """``cls.FromString`` with an ``InputError`` that says what is wrong (see ``malformed``)."""
    try:
        return cls.FromString(data)
    except DecodeError:
        raise InputError(malformed(cls.DESCRIPTOR, data)) from None


def malformed(desc: Descriptor, data: bytes) -> str:
    """Why ``data`` does not parse as ``desc``: protobuf's own error names no field, so name the string field
    with invalid UTF-8 (proto3 strings must be UTF-8) when that is the cause."""
    field = _bad_utf8(desc, data)
    if field:
        return f"invalid UTF-8 in string field {field} of the {desc.full_name} request"
    return f"malformed {desc.full_name} message ({len(data)} bytes): not a valid protobuf encoding"


def _bad_utf8(desc: Descriptor, data: bytes, depth: int = 0) -> str | None:
    """The first string field (full name) in ``data`` holding invalid UTF-8; None if none or unparsable."""

    def varint(i: int) -> tuple[int, int]:
        value, shift = 0, 0
        while True:
            b = data[i]
            value |= (b & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if b < 0x80 or shift > 63:
                return value, i

    i = 0
    try:
        while i < len(data):
            key, i = varint(i)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, i = varint(i)
            elif wire_type in (1, 5):
                i += 8 if wire_type == 1 else 4
            elif wire_type == 2:
                n, i = varint(i)
                if i + n > len(data):
                    return None  # truncated: not a UTF-8 problem
                chunk, i = data[i : i + n], i + n
                field = desc.fields_by_number.get(number)
                if field is None:
                    continue
                if field.type == FieldDescriptor.TYPE_STRING:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError:
                        return field.full_name
                elif field.type == FieldDescriptor.TYPE_MESSAGE and depth < 32:
                    if found := _bad_utf8(field.message_type, chunk, depth + 1):
                        return found
            else:
                return None  # groups (proto2) or garbage: not a UTF-8 problem
    except IndexError:
        return None
    return None


def wav_bytes(pcm: np.ndarray, sample_rate: int) -> bytes:
    """PCM float32 [n] or [channels, n] as a float WAV file (lossless), the encoders' audio input."""
    import soundfile as sf

    from modalink.encoders.audio import MAX_AUDIO_CHANNELS, MAX_SAMPLE_RATE

    if not 1 <= sample_rate <= MAX_SAMPLE_RATE:
        raise InputError(f"audio sample_rate must be in 1..{MAX_SAMPLE_RATE} Hz, got {sample_rate}")
    if pcm.ndim == 2:
        if not 1 <= pcm.shape[0] <= MAX_AUDIO_CHANNELS:
            raise InputError(f"audio pcm [channels, n] must have 1..{MAX_AUDIO_CHANNELS} channels, "
                             f"got shape {list(pcm.shape)}")  # fmt: skip
        pcm = pcm.T  # soundfile wants [n, channels]
    elif pcm.ndim != 1:
        raise InputError(f"audio pcm must be [n] or [channels, n], got shape {list(pcm.shape)}")
    if pcm.shape[0] == 0:
        raise InputError("audio pcm has no samples")
    buf = io.BytesIO()
    sf.write(buf, pcm.astype(np.float32), sample_rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def media_input(m: common_pb2.Media) -> tuple[str, Any]:
    """(modality, raw input) of a generic media part: a registered modality's file bytes or tensor, as it takes."""
    spec = get_modality(check_modality(m.modality))
    if spec.input == "tensor":
        if m.data or not m.HasField("tensor"):
            raise InputError(f"media of modality {m.modality!r} is a tensor: set media.tensor (float32), not data")
        return spec.name, from_tensor_msg(m.tensor, "media.tensor", ndim=spec.tensor_rank)
    if m.HasField("tensor") or not m.data:
        raise InputError(f"media of modality {m.modality!r} is an encoded file: set media.data (and mime)")
    return spec.name, m.data


def part_input(part: common_pb2.Part) -> tuple[str, Any]:
    """(modality, raw input the encoders decode) for a media part; ("text", str) for text."""
    kind = part.WhichOneof("kind")
    if kind is None:
        raise InputError("empty part: set one of text, image, audio, imu, video, media")
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
    if kind == "media":
        return media_input(part.media)
    v = part.video
    if v.frames:
        return "video", [f.data for f in v.frames]
    return "video", v.data


def check_turn(text: str, n_media: int, n_parts: int, max_parts: int | None = None) -> None:
    """A user turn's limits, the same through gRPC and HTTP: some text or media, at most ``max_parts`` parts."""
    max_parts = get_settings().max_parts if max_parts is None else max_parts
    if n_parts > max_parts:
        raise InputError(f"too many parts: {n_parts}; the limit is {max_parts} (MODALINK_MAX_PARTS)")
    if not text.strip() and not n_media:
        raise InputError("empty prompt: no text and no media")


def text_and_inputs(
    parts: Sequence[common_pb2.Part], max_parts: int | None = None
) -> tuple[str, list[tuple[str, Any]]]:
    """The user turn as ``Assistant.stream`` takes it: (text parts joined by spaces, media inputs in order).

    As in ``modalink ask``, media follow the text (AnyMAL order, how the adapters were trained) unless the
    text places them with tags (``<image>``), as ``place_media`` does. Limits: see ``check_turn``.
    """
    text = " ".join(p.text for p in parts if p.WhichOneof("kind") == "text" and p.text)
    check_turn(text, sum(p.WhichOneof("kind") != "text" for p in parts), len(parts), max_parts)  # before decoding
    return text, [(m, raw) for m, raw in map(part_input, parts) if m != "text"]


MAX_HISTORY_TURNS = 100


def history_from_msg(turns: Sequence[assistant_pb2.Turn]) -> tuple[list, list[list[tuple[str, Any]]]]:
    """Earlier turns of a conversation: (``Message``s of their text, each turn's raw media inputs)."""
    from modalink.prompt import Message

    messages, media = [], []
    for i, t in enumerate(turns[: MAX_HISTORY_TURNS + 1]):
        if t.role not in ("user", "assistant", "system"):
            raise InputError(f"history[{i}]: role must be user, assistant or system, got {t.role!r}")
        if t.media and t.role != "user":
            raise InputError(f"history[{i}]: only user turns carry media")
        inputs = [part_input(p) for p in t.media[: get_settings().max_parts + 1]]
        if any(m == "text" for m, _ in inputs):
            raise InputError(f"history[{i}].media: text belongs in the turn's text, not in its media")
        messages.append(Message(t.role, [t.text]))
        media.append(inputs)
    check_history(turns, media)
    return messages, media


def check_history(turns: Sequence, media: Sequence[Sequence], what: str = "history") -> None:
    """The limits of a conversation's earlier turns, the same through gRPC and HTTP: at most
    ``MAX_HISTORY_TURNS`` turns and ``MODALINK_MAX_PARTS`` media in all."""
    if len(turns) > MAX_HISTORY_TURNS:
        raise InputError(f"{what} has {len(turns)} earlier turns; the limit is {MAX_HISTORY_TURNS}")
    if (n := sum(map(len, media))) > get_settings().max_parts:
        raise InputError(f"{what} carries {n} media; the limit is {get_settings().max_parts} (MODALINK_MAX_PARTS)")


def turn_from_msg(request: assistant_pb2.GenerateRequest) -> Turn:
    """The pipeline's ``Turn`` from a gRPC ``GenerateRequest`` (limits checked before anything is decoded)."""
    from modalink.pipeline import Turn

    text, inputs = text_and_inputs(request.parts)
    history, history_media = history_from_msg(request.history)
    return Turn(text, inputs, params_from_msg(request.params), history, history_media)


def usage_to_msg(usage) -> common_pb2.Usage | None:
    """A ``pipeline.Usage`` (on an answer's last event) as the API's message; None elsewhere."""
    if usage is None:
        return None
    return common_pb2.Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                            total_tokens=usage.total_tokens)  # fmt: skip
