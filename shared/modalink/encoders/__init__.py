"""Frozen modality encoders, one file each; ``load_encoder`` builds the configured one by modality."""

from __future__ import annotations

from modalink.config import Settings, get_settings
from modalink.encoders.base import Encoder


def load_encoder(modality: str, settings: Settings | None = None, image: Encoder | None = None) -> Encoder:
    """The encoder for ``modality`` from config (video shares ``image`` when given); a plugin's from its
    ``Modality.load_encoder``."""
    settings = settings or get_settings()
    settings.apply_threads()
    if modality == "image":
        from modalink.encoders.image import load_image_encoder

        return load_image_encoder(settings)
    if modality == "audio":
        from modalink.encoders.audio import load_audio_encoder

        return load_audio_encoder(settings)
    if modality == "imu":
        from modalink.encoders.imu import load_imu_encoder

        return load_imu_encoder(settings)
    if modality == "video":
        from modalink.encoders.image import ImageEncoder, load_image_encoder
        from modalink.encoders.video import VideoEncoder

        img = image if isinstance(image, ImageEncoder) else load_image_encoder(settings)
        return VideoEncoder(settings, img)
    from modalink.modality import PluginError, get

    enc = get(modality).load_encoder(settings)  # InputError for a name nothing registered
    if not isinstance(enc, Encoder) or not isinstance(getattr(enc, "feature_dim", None), int) or enc.feature_dim < 1:
        raise PluginError(f"modality plugin {modality!r}: load_encoder must return a modalink.encoders.base.Encoder "
                          f"with an integer feature_dim >= 1, got {type(enc).__name__}")  # fmt: skip
    return enc


__all__ = ["Encoder", "load_encoder"]
