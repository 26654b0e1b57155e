"""Hostile input, media: well-formed video and audio whose decoding would cost far more memory or CPU than its size
suggests, sent through the gateway to real video and audio encoder services. Each is refused before the expensive
step (or stopped while decoding, where the header cannot tell) with a message naming the setting, the services'
memory does not grow with what they refused, and the next good request is answered; the shipped samples still
pass. Figures: ``build/reliability/hostile-*.json`` (docs/RELIABILITY.md).

Classes: a WebM/MKV declares no frame count (frames and frames x pixels are counted while decoding, and refused
from the declared duration when it gives them away), an animated GIF composites every frame onto its canvas
(frames x canvas pixels, from the header), frame geometry (the images' aspect-ratio bound, and a frame that grows
past the pixel limit mid-stream is refused by the decoder before it is allocated), audio (samples per channel and
channels from the header, a length the header does not give while decoding, and resampling from an odd rate).
"""

from __future__ import annotations

import io
import json
import struct
import time
from fractions import Fraction
from pathlib import Path

import av
import grpc
import numpy as np
import pytest
import soundfile as sf
from hostile import MIB, grpc_status, hostile
from procs import FIGURES

from modalink.encoders.audio import decode_audio
from modalink.encoders.video import VideoLimits, decode_video, sample_indices
from modalink.errors import InputError
from modalink.v1 import assistant_pb2_grpc
from modalink.wire import assistant_pb2, common_pb2

pytestmark = pytest.mark.slow


@pytest.fixture
def stack(hostile_stack):
    return hostile_stack


# -- crafting: small files that decode to a lot ------------------------------------------------------------------


def gif_of_dots(w: int, h: int, n: int) -> bytes:
    """An animated GIF: a ``w`` x ``h`` canvas and ``n`` frames of one pixel each, about 25 bytes a frame."""
    out = [b"GIF89a", struct.pack("<HHBBB", w, h, 0x80, 0, 0), b"\0\0\0\xff\xff\xff",
           b"!\xff\x0bNETSCAPE2.0\x03\x01\0\0\0"]  # fmt: skip
    for i in range(n):
        out.append(b"!\xf9\x04\0\x0a\0\0\0")  # graphic control: 100 ms
        out.append(b"," + struct.pack("<HHHHB", i % w, 0, 1, 1, 0) + b"\x02\x02\x44\x01\0")  # one pixel, LZW
    return b"".join([*out, b";"])


class _Pipe(io.BytesIO):
    def seekable(self) -> bool:  # the muxer cannot go back to write the duration: the file declares no length
        return False


def vp8_packets(w: int, h: int) -> list[bytes]:
    """A black key frame and an inter frame that repeats it (a few bytes), VP8 at ``w`` x ``h``."""
    enc = av.CodecContext.create("libvpx", "w")
    enc.width, enc.height, enc.pix_fmt, enc.time_base = w, h, "yuv420p", Fraction(1, 30)
    enc.options = {"deadline": "realtime", "cpu-used": "16"}
    frame = av.VideoFrame.from_ndarray(np.zeros((h, w, 3), np.uint8), format="rgb24").reformat(format="yuv420p")
    packets = []
    for i in range(2):
        frame.pts = i
        packets += [bytes(p) for p in enc.encode(frame)]
    return [*packets, *(bytes(p) for p in enc.encode(None))][:2]


def webm(packets: list[bytes], n: int, declared: bool = True, size: tuple[int, int] | None = None) -> bytes:
    """A WebM of ``n`` frames: the key frame, then the inter frame again and again. ``declared``: with the duration
    in its header (a seekable output), else with none, as a live stream is written."""
    buf = io.BytesIO() if declared else _Pipe()
    with av.open(buf, "w", format="webm") as c:
        s = c.add_stream("libvpx", rate=30)
        s.width, s.height = size or (64, 64)
        for i in range(n):
            p = av.Packet(packets[min(i, len(packets) - 1)])
            p.stream, p.pts, p.dts, p.time_base = s, i, i, Fraction(1, 30)
            c.mux(p)
    return buf.getvalue()


def audio_file(seconds: float, rate: int, fmt: str = "FLAC", channels: int = 1, subtype: str = "PCM_16") -> bytes:
    """Silence (written in blocks: a FLAC of 100 s at 384 kHz is 140 KB)."""
    buf, left = io.BytesIO(), round(seconds * rate)
    with sf.SoundFile(buf, "w", samplerate=rate, channels=channels, format=fmt, subtype=subtype) as f:
        while left > 0:
            f.write(np.zeros((min(left, 1 << 20), channels), np.int16))
            left -= 1 << 20
    return buf.getvalue()


def no_length(flac: bytes) -> bytes:
    """The FLAC with STREAMINFO's total sample count 0: "unknown", as a stream's."""
    raw = bytearray(flac)
    raw[21] &= 0xF0
    raw[22:26] = b"\0\0\0\0"
    return bytes(raw)


