"""Video encoder: sampled frames through the image encoder, then the clip's tokens (``clip_tokens``).

``frames`` (the default): one token per sampled frame, its spatial mean, in time order, so the projector and the
LLM see what comes first. ``st-pool`` (the earlier adapters'): Video-ChatGPT's spatial and temporal pooling, T + S
tokens, the temporal mean of every spatial token followed by the spatial mean of every frame.
"""

from __future__ import annotations

import bisect
import io
import itertools
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from modalink.config import Settings
from modalink.encoders.base import Encoder, Raw, read_bytes
from modalink.encoders.image import MAX_ASPECT, ImageEncoder, decode_image
from modalink.errors import InputError

FRAME_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
MAX_DECODED_FRAMES = 4096  # the default of MODALINK_MAX_VIDEO_FRAMES


@dataclass(frozen=True)
class VideoLimits:
    """What decoding one video may cost, checked from its header before decoding and frame by frame while decoding
    (the settings named in each refusal)."""

    frame_pixels: int = 40_000_000  # one frame, as an image (MODALINK_MAX_IMAGE_PIXELS)
    frames: int = MAX_DECODED_FRAMES  # frames decoded (MODALINK_MAX_VIDEO_FRAMES)
    pixels: int = 1_000_000_000  # frames x width x height decoded (MODALINK_MAX_VIDEO_PIXELS)
    seconds: float = 20.0  # wall clock (MODALINK_MAX_VIDEO_DECODE_S)

    @classmethod
    def of(cls, settings: Settings) -> VideoLimits:
        return cls(settings.max_image_pixels, settings.max_video_frames, settings.max_video_pixels,
                   settings.max_video_decode_s)  # fmt: skip


class _Budget:
    """Frames, pixels and time spent decoding one video, refused as soon as one passes its limit."""

    def __init__(self, limits: VideoLimits):
        self.limits, self.frames, self.pixels = limits, 0, 0
        self.deadline = time.monotonic() + limits.seconds

    def frame_size(self, w: int, h: int) -> None:
        """A frame's geometry, as an image's: its pixels, and the aspect ratio the encoder's resize would blow up."""
        if w < 1 or h < 1 or w * h > self.limits.frame_pixels:
            raise InputError(f"video frame size {w}x{h} exceeds {self.limits.frame_pixels} pixels "
                             "(MODALINK_MAX_IMAGE_PIXELS)")  # fmt: skip
        if max(w, h) > MAX_ASPECT * min(w, h):
            raise InputError(f"video frame of {w}x{h} pixels: the aspect ratio is beyond {MAX_ASPECT}:1")

    def declared(self, what: str, n: int, w: int, h: int) -> None:
        """What the header says the video holds, refused before a frame is decoded."""
        if n > self.limits.frames:
            raise InputError(f"{what} has {n} frames; the limit is {self.limits.frames} (MODALINK_MAX_VIDEO_FRAMES)")
        if n * w * h > self.limits.pixels:
            raise InputError(f"{what} has {n} frames of {w}x{h}: {n * w * h} pixels to decode; the limit is "
                             f"{self.limits.pixels} (MODALINK_MAX_VIDEO_PIXELS)")  # fmt: skip

    def charge(self, w: int, h: int) -> None:
        """One more decoded frame of ``w`` x ``h`` pixels."""
        self.frame_size(w, h)
        self.frames += 1
        self.pixels += w * h
        if self.frames > self.limits.frames:
            raise InputError(f"video has more than {self.limits.frames} frames; the limit is {self.limits.frames} "
                             "(MODALINK_MAX_VIDEO_FRAMES)")  # fmt: skip
        if self.pixels > self.limits.pixels:
            raise InputError(f"video decodes to more than {self.limits.pixels} pixels (frames x width x height) "
                             f"by frame {self.frames}; the limit is {self.limits.pixels} "
                             "(MODALINK_MAX_VIDEO_PIXELS)")  # fmt: skip
        self.check_time()

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise InputError(f"video took more than {self.limits.seconds:g} s to decode ({self.frames} frames); the "
                             f"limit is {self.limits.seconds:g} s (MODALINK_MAX_VIDEO_DECODE_S)")  # fmt: skip


