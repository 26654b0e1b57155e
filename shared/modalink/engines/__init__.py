"""The LLM runtimes, one file each behind ``modalink.engine.Engine``, and the factory that picks one.

    transformers  default, CPU or GPU: our own batched decode loop (``engines/transformers.py``)
    vllm          GPU: vLLM fed with prompt embeddings (``engines/vllm.py``)
    llamacpp      CPU: llama.cpp running the GGUF file, fed with prompt embeddings (``engines/llamacpp.py``)

A new runtime is one more file and one more line in ``RUNTIMES``; nothing else changes.
"""

from __future__ import annotations

import importlib

from modalink.engine import Engine
from modalink.errors import ConfigError

# MODALINK_ENGINE -> (module, class); the class is built by its ``from_settings``.
RUNTIMES = {
    "transformers": ("modalink.engines.transformers", "TransformersEngine"),
    "vllm": ("modalink.engines.vllm", "VLLMEngine"),
    "llamacpp": ("modalink.engines.llamacpp", "LlamaCppEngine"),
}


def load_engine(settings=None) -> Engine:
    """The engine ``MODALINK_ENGINE`` names, loaded (runtimes import their heavy libraries only when chosen)."""
    from modalink.config import get_settings

    settings = settings or get_settings()
    if settings.engine not in RUNTIMES:
        raise ConfigError(f"MODALINK_ENGINE={settings.engine!r}: expected one of {', '.join(RUNTIMES)}")
    module, name = RUNTIMES[settings.engine]
    return getattr(importlib.import_module(module), name).from_settings(settings)