def embed(stack, part: common_pb2.Part):
    """Embed one media part through the gateway; (status, message), as ``hostile`` wants."""

    def call():
        with grpc.insecure_channel(stack["gateway"], options=[("grpc.max_send_message_length", 64 * MIB)]) as ch:
            assistant_pb2_grpc.AssistantStub(ch).Embed(assistant_pb2.EmbedRequest(part=part), timeout=300)

    return lambda: grpc_status(call)


def video(raw: bytes) -> common_pb2.Part:
    return common_pb2.Part(video=common_pb2.Video(data=raw))


def audio(raw: bytes) -> common_pb2.Part:
    return common_pb2.Part(audio=common_pb2.Audio(data=raw))


def seconds(case: str) -> float:
    return json.loads((FIGURES / f"hostile-{case}.json").read_text())["seconds"]


# -- video -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames, limit", [(3000, "MODALINK_MAX_VIDEO_PIXELS"), (10_000, "MODALINK_MAX_VIDEO_FRAMES")])
def test_an_animated_gif_of_tiny_frames_on_a_huge_canvas_is_refused_from_its_header(stack, frames, limit):
    """Pillow composites every frame onto the whole canvas: 3000 one-pixel frames on 4000 x 4000 (69 KB) are 48
    billion pixels of work (0.17 s a frame here, and the frames were seeked twice: about 17 minutes). Refused
    from the blocks (frames x canvas), before one seek."""
    raw = gif_of_dots(4000, 4000, frames)
    case = f"gif-4000x4000-{frames}-dots-{len(raw) // 1000}KB"
    status, message = hostile(stack, case, embed(stack, video(raw)))
    assert status == "INVALID_ARGUMENT" and limit in message, message
    assert seconds(case) < 5


@pytest.fixture(scope="module")
def big_vp8():
    return vp8_packets(4000, 4000)  # encoding the key frame is the slow part (~3 s)


@pytest.mark.parametrize(
    "name, size, frames, declared, limit",
    [
        ("64x64-10000-frames-no-duration", (64, 64), 10_000, False, "MODALINK_MAX_VIDEO_FRAMES"),
        ("64x64-10000-frames", (64, 64), 10_000, True, "MODALINK_MAX_VIDEO_FRAMES"),
        ("4000x4000-300-frames", (4000, 4000), 300, True, "MODALINK_MAX_VIDEO_PIXELS"),
        ("4000x4000-300-frames-no-duration", (4000, 4000), 300, False, "MODALINK_MAX_VIDEO_PIXELS"),
    ],
)
def test_a_webm_that_decodes_to_too_much_is_refused(stack, big_vp8, name, size, frames, declared, limit):
    """A WebM declares no frame count. With the duration in its header, frames (duration x rate) and frames x
    pixels are refused before decoding; without it, decoding stops at the limit (frames are counted, and only a
    bounded sample of them is kept while decoding), within MODALINK_MAX_VIDEO_DECODE_S."""
    packets = big_vp8 if size == (4000, 4000) else vp8_packets(*size)
    raw = webm(packets, frames, declared, size)
    case = f"webm-{name}-{len(raw) // 1000}KB"
    status, message = hostile(stack, case, embed(stack, video(raw)))
    assert status == "INVALID_ARGUMENT" and limit in message, message
    assert seconds(case) < (2 if declared else VideoLimits().seconds)


def test_video_frames_obey_the_images_aspect_ratio_bound(stack):
    """A WebM of 64 x 2000 frames and a GIF of a 4000 x 100 canvas: refused from the header, before a frame is
    decoded, as an image of that shape is (its resize would blow the long side up)."""
    for case, raw in (("webm-64x2000", webm(vp8_packets(64, 2000), 3, True, (64, 2000))),
                      ("gif-4000x100", gif_of_dots(4000, 100, 3))):  # fmt: skip
        status, message = hostile(stack, case, embed(stack, video(raw)))
        assert status == "INVALID_ARGUMENT" and "aspect ratio is beyond 20:1" in message, message


def test_a_frame_that_grows_mid_stream_is_refused_before_it_is_allocated():
    """The header says 64 x 64; a later key frame is 1200 x 1000. The decoder refuses it (max_pixels) before it
    allocates it, the limit being the frame limit; frames of a folder are checked as images."""
    small, big = vp8_packets(64, 64), vp8_packets(1200, 1000)
    raw = webm([small[0], small[1], big[0], small[0]], 4, True, (64, 64))
    assert len(decode_video(raw, 8, max_pixels=2_000_000)) == 4
    with pytest.raises(InputError, match="not a decodable video"):
        decode_video(raw, 8, max_pixels=1_000_000)


def test_decoding_stops_at_the_deadline():
    """MODALINK_MAX_VIDEO_DECODE_S: a stream within every other limit, stopped by the clock."""
    raw = webm(vp8_packets(1920, 1080), 400, False, (1920, 1080))
    t0 = time.perf_counter()
    assert len(decode_video(raw, 8, limits=VideoLimits(seconds=600))) == 8
    whole = time.perf_counter() - t0  # this machine's time for the whole stream: the deadline is a quarter of it
    deadline = float(f"{whole / 4:.3g}")
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=rf"took more than {deadline:g} s to decode .*MODALINK_MAX_VIDEO_DECODE_S"):
        decode_video(raw, 8, limits=VideoLimits(seconds=deadline))
    assert time.perf_counter() - t0 < whole  # stopped well before the end


