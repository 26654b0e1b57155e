"""The in-process assistant: encoders + projectors + engine in one process (``modalink ask``, tests, bench).

It is the turn pipeline (``modalink.pipeline``) on local backends: the ``Embedder`` encodes the media (what an
encoder service runs) and the engine generates (what the LLM service runs); the gateway runs the same pipeline
on those services, so both answer alike.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

from modalink import methods
from modalink.config import Settings
from modalink.embedder import UNTRAINED, Embedder
from modalink.engine import Engine, GenerationParams
from modalink.engines import load_engine
from modalink.pipeline import Answer, Pipeline, Reply, Turn
from modalink.prompt import Message, Segment
from modalink.safety import SafetyFilter

__all__ = ["UNTRAINED", "Answer", "Assistant"]


class Assistant(Embedder):
    def __init__(
        self, settings: Settings | None = None, engine: Engine | None = None, versions: dict[str, str] | None = None
    ):
        """``versions`` pins adapter versions per modality (default: the registry's current ones)."""
        super().__init__(settings, versions)
        self._engine = engine
        self._engine_lock = threading.Lock()
        self.safety = SafetyFilter.from_settings(self.settings)  # a bad MODALINK_SAFETY_* fails here
        self.pipeline = Pipeline(self, self, self.settings.system_prompt, self.safety, self.settings.max_text_bytes,
                                 self.settings.client_system_messages == "allow")  # fmt: skip

    @property
    def engine(self) -> Engine:
        """The runtime ``MODALINK_ENGINE`` names, loaded on first use, so bad inputs are refused before the LLM is
        loaded."""
        with self._engine_lock:
            if self._engine is None:
                self._engine = load_engine(self.settings)
            return self._engine

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def d_llm(self) -> int:
        return self.engine.hidden_size

    def llm_adapter(self, modality: str) -> str | None:
        """The LLM adapter trained with this modality's projector (stage 2, any method), or None (stage 1)."""
        return methods.serve(self.engine, self.registry, modality, self.projector(modality)[1])

    def start(self, prompt: list[Segment], params: GenerationParams, adapters: Sequence[str],
              timeout_s: float | None = None) -> LocalStream:  # fmt: skip
        """The ``pipeline.LLM`` interface: generate from ``prompt`` with the LLM adapter ``methods.choose`` picks."""
        adapter = methods.choose(self.engine, self.registry, adapters)
        return LocalStream(self.engine.stream([prompt], params, [adapter]), self.engine.prompt_length(prompt))

    def stream(self, text: str, inputs: Sequence[tuple[str, Any]] = (), params: GenerationParams | None = None,
               history: Sequence[Message] = ()) -> Reply:  # fmt: skip
        """Start answering: a ``Reply`` to iterate for events (its ``versions``: the adapters used; ``usage``
        once spent). A refused request (safety filters) is one event, before any encoding or generation."""
        return self.pipeline.start(Turn(text, inputs, params or GenerationParams(), history))

    def ask(self, text: str, inputs: Sequence[tuple[str, Any]] = (), params: GenerationParams | None = None) -> Answer:
        return self.stream(text, inputs, params).answer()


class LocalStream:
    """The engine's token events for one prompt; ``cancel()`` closes the generator (stops generating)."""

    def __init__(self, events: Iterator, prompt_tokens: int):
        self.events, self.prompt_tokens = events, prompt_tokens

    def __iter__(self) -> Iterator:
        return iter(self.events)

    def cancel(self) -> None:
        self.events.close()
