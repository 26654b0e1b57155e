"""Stage-2 LoRA on the frozen LLM: one small peft adapter per modality, stored with that modality's projector.

Why per modality rather than one shared adapter: each modality is versioned, promoted and rolled back on
its own, and a projector trained together with a LoRA only works with that LoRA, so the two live in one
registry version (``lora/adapter_model.safetensors`` + ``lora/adapter_config.json``, the standard peft
layout). At inference all adapters stay loaded and every prompt of a batch picks its own (peft's
mixed-adapter batches), as TGI and vLLM serve many LoRAs over one base model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


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


def save(directory: Path, tensors: dict[str, torch.Tensor], config: dict, half: bool = True) -> list[str]:
    """Write a peft adapter folder; returns the file names written."""
    directory.mkdir(parents=True, exist_ok=True)
    if half:
        tensors = {k: v.to(torch.float16) for k, v in tensors.items()}
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    return ["adapter_model.safetensors", "adapter_config.json"]


def serve(engine, registry, modality: str, version: str) -> str | None:
    """Make the LoRA that ``modality``'s adapter ``version`` was trained with available in ``engine``.

    Returns its engine name, ``"<modality>@<version>"``, or None for a stage-1 version (the bare LLM).
    The assistant and the LLM service both resolve adapters through here, so they answer alike.
    """
    path = lora_path(registry, modality, version)
    if path is None:
        return None
    name = f"{modality}@{version}"
    if name not in engine.adapters:
        registry.verify(modality, version)
        engine.load_adapter(name, path)
    return name


def lora_path(registry, modality: str, version: str):
    """The folder of the LoRA that adapter ``version`` was trained with; None for a stage-1 version (or none yet)."""
    from modalink.errors import InputError

    if version not in registry.versions(modality):
        if version == "untrained" or not registry.versions(modality):
            return None
        raise InputError(f"unknown {modality} adapter version {version!r}; have {registry.versions(modality)}")
    return registry.lora_path(modality, version)


def choose(
    engine, registry, names: Sequence[str], guard: Callable[[], AbstractContextManager] = nullcontext
) -> str | None:
    """The LoRA for a prompt whose media came from the adapters ``names`` ("<modality>@<version>", prompt order):
    the first one trained with a LoRA (mixed-modality prompts share it), loaded on first use; None: the bare LLM.
    One rule for the in-process assistant and the LLM service. ``guard``: held only while a LoRA is loaded (peft
    adds modules in place, so a serving engine loads between batches only); a version without a LoRA never
    takes it, so its requests never wait for a running batch."""
    for name in names:
        modality, version = parse_name(name)
        if name in engine.adapters:
            return name
        if lora_path(registry, modality, version) is None:
            continue
        with guard():
            if served := serve(engine, registry, modality, version):
                return served
    return None


def parse_name(name: str) -> tuple[str, str]:
    """``"audio@v3"`` -> ("audio", "v3"), with a clear error for anything else."""
    from modalink import MODALITIES
    from modalink.errors import InputError

    modality, _, version = name.partition("@")
    if modality not in MODALITIES or not version:
        raise InputError(f"adapter must be '<modality>@<version>' with a modality in {MODALITIES}, got {name!r}")
    return modality, version
