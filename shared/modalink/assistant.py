"""The in-process assistant: encoders + projectors + engine in one process (``modalink ask``, tests, bench).

The services split exactly these steps across processes: ``embed`` is what an encoder service runs,
``build_prompt`` + ``engine.stream`` what the gateway and the LLM service run.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modalink import MODALITIES
from modalink.config import Settings, get_settings
from modalink.encoders import Encoder, load_encoder
from modalink.engine import Engine, GenerationParams, TokenEvent, TransformersEngine
from modalink.errors import InputError
from modalink.projectors import DEFAULT_PROJECTORS, ProjectorConfig, build_projector, pad_features
from modalink.prompt import Media, Message, Part, build_prompt, place_media
from modalink.registry import AdapterRegistry

log = logging.getLogger(__name__)

UNTRAINED = "untrained"


@dataclass
class Answer:
    text: str
    finish_reason: str
    adapters: dict[str, str] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=dict)


class Assistant:
    def __init__(
        self, settings: Settings | None = None, engine: Engine | None = None, versions: dict[str, str] | None = None
    ):
        """``versions`` pins adapter versions per modality (default: the registry's current ones)."""
        self.settings = settings or get_settings()
        self.settings.apply_threads()
        self._engine = engine
        self.registry = AdapterRegistry(self.settings.adapters_dir)
        self._encoders: dict[str, Encoder] = {}
        self._projectors: dict[str, tuple[nn.Module, str]] = {}
        self._loras: dict[str, str | None] = {}
        self.pinned = dict(versions or {})  # modality -> name of its LoRA in the engine (stage-2 versions)
        self._lock = threading.RLock()

    @property
    def engine(self) -> Engine:
        """Loaded on first use, so bad inputs are refused before the LLM is loaded."""
        with self._lock:
            if self._engine is None:
                self._engine = TransformersEngine.load(settings=self.settings)
            return self._engine

    def encoder(self, modality: str) -> Encoder:
        if modality not in MODALITIES:
            raise InputError(f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")
        with self._lock:
            if modality not in self._encoders:
                image = self._encoders.get("image")
                self._encoders[modality] = load_encoder(modality, self.settings, image=image)
                if modality == "video" and "image" not in self._encoders:
                    self._encoders["image"] = self._encoders["video"].image  # type: ignore[attr-defined]
            return self._encoders[modality]

    def projector(self, modality: str) -> tuple[nn.Module, str]:
        """The registry's current adapter, or a fixed-seed untrained one (answers are then meaningless)."""
        enc = self.encoder(modality)
        with self._lock:
            if modality not in self._projectors:
                loaded = self.registry.load(modality, self.pinned.get(modality), self.settings.torch_device())
                if loaded is not None:
                    module, version, meta = loaded
                    if meta.get("encoder_weights") and meta["encoder_weights"] != enc.weights_id:
                        raise RuntimeError(
                            f"{modality} adapter {version} was trained on encoder weights {meta['encoder_weights']} "
                            f"but {enc.name} has {enc.weights_id}: retrain the adapter or restore that encoder"
                        )
                else:
                    log.info("no trained %s adapter in %s: using an untrained projector", modality, self.registry.root)
                    cfg = ProjectorConfig(
                        d_in=enc.feature_dim, d_llm=self.engine.hidden_size, **DEFAULT_PROJECTORS[modality]
                    )
                    with torch.random.fork_rng():  # fixed init without touching the caller's RNG
                        torch.manual_seed(0)
                        module, version = build_projector(cfg).eval(), UNTRAINED
                if module.cfg.d_in != enc.feature_dim or module.cfg.d_llm != self.engine.hidden_size:
                    raise RuntimeError(
                        f"{modality} adapter {version} maps {module.cfg.d_in}->{module.cfg.d_llm} but the encoder "
                        f"gives {enc.feature_dim} and the LLM takes {self.engine.hidden_size}"
                    )
                lora_dir = self.registry.lora_path(modality, version) if version != UNTRAINED else None
                if lora_dir is not None:
                    self.engine.load_adapter(f"{modality}@{version}", lora_dir)
                self._loras[modality] = f"{modality}@{version}" if lora_dir is not None else None
                self._projectors[modality] = (module.to(self.settings.torch_device()), version)
            return self._projectors[modality]

    def lora(self, modality: str) -> str | None:
        """The LLM LoRA trained with this modality's projector (stage 2), or None (stage 1: the bare LLM)."""
        self.projector(modality)
        return self._loras[modality]

    def decode(self, modality: str, items: Sequence[Any]) -> list[Any]:
        """Check and decode raw items (bytes or paths); raises InputError before any heavy work."""
        enc = self.encoder(modality)
        return [enc.decode(x) for x in items]

    def embed(self, modality: str, items: Sequence[Any], decoded: bool = False) -> tuple[list[torch.Tensor], str]:
        """Encode + project a batch of raw (or already decoded) items: one [n_tokens, d_llm] tensor each."""
        enc = self.encoder(modality)
        inputs = list(items) if decoded else self.decode(modality, items)
        projector, version = self.projector(modality)
        feats = enc.encode(inputs)
        x, mask = pad_features([f.to(self.settings.torch_device()) for f in feats])
        with torch.inference_mode():
            out = projector(x, mask)
        return list(out.float().cpu()), version

    def media(self, inputs: Sequence[tuple[str, Any]]) -> tuple[list[Media], dict[str, str]]:
        """Project (modality, raw) inputs, batching items of one modality together; keeps input order."""
        out: list[Media | None] = [None] * len(inputs)
        versions: dict[str, str] = {}
        groups = {
            mod: [i for i, (m, _) in enumerate(inputs) if m == mod] for mod in dict.fromkeys(m for m, _ in inputs)
        }
        decoded = {mod: self.decode(mod, [inputs[i][1] for i in idx]) for mod, idx in groups.items()}
        for modality, idx in groups.items():
            embs, versions[modality] = self.embed(modality, decoded[modality], decoded=True)
            for i, e in zip(idx, embs, strict=True):
                out[i] = Media(modality, e)
        return [m for m in out if m is not None], versions

    def stream(
        self,
        text: str,
        inputs: Sequence[tuple[str, Any]] = (),
        params: GenerationParams | None = None,
        history: Sequence[Message] = (),
    ) -> tuple[Iterator[TokenEvent], dict[str, str], int]:
        """Start answering: (token events, adapter versions used, prompt tokens)."""
        params = params or GenerationParams()
        media, versions = self.media(inputs)
        parts: list[Part] = place_media(text, media)
        prompt = build_prompt(self.engine.tokenizer, [*history, Message("user", parts)], self.settings.system_prompt)
        # One LoRA per prompt: the first input's modality that has one (mixed-modality prompts share it).
        adapter = next((a for m in media if (a := self.lora(m.modality))), None)
        return self.engine.stream([prompt], params, [adapter]), versions, self.engine.prompt_length(prompt)

    def ask(self, text: str, inputs: Sequence[tuple[str, Any]] = (), params: GenerationParams | None = None) -> Answer:
        events, versions, prompt_tokens = self.stream(text, inputs, params)
        out, finish, n = [], "length", 0
        for ev in events:
            out.append(ev.text)
            n += 1
            finish = ev.finish_reason or finish
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        return Answer("".join(out), finish, versions, usage)
