"""Bad input, case by case, then fuzzed: every request decoder answers a clear ``InputError`` (INVALID_ARGUMENT /
HTTP 400 through the services) that names the problem, never another exception, and memory stays bounded.

Three layers: the decoders in process (``modalink.wire``, the encoders' ``decode_*``, ``GenerationParams``); the
same cases through real services (image and audio encoders, the LLM, the gateway, over gRPC and the OpenAI HTTP
route), after which the gateway must still give the answer it gave before and not have grown; and a bounded,
deterministic hypothesis pass over the decoders (arbitrary and mutated bytes, shapes, params, manifests).
"""

from __future__ import annotations

import functools
import io
import json
import os
import struct
import sys
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from procs import Procs, free_port, wait_grpc, wait_triton

from modalink import data
from modalink.encoders.audio import decode_audio
from modalink.encoders.image import decode_image
from modalink.encoders.imu import decode_imu
from modalink.encoders.video import MAX_DECODED_FRAMES, decode_video, frames_to_gif
from modalink.engine import GenerationParams
from modalink.errors import InputError
from modalink.rpc import MAX_MESSAGE_BYTES
from modalink.wire import (
    DTYPES,
    MAX_TENSOR_BYTES,
    assistant_pb2,
    common_pb2,
    from_tensor_msg,
    params_from_msg,
    parse_message,
    part_input,
    text_and_inputs,
)

MiB = 1 << 20
T = common_pb2.Tensor
P = common_pb2.Part


# -- inputs built here: small, valid files, and broken versions of them ----------------------------------------


def png(w: int = 16, h: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 90)).save(buf, "PNG")
    return buf.getvalue()


