"""Generation from prefix embeddings: the engine interface every runtime implements.

An engine takes prompts as segment lists (text or embedding tensors [n, d_llm]), pads several prompts
together into one batch, and streams token events. The runtimes live in ``modalink.engines``, one file each
(transformers, the default; vLLM on a GPU), and ``modalink.engines.load_engine`` picks one by settings.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

from modalink.errors import InputError
from modalink.prompt import Segment, prompt_tokens

FINISH_STOP, FINISH_LENGTH = "stop", "length"


@dataclass
class GenerationParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def validate(self) -> None:
        """Refuse what would fail inside a batch and so fail the requests batched with it: wrong types (from JSON),
        or a temperature so small that logits / temperature overflow to NaN."""
        for name in ("max_new_tokens", "top_k"):
            if not _is_int(getattr(self, name)):
                raise InputError(f"{name} must be an integer, got {getattr(self, name)!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not (_is_int(getattr(self, name)) or isinstance(getattr(self, name), float)):
                raise InputError(f"{name} must be a number, got {getattr(self, name)!r}")
        if not 1 <= self.max_new_tokens <= 32_768:
            raise InputError(f"max_new_tokens must be in 1..32768, got {self.max_new_tokens}")
        t = self.temperature
        if not (math.isfinite(t) and (t == 0 or MIN_TEMPERATURE <= t <= 100)):
            raise InputError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, 100], got {t}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")
        if not (math.isfinite(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0):
            raise InputError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        stop = self.stop if isinstance(self.stop, list) else [None]
        if len(stop) > 16 or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in stop):
            raise InputError("stop: at most 16 non-empty strings of at most 256 characters")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < 2**64):
            raise InputError(f"seed must be an integer in 0..2**64-1, got {self.seed!r}")


MIN_TEMPERATURE = 1e-4


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class TokenEvent:
    index: int  # which prompt of the batch
    token_id: int
    text: str  # newly visible text (may be empty while a stop sequence or UTF-8 character is pending)
    finish_reason: str | None = None  # set on the last event of a prompt: "stop" | "length"


@dataclass
class Completion:
    text: str
    finish_reason: str
    token_ids: list[int]
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class Join(Protocol):
    """How a running batch meets requests that arrive while it decodes (continuous batching)."""

    def more(self, running: int) -> list[tuple[list[Segment], GenerationParams, str | None]]:
        """Requests (prompt, params, adapter) to add now, beside ``running`` rows; their event indices continue
        the batch's, in this order. Called between decode steps, so it must not block."""

    def cancelled(self, index: int) -> bool:
        """Whether the request at ``index`` is no longer wanted (its row leaves the batch)."""


class Engine(ABC):
    """What the assistant and the LLM service need from an LLM runtime."""

    tokenizer: PreTrainedTokenizerBase
    hidden_size: int
    max_context: int
    runtime: str = ""  # its MODALINK_ENGINE name, set by ``load_engine`` (auto resolves to one)
    joins: bool = False  # whether ``stream`` takes ``join`` (continuous batching); else a batch runs to its end

    @abstractmethod
    def stream(
        self,
        prompts: Sequence[list[Segment]],
        params: GenerationParams | Sequence[GenerationParams],
        adapters: Sequence[str | None] | None = None,
    ) -> Iterator[TokenEvent]:
        """Token events of all prompts, generated together, as they come; ``adapters``: a LoRA name per prompt."""

    def load_adapter(self, name: str, path) -> None:
        """Load a peft LoRA adapter folder under ``name`` (prompts then select it by name)."""
        raise NotImplementedError(f"{type(self).__name__} does not serve LoRA adapters")

    def _check_budget(self, prompt_tokens: int, params: GenerationParams) -> None:
        params.validate()
        if prompt_tokens > self.max_context:
            raise InputError(f"prompt ({prompt_tokens} tokens) exceeds the context of {self.max_context} tokens")
        if prompt_tokens + params.max_new_tokens > self.max_context:
            raise InputError(
                f"prompt ({prompt_tokens} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                f"context of {self.max_context} tokens"
            )

    @abstractmethod
    def check(self, prompt: list[Segment], params: GenerationParams, adapter: str | None = None) -> int:
        """Everything ``stream`` would refuse about one request, without running the model: its prompt tokens.

        A server checks each request before batching it with others, so one bad request fails alone.
        """

    @staticmethod
    def per_prompt(
        prompts: Sequence, params: GenerationParams | Sequence[GenerationParams], adapters: Sequence[str | None] | None
    ) -> tuple[list[GenerationParams], list[str | None]]:
        """``stream``'s arguments as one GenerationParams and one adapter name (or None) per prompt."""
        n = len(prompts)
        plist = [params] * n if isinstance(params, GenerationParams) else list(params)
        names = list(adapters) if adapters is not None else [None] * n
        if len(plist) != n or len(names) != n:
            raise ValueError("one GenerationParams and one adapter name (or None) per prompt")
        return plist, names

    def check_embeddings(self, seg: torch.Tensor) -> None:
        """Prefix embeddings this LLM can read: ``[n, hidden_size]``, finite."""
        if seg.ndim != 2 or seg.shape[1] != self.hidden_size:
            raise InputError(f"prefix embeddings must be [n, {self.hidden_size}] for this LLM, got {list(seg.shape)}")
        if not torch.isfinite(seg).all():
            raise InputError("prefix embeddings contain NaN or Inf")

    def check_prompt(self, prompt: list[Segment], params: GenerationParams) -> int:
        """A prompt's tokens, bounded before the expensive steps: embeddings checked, text by size before it is
        tokenized, tokens against the context before anything is embedded."""
        for seg in prompt:
            if not isinstance(seg, str):
                self.check_embeddings(seg)
        length = self.prompt_length(prompt)
        if not length:
            raise InputError("empty prompt")
        self._check_budget(length, params)
        return length

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most bytes one token of the vocabulary can stand for (an upper bound: a token's own spelling)."""
        return max(len(t.encode()) for t in self.tokenizer.get_vocab())

    def check_text_size(self, prompt: list[Segment]) -> None:
        """Refuse, unread, text that could not fit the context whatever it says (more than ``max_context`` times
        the longest token's bytes): it is bounded before the tokenizer sees it, so its size costs no memory."""
        limit = self.max_context * self.max_token_bytes
        size = sum(len(s) for s in prompt if isinstance(s, str))  # characters <= bytes: a cheap lower bound
        if size > limit:
            raise InputError(f"the prompt's text ({size} characters) cannot fit the context of {self.max_context} "
                             f"tokens (at most {limit} bytes of text)")  # fmt: skip

    def prompt_length(self, prompt: list[Segment]) -> int:
        """Prompt tokens (text tokenized, embedding rows counted), nothing embedded; text bounded first."""
        self.check_text_size(prompt)
        return prompt_tokens(self.tokenizer, prompt)

    def generate(
        self,
        prompts: Sequence[list[Segment]],
        params: GenerationParams | Sequence[GenerationParams],
        adapters: Sequence[str | None] | None = None,
    ) -> list[Completion]:
        texts = [""] * len(prompts)
        ids: list[list[int]] = [[] for _ in prompts]
        finish = [FINISH_LENGTH] * len(prompts)
        for ev in self.stream(prompts, params, adapters):
            texts[ev.index] += ev.text
            if ev.token_id >= 0:
                ids[ev.index].append(ev.token_id)
            if ev.finish_reason:
                finish[ev.index] = ev.finish_reason
        return [
            Completion(t, f, i, self.prompt_length(p)) for t, f, i, p in zip(texts, finish, ids, prompts, strict=True)
        ]
