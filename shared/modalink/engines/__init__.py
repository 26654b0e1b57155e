"""The LLM runtimes, one file each behind ``modalink.engine.Engine``, and the factory that picks one.

    transformers  the library's default and the reference, CPU or GPU: our own batched decode loop
                  (``engines/transformers.py``)
    vllm          GPU: vLLM fed with prompt embeddings (``engines/vllm.py``)
    llamacpp      CPU: llama.cpp running the GGUF file, fed with prompt embeddings (``engines/llamacpp.py``)
    auto          llamacpp on a CPU where it can serve (about 3.5x the transformers engine's batch-1 decode; the
                  transformers engine prefills faster: docs/PERFORMANCE.md), else transformers; ``choose`` says
                  which and why

A new runtime is one more file and one more line in ``RUNTIMES``; nothing else changes.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from pathlib import Path

from modalink.engine import Engine
from modalink.errors import ConfigError

log = logging.getLogger("modalink.engines")

# MODALINK_ENGINE -> (module, class); the class is built by its ``from_settings``.
RUNTIMES = {
    "transformers": ("modalink.engines.transformers", "TransformersEngine"),
    "vllm": ("modalink.engines.vllm", "VLLMEngine"),
    "llamacpp": ("modalink.engines.llamacpp", "LlamaCppEngine"),
}


def choose(settings) -> tuple[str, str]:
    """The runtime ``MODALINK_ENGINE=auto`` means here, and why: llamacpp where every condition for it holds (a CPU,
    llama-cpp-python installed, a GGUF-backed LLM, no current LLM adapter of a method other than LoRA), else
    transformers. Checked without importing either runtime."""
    from modalink.llm import EMBEDDED_LLMS

    if settings.torch_device().type != "cpu":
        return "transformers", f"device {settings.torch_device()} (llama.cpp is this project's CPU engine)"
    if importlib.util.find_spec("llama_cpp") is None:
        return "transformers", "llama-cpp-python is not installed (make bench or make test build it)"
    if settings.llm not in EMBEDDED_LLMS and not str(settings.llm).endswith(".gguf"):
        return "transformers", f"MODALINK_LLM={settings.llm!r} is not a GGUF file"
    blocker = _non_lora_adapter(Path(settings.adapters_dir))
    if blocker:
        return "transformers", f"the current {blocker} adapter is not a LoRA, which llama.cpp cannot serve"
    return "llamacpp", "a CPU, llama-cpp-python installed, a GGUF LLM, LoRA adapters only"


def _non_lora_adapter(root: Path) -> str | None:
    """The first modality whose current version carries an LLM adapter of a method other than LoRA."""
    from modalink.methods import method_of, read_config
    from modalink.registry import AdapterRegistry

    registry = AdapterRegistry(root)
    for folder in sorted(root.iterdir()) if root.is_dir() else ():
        version = registry.current(folder.name)
        path = version and registry.llm_adapter_path(folder.name, version)
        method = path and method_of(read_config(path))
        if method and method != "lora":
            return f"{folder.name} ({version}, {method!r})"
    return None


def load_engine(settings=None) -> Engine:
    """The engine ``MODALINK_ENGINE`` names, loaded (runtimes import their heavy libraries only when chosen)."""
    from modalink.config import get_settings

    settings = settings or get_settings()
    runtime = settings.engine
    if runtime == "auto":
        runtime, why = choose(settings)
        log.info("MODALINK_ENGINE=auto: the %s engine (%s)", runtime, why)
    if runtime not in RUNTIMES:
        raise ConfigError(f"MODALINK_ENGINE={settings.engine!r}: expected auto or one of {', '.join(RUNTIMES)}")
    module, name = RUNTIMES[runtime]
    engine = getattr(importlib.import_module(module), name).from_settings(settings)
    engine.runtime = runtime
    return engine
