"""Stage-2 methods: the ways modalink adapts the frozen LLM to a modality, one file each behind one interface.

Stage 1 aligns a modality's projector with the LLM frozen; stage 2 (``modalink train --stage 2 --method M``) trains
the projector on instructions together with one of these, stored in the modality's registry version and served per
request by the LLM service and the in-process assistant:

=================  ==========================================================  ======================================
method             what it trains                                              implementation
=================  ==========================================================  ======================================
``lora``           low-rank updates of q_proj and v_proj (Hu et al. 2021)      peft (``lora.py``)
``ia3``            vectors rescaling keys, values, feed-forward (Liu 2022)     ``ia3.py``
``adapter``        bottleneck adapters after each feed-forward (Houlsby        ``bottleneck.py``
                   2019); ``experts`` > 1: a router over several (LaVIN's MMA)
``prompt``         virtual token embeddings before the prompt (Lester 2021)    ``prompt.py``
``prefix``         keys and values every layer attends to (Li and Liang 2021)  ``prefix.py``
``llama-adapter``  gated adaption prompts in the top layers (Zhang 2023)       ``llama_adapter.py``
=================  ==========================================================  ======================================

peft has IA3, prompt, prefix and adaption-prompt models too, but each applies one adapter to a whole batch and the
prompt-learning ones own the KV cache; modalink's engine batches requests of different adapters together and
keeps its own KV and prefix caches, so those methods are written here as :class:`~modalink.methods.routing.RoutedMethod`
modules that act per row (``routing.py``). Every method therefore shares the dynamic batcher with every other.
Engines: the transformers engine serves all; vLLM and llama.cpp serve LoRA only (and say so for the others).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from modalink.methods.routing import RoutedMethod, Router

METHODS = ("lora", "ia3", "adapter", "prompt", "prefix", "llama-adapter")


def routed_class(method: str) -> type[RoutedMethod]:
    from modalink.errors import ConfigError
    from modalink.methods.bottleneck import Bottleneck
    from modalink.methods.ia3 import IA3
    from modalink.methods.llama_adapter import LlamaAdapter
    from modalink.methods.prefix import PrefixTuning
    from modalink.methods.prompt import PromptTuning

    classes = {c.method: c for c in (IA3, Bottleneck, PromptTuning, PrefixTuning, LlamaAdapter)}
    if method not in classes:
        raise ConfigError(f"unknown stage-2 method {method!r}; expected one of {', '.join(METHODS)}")
    return classes[method]


def default_lr(method: str) -> float:
    """The peak learning rate a method's adapter trains at unless ``--method-lr`` says otherwise."""
    from modalink.methods.lora import LR

    return LR if method == "lora" else routed_class(method).lr


def method_of(config: dict) -> str:
    """The method an ``adapter_config.json`` describes: peft's ``peft_type`` LORA, or modalink's ``method``."""
    peft_type = config.get("peft_type", "")
    if str(getattr(peft_type, "value", peft_type)).upper() == "LORA":  # a PeftType enum, or its JSON string
        return "lora"
    return str(config.get("method", ""))


def read_config(path: Path) -> dict:
    return json.loads((Path(path) / "adapter_config.json").read_text())


def require_lora(path: Path, engine: str) -> None:
    """Refuse, with a message that says what to do, an adapter folder whose method ``engine`` cannot serve."""
    from modalink.errors import ConfigError

    method = method_of(read_config(path))
    if method != "lora":
        raise ConfigError(
            f"the {engine} engine serves LoRA adapters only; {path} holds a {method!r} adapter "
            "(serve it with the transformers engine, or train the modality with --method lora)"
        )


def save(directory: Path, tensors: dict[str, torch.Tensor], config: dict, half: bool = True) -> list[str]:
    """Write an adapter folder (peft's layout, for every method); returns the file names written."""
    directory.mkdir(parents=True, exist_ok=True)
    if half:
        tensors = {k: v.to(torch.float16) for k, v in tensors.items()}
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    return ["adapter_model.safetensors", "adapter_config.json"]


def routed_state(module: RoutedMethod) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, adapter_config) of a routed method's adapter."""
    tensors = {k: v.detach().float().contiguous() for k, v in module.state_dict().items()}
    return tensors, {"method": module.method, **module.settings}


def load_routed(path: Path, model_config) -> RoutedMethod:
    """A routed method's adapter from its folder, its tensors checked against the shapes its config implies."""
    from modalink.errors import ConfigError

    config = read_config(path)
    method = method_of(config)
    module = routed_class(method)(model_config, {k: v for k, v in config.items() if k != "method"})
    tensors = load_file(str(Path(path) / "adapter_model.safetensors"))
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        raise ConfigError(f"{path}: {method} tensors {got} do not fit this LLM (expected {expected})")
    module.load_state_dict({k: v.float() for k, v in tensors.items()})
    return module.requires_grad_(False)


def serve(engine, registry, modality: str, version: str) -> str | None:
    """Make the LLM adapter that ``modality``'s adapter ``version`` was trained with available in ``engine``.

    Returns its engine name, ``"<modality>@<version>"``, or None for a stage-1 version (the bare LLM).
    The assistant and the LLM service both resolve adapters through here, so they answer alike.
    """
    path = adapter_path(registry, modality, version)
    if path is None:
        return None
    name = f"{modality}@{version}"
    if name not in engine.adapters:
        registry.verify(modality, version)
        engine.load_adapter(name, path)
    return name


def adapter_path(registry, modality: str, version: str):
    """The folder of the LLM adapter that ``version`` was trained with; None for a stage-1 version (or none yet)."""
    from modalink.errors import InputError

    if version not in registry.versions(modality):
        if version == "untrained" or not registry.versions(modality):
            return None
        raise InputError(f"unknown {modality} adapter version {version!r}; have {registry.versions(modality)}")
    return registry.llm_adapter_path(modality, version)


def choose(
    engine, registry, names: Sequence[str], guard: Callable[[], AbstractContextManager] = nullcontext
) -> str | None:
    """The LLM adapter for a prompt whose media came from the adapters ``names`` ("<modality>@<version>", prompt
    order): the first one trained with one (mixed-modality prompts share it), loaded on first use; None: the bare
    LLM. One rule for the in-process assistant and the LLM service. ``guard``: held only while an adapter is loaded
    (it adds modules and hooks, so a serving engine loads between batches only); a version without one never takes
    it, so its requests never wait for a running batch."""
    for name in names:
        modality, version = parse_name(name)
        if name in engine.adapters:
            return name
        if adapter_path(registry, modality, version) is None:
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


__all__ = ["METHODS", "RoutedMethod", "Router", "adapter_path", "choose", "default_lr", "load_routed", "method_of",
           "parse_name", "read_config", "require_lora", "routed_class", "routed_state", "save", "serve"]  # fmt: skip