def sample_indices(n: int, k: int) -> list[int]:
    """``k`` frame indices spread uniformly over ``n`` frames (centers of k equal segments)."""
    if n <= k:
        return list(range(n))
    return [int((i + 0.5) * n / k) for i in range(k)]


SIDE = 448  # a sampled frame's short side is shrunk to this (the encoders resize it to 224 or 336 anyway)


def _shrink(img: Image.Image, side: int = SIDE) -> Image.Image:
    img = img.convert("RGB")
    if min(img.size) > side:
        img.thumbnail((side * img.size[0] // min(img.size), side * img.size[1] // min(img.size)))
    return img


def _frame_image(frame, side: int = SIDE) -> Image.Image:
    """A decoded video frame as an RGB image, its short side shrunk to ``side`` by the scaler in the same pass as
    the colour conversion (a 4000x4000 frame: 20 ms, against 600 ms converted at full size, then shrunk)."""
    w, h = frame.width, frame.height
    if min(w, h) <= side:
        return frame.to_image()
    return frame.to_image(width=max(1, side * w // min(w, h)), height=max(1, side * h // min(w, h)),
                          interpolation="AREA")  # fmt: skip


def _gif_frames(raw: bytes) -> tuple[list[int | None], tuple[int, int]]:
    """Each frame's duration (ms, None where the file gives none) and the canvas all frames cover, read from the
    GIF's blocks as Pillow reads them, without decoding a pixel: seeking composites every frame onto the canvas,
    so reading durations by seeking costs a full decode, and Pillow grows the canvas to cover a frame that reaches
    past the logical screen."""
    w, h = struct.unpack_from("<HH", raw, 6)
    o = 13 + (3 << ((raw[10] & 7) + 1) if raw[10] & 0x80 else 0)
    durations: list[int | None] = []
    delay = None
    try:
        while o < len(raw) and raw[o] != 0x3B:
            if raw[o] == 0x21:  # extension: label, then sub-blocks
                label, o = raw[o + 1], o + 2
                if label == 0xF9 and raw[o] >= 3:  # graphic control: the next frame's delay, in 1/100 s
                    delay = int.from_bytes(raw[o + 2 : o + 4], "little") * 10
                while raw[o]:
                    o += 1 + raw[o]
                o += 1
            elif raw[o] == 0x2C:  # image: descriptor, local palette, LZW code size, sub-blocks
                x, y, fw, fh, flags = struct.unpack_from("<HHHHB", raw, o + 1)
                w, h = max(w, x + fw), max(h, y + fh)
                o += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0) + 1
                durations.append(delay)
                delay = None
                while raw[o]:
                    o += 1 + raw[o]
                o += 1
            else:  # Pillow skips a stray byte
                o += 1
    except (IndexError, struct.error):  # truncated: the frames whose descriptors were read
        pass
    return durations, (w, h)


def _webp_durations(raw: bytes) -> list[int]:
    """Each frame's duration (ms) from the ANMF chunks of an animated WebP (Pillow reports it only once the frame
    is decoded)."""
    out, o = [], 12
    while o + 8 <= len(raw):
        size = int.from_bytes(raw[o + 4 : o + 8], "little")
        if raw[o : o + 4] == b"ANMF" and size >= 16:
            out.append(int.from_bytes(raw[o + 20 : o + 23], "little"))
        o += 8 + size + (size & 1)
    return out


def _sample_by_time(img: Image.Image, durations: list, k: int, budget: _Budget) -> list[Image.Image]:
    """``k`` frames of an animated image sampled uniformly in time, honouring each frame's duration, in one forward
    pass that stops at the last frame sampled.

    GIF encoders merge identical consecutive frames into one longer frame, so sampling by frame index
    would see a still item once instead of for as long as it is shown.
    """
    durations = [max(1, int(d or 100)) for d in durations]
    total, ends = sum(durations), list(itertools.accumulate(durations))
    wanted = [min(len(durations) - 1, bisect.bisect_right(ends, (j + 0.5) * total / k)) for j in range(k)]
    frames, at = [], 0
    budget.charge(*img.size)
    for i in wanted:
        while at < i:  # frame by frame: each one composited onto the canvas is the cost the budget counts
            at += 1
            img.seek(at)
            budget.charge(*img.size)
        frames.append(_shrink(img))
    return frames


def _animated_frames(img: Image.Image, raw: bytes, k: int, budget: _Budget) -> list[Image.Image]:
    """Frames of an animated image (GIF/WebP) or of a still one, bounded from the header: Pillow composites every
    frame onto the full canvas, so the cost is frames x canvas pixels, whatever each frame holds."""
    if img.format == "GIF":
        durations, size = _gif_frames(raw)
    else:
        n = getattr(img, "n_frames", 1)
        durations, size = (_webp_durations(raw) if img.format == "WEBP" else []), img.size
        if len(durations) != n:  # other formats, or chunks that do not add up: sampled by index
            durations = [None] * n
    budget.frame_size(*size)
    budget.declared("animated image", len(durations), *size)
    if len(durations) <= 1:
        return [_shrink(img)]
    return _sample_by_time(img, durations, k, budget)


class _Thinned:
    """Frames of a stream of unknown length sampled with bounded memory: every ``step``-th frame is kept; when
    ``2 k`` are kept, every other one is dropped and the step doubles. At the end, the kept frame nearest each of
    ``sample_indices(n, k)`` (within step / 2 of it; exactly it when fewer than ``2 k`` frames came)."""

    def __init__(self, k: int):
        self.k, self.step, self.n, self.kept = k, 1, 0, []

    def offer(self, frame) -> None:
        self.n += 1
        if (self.n - 1) % self.step:
            return
        self.kept.append(_frame_image(frame))
        if len(self.kept) >= 2 * self.k:
            self.kept, self.step = self.kept[::2], self.step * 2

    def sample(self) -> list[Image.Image]:
        return [self.kept[min(len(self.kept) - 1, round(i / self.step))] for i in sample_indices(self.n, self.k)]


def _av_frames(raw: bytes, k: int, budget: _Budget) -> list[Image.Image]:
    """Frames of a video container (MP4, WebM, MKV...) via PyAV: refused from the header when it declares more than
    the limits allow, and while decoding (a WebM or MKV declares no frame count, and a frame may change size)."""
    import av

    with av.open(io.BytesIO(raw)) as container:
        if not container.streams.video:
            raise InputError("media file has no video stream")
        stream = container.streams.video[0]
        budget.frame_size(stream.width, stream.height)
        n = stream.frames
        if not n and container.duration and stream.average_rate:  # the declared length x the frame rate
            n = int(container.duration / av.time_base * stream.average_rate)
        budget.declared("video", n, stream.width, stream.height)
        # The decoder itself refuses a frame larger than a frame may be, before allocating it (the size can
        # change at any key frame, past the header's).
        stream.codec_context.options = {"max_pixels": str(budget.limits.frame_pixels)}
        wanted = set(sample_indices(stream.frames, k)) if stream.frames else None
        thinned, frames = _Thinned(k), []
        for i, frame in enumerate(container.decode(stream)):
            budget.charge(frame.width, frame.height)
            if wanted is None:
                thinned.offer(frame)
            elif i in wanted:
                frames.append(_frame_image(frame))
    return thinned.sample() if wanted is None else frames


def _container_frames(raw: bytes, k: int, limits: VideoLimits) -> list[Image.Image]:
    """Frames of an animated image (GIF/WebP) via Pillow, else of a video container (MP4, WebM...) via PyAV."""
    budget = _Budget(limits)
    try:
        img = Image.open(io.BytesIO(raw))
        return _animated_frames(img, raw, k, budget)
    except UnidentifiedImageError:
        pass
    except (InputError, MemoryError):
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"video frame dimensions exceed the decoder's safety limit: {e}") from None
    except Exception as e:  # noqa: BLE001  (a format plugin's error on untrusted bytes, of any type)
        raise InputError(f"corrupt animated image: {type(e).__name__}: {e}") from None
    try:
        return _av_frames(raw, k, budget)
    except (InputError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001  (FFmpegError, or a frame conversion's error on odd data)
        raise InputError(f"not a decodable video (GIF/WebP/MP4/WebM or a folder of frames expected): {e}") from None


def decode_video(
    data: Raw | list[Raw] | list[Image.Image],
    n_frames: int = 8,
    max_pixels: int = 40_000_000,
    limits: VideoLimits | None = None,
) -> list[Image.Image]:
    """Up to ``n_frames`` RGB frames sampled uniformly from a folder of frames, a list of frames, or a file.

    ``limits`` bound the cost of decoding (default: ``VideoLimits`` with ``max_pixels`` per frame)."""
    limits = limits or VideoLimits(frame_pixels=max_pixels)
    if isinstance(data, (str, Path)) and Path(data).is_dir():
        data = sorted(p for p in Path(data).iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not data:
            raise InputError("video folder has no frame images (.png/.jpg/.webp/.bmp)")
    if isinstance(data, list):
        if not data:
            raise InputError("video has no frames")
        if len(data) > limits.frames:
            raise InputError(f"video has {len(data)} frames; the limit is {limits.frames} (MODALINK_MAX_VIDEO_FRAMES)")
        # Only the sampled frames are decoded, each checked as an image (pixels and aspect ratio) before its pixels.
        return [decode_image(data[i], limits.frame_pixels) for i in sample_indices(len(data), n_frames)]
    frames = _container_frames(read_bytes(data, "video"), n_frames, limits)
    if not frames:
        raise InputError("video has no decodable frames")
    return frames


def clip_tokens(frames: torch.Tensor, kind: str = "frames") -> torch.Tensor:
    """A clip's tokens from its sampled frames' image features [T, S, d]: ``frames``, one token per frame in time
    order (the frame's spatial mean) [T, d]; ``st-pool``, Video-ChatGPT's spatial pooling over time and temporal
    pooling over space [S + T, d], where time survives only in the last T rows."""
    if kind == "frames":
        return frames.mean(1)
    if kind == "st-pool":
        return torch.cat([frames.mean(0), frames.mean(1)])
    raise ValueError(f"unknown video tokens {kind!r}: 'frames' or 'st-pool'")


class VideoEncoder(Encoder):
    modality = "video"

    def __init__(self, settings: Settings, image_encoder: ImageEncoder):
        self.image = image_encoder
        self.tokens = settings.video_tokens
        self.name = f"{image_encoder.name}+{self.tokens}"
        self.feature_dim = image_encoder.feature_dim
        self.n_frames = settings.video_frames
        self.max_pixels = settings.max_image_pixels
        self.limits = VideoLimits.of(settings)

    def decode(self, data: Raw | list) -> torch.Tensor:
        frames = decode_video(data, self.n_frames, self.max_pixels, self.limits)
        return torch.stack([self.image.decode(f) for f in frames])  # [T, 3, H, W]

    def encode(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        # All frames of all clips in one image-encoder pass.
        flat = self.image.encode(list(torch.cat(inputs)))
        out, i = [], 0
        for clip in inputs:
            f = torch.stack(flat[i : i + len(clip)])  # [T, S, d]
            i += len(clip)
            out.append(clip_tokens(f, self.tokens))
        return out


def frames_to_gif(frames: list[np.ndarray] | list[Image.Image], duration_ms: int = 250) -> bytes:
    """Encode frames as an animated GIF (used to make sample clips from packaged images)."""
    imgs = [f if isinstance(f, Image.Image) else Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    imgs[0].save(buf, format="GIF", save_all=True, append_images=imgs[1:], duration=duration_ms, loop=0)
    return buf.getvalue()
