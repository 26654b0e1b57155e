"""modalink: an any-modality assistant in the manner of AnyMAL.

Frozen modality encoders -> small trained projectors -> prefix embeddings of a frozen chat LLM.
Everything here runs in one process; the services under ``services/`` are thin servers over it.
"""

import os

# No model or dataset is ever fetched from a hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__version__ = "0.1.0"

MODALITIES = ("image", "audio", "imu", "video")


def check_modality(modality: str) -> str:
    """``modality`` if it is one of ``MODALITIES``; else the ``InputError`` every entry point answers with."""
    if modality not in MODALITIES:
        from modalink.errors import InputError

        raise InputError(f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")
    return modality
