"""One user turn, start to finish, written once for every place that answers one:

    safety on the input -> encode each media part -> prompt with the chat template -> choose the stage-2 LoRA
    -> stream from the LLM -> safety on the output -> usage

The in-process ``Assistant`` runs it on its own embedder and engine; the gateway (gRPC Generate and Caption, the
OpenAI route) and the captioning workers run it on the encoder services and the LLM service
(``modalink.remote.RemoteAssistant``). Only those two backends differ, behind two small interfaces:
``MediaEncoder`` (raw media in, projected ``Media`` out) and ``LLM`` (a prompt of segments in, tokens out). The
APIs on top only translate messages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from modalink.engine import GenerationParams
from modalink.errors import InputError
from modalink.prompt import Media, Message, Segment, build_prompt, place_media, prompt_tokens, sanitize
from modalink.safety import CONTENT_FILTER, SafetyFilter, final_text

Inputs = Sequence[tuple[str, Any]]  # (modality, raw): bytes, a path, an array


@dataclass
class Turn:
    """A user turn and the conversation before it, as every API hands it over."""

    text: str
    inputs: Inputs = ()  # this turn's media, raw
    params: GenerationParams = field(default_factory=GenerationParams)
    history: Sequence[Message] = ()  # earlier turns; their content may hold already projected ``Media``
    history_media: Sequence[Inputs] = ()  # each earlier turn's raw media, placed into that turn once encoded

    def every_input(self) -> list[tuple[str, Any]]:
        return [*(x for turn in self.history_media for x in turn), *self.inputs]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens}  # fmt: skip


@dataclass
class Event:
    """A piece of the answer: ``text`` to show now; the last one has ``finish_reason`` ("stop", "length",
    "content_filter") and ``usage``."""

    text: str
    finish_reason: str = ""
    token_id: int = -1  # -1: no token (a refusal, a held-back remainder)
    usage: Usage | None = None


@dataclass
class Answer:
    text: str
    finish_reason: str
    adapters: dict[str, str] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=dict)


class TokenStream(Protocol):
    """What ``LLM.start`` returns: token events (``token_id``, ``text``, ``finish_reason``) as they come."""

    prompt_tokens: int | None  # the LLM's own count, once it is known

    def __iter__(self) -> Iterator[Any]: ...

    def cancel(self) -> None: ...


class MediaEncoder(Protocol):
    def media(self, inputs: Inputs, timeout_s: float | None = None) -> tuple[list[Media], dict[str, str]]:
        """Every input projected into the LLM's space, in order; and the adapter version per modality."""
        ...


class LLM(Protocol):
    tokenizer: Any

    def start(self, prompt: list[Segment], params: GenerationParams, adapters: Sequence[str],
              timeout_s: float | None = None) -> TokenStream:  # fmt: skip
        """Start generating now. ``adapters``: "<modality>@<version>" of the prompt's media in prompt order; the
        LLM applies the LoRA of the first one trained with one (stage 2), as ``methods.choose`` picks it."""
        ...


class Reply:
    """A turn being answered: iterate it for ``Event``s; ``versions`` are the adapters that read its media;
    ``cancel()`` stops the generation (a client that went away)."""

    def __init__(self, events: Iterator[Event], versions: dict[str, str], cancel: Callable[[], None] = lambda: None):
        self.events, self.versions, self.cancel = events, versions, cancel
        self.usage = Usage()  # final once the events are spent

    def __iter__(self) -> Iterator[Event]:
        for ev in self.events:
            if ev.usage is not None:
                self.usage = ev.usage
            yield ev

    def answer(self) -> Answer:
        """The whole answer (only the refusal when a filter stopped it)."""
        events = list(self)
        finish = events[-1].finish_reason if events else "length"
        return Answer(final_text([ev.text for ev in events], finish), finish, self.versions, self.usage.as_dict())


