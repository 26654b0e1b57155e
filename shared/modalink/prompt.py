"""Prompt assembly: the LLM's own chat template, with modality embeddings spliced in where they belong.

A prompt becomes a list of *segments*: text (tokenized by the engine) or a tensor of embeddings
[n, d_llm]. Every modality item is wrapped in text boundary markers, ``<image>`` ... ``</image>``.
Items go where the user put them (interleaved, KOSMOS-1 style); a prompt with no placement gets
AnyMAL's order, ``[<instruction> <modality tokens>]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from modalink import MODALITIES
from modalink.errors import InputError

Segment = str | torch.Tensor

_SLOT = "<|modalink:{}|>"
_SLOT_RE = re.compile(r"<\|modalink:(\d+)\|>")
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
    """Render ``messages`` with the tokenizer's chat template and splice each media item's embeddings."""
    if not messages or messages[-1].role != "user":
        raise InputError("a prompt needs at least one message and must end with a user turn")
    media: list[Media] = []
    rendered = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for msg in messages:
        if msg.role not in ("system", "user", "assistant"):
            raise InputError(f"unknown role {msg.role!r}")
        text = []
        for part in msg.content:
            if isinstance(part, Media):
                if part.modality not in MODALITIES:
                    raise InputError(f"unknown modality {part.modality!r}")
                text.append(_SLOT.format(len(media)))
                media.append(part)
            elif isinstance(part, str):
                text.append(sanitize(part))  # a user cannot forge a slot
            else:
                raise InputError(f"a message part must be text or a modality input, got {type(part).__name__}")
        rendered.append({"role": msg.role, "content": "".join(text)})
    if not any(r["content"].strip() for r in rendered if r["role"] == "user"):
        raise InputError("the prompt is empty: give a question or at least one input")
    chat = tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
    segments: list[Segment] = []
    pos = 0
    for slot in _SLOT_RE.finditer(chat):
        item = media[int(slot.group(1))]
        segments += [chat[pos : slot.start()] + f"<{item.modality}>", item.embeddings, f"</{item.modality}>"]
        pos = slot.end()
    segments.append(chat[pos:])
    return merge_text(segments)


def prompt_tokens(tokenizer: PreTrainedTokenizerBase, prompt: list[Segment]) -> int:
    """A prompt's length in tokens: each text segment's tokens plus each embedding segment's rows."""
    return sum(len(tokenizer(s, add_special_tokens=False).input_ids) if isinstance(s, str) else s.shape[0]
               for s in prompt)  # fmt: skip


def merge_text(segments: list[Segment]) -> list[Segment]:
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