def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def png_declaring(w: int, h: int) -> bytes:
    """A 16x16 PNG whose IHDR (with a valid CRC) declares ``w`` x ``h``: a decompression bomb's header."""
    b = bytearray(png())
    ihdr = struct.pack(">II", w, h) + bytes(b[24:29])
    b[16:29] = ihdr
    b[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(b)


@functools.cache
def audio_file(seconds: float, fmt: str = "WAV", rate: int = 16_000) -> bytes:
    """A tone (silence after the first second) written block by block: an hour of FLAC is a few hundred KB."""
    buf = io.BytesIO()
    subtype = "VORBIS" if fmt == "OGG" else "PCM_16"
    with sf.SoundFile(buf, "w", samplerate=rate, channels=1, format=fmt, subtype=subtype) as f:
        left = int(seconds * rate)
        tone = (np.sin(np.arange(min(left, rate)) * 0.05) * 8000).astype(np.int16)
        f.write(tone)
        left -= len(tone)
        block = np.zeros(60 * rate, np.int16)
        while left > 0:
            f.write(block[:left])
            left -= len(block)
    return buf.getvalue()


def gif(n_frames: int, side: int = 8) -> bytes:
    rng = np.random.default_rng(n_frames)
    return frames_to_gif([rng.integers(0, 255, (side, side, 3), dtype=np.uint8) for _ in range(n_frames)], 20)


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def npy_declaring(shape: tuple[int, ...], data: bytes = b"\0" * 96) -> bytes:
    """A .npy header claiming ``shape`` float32 followed by a few bytes: np.load would allocate the claim."""
    header = repr({"descr": "<f4", "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data


def tensor(arr: np.ndarray) -> common_pb2.Tensor:
    return T(dtype=arr.dtype.name, shape=list(arr.shape), data=arr.tobytes())


def pcm_part(arr: np.ndarray, rate: int = 16_000, dtype: str | None = None) -> common_pb2.Part:
    t = tensor(arr)
    if dtype:
        t.dtype = dtype
    return P(audio=common_pb2.Audio(pcm=t, sample_rate=rate))


def bad_utf8_generate_request() -> bytes:
    """A GenerateRequest whose one Part.text holds invalid UTF-8, encoded by hand (protobuf refuses to build it)."""
    text = b"\x0a\x04hi\xff\xfe"  # Part field 1 (text), 4 bytes
    return b"\x0a" + bytes([len(text)]) + text  # GenerateRequest field 1 (parts)


def rss_mib(pid: int | None = None, tree: bool = False) -> float:
    proc = psutil.Process(pid)
    procs = [proc, *proc.children(recursive=True)] if tree else [proc]
    return sum(p.memory_info().rss for p in procs) / MiB


def raises(fn, *args, match: str, **kw) -> str:
    """Assert ``fn`` raises ``InputError`` whose message contains ``match`` (case-insensitive); the message."""
    with pytest.raises(InputError) as e:
        fn(*args, **kw)
    assert match.lower() in str(e.value).lower(), str(e.value)
    return str(e.value)


# -- 1. in process: tensors, parts, turns ------------------------------------------------------------------------

TENSORS = {
    "wrong dtype": (T(dtype="float64", shape=[2], data=b"\0" * 16), "dtype must be float32, got 'float64'"),
    "unknown dtype": (T(dtype="complex64", shape=[1], data=b"\0" * 8), "dtype must be float32"),
    "empty dtype": (T(shape=[1], data=b"\0" * 4), "got '(empty)'"),
    "wrong rank": (tensor(np.zeros((2, 3, 4), np.float32)), "expected 2 dimensions, got shape [2, 3, 4]"),
    "too many dims": (T(dtype="float32", shape=[1] * 40, data=b"\0" * 4), "40 dimensions; at most 8"),
    "negative dim": (T(dtype="float32", shape=[-1, 4], data=b"\0" * 16), "negative dimension in shape [-1, 4]"),
    "shape vs data": (T(dtype="float32", shape=[2, 3], data=b"\0" * 20), "needs 24 bytes, got 20"),
    # 2**62 * 4 elements * 4 bytes wraps int64 to 0: must not pass as "0 bytes needed" with empty data
    "int64 overflow": (T(dtype="float32", shape=[2**62, 4], data=b""), "shape [4611686018427387904, 4] is over"),
    # (2**62 + 1) * 4 wraps to 4 elements, 16 bytes: exactly the data's length
    "overflow to data length": (T(dtype="float32", shape=[2**62 + 1, 4], data=b"\0" * 16), "is over the limit"),
    "empty but huge dim": (T(dtype="float32", shape=[0, 2**61]), "is over the limit of 268435456 bytes"),
    "empty but huge dims": (T(dtype="float32", shape=[0, 8, 8, 2**27, 2**27]), "is over the limit"),
    "NaN": (tensor(np.array([[1.0, np.nan]], np.float32)), "NaN or Inf"),
    "Inf": (tensor(np.array([[np.inf, 1.0]], np.float32)), "NaN or Inf"),
    "oversize": (lambda: T(dtype="float32", shape=[MAX_TENSOR_BYTES // 4 + 1], data=b"\0" * (MAX_TENSOR_BYTES + 4)),
                 f"exceeds the limit of {MAX_TENSOR_BYTES}"),  # built in the test: 256 MiB
}  # fmt: skip


@pytest.mark.parametrize("case", TENSORS)
def test_tensor_decoder_refuses(case):
    msg, match = TENSORS[case]
    msg = msg() if callable(msg) else msg
    rss = rss_mib()
    raises(from_tensor_msg, msg, "imu.data", ndim=2 if case == "wrong rank" else None, match=match)
    assert rss_mib() - rss < 64, "refusing a tensor must not allocate its claimed shape"


PARTS = {
    "empty part": (P(), "empty part: set one of text, image, audio, imu, video"),
    "pcm wrong dtype": (pcm_part(np.zeros(160, np.int32)), "audio.pcm: dtype must be float32, got 'int32'"),
    "pcm NaN": (pcm_part(np.full(160, np.nan, np.float32)), "audio.pcm: contains NaN or Inf"),
    "pcm rank 3": (pcm_part(np.zeros((1, 2, 80), np.float32)), "must be [n] or [channels, n]"),
    "pcm no samples": (pcm_part(np.zeros(0, np.float32)), "audio pcm has no samples"),
    "pcm 5000 channels": (pcm_part(np.zeros((5000, 2), np.float32)), "1..64 channels, got shape [5000, 2]"),
    "pcm rate 0": (pcm_part(np.zeros(160, np.float32), 0), "sample_rate must be in 1..384000 Hz, got 0"),
    "pcm rate negative": (pcm_part(np.zeros(160, np.float32), -16000), "got -16000"),
    "pcm rate 1 MHz": (pcm_part(np.zeros(160, np.float32), 1_000_000), "got 1000000"),
    "imu rank 1": (P(imu=common_pb2.Imu(data=tensor(np.zeros(600, np.float32)))), "imu.data: expected 2 dimensions"),
    "imu NaN": (P(imu=common_pb2.Imu(data=tensor(np.full((6, 100), np.nan, np.float32)))), "imu.data: contains NaN"),
    "imu float64": (P(imu=common_pb2.Imu(data=tensor(np.zeros((6, 100))))), "imu.data: dtype must be float32"),
}  # fmt: skip


@pytest.mark.parametrize("case", PARTS)
def test_part_decoder_refuses(case):
    part, match = PARTS[case]
    raises(part_input, part, match=match)


def test_unknown_part_type_is_an_empty_part():
    """A part type this server does not know (a newer client's oneof field 9) parses as a part with none set."""
    part = parse_message(P, b"\x4a\x03abc")  # field 9, length-delimited
    raises(part_input, part, match="empty part")


def test_turn_limits():
    raises(text_and_inputs, [], match="empty prompt: no text and no media")
    raises(text_and_inputs, [P(text=""), P(text="  \n")], match="empty prompt")
    raises(text_and_inputs, [P(text="x")] * 17, match="too many parts: 17; the limit is 16")
    raises(text_and_inputs, [P(text="x")] * 3, max_parts=2, match="too many parts: 3; the limit is 2")
    assert text_and_inputs([P(text="hi"), P(image=common_pb2.Image(data=b"x"))]) == ("hi", [("image", b"x")])
    assert text_and_inputs([P(image=common_pb2.Image(data=b"x"))]) == ("", [("image", b"x")])  # media alone: fine


def test_malformed_protobuf_names_the_problem():
    raises(parse_message, assistant_pb2.GenerateRequest, bad_utf8_generate_request(),
           match="invalid UTF-8 in string field modalink.v1.Part.text")  # fmt: skip
    raises(parse_message, assistant_pb2.GenerateRequest, b"\x0a\x05ab", match="not a valid protobuf encoding")
    raises(parse_message, assistant_pb2.EmbedRequest, b"\x0a\x04\x0a\x02\xc3\x28",
           match="invalid UTF-8 in string field modalink.v1.Part.text of the modalink.v1.EmbedRequest")  # fmt: skip


# -- 1b. in process: the media decoders --------------------------------------------------------------------------

IMAGES = {
    "zero bytes": (b"", "image is empty (0 bytes)"),
    "not an image": (b"hello, world" * 10, "not a decodable image (120 bytes"),
    "truncated PNG header": (png()[:40], "not a decodable image"),
    "truncated PNG data": (png(64, 64)[:-30], "corrupt or truncated image"),
    "truncated JPEG": (jpeg()[: len(jpeg()) // 2], "image"),
    "corrupt PNG CRC": (png()[:20] + b"\xff" * 8 + png()[28:], "not a decodable image"),
    "unsupported format (PPM)": (b"P6\n2 2\n255\n" + b"\0" * 12, "unsupported image format PPM"),
    "bomb 100000x100000": (png_declaring(100_000, 100_000), "image dimensions exceed the decoder's safety limit"),
    "bomb 7000x7000": (png_declaring(7000, 7000), "image dimensions 7000x7000 exceed the limit of 40000000 pixels"),
}


@pytest.mark.parametrize("case", IMAGES)
def test_image_decoder_refuses(case):
    raw, match = IMAGES[case]
    rss = rss_mib()
    raises(decode_image, raw, 40_000_000, match=match)
    assert rss_mib() - rss < 64, "a bomb must be refused from its header, before its pixels are allocated"


def test_image_limit_is_the_setting():
    """``Settings.max_image_pixels`` is what the encoder enforces (a 300x300 image against a 50000-pixel limit)."""
    from modalink.config import Settings
    from modalink.encoders.image import ImageEncoder

    class Small(ImageEncoder):
        name, feature_dim = "test", 1

    enc = Small(Settings(max_image_pixels=50_000))
    raises(enc.decode, png(300, 300), match="300x300 exceed the limit of 50000 pixels")
    assert enc.decode(png(200, 200)).shape == (3, 224, 224)


AUDIO = {
    "zero bytes": (b"", "audio is empty (0 bytes)"),
    "not audio": (b"RIFF" + b"\0" * 100, "not a decodable audio file"),
    "truncated WAV header": (audio_file(1)[:30], "not a decodable audio file"),
    "truncated FLAC": (audio_file(1, "FLAC")[:44], "not a decodable audio file"),
    "PNG as audio": (png(), "not a decodable audio file"),
    "too long (700 s FLAC, 34 KB)": (audio_file(700, "FLAC"), "audio is 700.0 s long; the limit is 600 s"),
}


@pytest.mark.parametrize("case", AUDIO)
def test_audio_decoder_refuses(case):
    raw, match = AUDIO[case]
    raises(decode_audio, raw, match=match)


def test_audio_bomb_is_refused_before_decoding():
    """An hour of FLAC silence is ~180 KB; decoded it would be 230 MB of float32. Refused from its header, and a
    header that does not say its length (STREAMINFO total 0) is cut off while decoding, at the limit."""
    raw = audio_file(3600, "FLAC")
    assert len(raw) < 400_000
    rss = rss_mib()
    raises(decode_audio, raw, match="audio is 3600.0 s long; the limit is 600 s")
    unknown = bytearray(raw)
    unknown[21] &= 0xF0  # STREAMINFO: 36-bit total sample count -> 0 (unknown)
    unknown[22:26] = b"\0\0\0\0"
    raises(decode_audio, bytes(unknown), max_seconds=60, match="longer than the limit of 60 s")
    assert rss_mib() - rss < 64


def test_audio_limit_is_the_setting(samples):
    raw = Path(samples["audio"]).read_bytes()
    seconds = sf.info(io.BytesIO(raw)).duration
    assert decode_audio(raw).size == pytest.approx(seconds * 16_000, abs=2)
    raises(decode_audio, raw, max_seconds=seconds / 2, match=f"the limit is {seconds / 2:.0f} s")


IMU = {
    "zero bytes": (b"", "IMU is empty (0 bytes)"),
    "wrong channels": (npy(np.zeros((4, 100), np.float32)), "must have 6 channels, got shape [4, 100]"),
    "rank 3": (npy(np.zeros((6, 10, 10), np.float32)), "2-D [channels, time], got shape [6, 10, 10]"),
    "NaN": (npy(np.full((6, 100), np.nan, np.float32)), "IMU data contains NaN or Inf"),
    "too short": (npy(np.zeros((6, 4), np.float32)), "16..100000 time steps, got 4"),
    "object dtype npy": (npy(np.array([[None] * 20] * 6, dtype=object)), "must hold numbers, got dtype object"),
    "npy header claims 24 TB": (npy_declaring((6, 10**12)), "header says shape [6, 1000000000000]"),
    "npy bad header": (b"\x93NUMPY\x01\x00\x10\x00{'descr': 1}   \n", "IMU .npy header is corrupt"),
    "CSV text": (b"a,b,c\n1,2,3\n", "IMU data must be .npy or numeric CSV"),
    "not UTF-8": (b"\xff\xfe\x00garbage", "IMU data must be .npy or numeric CSV"),
}


@pytest.mark.parametrize("case", IMU)
def test_imu_decoder_refuses(case):
    raw, match = IMU[case]
    rss = rss_mib()
    raises(decode_imu, raw, match=match)
    assert rss_mib() - rss < 64


VIDEO = {
    "zero bytes": (b"", "video is empty (0 bytes)"),
    "no frames": ([], "video has no frames"),
    "corrupt GIF": (b"GIF89a" + b"\x01" * 50, "not a decodable video"),
    "truncated GIF": (gif(4)[:60], "video"),
    "not a video": (b"\0\0\0\x18ftypmp42" + b"\0" * 100, "not a decodable video"),
    "too many frames (list)": ([png()] * (MAX_DECODED_FRAMES + 1), f"frames; the limit is {MAX_DECODED_FRAMES}"),
    "corrupt frame": ([png(), b"not a frame"], "not a decodable image"),
    "frame bomb": ([png_declaring(7000, 7000)], "exceed the limit"),
}


@pytest.mark.parametrize("case", VIDEO)
def test_video_decoder_refuses(case):
    raw, match = VIDEO[case]
    raises(decode_video, raw, match=match)


def test_animated_image_with_too_many_frames():
    raw = gif(MAX_DECODED_FRAMES + 1, side=2)
    raises(decode_video, raw, match=f"animated image has {MAX_DECODED_FRAMES + 1} frames; the limit is")
    assert len(decode_video(gif(12), n_frames=8)) == 8


# -- 1c. generation parameters -----------------------------------------------------------------------------------

PARAMS = {
    "max_new_tokens negative": (common_pb2.GenerationParams(max_new_tokens=-5), "max_new_tokens must be in 1..32768"),
    "max_new_tokens huge": (common_pb2.GenerationParams(max_new_tokens=2**31 - 1), "got 2147483647"),
    "temperature negative": (common_pb2.GenerationParams(temperature=-1), "temperature must be 0 (greedy) or in"),
    "temperature tiny": (common_pb2.GenerationParams(temperature=1e-30), "temperature must be 0 (greedy) or in"),
    "temperature NaN": (common_pb2.GenerationParams(temperature=float("nan")), "got nan"),
    "temperature Inf": (common_pb2.GenerationParams(temperature=float("inf")), "got inf"),
    "top_p above 1": (common_pb2.GenerationParams(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
    "top_p negative": (common_pb2.GenerationParams(top_p=-0.5), "top_p must be in (0, 1]"),
    "top_k negative": (common_pb2.GenerationParams(top_k=-1), "top_k must be >= 0, got -1"),
    "repetition_penalty huge": (common_pb2.GenerationParams(repetition_penalty=1e6), "repetition_penalty must be"),
    "repetition_penalty negative": (common_pb2.GenerationParams(repetition_penalty=-1), "repetition_penalty"),
    "17 stop sequences": (common_pb2.GenerationParams(stop=["a"] * 17), "stop: at most 16"),
    "stop sequence too long": (common_pb2.GenerationParams(stop=["x" * 257]), "of at most 256 characters"),
    "empty stop sequence": (common_pb2.GenerationParams(stop=[""]), "non-empty"),
}


@pytest.mark.parametrize("case", PARAMS)
def test_generation_params_refused(case):
    msg, match = PARAMS[case]
    raises(params_from_msg, msg, match=match)


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"seed": -1}, "seed must be an integer in 0..2**64-1"), ({"seed": 2**64}, "seed must be"),
     ({"seed": "42"}, "seed must be an integer"), ({"max_new_tokens": "100"}, "max_new_tokens must be an integer"),
     ({"max_new_tokens": True}, "must be an integer"), ({"temperature": "hot"}, "temperature must be a number"),
     ({"top_k": 2.5}, "top_k must be an integer"), ({"stop": [1, 2]}, "stop: at most 16 non-empty strings"),
     ({"stop": "halt"}, "stop:")],
)  # fmt: skip
def test_generation_params_types(kw, match):
    """JSON (the HTTP route) can put any type anywhere: a wrong one is refused, not a TypeError deep in sampling."""
    raises(GenerationParams(**kw).validate, match=match)


@pytest.mark.slow
def test_max_new_tokens_beyond_the_context(engine, assistant):
    """Both ways in, the LLM service's batcher and the in-process assistant, refuse it with both numbers."""
    from modalink.batching import DynamicBatcher

    too_many = GenerationParams(max_new_tokens=engine.max_context)
    batcher = DynamicBatcher(engine)
    try:
        msg = raises(batcher.submit, ["Hello"], too_many, match=f"exceeds the context of {engine.max_context} tokens")
        assert f"max_new_tokens ({engine.max_context})" in msg and "prompt (1 tokens)" in msg
        assert batcher.stats.batches == 0  # refused at admission, never batched with others
    finally:
        batcher.close()
    events = iter(assistant.stream("Hello", [], too_many))
    raises(next, events, match=f"+ max_new_tokens ({engine.max_context}) exceeds the context")
    raises(assistant.ask, "Hello", [], GenerationParams(temperature=1e-30), match="temperature must be 0 (greedy)")


# -- 2. through the services -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """An image and an audio encoder, the LLM, the gateway (gRPC + HTTP); their addresses and processes."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MODALINK_NUM_THREADS": "1", "MODALINK_QUANTIZE": "fp16-cpu"}
    procs = Procs(tmp_path_factory.mktemp("logs"), env)
    modalink = [sys.executable, "-m", "modalink.cli"]
    try:
        encoders, waits = [], []
        for modality in ("image", "audio"):
            http, grpc_port, metrics = free_port(), free_port(), free_port()
            proc, log = procs.start(modality, [*modalink, "serve", "encoder", "-m", modality, "--http-port", str(http),
                                    "--grpc-port", str(grpc_port), "--metrics-port", str(metrics)])  # fmt: skip
            encoders.append(f"{modality}=127.0.0.1:{grpc_port}")
            waits.append((http, f"{modality}_encoder", proc, log))
        llm_port, gw_port, http_port = free_port(), free_port(), free_port()
        llm = procs.start("llm", [*modalink, "serve", "llm", "--port", str(llm_port), "--http-port", "0"])
        gateway = procs.start("gateway", [*modalink, "serve", "gateway", "--port", str(gw_port), "--http-port",
                              str(http_port)], {"MODALINK_ENCODERS": ",".join(encoders),
                                                "MODALINK_LLM_ADDRESS": f"127.0.0.1:{llm_port}"})  # fmt: skip
        for w in waits:
            wait_triton(*w)
        wait_grpc(f"127.0.0.1:{llm_port}", *llm)
        wait_grpc(f"127.0.0.1:{gw_port}", *gateway)
        yield {"gateway": f"127.0.0.1:{gw_port}", "http": f"http://127.0.0.1:{http_port}", "procs": procs.running}
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def channel(stack):
    # the client may send more than the server accepts (the oversize case); default receive limit is plenty
    with grpc.insecure_channel(stack["gateway"], options=[("grpc.max_send_message_length", -1)]) as ch:
        yield ch


@pytest.fixture(scope="module")
def gateway(channel):
    from modalink.v1 import assistant_pb2_grpc

    return assistant_pb2_grpc.AssistantStub(channel)


GOOD_PARAMS = common_pb2.GenerationParams(max_new_tokens=12)


def good_answers(gateway, samples) -> tuple[str, str]:
    image = P(image=common_pb2.Image(data=Path(samples["image"]).read_bytes()))
    text = "".join(r.text for r in gateway.Generate(assistant_pb2.GenerateRequest(
        parts=[P(text="What is in this picture?"), image], params=GOOD_PARAMS), timeout=300))  # fmt: skip
    audio = P(audio=common_pb2.Audio(data=Path(samples["audio"]).read_bytes()))
    caption = gateway.Caption(assistant_pb2.CaptionRequest(part=audio, params=GOOD_PARAMS), timeout=300).caption
    return text, caption


@pytest.fixture(scope="module")
def before(stack, gateway, samples):
    """Good answers and the gateway's and image encoder's memory before any bad input (after a warm-up call)."""
    good_answers(gateway, samples)
    return {"answers": good_answers(gateway, samples), "gateway_mib": rss_mib(stack["procs"]["gateway"].pid),
            "image_mib": rss_mib(stack["procs"]["image"].pid, tree=True)}  # fmt: skip


def gen(*parts: common_pb2.Part, **params) -> tuple[str, object]:
    return "Generate", assistant_pb2.GenerateRequest(parts=list(parts), params=common_pb2.GenerationParams(**params))


def text(s: str = "Describe it.") -> common_pb2.Part:
    return P(text=s)


def img(data: bytes) -> common_pb2.Part:
    return P(image=common_pb2.Image(data=data))


def aud(data: bytes) -> common_pb2.Part:
    return P(audio=common_pb2.Audio(data=data))


def pcm_of(t: common_pb2.Tensor) -> common_pb2.Part:
    return P(audio=common_pb2.Audio(pcm=t, sample_rate=16000))


def caption(part: common_pb2.Part, **params) -> tuple[str, object]:
    return "Caption", assistant_pb2.CaptionRequest(part=part, params=common_pb2.GenerationParams(**params))


GRPC_CASES = {
    "no parts": (gen(), "empty prompt: no text and no media"),
    "only empty text": (gen(text("")), "empty prompt"),
    "too many parts": (gen(*[text("a")] * 17), "too many parts: 17; the limit is 16"),
    "empty part": (gen(text(), P()), "empty part"),
    "corrupt image": (gen(text(), img(b"\x89PNG\r\n\x1a\n not really")), "not a decodable image"),
    "truncated PNG": (gen(text(), img(png(64, 64)[:-30])), "corrupt or truncated image"),
    "zero-byte image": (gen(text(), img(b"")), "image is empty (0 bytes)"),
    "image bomb 100000x100000": (gen(text(), img(png_declaring(100_000, 100_000))), "exceed the decoder's safety"),
    "image 7000x7000": (gen(text(), img(png_declaring(7000, 7000))), "7000x7000 exceed the limit of 40000000"),
    "corrupt audio": (gen(text(), aud(b"RIFF" + b"\0" * 100)), "not a decodable audio file"),
    "zero-byte audio": (gen(text(), aud(b"")), "audio is empty (0 bytes)"),
    "audio 1 h FLAC": (gen(text(), aud(audio_file(3600, "FLAC"))), "audio is 3600.0 s long; the limit is 600 s"),
    "pcm wrong dtype": (gen(text(), pcm_part(np.zeros(160, np.int64))), "audio.pcm: dtype must be float32"),
    "pcm NaN": (gen(text(), pcm_part(np.full(160, np.nan, np.float32))), "audio.pcm: contains NaN or Inf"),
    "pcm shape vs data": (gen(text(), pcm_of(T(dtype="float32", shape=[100], data=b"\0" * 8))), "needs 400 bytes"),
    "pcm int64 overflow": (gen(text(), pcm_of(T(dtype="float32", shape=[2**62, 4]))), "is over the limit of"),
    "pcm sample rate 0": (gen(text(), pcm_part(np.zeros(160, np.float32), 0)), "sample_rate must be in 1..384000"),
    "imu wrong rank": (gen(text(), P(imu=common_pb2.Imu(data=tensor(np.zeros(60, np.float32))))), "expected 2 dim"),
    "imu Inf": (gen(text(), P(imu=common_pb2.Imu(data=tensor(np.full((6, 20), np.inf, np.float32))))), "NaN or Inf"),
    "video, none served": (gen(text(), P(video=common_pb2.Video(data=gif(3)))), "no encoder service for modality"),
    "max_new_tokens beyond context": (gen(text(), max_new_tokens=30_000), "+ max_new_tokens (30000) exceeds the"),
    "max_new_tokens negative": (gen(text(), max_new_tokens=-1), "max_new_tokens must be in 1..32768, got -1"),
    "temperature negative": (gen(text(), temperature=-0.5), "temperature must be 0 (greedy) or in"),
    "temperature 1e-30": (gen(text(), temperature=1e-30), "temperature must be 0 (greedy) or in"),
    "top_p 1.5": (gen(text(), top_p=1.5), "top_p must be in (0, 1], got 1.5"),
    "top_k negative": (gen(text(), top_k=-3), "top_k must be >= 0, got -3"),
    "repetition_penalty 1e6": (gen(text(), repetition_penalty=1e6), "repetition_penalty must be in (0, 10]"),
    "17 stop sequences": (gen(text(), stop=["x"] * 17), "stop: at most 16"),
    "Embed text": (("Embed", assistant_pb2.EmbedRequest(part=text())), "Embed takes a media part"),
    "Embed empty part": (("Embed", assistant_pb2.EmbedRequest(part=P())), "empty part"),
    "Embed corrupt image": (("Embed", assistant_pb2.EmbedRequest(part=img(b"GIF89a..."))), "not a decodable image"),
    "Embed zero-byte audio": (("Embed", assistant_pb2.EmbedRequest(part=aud(b""))), "audio is empty (0 bytes)"),
    "Caption text": (("Caption", assistant_pb2.CaptionRequest(part=text())), "Caption takes a media part"),
    "Caption truncated WAV": (caption(aud(audio_file(1)[:30])), "not a decodable audio file"),
    "Caption bad params": (caption(img(png()), max_new_tokens=30_000), "exceeds the context"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", GRPC_CASES)
def test_grpc_bad_request(gateway, before, case):
    (method, request), match = GRPC_CASES[case]
    call = getattr(gateway, method)
    with pytest.raises(grpc.RpcError) as e:
        res = call(request, timeout=120)
        if method == "Generate":
            list(res)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.value.code(), e.value.details())
    assert match.lower() in e.value.details().lower(), e.value.details()


BAD_UTF8 = "invalid UTF-8 in string field modalink.v1.Part.text"
RAW_CASES = {
    "Generate: invalid UTF-8 in Part.text": ("Generate", True, bad_utf8_generate_request(), BAD_UTF8),
    "Caption: invalid UTF-8 in Part.text": ("Caption", False, b"\x0a\x04\x0a\x02\xc3\x28", BAD_UTF8),
    "Embed: truncated protobuf": ("Embed", False, b"\x0a\x10\x12\x05", "not a valid protobuf encoding"),
    "Generate: garbage bytes": ("Generate", True, b"\xff" * 12, "malformed modalink.v1.GenerateRequest"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", RAW_CASES)
def test_grpc_malformed_request(channel, before, case):
    """Bytes no client library would send: grpc-python alone answers INTERNAL "Exception deserializing request"."""
    method, streaming, raw, match = RAW_CASES[case]
    path = f"/modalink.v1.Assistant/{method}"
    make = channel.unary_stream if streaming else channel.unary_unary
    call = make(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as e:
        res = call(raw, timeout=60)
        if streaming:
            list(res)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.value.code(), e.value.details())
    assert match.lower() in e.value.details().lower(), e.value.details()


@pytest.mark.slow
def test_grpc_oversize_message(gateway, before):
    """Past the gateway's max message size gRPC itself refuses the call (RESOURCE_EXHAUSTED), before the servicer."""
    from modalink.config import Settings

    limit = getattr(Settings(), "max_message_mb", MAX_MESSAGE_BYTES >> 20) << 20
    request = assistant_pb2.EmbedRequest(part=img(b"\0" * (limit + MiB)))
    with pytest.raises(grpc.RpcError) as e:
        gateway.Embed(request, timeout=120)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.value.code(), e.value.details())
    assert "larger than max" in e.value.details().lower(), e.value.details()


def post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def chat(content, **kw) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": content}], **kw}).encode()


def data_url(raw: bytes) -> dict:
    import base64

    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(raw).decode()}}


HTTP_CASES = {
    "malformed JSON": (b'{"messages": [', "request body is not UTF-8 JSON"),
    "invalid UTF-8": (b'{"messages": [{"role": "user", "content": "hi \xff\xfe"}]}', "not UTF-8 JSON"),
    "not an object": (b"[1, 2]", "request body must be a JSON object"),
    "no messages": (b"{}", "`messages` must be a non-empty list"),
    "bad role": (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode(), "needs a role"),
    "text not a string": (chat([{"type": "text", "text": 5}]), "needs a string `text`"),
    "unknown content part": (chat([{"type": "video_url", "video_url": "x"}]), "unsupported content part type"),
    "empty prompt": (chat(""), "empty prompt: no text and no media"),
    "too many parts": (chat([{"type": "text", "text": "a"}] * 17), "too many parts: 17"),
    "remote image URL": (chat([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]), "data: URL"),
    "image_url not a string": (chat([{"type": "image_url", "image_url": {"url": 7}}]), "data: URL"),
    "bad base64": (chat([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]), "base64"),
    "corrupt image": (chat([{"type": "text", "text": "hi"}, data_url(b"nope")]), "not a decodable image"),
    "max_tokens a string": (chat("hi", max_tokens="many"), "max_new_tokens must be an integer, got 'many'"),
    "temperature negative": (chat("hi", temperature=-1), "temperature must be 0 (greedy) or in"),
    "temperature a list": (chat("hi", temperature=[1]), "temperature must be a number"),
    "seed negative": (chat("hi", seed=-7), "seed must be an integer in 0..2**64-1"),
    "stop not strings": (chat("hi", stop=[1, 2]), "stop: at most 16 non-empty strings"),
    "max_tokens beyond context": (chat("hi", max_tokens=30_000), "exceeds the context"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", HTTP_CASES)
def test_http_bad_request(stack, before, case):
    body, match = HTTP_CASES[case]
    status, answer = post(stack["http"], body)
    assert status == 400, answer
    assert match.lower() in answer["error"]["message"].lower(), answer
    assert answer["error"]["type"] == "invalid_request_error"


# The bad requests that reach the decoders (image, audio), sent again and again: memory per request, not per run.
LEAK_CASES = ["image bomb 100000x100000", "image 7000x7000", "truncated PNG", "corrupt image", "audio 1 h FLAC",
              "Embed corrupt image", "Caption truncated WAV", "max_new_tokens beyond context"]  # fmt: skip
LEAK_ROUNDS = 8
LEAK_MIB_PER_REQUEST = 0.25  # a leak of 1 MiB per request grows 64 MiB here, four times the whole allowance


@pytest.mark.slow
def test_memory_per_bad_request_is_bounded(stack, gateway, before):
    """After two warm-up rounds (decoder buffers, allocator arenas), repeating the bad requests grows no service by
    more than LEAK_MIB_PER_REQUEST per request: a leak of a few MiB per request fails, allocator noise does not."""

    def one_round() -> None:
        for case in LEAK_CASES:
            (method, request), match = GRPC_CASES[case]
            with pytest.raises(grpc.RpcError) as e:
                res = getattr(gateway, method)(request, timeout=120)
                if method == "Generate":
                    list(res)
            assert match.lower() in e.value.details().lower(), e.value.details()

    procs = stack["procs"]
    watched = {name: (procs[name].pid, name != "gateway") for name in ("gateway", "image", "audio", "llm")}
    one_round()
    one_round()
    start = {name: rss_mib(pid, tree) for name, (pid, tree) in watched.items()}
    for _ in range(LEAK_ROUNDS):
        one_round()
    n = LEAK_ROUNDS * len(LEAK_CASES)
    per_request = {name: (rss_mib(pid, tree) - start[name]) / n for name, (pid, tree) in watched.items()}
    print("RSS growth per bad request: " + ", ".join(f"{k} {v:+.3f} MiB" for k, v in per_request.items()))
    for name, growth in per_request.items():
        assert growth < LEAK_MIB_PER_REQUEST, f"{name} grew {growth:.2f} MiB per bad request over {n} requests"


@pytest.mark.slow
def test_still_serving_and_bounded_after_bad_input(stack, gateway, before, samples):
    """After every case above: the same good requests get the same answers, and memory did not run away."""
    assert good_answers(gateway, samples) == before["answers"]
    status, answer = post(stack["http"], chat("Say hi.", max_tokens=4))
    assert status == 200 and answer["choices"][0]["message"]["content"], answer
    grown = rss_mib(stack["procs"]["gateway"].pid) - before["gateway_mib"]
    image_grown = rss_mib(stack["procs"]["image"].pid, tree=True) - before["image_mib"]
    print(f"RSS growth over the bad-input run: gateway {grown:+.0f} MiB, image encoder {image_grown:+.0f} MiB")
    assert grown < 200, f"gateway RSS grew {grown:.0f} MiB over the bad-input run"
    assert image_grown < 300, f"image encoder RSS grew {image_grown:.0f} MiB (decompression bombs?)"
    for name, proc in stack["procs"].items():
        assert proc.poll() is None, f"{name} exited"


# -- 3. fuzz: the only outcomes are a result or InputError -------------------------------------------------------

# Bounded and derandomized: the same examples in every CI run (about 30 s in all). A longer hunt, with fresh
# examples each run: FUZZ_EXAMPLES=20000 FUZZ_RANDOM=1 pytest tests/test_bad_input.py -k fuzz
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 300)), deadline=None,
                derandomize=not os.environ.get("FUZZ_RANDOM"), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip


def only_input_errors(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except InputError as e:
        assert str(e), "an InputError must say what is wrong"
        return None


def mutated(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """A valid file with some bytes overwritten, cut short or extended: the inputs that reach parsers' depths."""

    @st.composite
    def build(draw):
        b = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(0, 8))):
            b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
        cut = draw(st.one_of(st.none(), st.integers(0, len(b))))
        return bytes(b[:cut]) + draw(st.binary(max_size=16))

    return build()


@pytest.mark.timeout(120)
@FUZZ
@given(st.one_of(st.binary(max_size=256), mutated([P(text="hi").SerializeToString(),
       pcm_part(np.zeros(4, np.float32)).SerializeToString(),
       P(imu=common_pb2.Imu(data=tensor(np.zeros((6, 16), np.float32)))).SerializeToString()])))  # fmt: skip
def test_fuzz_part_bytes(raw):
    part = only_input_errors(parse_message, P, raw)
    if part is not None:
        only_input_errors(part_input, part)
    request = only_input_errors(parse_message, assistant_pb2.GenerateRequest, raw)
    if request is not None:
        only_input_errors(text_and_inputs, request.parts)


@pytest.mark.timeout(120)
@FUZZ
@given(
    st.one_of(st.sampled_from([*DTYPES, "", "bfloat16", "float32 "]), st.text(max_size=8)),
    st.lists(st.one_of(st.integers(-2, 8), st.integers(-(2**63), 2**63 - 1)), max_size=10),
    st.binary(max_size=128),
    st.one_of(st.none(), st.integers(0, 3)),
)
def test_fuzz_tensor(dtype, shape, data, ndim):
    arr = only_input_errors(from_tensor_msg, T(dtype=dtype, shape=shape, data=data), dtypes=list(DTYPES), ndim=ndim)
    if arr is not None:
        assert arr.nbytes == len(data) and list(arr.shape) == shape


@pytest.mark.timeout(120)
@FUZZ
@given(st.one_of(st.binary(max_size=256), mutated([png(), jpeg(), gif(2)])))
def test_fuzz_image_decoder(raw):
    img = only_input_errors(decode_image, raw, 1_000_000)
    if img is not None:
        assert img.mode == "RGB" and img.size[0] * img.size[1] <= 1_000_000


@pytest.mark.timeout(120)
@FUZZ
@given(st.one_of(st.binary(max_size=256), mutated([audio_file(0.05), audio_file(0.05, "FLAC"),
                                                   audio_file(0.05, "OGG")])))  # fmt: skip
def test_fuzz_audio_decoder(raw):
    audio = only_input_errors(decode_audio, raw, max_seconds=5)
    if audio is not None:
        assert audio.dtype == np.float32 and audio.ndim == 1 and np.isfinite(audio).all()


@pytest.mark.timeout(120)
@FUZZ
@given(st.one_of(st.binary(max_size=256), mutated([gif(3), npy(np.zeros((6, 16), np.float32))])))
def test_fuzz_video_and_imu_decoders(raw):
    frames = only_input_errors(decode_video, raw, 4, 1_000_000)
    if frames is not None:
        assert 1 <= len(frames) <= 4
    imu = only_input_errors(decode_imu, raw)
    if imu is not None:
        assert imu.shape[0] == 6 and bool(imu.isfinite().all())


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(
                        ["id", "modality", "path", "uri", "x"]), inner, max_size=5), max_leaves=12)  # fmt: skip


@pytest.mark.timeout(120)
@FUZZ
@given(st.one_of(st.text(max_size=300), st.lists(JSON.map(json.dumps), max_size=6).map("\n".join)))
def test_fuzz_manifest(text):
    rows = only_input_errors(data.parse_manifest, text, Path("/tmp"))
    if rows is not None:
        assert all(isinstance(r["id"], str) and (r.get("path") or r.get("uri")) for r in rows)


@pytest.mark.timeout(120)
@FUZZ
@given(
    st.integers(-(2**31), 2**31 - 1), st.floats(width=32), st.floats(width=32), st.integers(-(2**31), 2**31 - 1),
    st.floats(width=32), st.lists(st.text(max_size=300), max_size=20), st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)  # fmt: skip
def test_fuzz_generation_params(max_new_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed):
    msg = common_pb2.GenerationParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        repetition_penalty=repetition_penalty, stop=stop, seed=seed,
    )  # fmt: skip
    p = only_input_errors(params_from_msg, msg)
    if p is not None:
        assert 1 <= p.max_new_tokens <= 32_768 and 0 < p.top_p <= 1 and p.top_k >= 0
