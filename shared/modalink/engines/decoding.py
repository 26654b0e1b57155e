"""What every decode loop does per row, whatever runs the model: sampling (repetition penalty, greedy or temperature /
top-k / top-p, seeded), incremental detokenization with stop sequences, and the finish reasons. The transformers and
llama.cpp engines share it, so one request decodes the same way on either."""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from modalink.engine import FINISH_LENGTH, FINISH_STOP, GenerationParams, TokenEvent
from modalink.prefix_cache import Piece

WINDOW = 8  # tokens of context a window keeps at most before its start moves on (then one more decode)


class TextStream:
    """Incremental detokenization with stop sequences: emits only text that can no longer change.

    Each token decodes a short window, not the whole answer (vLLM's and TGI's method): the tokens not yet settled,
    after a few settled ones as context; what the window decodes to beyond its context is what they added. A
    window's text is the next one's context, so a token costs one decode of a few ids (one more every ``WINDOW``
    tokens, when the context starts again later), the same at the 10th position and the 8000th: decoding the whole
    answer each time made a long answer quadratic (~1.5 ms a token at 4000 tokens, per row of the batch). A window
    that ends inside a multi-byte character decodes to U+FFFD and waits for the next token. Stop sequences are
    searched only where the new text can complete one."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str]):
        self.stop = stop
        self.longest_stop = max((len(s) for s in stop), default=0)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.context = 0  # ids[context:settled]: the context of the unsettled tokens ids[settled:]
        self.settled = 0
        self.context_text: str | None = ""  # its text, once decoded
        # A fast tokenizer's decode is its Rust tokenizer's, plus a clean-up pass when configured: without that pass,
        # call the Rust one directly (half the time of a call through transformers, every token of every row)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        cleanup = getattr(tokenizer, "clean_up_tokenization_spaces", True)
        self._decoder = backend.decode if backend is not None and not cleanup else tokenizer.decode

    def _decode(self, ids: list[int]) -> str:
        return self._decoder(ids, skip_special_tokens=True)

    def _window(self) -> tuple[str, str]:
        """The text of the context, and of the context with the unsettled tokens."""
        if self.context_text is None:
            self.context_text = self._decode(self.ids[self.context : self.settled])
        return self.context_text, self._decode(self.ids[self.context :])

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; returns (newly visible text, whether a stop sequence was hit)."""
        self.ids.append(token_id)
        before = len(self.text)
        context, window = self._window()
        if len(window) > len(context) and not window.endswith("\ufffd"):
            self.text += window[len(context) :]
            if self.settled - self.context >= WINDOW:  # start a shorter context at the last settled point
                self.context, self.context_text = self.settled, None
            else:  # the same context start: what was decoded is the next context (one decode per token)
                self.context_text = window
            self.settled = len(self.ids)
        if self.stop and len(self.text) > before:
            start = max(0, before - self.longest_stop + 1)  # a stop may begin in text seen before
            hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
            if hits:
                end = min(hits)
                delta = self.text[self.emitted : end]
                self.emitted = max(self.emitted, end)
                return delta, True
        safe = len(self.text)
        for s in self.stop:  # hold back a tail that may grow into a stop sequence
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    safe = min(safe, len(self.text) - k)
                    break
        delta = self.text[self.emitted : safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return delta, False

    def flush(self) -> str:
        """The rest, at the end of the answer: held-back text and an unfinished character (as U+FFFD)."""
        context, window = self._window()
        self.text += window[len(context) :]
        self.context, self.settled, self.context_text = len(self.ids), len(self.ids), ""
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta


def argmax(logits: torch.Tensor | np.ndarray) -> int:
    """The greedy token of a CPU logits row: numpy's argmax, about 10x faster than torch's on a vocabulary row (60
    vs 6 us for 49152 logits on 2 cores, once per row per token); both take the first of equal maxima."""
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().to(torch.float32).numpy()
    return int(logits.argmax())


def sample(logits: torch.Tensor, p: GenerationParams, seen: torch.Tensor, gen: torch.Generator | None) -> int:
    """Next token for one row (logits on the CPU): repetition penalty, then greedy or temperature / top-k / top-p
    sampling."""
    penalize = p.repetition_penalty != 1.0 and seen.numel()
    if p.temperature == 0.0 and not penalize:
        return argmax(logits)  # nothing to edit: no copy
    logits = logits.to(torch.float32, copy=True)  # a normal tensor we may edit (the model's is an inference tensor)
    if penalize:
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if p.temperature == 0.0:
        return argmax(logits)
    logits = logits / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, -1)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > p.top_p  # keep the smallest set reaching top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))


class Row:
    """One request in a running batch: its sampling state and what the prefix cache needs to keep its answer."""

    def __init__(self, index: int, params: GenerationParams, adapter: str | None, key: tuple[Piece, ...],
                 length: int, prompt_ids: list[int], tokenizer: PreTrainedTokenizerBase):  # fmt: skip
        self.index, self.params, self.adapter, self.key, self.length = index, params, adapter, key, length
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.gen = torch.Generator().manual_seed(seed)
        self.seen = torch.tensor(prompt_ids, dtype=torch.long)
        self.text = TextStream(tokenizer, params.stop)
        self.tokens: list[int] = []
        self.done = False

    @property
    def greedy(self) -> bool:
        """Its next token is the argmax of the logits, whatever came before (an engine may take it where they are)."""
        return self.params.temperature == 0.0 and self.params.repetition_penalty == 1.0

    def next(self, eos_ids: set[int], logits: torch.Tensor | int) -> TokenEvent:
        """Sample the next token from this row's logits (or take the greedy token an engine read from them); the
        event ends the row on EOS, a stop or the length."""
        p = self.params
        tok = logits if isinstance(logits, int) else sample(logits.cpu(), p, self.seen, self.gen)
        self.tokens.append(tok)
        if tok in eos_ids:
            self.done = True
            return TokenEvent(self.index, tok, self.text.flush(), FINISH_STOP)
        if p.repetition_penalty != 1.0:
            self.seen = torch.cat([self.seen, torch.tensor([tok])])
        delta, hit_stop = self.text.push(tok)
        if hit_stop or len(self.tokens) >= p.max_new_tokens:
            self.done = True
            tail = "" if hit_stop else self.text.flush()
            return TokenEvent(self.index, tok, delta + tail, FINISH_STOP if hit_stop else FINISH_LENGTH)
        return TokenEvent(self.index, tok, delta)
