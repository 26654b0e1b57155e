"""Video encoder: frames through the image encoder, then Video-ChatGPT's spatial and temporal pooling.

A clip of T sampled frames with S spatial tokens each gives T + S tokens: the temporal mean of every
spatial token (what is where) followed by the spatial mean of every frame (what happens when).
"""

from __future__ import annotations

import bisect
import io
import itertools
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from modalink.config import Settings
from modalink.encoders.base import Encoder, Raw, read_bytes
from modalink.encoders.image import ImageEncoder, decode_image
from modalink.errors import InputError

FRAME_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
MAX_DECODED_FRAMES = 4096


def sample_indices(n: int, k: int) -> list[int]:
    """``k`` frame indices spread uniformly over ``n`` frames (centers of k equal segments)."""
    if n <= k:
        return list(range(n))
    return [int((i + 0.5) * n / k) for i in range(k)]


def _shrink(img: Image.Image, side: int = 448) -> Image.Image:
    img = img.convert("RGB")
    if min(img.size) > side:
        img.thumbnail((side * img.size[0] // min(img.size), side * img.size[1] // min(img.size)))
    return img


def _sample_by_time(img: Image.Image, n: int, k: int) -> list[Image.Image]:
    """``k`` frames of an animated image sampled uniformly in time, honouring each frame's duration.

    GIF encoders merge identical consecutive frames into one longer frame, so sampling by frame index
    would see a still item once instead of for as long as it is shown.
    """
    durations = []
    for i in range(n):
        img.seek(i)
        durations.append(max(1, int(img.info.get("duration") or 100)))
    if n == 1:
        img.seek(0)
        return [img.copy()]
    total = sum(durations)
    ends = list(itertools.accumulate(durations))
    frames = []
    for j in range(k):
        t = (j + 0.5) * total / k
        img.seek(bisect.bisect_right(ends, t))
        frames.append(img.copy())
    return frames


def _container_frames(raw: bytes, k: int, max_pixels: int) -> list[Image.Image]:
    """Frames of an animated image (GIF/WebP) via Pillow, else of a video container (MP4, WebM...) via PyAV."""
    try:
        img = Image.open(io.BytesIO(raw))
        if img.size[0] * img.size[1] > max_pixels:
            raise InputError(f"video frame size {img.size[0]}x{img.size[1]} exceeds {max_pixels} pixels")
        n = getattr(img, "n_frames", 1)
        if n > MAX_DECODED_FRAMES:
            raise InputError(f"animated image has {n} frames; the limit is {MAX_DECODED_FRAMES}")
        return [_shrink(f) for f in _sample_by_time(img, n, k)]
    except UnidentifiedImageError:
        pass
    except (InputError, MemoryError):
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"video frame dimensions exceed the decoder's safety limit: {e}") from None
    except Exception as e:  # noqa: BLE001  (a format plugin's error on untrusted bytes, of any type)
        raise InputError(f"corrupt animated image: {type(e).__name__}: {e}") from None
    import av

    try:
        with av.open(io.BytesIO(raw)) as container:
            if not container.streams.video:
                raise InputError("media file has no video stream")
            stream = container.streams.video[0]
            if stream.width * stream.height > max_pixels:
                raise InputError(f"video frame size {stream.width}x{stream.height} exceeds {max_pixels} pixels")
            wanted = set(sample_indices(stream.frames, k)) if stream.frames else None
            frames = []
            for i, frame in enumerate(container.decode(stream)):
                if i >= MAX_DECODED_FRAMES:
                    break
                if wanted is None or i in wanted:
                    frames.append(_shrink(frame.to_image()))
    except (InputError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001  (FFmpegError, or a frame conversion's error on odd data)
        raise InputError(f"not a decodable video (GIF/WebP/MP4/WebM or a folder of frames expected): {e}") from None
    if wanted is None:
        frames = [frames[i] for i in sample_indices(len(frames), k)]
    return frames


def decode_video(
    data: Raw | list[Raw] | list[Image.Image], n_frames: int = 8, max_pixels: int = 40_000_000
) -> list[Image.Image]:
    """Up to ``n_frames`` RGB frames sampled uniformly from a folder of frames, a list of frames, or a file."""
    if isinstance(data, (str, Path)) and Path(data).is_dir():
        data = sorted(p for p in Path(data).iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not data:
            raise InputError("video folder has no frame images (.png/.jpg/.webp/.bmp)")
    if isinstance(data, list):
        if not data:
            raise InputError("video has no frames")
        if len(data) > MAX_DECODED_FRAMES:
            raise InputError(f"video has {len(data)} frames; the limit is {MAX_DECODED_FRAMES}")
        return [decode_image(data[i], max_pixels) for i in sample_indices(len(data), n_frames)]
    frames = _container_frames(read_bytes(data, "video"), n_frames, max_pixels)
    if not frames:
        raise InputError("video has no decodable frames")
    return frames


class VideoEncoder(Encoder):
    modality = "video"

    def __init__(self, settings: Settings, image_encoder: ImageEncoder):
        self.image = image_encoder
        self.name = f"{image_encoder.name}+st-pool"
        self.feature_dim = image_encoder.feature_dim
        self.n_frames = settings.video_frames
        self.max_pixels = settings.max_image_pixels

    def decode(self, data: Raw | list) -> torch.Tensor:
        frames = decode_video(data, self.n_frames, self.max_pixels)
        return torch.stack([self.image.decode(f) for f in frames])  # [T, 3, H, W]

    def encode(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        # All frames of all clips in one image-encoder pass.
        flat = self.image.encode(list(torch.cat(inputs)))
        out, i = [], 0
        for clip in inputs:
            f = torch.stack(flat[i : i + len(clip)])  # [T, S, d]
            i += len(clip)
            out.append(torch.cat([f.mean(0), f.mean(1)]))  # [S + T, d]
        return out


def frames_to_gif(frames: list[np.ndarray] | list[Image.Image], duration_ms: int = 250) -> bytes:
    """Encode frames as an animated GIF (used to make sample clips from packaged images)."""
    imgs = [f if isinstance(f, Image.Image) else Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    imgs[0].save(buf, format="GIF", save_all=True, append_images=imgs[1:], duration=duration_ms, loop=0)
    return buf.getvalue()
