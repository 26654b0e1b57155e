"""LoRA (Hu et al. 2021) through peft: low-rank updates of the attention projections (q_proj, v_proj by default).

Stored in the registry version as a standard peft folder (``lora/adapter_model.safetensors`` +
``lora/adapter_config.json``), which vLLM and llama.cpp (converted to GGUF) load too. At inference all adapters stay
loaded and every prompt of a batch picks its own (peft's mixed-adapter batches), as TGI and vLLM serve many LoRAs
over one base model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


LR = 5e-4  # the default peak learning rate of a LoRA's weights (the shipped audio and video adapters' recipe)


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0  # the LLM stays in eval mode (peft's mixed batches require it)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=list(self.target_modules)
        )


def attach(model: nn.Module, name: str, settings: LoraSettings | dict | None = None) -> nn.Module:
    """Add a fresh trainable adapter ``name`` to ``model`` (in place) and make it the active one."""
    from peft import PeftModel, get_peft_model

    if isinstance(settings, dict):
        settings = LoraSettings(**settings)
    cfg = (settings or LoraSettings()).peft_config()
    if isinstance(model, PeftModel):
        model.add_adapter(name, cfg)
        model.set_adapter(name)
        return model
    return get_peft_model(model, cfg, adapter_name=name)


def parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The trainable tensors of adapter ``name`` (everything else stays frozen)."""
    params = [p for n, p in model.named_parameters() if ".lora_" in n and n.split(".")[-2] == name]
    for p in params:
        p.requires_grad_(True)
    return params


def state(model: nn.Module, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, adapter_config) of adapter ``name`` in peft's on-disk format."""
    from peft import get_peft_model_state_dict

    tensors = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
    cfg = model.peft_config[name].to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    return tensors, cfg


def load_state(model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, tensors, adapter_name=name)
