"""modalink: an any-modality assistant in the manner of AnyMAL.

Frozen modality encoders -> small trained projectors -> prefix embeddings of a frozen chat LLM.
Everything here runs in one process; the services under ``services/`` are thin servers over it.
"""

import os

# No model or dataset is ever fetched from a hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__version__ = "0.1.0"


def __getattr__(name: str):
    """``MODALITIES``: every registered modality (``modalink.modality``: the built-ins, then plugins by name)."""
    if name == "MODALITIES":
        from modalink.modality import names

        return names()
    raise AttributeError(f"module 'modalink' has no attribute {name!r}")


def check_modality(modality: str) -> str:
    """``modality`` if it is a registered one; else the ``InputError`` every entry point answers with."""
    from modalink.modality import names

    if modality not in names():
        from modalink.errors import InputError

        raise InputError(f"unknown modality {modality!r}; expected one of {', '.join(names())}")
    return modality
