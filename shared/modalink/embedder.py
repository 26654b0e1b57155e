"""Encoders + projectors: raw media in, LLM-space embeddings out. What an encoder service runs.

It needs no LLM weights (only its hidden size, from the checkpoint's config), so an encoder service
starts in seconds. Projectors come from the adapter registry and follow its ``CURRENT`` pointer:
``refresh`` picks up a newly promoted version between batches (hot reload).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from modalink import check_modality
from modalink.config import Settings, get_settings
from modalink.encoders import Encoder, load_encoder
from modalink.modality import get as get_modality
from modalink.projectors import ProjectorConfig, build_projector, pad_features, project
from modalink.prompt import Media
from modalink.registry import AdapterRegistry

log = logging.getLogger(__name__)

UNTRAINED = "untrained"


def llm_hidden_size(settings: Settings) -> int:
    """The LLM's embedding width from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    from modalink.llm import resolve_llm_path

    return AutoConfig.from_pretrained(resolve_llm_path(settings.llm, settings), local_files_only=True).hidden_size


def check_video_tokens(modality: str, version: str, meta: dict, enc: Encoder) -> None:
    """A video adapter reads the kind of clip tokens it was trained on (its encoder's name ends ``+<kind>``):
    another kind has the same width, so it would load and answer nonsense."""
    trained = str(meta.get("encoder") or "")
    if modality == "video" and "+" in trained and trained.rpartition("+")[2] != enc.tokens:  # type: ignore[attr-defined]
        raise RuntimeError(
            f"video adapter {version} was trained on {trained.rpartition('+')[2]!r} clip tokens but the encoder makes "
            f"{enc.tokens!r} (MODALINK_VIDEO_TOKENS): set it to match, or promote an adapter trained on them"  # type: ignore[attr-defined]
        )


def as_at_rest(embeddings: torch.Tensor, dtype: str) -> torch.Tensor:
    """Embeddings rounded as the media embedding cache keeps them at rest (``MODALINK_EMBED_CACHE_DTYPE``: float16
    rounds, wire keeps float32). Every path rounds alike (encoder services, the in-process assistant, ``modalink
    eval``, the gateway whether the cache is on, hit or missed), so no answer depends on the path taken."""
    return embeddings.to(torch.float16).to(torch.float32) if dtype == "float16" else embeddings


