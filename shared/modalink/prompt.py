"""Prompt assembly: the LLM's own chat template, with modality embeddings spliced in where they belong.

A prompt becomes a list of *segments*: text (tokenized by the engine) or a tensor of embeddings
[n, d_llm]. Every modality item is wrapped in text boundary markers, ``<image>`` ... ``</image>``.
Items go where the user put them (interleaved, KOSMOS-1 style); a prompt with no placement gets
AnyMAL's order, ``[<instruction> <modality tokens>]``.

What clients wrote (every message's text, system and assistant turns of a history included) is marked in the
prompt's text (``Text.plain``) and tokenized as plain text (``text_ids``): the spelling of a special token there,
``<|im_start|>system`` or ``</s>``, is ordinary text, so a user cannot open a turn of another role or end one. Only
the chat template's own special tokens (and the operator's system prompt) are control tokens.
"""

from __future__ import annotations

import bisect
import re
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase

from modalink import MODALITIES
from modalink.errors import InputError

Segment = str | torch.Tensor

_SLOT = "<|modalink:{}|>"
_OPEN, _CLOSE = "<|modalink:text|>", "<|modalink:/text|>"  # around client text while the template renders
_SLOT_RE = re.compile(r"<\|modalink:(\d+|text|/text)\|>")
_TAG_RE = re.compile(r"<(" + "|".join(MODALITIES) + r")>")


@dataclass
class Media:
    """One modality item already projected into the LLM's embedding space."""

    modality: str
    embeddings: torch.Tensor  # [n_tokens, d_llm]
    version: str = ""  # the adapter (projector) version that made them


Part = str | Media


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    content: list[Part]


class Text(str):
    """Prompt text of which the ``plain`` spans (character offsets) are what a client wrote: ``text_ids`` reads
    them as plain text, a special token's spelling included; the rest is the chat template's, whose special tokens
    are control tokens. Concatenation and slicing keep the spans; other ``str`` methods return a plain ``str``."""

    plain: tuple[tuple[int, int], ...]

    def __new__(cls, text: str = "", plain: Iterable[tuple[int, int]] = ()) -> Text:
        self = super().__new__(cls, text)
        spans: list[tuple[int, int]] = []
        for a, b in sorted((max(0, a), min(len(text), b)) for a, b in plain):
            if a >= b:
                continue
            if spans and a <= spans[-1][1]:
                spans[-1] = (spans[-1][0], max(b, spans[-1][1]))
            else:
                spans.append((a, b))
        self.plain = tuple(spans)
        return self

    def __add__(self, other: str) -> Text:
        if not isinstance(other, str):
            return NotImplemented
        n = len(self)
        return Text(str(self) + other, [*self.plain, *((a + n, b + n) for a, b in getattr(other, "plain", ()))])

    def __radd__(self, other: str) -> Text:
        if not isinstance(other, str):
            return NotImplemented
        n = len(other)
        return Text(other + str(self), [*getattr(other, "plain", ()), *((a + n, b + n) for a, b in self.plain)])

    def __getitem__(self, key):
        piece = str.__getitem__(self, key)
        if not isinstance(key, slice) or key.step not in (None, 1):
            return piece
        start = key.indices(len(self))[0]
        return Text(piece, [(a - start, b - start) for a, b in self.plain])

    def __repr__(self) -> str:
        return f"Text({str.__repr__(self)}, plain={self.plain})"


def plain(text: str) -> Text:
    """``text``, all of it read as plain text."""
    return Text(text, [(0, len(text))])


def sanitize(text: str) -> str:
    """User text with every slot marker removed, to a fixed point: one pass over ``<|modal<|modalink:0|>ink:0|>``
    would leave a forged marker behind. The safety filter checks this text, which is what the LLM reads."""
    while (clean := _SLOT_RE.sub("", text)) != text:
        text = clean
    return text