class Pipeline:
    def __init__(self, encoder: MediaEncoder, llm: LLM, system_prompt: str | None, safety: SafetyFilter,
                 max_text_bytes: int = 1 << 20, client_system: bool = True):  # fmt: skip
        """``system_prompt``: the operator's, always first; ``client_system``: whether a client's own system
        messages (history turns of role system) are read, after it (``MODALINK_CLIENT_SYSTEM_MESSAGES``)."""
        self.encoder, self.llm, self.system_prompt, self.safety = encoder, llm, system_prompt, safety
        self.max_text_bytes, self.client_system = max_text_bytes, client_system

    def start(self, turn: Turn, timeout_s: float | None = None, media: Sequence[Media] | None = None) -> Reply:
        """Check the turn, encode its media (and its history's), build the prompt and start the LLM. ``media``:
        this turn's inputs already projected (a captioning batch encodes all its items in one request).

        A refused turn is one event with the refusal text, before any encoding or generation."""
        turn.params.validate()
        if not self.client_system and any(m.role == "system" for m in turn.history):
            raise InputError(
                "system messages from clients are refused here (MODALINK_CLIENT_SYSTEM_MESSAGES=refuse): the "
                "operator's system prompt applies; put instructions in a user turn"
            )
        turn = self._bounded(turn)
        if refusal := self.safety.check_input(turn.text, turn.every_input(), turn.history):
            return Reply(iter([Event(refusal.text, CONTENT_FILTER, usage=Usage())]), {})
        earlier = [x for t in turn.history_media for x in t]
        todo = earlier if media is not None else [*earlier, *turn.inputs]
        encoded, _ = self.encoder.media(todo, timeout_s) if todo else ([], {})
        history = _place_history(turn.history, turn.history_media, encoded[: len(earlier)])
        media = list(media) if media is not None else encoded[len(earlier) :]
        messages = [*history, Message("user", place_media(turn.text, media))]
        prompt = build_prompt(self.llm.tokenizer, messages, self.system_prompt)
        versions: dict[str, str] = {}  # per modality, in prompt order (earlier turns first)
        for part in (p for msg in messages for p in msg.content if isinstance(p, Media) and p.version):
            versions.setdefault(part.modality, part.version)
        stream = self.llm.start(prompt, turn.params, [f"{m}@{v}" for m, v in versions.items()], timeout_s)
        return Reply(self._events(stream, prompt), versions, stream.cancel)

    def _bounded(self, turn: Turn) -> Turn:
        """The turn's text, all turns together, within ``MODALINK_MAX_TEXT_BYTES`` (checked before anything is
        tokenized or encoded), and sanitized as the LLM will read it, so the safety filter checks that text."""
        texts = [turn.text, *(p for m in turn.history for p in m.content if isinstance(p, str))]
        size = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
        if size > self.max_text_bytes:
            raise InputError(f"the request's text is {size} bytes (all turns); the limit is {self.max_text_bytes} "
                             "(MODALINK_MAX_TEXT_BYTES)")  # fmt: skip
        history = [Message(m.role, [sanitize(p) if isinstance(p, str) else p for p in m.content]) for m in turn.history]
        return replace(turn, text=sanitize(turn.text), history=history)

    def _events(self, stream: TokenStream, prompt: list[Segment]) -> Iterator[Event]:
        n, previous = 0, None
        for tok, text, finish in self.safety.filter_output(stream):
            n += tok is not previous and tok.token_id >= 0  # every token the LLM made (the filter may repeat one)
            previous = tok
            usage = None
            if finish:
                n_prompt = stream.prompt_tokens
                if n_prompt is None:  # cut short before the LLM reported it (a filtered answer)
                    n_prompt = prompt_tokens(self.llm.tokenizer, prompt)
                usage = Usage(n_prompt, n)
            yield Event(text, finish or "", tok.token_id, usage)


def _place_history(history: Sequence[Message], history_media: Sequence[Inputs], media: list[Media]) -> list[Message]:
    """Earlier turns with their (now projected) media placed into their text, as the in-process history holds it."""
    if not media:
        return list(history)
    done, placed = iter(media), []
    for i, msg in enumerate(history):
        turn = history_media[i] if i < len(history_media) else ()
        text = " ".join(p for p in msg.content if isinstance(p, str))
        placed.append(Message(msg.role, place_media(text, [next(done) for _ in turn])) if turn else msg)
    return placed
