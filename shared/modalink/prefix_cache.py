"""The LLM's KV prefix cache: a later prompt that starts like an earlier one prefills only what is new.

A chat's second turn repeats the first turn's prompt (system message, history, the media's prefix embeddings)
and adds the answer and a new question; captioning prompts share the system head. The engine keeps, per LoRA
adapter (a LoRA changes the keys and values), the keys and values of recent prompts, and a new prompt reuses
those of the longest prefix it shares with any of them. Prompts are compared piece by piece: a text piece by
its token ids, an embedding piece by a hash of its values, so media match by content, never by position
alone. Memory is bounded in bytes, least recently used first; the entry that holds a system head is used by
every prompt, so it stays hot. Size: ``MODALINK_KV_CACHE_MB`` (0 = off).

What an entry holds is the engine's: the transformers engine keeps per-layer key and value tensors (``Layers``),
the llama.cpp engine a sequence's saved state (bytes); the cache only needs each value's size in bytes.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# Reusing fewer tokens than this saves less than assembling the batch's cache costs.
MIN_REUSE_TOKENS = 16

Piece = tuple  # ("t", token ids...) or ("e", sha256 hex of the embedding's values, rows)
Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each [kv_heads, positions, head_dim]


def embedding_piece(embeds: torch.Tensor) -> Piece:
    """An embedding segment's key: its values' hash (dtype and shape included) and its length in positions."""
    t = embeds.detach().contiguous().cpu()
    digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return ("e", digest.hexdigest(), t.shape[0])


def add_text(key: list[Piece], ids: list[int]) -> None:
    """Append token ids to a prompt's key: a run of text is one piece of ids, however it was split."""
    if key and key[-1][0] == "t":
        key[-1] = (*key[-1], *ids)
    else:
        key.append(("t", *ids))


def piece_length(piece: Piece) -> int:
    return piece[2] if piece[0] == "e" else len(piece) - 1


def common_length(a: tuple[Piece, ...], b: tuple[Piece, ...]) -> int:
    """Positions the two prompts share from their start (an embedding piece matches only whole)."""
    n = 0
    for pa, pb in zip(a, b, strict=False):
        if pa == pb:
            n += piece_length(pa)
            continue
        if pa[0] == pb[0] == "t":
            k = 1
            while k < min(len(pa), len(pb)) and pa[k] == pb[k]:
                k += 1
            n += k - 1
        break
    return n


@dataclass
class PrefixStats:
    """Counters for /metrics."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    tokens_reused: int = 0  # prompt positions not prefilled again
    bytes: int = 0
    entries: int = 0


def layers_nbytes(layers: Layers) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)


def cut(layers: Layers, n: int) -> Layers:
    """The first ``n`` positions of an entry's layers (views)."""
    return [(k[:, :n], v[:, :n]) for k, v in layers]


@dataclass
class _Entry:
    adapter: str | None
    pieces: tuple[Piece, ...]
    length: int
    value: Any
    nbytes: int


class PrefixCache:
    """Keys and values of recent prompts, per adapter, at most ``max_bytes`` in all (LRU). ``nbytes`` sizes an
    entry's value (default: the transformers engine's ``Layers``)."""

    def __init__(self, max_bytes: int, nbytes: Callable[[Any], int] = layers_nbytes):
        self.max_bytes, self._nbytes = max_bytes, nbytes
        self.stats = PrefixStats()
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next = 0
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return self.max_bytes > 0

    def lookup(self, adapter: str | None, pieces: tuple[Piece, ...], length: int) -> tuple[int, Any]:
        """(positions reused, the entry's value: it holds at least that many, the caller uses the first ones) for
        the longest cached prefix of a prompt of ``length`` positions; at least its last position is left to
        prefill (its logits pick the first token)."""
        best, best_n = None, 0
        with self._lock:
            for key, entry in self._entries.items():
                if entry.adapter == adapter:
                    n = min(common_length(entry.pieces, pieces), entry.length, length - 1)
                    if n > best_n:
                        best, best_n = key, n
            if best is None or best_n < MIN_REUSE_TOKENS:
                self.stats.misses += 1
                return 0, None
            self._entries.move_to_end(best)
            self.stats.hits += 1
            self.stats.tokens_reused += best_n
            return best_n, self._entries[best].value

    def covers(self, adapter: str | None, pieces: tuple[Piece, ...], length: int) -> bool:
        """Some entry already holds this whole prompt (no need to store it again)."""
        with self._lock:
            return self._covered(adapter, pieces, length)

    def _covered(self, adapter: str | None, pieces: tuple[Piece, ...], length: int) -> bool:
        return any(e.adapter == adapter and min(common_length(e.pieces, pieces), e.length) >= length
                   for e in self._entries.values())  # fmt: skip

    def store(self, adapter: str | None, pieces: tuple[Piece, ...], length: int, value: Callable[[], Any]) -> None:
        """Keep a prompt's keys and values, unless an entry already holds the whole prompt: ``value()`` is called
        only then, and what it returns (tensors or bytes of their own, not views of a batch's cache) is kept as it
        is. Entries the prompt extends are dropped, then the oldest go."""
        if length < MIN_REUSE_TOKENS or self.covers(adapter, pieces, length):
            return
        held = value()
        entry = _Entry(adapter, pieces, length, held, self._nbytes(held))
        if entry.nbytes > self.max_bytes:
            return
        with self._lock:
            for key in [k for k, e in self._entries.items() if e.adapter == adapter
                        and common_length(e.pieces, pieces) >= e.length]:  # fmt: skip
                self._drop(key)  # a prefix of the new prompt: the new entry serves all it did
            self._entries[self._next] = entry
            self._next += 1
            self.stats.bytes += entry.nbytes
            while self.stats.bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
                self.stats.evictions += 1
            self.stats.entries = len(self._entries)

    def _drop(self, key: int) -> None:
        self.stats.bytes -= self._entries.pop(key).nbytes
        self.stats.entries = len(self._entries)
