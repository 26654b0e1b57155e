"""The in-process assistant: encoders + projectors + engine in one process (``modalink ask``, tests, bench).

The services split exactly these steps across processes: ``embed`` (the ``Embedder``) is what an encoder
service runs, ``build_prompt`` + ``engine.stream`` what the gateway and the LLM service run.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from modalink import lora
from modalink.config import Settings
from modalink.embedder import UNTRAINED, Embedder
from modalink.engine import Engine, GenerationParams, TokenEvent, TransformersEngine
from modalink.prompt import Media, Message, Part, build_prompt, place_media
from modalink.safety import CONTENT_FILTER, SafetyFilter, final_text

__all__ = ["UNTRAINED", "Answer", "Assistant"]


@dataclass
class Answer:
    text: str
    finish_reason: str
    adapters: dict[str, str] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=dict)


class Assistant(Embedder):
    def __init__(
        self, settings: Settings | None = None, engine: Engine | None = None, versions: dict[str, str] | None = None
    ):
        """``versions`` pins adapter versions per modality (default: the registry's current ones)."""
        super().__init__(settings, versions)
        self._engine = engine
        self._engine_lock = threading.Lock()
        self.safety = SafetyFilter.from_settings(self.settings)  # a bad MODALINK_SAFETY_* fails here

    @property
    def engine(self) -> Engine:
        """Loaded on first use, so bad inputs are refused before the LLM is loaded."""
        with self._engine_lock:
            if self._engine is None:
                self._engine = TransformersEngine.load(settings=self.settings)
            return self._engine

    @property
    def d_llm(self) -> int:
        return self.engine.hidden_size

    def lora(self, modality: str) -> str | None:
        """The LLM LoRA trained with this modality's projector (stage 2), or None (stage 1: the bare LLM)."""
        return lora.serve(self.engine, self.registry, modality, self.projector(modality)[1])

    def stream(
        self,
        text: str,
        inputs: Sequence[tuple[str, Any]] = (),
        params: GenerationParams | None = None,
        history: Sequence[Message] = (),
    ) -> tuple[Iterator[TokenEvent], dict[str, str], int]:
        """Start answering: (token events, adapter versions used, prompt tokens). A refused request (safety
        filters) is one event with the refusal text, before any encoding or generation."""
        params = params or GenerationParams()
        if refusal := self.safety.check_input(text, inputs, history):
            return iter([TokenEvent(0, -1, refusal.text, CONTENT_FILTER)]), {}, 0
        media, versions = self.media(inputs)
        parts: list[Part] = place_media(text, media)
        prompt = build_prompt(self.engine.tokenizer, [*history, Message("user", parts)], self.settings.system_prompt)
        # One LoRA per prompt: the first input's modality that has one (mixed-modality prompts share it), earlier
        # turns' media first, as the LLM service picks it from the request's adapters.
        earlier = [p for msg in history for p in msg.content if isinstance(p, Media)]
        adapter = next((a for m in [*earlier, *media] if (a := self.lora(m.modality))), None)
        events = self.safety.filter_output(self.engine.stream([prompt], params, [adapter]))
        events = (replace(ev, text=t, finish_reason=f) for ev, t, f in events)
        return events, versions, self.engine.prompt_length(prompt)

    def ask(self, text: str, inputs: Sequence[tuple[str, Any]] = (), params: GenerationParams | None = None) -> Answer:
        events, versions, prompt_tokens = self.stream(text, inputs, params)
        out, finish, n = [], "length", 0
        for ev in events:
            out.append(ev.text)
            n += ev.token_id >= 0
            finish = ev.finish_reason or finish
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        return Answer(final_text(out, finish), finish, versions, usage)