def test_a_long_stream_without_a_frame_count_is_sampled_with_bounded_memory():
    """3000 frames, no duration: 8 frames spread over the whole clip (each frame's grey level is its index / 12),
    with never more than 16 kept while decoding."""
    enc = av.CodecContext.create("libvpx", "w")
    enc.width, enc.height, enc.pix_fmt, enc.time_base = 64, 64, "yuv420p", Fraction(1, 30)
    enc.options = {"deadline": "realtime", "cpu-used": "16", "kf-max-dist": "1"}
    packets = []
    for i in range(250):
        frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i, np.uint8), format="rgb24").reformat(format="yuv420p")
        frame.pts = i
        packets += [bytes(p) for p in enc.encode(frame)]
    packets += [bytes(p) for p in enc.encode(None)]
    buf = _Pipe()
    with av.open(buf, "w", format="webm") as c:
        s = c.add_stream("libvpx", rate=30)
        s.width, s.height = 64, 64
        for i in range(3000):  # every packet is a key frame: each repeated 12 times
            p = av.Packet(packets[i // 12])
            p.stream, p.pts, p.dts, p.time_base = s, i, i, Fraction(1, 30)
            c.mux(p)
    frames = decode_video(buf.getvalue(), 8)
    levels = [int(np.asarray(f)[32, 32, 0]) for f in frames]
    # Each is the kept frame nearest the uniform sample: 3000 frames thinned to every 256th, so within 128 frames
    # (10.7 grey levels) of it, plus the codec's error.
    targets = [i / 12 for i in sample_indices(3000, 8)]
    assert len(frames) == 8 and all(abs(a - b) <= 14 for a, b in zip(levels, targets, strict=True)), levels
    assert levels == sorted(levels) and len(set(levels)) == 8, levels


# -- audio -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, make, limit",
    [
        ("flac-384kHz-101s", lambda: audio_file(101, 384_000), "MODALINK_MAX_AUDIO_SAMPLES"),
        ("flac-384kHz-101s-no-length", lambda: no_length(audio_file(101, 384_000)), "MODALINK_MAX_AUDIO_SAMPLES"),
        ("wav-1MHz", lambda: audio_file(1, 1_000_000, "WAV"), "outside 1..384000 Hz"),
        ("wav-16-channels", lambda: audio_file(1, 16_000, "WAV", 16, "PCM_U8"), "MODALINK_MAX_AUDIO_CHANNELS"),
    ],
)
def test_audio_that_decodes_to_too_many_samples_is_refused(stack, name, make, limit):
    """A 140 KB FLAC of 101 s at 384 kHz is within MODALINK_MAX_AUDIO_SECONDS but 39 million samples (155 MB
    decoded, and their resampling): refused from the header, or, when the header gives no length, at the limit
    while decoding. A rate over 384 kHz and more channels than the limit are refused from the header."""
    raw = make()
    case = f"audio-{name}-{len(raw) // 1000}KB"
    status, message = hostile(stack, case, embed(stack, audio(raw)))
    assert status == "INVALID_ARGUMENT" and limit in message, message
    assert seconds(case) < (20 if "no-length" in name else 5)  # without a length: decoded up to the limit


def test_audio_without_a_length_in_its_header_is_held_to_the_limits_while_decoding():
    """The samples per channel and the seconds, counted as the buffer grows (the header cannot tell)."""
    raw = no_length(audio_file(60, 44_100))
    with pytest.raises(InputError, match=r"more than 200000 samples per channel; the limit is 200000 \(MODALINK_MAX"):
        decode_audio(raw, max_samples=200_000)
    with pytest.raises(InputError, match=r"longer than the limit of 10 s \(MODALINK_MAX_AUDIO_SECONDS\)"):
        decode_audio(raw, max_seconds=10)


def test_audio_at_an_odd_rate_is_resampled_at_a_bounded_cost(stack):
    """10 s at 383,999 Hz (within every limit): the exact ratio 16000/383999 wants a 7.7M-tap filter (30 s of it:
    7.6 s and 300 MiB here); resampled by 1/24 instead (3 ppm off)."""
    raw = audio_file(10, 383_999, "WAV")
    case = f"audio-wav-383999Hz-10s-{len(raw) // MIB}MB"
    status, message = hostile(stack, case, embed(stack, audio(raw)))
    assert status == "OK", message
    assert seconds(case) < 10


@pytest.mark.parametrize("modality", ["video", "audio"])
def test_the_shipped_samples_are_still_accepted(stack, samples, modality):
    raw = Path(samples[modality]).read_bytes()
    status, message = hostile(stack, f"sample-{modality}", embed(stack, video(raw) if modality == "video" else
                                                                   audio(raw)))  # fmt: skip
    assert status == "OK", message