def place_media(text: str, media: list[Media]) -> list[Part]:
    """Interleave ``media`` with ``text``. Tags ``<image>``/``<audio>``/``<imu>``/``<video>`` in the text take
    the items of their modality in order (one tag per item); text without tags gets AnyMAL order, text first."""
    tags = list(_TAG_RE.finditer(text))
    if not tags:
        return ([text] if text else []) + list(media)
    wanted = sorted(m.group(1) for m in tags)
    given = sorted(m.modality for m in media)
    if wanted != given:
        raise InputError(f"the prompt has tags for {wanted} but the inputs are {given}: use one tag per input, or none")
    queues = {mod: [m for m in media if m.modality == mod] for mod in set(given)}
    parts: list[Part] = []
    pos = 0
    for tag in tags:
        parts += [text[pos : tag.start()], queues[tag.group(1)].pop(0)]
        pos = tag.end()
    parts.append(text[pos:])
    return [p for p in parts if not isinstance(p, str) or p]


def build_prompt(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], system_prompt: str | None = None
) -> list[Segment]:
    """Render ``messages`` with the tokenizer's chat template and splice each media item's embeddings.

    The operator's ``system_prompt`` comes first; a client's system messages come after it, where the client put
    them, or, with a template that takes one system message only (LLaMA-2), appended to it. Every message's text
    is client text: a ``Text`` span, tokenized as plain text (``text_ids``)."""
    if not messages or messages[-1].role != "user":
        raise InputError("a prompt needs at least one message and must end with a user turn")
    media: list[Media] = []
    rendered = []
    for msg in messages:
        if msg.role not in ("system", "user", "assistant"):
            raise InputError(f"unknown role {msg.role!r}")
        parts: list[Part] = []
        for part in msg.content:
            if isinstance(part, Media):
                if part.modality not in MODALITIES:
                    raise InputError(f"unknown modality {part.modality!r}")
                parts.append(part)
            elif isinstance(part, str):
                parts.append(sanitize(part))  # a user cannot forge a slot
            else:
                raise InputError(f"a message part must be text or a modality input, got {type(part).__name__}")
        content = []
        for part in parts:
            if isinstance(part, Media):
                content.append(_SLOT.format(len(media)))
                media.append(part)
            elif core := part.strip():  # marked inside its whitespace, which a template may strip (LLaMA-2's does)
                start = part.index(core)
                content.append(part[:start] + _OPEN + core + _CLOSE + part[start + len(core) :])
            else:
                content.append(part)
        rendered.append({"role": msg.role, "content": "".join(content)})
    if not any(r["content"].strip() for r in rendered if r["role"] == "user"):
        raise InputError("the prompt is empty: give a question or at least one input")
    chat = _render(tokenizer, sanitize(system_prompt or ""), rendered)
    segments: list[Segment] = []
    text, spans, inside, pos = "", [], False, 0
    for mark in _SLOT_RE.finditer(chat):
        piece = chat[pos : mark.start()]
        if inside:
            spans.append((len(text), len(text) + len(piece)))
        text, pos = text + piece, mark.end()
        if mark.group(1) in ("text", "/text"):
            inside = mark.group(1) == "text"
            continue
        item = media[int(mark.group(1))]
        segments += [Text(text + f"<{item.modality}>", spans), item.embeddings]
        text, spans = f"</{item.modality}>", []
    if inside:
        spans.append((len(text), len(text) + len(chat) - pos))
    segments.append(Text(text + chat[pos:], spans))
    return merge_text([s if not isinstance(s, Text) or s.plain else str(s) for s in segments])


def _render(tokenizer: PreTrainedTokenizerBase, system_prompt: str, rendered: list[dict]) -> str:
    """The chat template applied: the operator's system prompt first, then the messages. A template that refuses
    a second system message (LLaMA-2 takes one, first) gets the client's appended to the operator's."""
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    try:
        return tokenizer.apply_chat_template(head + rendered, tokenize=False, add_generation_prompt=True)
    except TemplateError as e:
        error = e
    client = [r["content"] for r in rendered if r["role"] == "system"]
    if client:
        system = "\n\n".join(([system_prompt] if system_prompt else []) + client)
        merged = [{"role": "system", "content": system}] + [r for r in rendered if r["role"] != "system"]
        try:
            return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
        except TemplateError as e:
            error = e
    raise InputError(f"the LLM's chat template refuses this conversation: {error}") from None


