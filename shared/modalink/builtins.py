"""The four built-in modalities, registered as plugins like any other (``pyproject.toml``'s
``modalink.modalities`` entry points). Each spec points at the code that already serves it: the encoder in
``modalink/encoders/<name>.py``, the data builder in ``modalink/data.py``, the sample in ``modalink/samples.py``.
Heavy modules are imported only when a spec's function is called."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modalink import data
from modalink.modality import Modality
from modalink.projectors import DEFAULT_PROJECTORS


def _load(modality: str):
    def load(settings):
        from modalink.encoders import load_encoder

        return load_encoder(modality, settings)

    return load


def _build(modality: str):
    def build(out: Path, cfg: Any) -> dict[str, int]:
        return data.BUILDERS[modality](out, cfg)

    return build


def _sample(modality: str):
    def write(out: Path) -> dict:
        from modalink import samples

        return samples.SAMPLES[modality](out)

    return write


def _settings(*names: str, encoder: str):
    return lambda s: {"encoder": getattr(s, encoder), **{n: getattr(s, n) for n in names}}


def _spec(name: str, **kw) -> Modality:
    return Modality(
        name=name, load_encoder=_load(name), questions=data.QUESTIONS[name], words=data.CLASS_WORDS[name],
        checks=data.CHECKS[name], projector=DEFAULT_PROJECTORS[name], build_data=_build(name),
        write_sample=_sample(name), **kw,
    )  # fmt: skip


IMAGE = _spec("image", answers=data.ANSWERS["image"], file_types=(".png", ".jpg", ".jpeg", ".webp", ".bmp"),
              mime="image/png", preprocessing=_settings(encoder="image_encoder"))  # fmt: skip
AUDIO = _spec("audio", answers=data.ANSWERS["audio"], file_types=(".wav", ".flac", ".ogg"), mime="audio/wav",
              preprocessing=_settings(encoder="audio_encoder"))  # fmt: skip
IMU = _spec("imu", answers=data.ANSWERS["imu"], describe=data.ACTIVITY_TEXT.__getitem__, input="tensor",
            file_types=(".npy", ".csv"), preprocessing=_settings("imu_channels", encoder="imu_encoder"))  # fmt: skip
# A video's captions name its items in order (data.answer_templates); these are the one-item ones.
VIDEO = _spec("video", answers=tuple(t.replace("{a}", "{label}") for t in data.VIDEO_ANSWERS[1]),
              file_types=(".gif", ".mp4", ".webm", ".mov"), mime="image/gif",
              preprocessing=_settings("video_frames", "video_tokens", encoder="image_encoder"))  # fmt: skip