class Embedder:
    def __init__(self, settings: Settings | None = None, versions: dict[str, str] | None = None):
        """``versions`` pins adapter versions per modality (default: the registry's current ones, followed)."""
        self.settings = settings or get_settings()
        self.settings.apply_threads()
        self.registry = AdapterRegistry(self.settings.adapters_dir)
        self.pinned = dict(versions or {})
        self._encoders: dict[str, Encoder] = {}
        self._projectors: dict[str, tuple[nn.Module, str]] = {}
        self._d_llm: int | None = None
        self._lock = threading.RLock()
        self._refresh_lock = threading.Lock()  # an encoder service's model instances refresh from their threads

    @property
    def d_llm(self) -> int:
        if self._d_llm is None:
            self._d_llm = llm_hidden_size(self.settings)
        return self._d_llm

    def encoder(self, modality: str) -> Encoder:
        check_modality(modality)
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
                self._projectors[modality] = self._load(modality, enc)
            return self._projectors[modality]

    def _load(self, modality: str, enc: Encoder) -> tuple[nn.Module, str]:
        loaded = self.registry.load(modality, self.pinned.get(modality), self.settings.torch_device())
        if loaded is not None:
            module, version, meta = loaded
            if meta.get("encoder_weights") and meta["encoder_weights"] != enc.weights_id:
                raise RuntimeError(
                    f"{modality} adapter {version} was trained on encoder weights {meta['encoder_weights']} "
                    f"but {enc.name} has {enc.weights_id}: retrain the adapter or restore that encoder"
                )
            check_video_tokens(modality, version, meta, enc)
            if meta.get("encoder") and meta["encoder"] != enc.name:  # features of another encoder: wrong answers
                raise RuntimeError(
                    f"{modality} adapter {version} was trained on encoder {meta['encoder']!r} but this process "
                    f"encodes with {enc.name!r}: retrain the adapter (or pin a version trained on {enc.name!r})"
                )
        else:
            log.info("no trained %s adapter in %s: using an untrained projector", modality, self.registry.root)
            cfg = ProjectorConfig(d_in=enc.feature_dim, d_llm=self.d_llm, **get_modality(modality).projector)
            with torch.random.fork_rng():  # fixed init without touching the caller's RNG
                torch.manual_seed(0)
                module, version = build_projector(cfg).eval(), UNTRAINED
        if module.cfg.d_in != enc.feature_dim or module.cfg.d_llm != self.d_llm:
            raise RuntimeError(
                f"{modality} adapter {version} maps {module.cfg.d_in}->{module.cfg.d_llm} but the encoder "
                f"gives {enc.feature_dim} and the LLM takes {self.d_llm}"
            )
        return module.to(self.settings.torch_device()), version

    def refresh(self, modality: str) -> str | None:
        """Switch to the registry's current version if it changed (hot reload); returns the new version or None.

        A broken new version is logged and skipped: the service keeps answering with the one it has. Callers in
        several threads load a new version once (the others wait, then find it loaded).
        """
        if modality in self.pinned or modality not in self._projectors:
            return None
        with self._refresh_lock:
            return self._refresh(modality)

    def _refresh(self, modality: str) -> str | None:
        current = self.registry.current(modality)
        if current is None or current == self._projectors[modality][1]:
            return None
        try:
            loaded = self._load(modality, self.encoder(modality))
        except Exception as e:  # noqa: BLE001  (keep serving the loaded version)
            log.error("not switching %s to %s: %s", modality, current, e)
            return None
        with self._lock:
            self._projectors[modality] = loaded
        log.info("%s adapter switched to %s", modality, loaded[1])
        return loaded[1]

    def decode(self, modality: str, items: Sequence[Any]) -> list[Any]:
        """Check and decode raw items (bytes or paths); raises InputError before any heavy work."""
        enc = self.encoder(modality)
        return [enc.decode(x) for x in items]

    def embed(self, modality: str, items: Sequence[Any], decoded: bool = False) -> tuple[list[torch.Tensor], str]:
        """Encode + project a batch of raw (or already decoded) items: one [n_tokens, d_llm] tensor each (fewer
        tokens for a short item of a projector that does not stretch: a one-frame video), rounded ``as_at_rest``."""
        enc = self.encoder(modality)
        inputs = list(items) if decoded else self.decode(modality, items)
        projector, version = self.projector(modality)
        feats = get_modality(modality).check_features(enc, enc.encode(inputs))
        x, mask = pad_features([f.to(self.settings.torch_device()) for f in feats])
        with torch.inference_mode():
            out = project(projector, x, mask)
        return [as_at_rest(o.float().cpu(), self.settings.embed_cache_dtype) for o in out], version

    def media(
        self, inputs: Sequence[tuple[str, Any]], timeout_s: float | None = None
    ) -> tuple[list[Media], dict[str, str]]:
        """Project (modality, raw) inputs, batching items of one modality together; keeps input order.
        (``timeout_s``: the ``pipeline.MediaEncoder`` interface; in process nothing waits on a network.)"""
        out: list[Media | None] = [None] * len(inputs)
        versions: dict[str, str] = {}
        groups = {
            mod: [i for i, (m, _) in enumerate(inputs) if m == mod] for mod in dict.fromkeys(m for m, _ in inputs)
        }
        decoded = {mod: self.decode(mod, [inputs[i][1] for i in idx]) for mod, idx in groups.items()}
        for modality, idx in groups.items():
            embs, versions[modality] = self.embed(modality, decoded[modality], decoded=True)
            for i, e in zip(idx, embs, strict=True):
                out[i] = Media(modality, e, versions[modality])
        return [m for m in out if m is not None], versions