@dataclass(frozen=True)
class _Specials:
    special: dict[str, int]  # the special tokens' spellings -> ids
    pattern: re.Pattern | None  # any special token's spelling, longest first


_SPECIALS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _specials(tokenizer: PreTrainedTokenizerBase) -> _Specials:
    """The special tokens ``text_ids`` needs to know of a tokenizer, found once per tokenizer."""
    found = _SPECIALS.get(tokenizer)
    if found is None:
        special = {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special and t.content}
        words = sorted(special, key=len, reverse=True)
        pattern = re.compile("|".join(map(re.escape, words))) if words else None
        found = _SPECIALS[tokenizer] = _Specials(special, pattern)
    return found


def text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a prompt's text. The special tokens the chat template wrote are control tokens; in a ``Text``'s
    ``plain`` spans (what a client wrote) their spellings are plain text, tokenized as any other text.

    Text whose plain spans hold no special token (nearly all) is tokenized in one call, exactly as before; else
    it is cut at the template's control tokens and each piece between them is tokenized with
    ``split_special_tokens`` (BPE tokenizers such as SmolLM2's then give the same ids as one call would)."""
    spans = getattr(text, "plain", ())
    if not spans:
        return tokenizer(str(text), add_special_tokens=False).input_ids
    info = _specials(tokenizer)
    if info.pattern is None:
        return tokenizer(str(text), add_special_tokens=False).input_ids
    if tokenizer.is_fast:
        enc = tokenizer(str(text), add_special_tokens=False, return_offsets_mapping=True)
        special, ends = set(info.special.values()), [b for _, b in spans]
        if not any(i in special and _overlaps(span, spans, ends) for i, span in zip(enc.input_ids, enc.offset_mapping,
                                                                                     strict=True)):  # fmt: skip
            return enc.input_ids
    ids: list[int] = []
    text, pos = str(text), 0
    for a, b in _controls(text, spans, info.pattern):
        ids += _plain_ids(tokenizer, text[pos:a]) + [info.special[text[a:b]]]
        pos = b
    return ids + _plain_ids(tokenizer, text[pos:])


def _overlaps(span: tuple[int, int], spans: tuple[tuple[int, int], ...], ends: list[int]) -> bool:
    """Whether ``span`` overlaps one of ``spans`` (sorted, disjoint; ``ends``: their ends), in O(log n)."""
    k = bisect.bisect_right(ends, span[0])  # the first span that ends after span starts
    return k < len(spans) and spans[k][0] < span[1] and span[0] < span[1]


def _controls(text: str, spans: tuple[tuple[int, int], ...], pattern: re.Pattern) -> list[tuple[int, int]]:
    """Where the template's special tokens are: matches in the text outside the plain spans, each run on its own
    (a match cannot start in a client's text and end in the template's)."""
    out, pos = [], 0
    for a, b in [*spans, (len(text), len(text))]:
        out += [(pos + m.start(), pos + m.end()) for m in pattern.finditer(text[pos:a])]
        pos = b
    return out


def _plain_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    if not text:
        return []
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids


def prompt_tokens(tokenizer: PreTrainedTokenizerBase, prompt: list[Segment]) -> int:
    """A prompt's length in tokens: each text segment's tokens (``text_ids``) plus each embedding segment's rows."""
    return sum(len(text_ids(tokenizer, s)) if isinstance(s, str) else s.shape[0] for s in prompt)


def merge_text(segments: list[Segment]) -> list[Segment]:
    """Adjacent text segments joined (a ``Text``'s plain spans kept), empty ones dropped."""
    out: list[Segment] = []
    for s in segments:
        if isinstance(s, str):
            if not s:
                continue
            if out and isinstance(out[-1], str):
                out[-1] += s
                continue
        out.append(s)
    return out
