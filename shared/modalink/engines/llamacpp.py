"""The llama.cpp runtime (CPU): llama.cpp runs the GGUF file itself, fed with prefix embeddings.

``MODALINK_ENGINE=llamacpp`` selects it; it needs ``llama-cpp-python`` (``make bench`` and ``make test`` build it
from its PyPI sdist). Why: on a CPU, llama.cpp runs a decode step as one graph of fused kernels over the 4-bit
blocks themselves, where the transformers engine dispatches about a thousand operators per token over float
weights (``bench/llamacpp.py`` races the two; ``docs/PERFORMANCE.md``).

How the parts map: text segments go in as token ids, media segments as llama.cpp embedding batches (``llama_batch``
with ``embd``, as llama.cpp's own multimodal path feeds images), each prompt in its own sequence of one unified KV
cache, so rows of different lengths decode together, one token per row per ``llama_decode``; requests join a
running batch between steps (continuous batching) when a sequence and KV room are free. Sampling, stop sequences
and finish reasons are ``engines.decoding``'s, shared with the transformers engine. The tokenizer is the GGUF's own,
read by transformers, so prompts are built and counted exactly as in the other engines.

Not (yet) here: stage-2 LoRA adapters (llama.cpp takes GGUF LoRAs; a peft adapter needs converting), so a request
naming one is refused with a clear error; and the KV prefix cache across requests.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from modalink.engine import Engine, GenerationParams, Join, TokenEvent
from modalink.engines.decoding import Row
from modalink.errors import ConfigError, InputError
from modalink.prompt import Segment, text_ids

N_BATCH = 512  # positions per llama_decode call (a longer prompt is fed in chunks)


class LlamaCppEngine(Engine):
    """A GGUF model run by llama.cpp, with prefix embeddings and continuous batching."""

    joins = True

    def __init__(self, gguf: Path, tokenizer, threads: int, max_rows: int = 32, kv_tokens: int | None = None):
        import llama_cpp as lc
        from llama_cpp import _logger  # noqa: F401  (routes llama.cpp's log through Python logging, quiet)

        _logger.set_verbose(False)
        self.lc, self.tokenizer, self.max_rows = lc, tokenizer, max_rows
        self.adapters: set[str] = set()  # LoRA adapters loaded: none can be (``load_adapter``)
        lc.llama_backend_init()
        self._model = lc.llama_model_load_from_file(str(gguf).encode(), lc.llama_model_default_params())
        if not self._model:
            raise ConfigError(f"llama.cpp could not load {gguf}")
        self.hidden_size = lc.llama_model_n_embd(self._model)
        self.max_context = lc.llama_model_n_ctx_train(self._model)
        self.kv_tokens = kv_tokens or self.max_context  # shared by every row (a unified KV cache)
        params = lc.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = self.kv_tokens, N_BATCH, N_BATCH
        params.n_seq_max, params.kv_unified = max_rows, True
        params.n_threads = params.n_threads_batch = threads
        # flash attention off, as llama-cpp-python's Llama has it: its CPU kernel rounds queries to fp16
        params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self._ctx = lc.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise ConfigError(f"llama.cpp could not make a context of {self.kv_tokens} positions for {gguf}")
        self._memory = lc.llama_get_memory(self._ctx)
        vocab = lc.llama_model_get_vocab(self._model)
        self.vocab_size = lc.llama_vocab_n_tokens(vocab)
        eos = {tokenizer.eos_token_id, *(t for t in range(self.vocab_size) if lc.llama_vocab_is_eog(vocab, t))}
        self.eos_ids = {t for t in eos if t is not None}
        self._tokens = lc.llama_batch_init(N_BATCH, 0, max_rows)
        self._embeds = lc.llama_batch_init(N_BATCH, self.hidden_size, 1)

    def __del__(self) -> None:
        lc = getattr(self, "lc", None)
        if lc is None:
            return
        for batch in ("_tokens", "_embeds"):
            if hasattr(self, batch):
                lc.llama_batch_free(getattr(self, batch))
        if getattr(self, "_ctx", None):
            lc.llama_free(self._ctx)
        if getattr(self, "_model", None):
            lc.llama_model_free(self._model)

    @classmethod
    def from_settings(cls, settings) -> LlamaCppEngine:
        return cls.load(settings=settings)

    @classmethod
    def load(cls, settings=None) -> LlamaCppEngine:
        """The embedded LLM's packaged GGUF, or ``MODALINK_LLM`` naming a ``.gguf`` file."""
        from transformers import AutoTokenizer

        from modalink.cache import package_dir
        from modalink.config import get_settings
        from modalink.llm import EMBEDDED_LLMS

        settings = settings or get_settings()
        if settings.llm in EMBEDDED_LLMS:
            spec = EMBEDDED_LLMS[settings.llm]
            gguf = package_dir(spec.package) / spec.gguf_file
        elif str(settings.llm).endswith(".gguf") and Path(settings.llm).is_file():
            gguf = Path(settings.llm)
        else:
            raise ConfigError(f"MODALINK_ENGINE=llamacpp runs a GGUF file: MODALINK_LLM={settings.llm!r} is neither an "
                              f"embedded LLM ({', '.join(EMBEDDED_LLMS)}) nor a .gguf file")  # fmt: skip
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise ConfigError("MODALINK_ENGINE=llamacpp needs llama-cpp-python (pip install llama-cpp-python, "
                              "built from its sdist; `make bench` does it)") from None  # fmt: skip
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        return cls(gguf, tokenizer, threads=max(1, torch.get_num_threads()))

    def load_adapter(self, name: str, path) -> None:
        raise InputError(f"adapter {name} was trained with a LoRA (stage 2), which the llama.cpp engine cannot serve "
                         "yet: use MODALINK_ENGINE=transformers for it")  # fmt: skip

    # -- checks, before any work -----------------------------------------------------------------------------------

    def check(self, prompt: list[Segment], params: GenerationParams, adapter: str | None = None) -> int:
        self._no_adapter([adapter])
        return self.check_prompt(prompt, params)

    def _no_adapter(self, adapters: Sequence[str | None]) -> None:
        named = sorted({a for a in adapters if a})
        if named:
            raise InputError(f"unknown LoRA adapter(s) {named}: the llama.cpp engine serves none (use "
                             "MODALINK_ENGINE=transformers for stage-2 adapters)")  # fmt: skip

    def _pieces(self, prompt: list[Segment], params: GenerationParams) -> list[list[int] | np.ndarray]:
        """The prompt as token-id runs and float32 embedding blocks, bounded and checked before any is fed."""
        self.check_text_size(prompt)
        pieces: list[list[int] | np.ndarray] = []
        for seg in prompt:
            if isinstance(seg, str):
                pieces.append(text_ids(self.tokenizer, seg))
            else:
                self.check_embeddings(seg)
                pieces.append(np.ascontiguousarray(seg.detach().to(torch.float32).cpu().numpy()))
        length = sum(len(p) for p in pieces)
        if not length:
            raise InputError("empty prompt")
        self._check_budget(length, params)
        return pieces

    def next_token_logits(self, prompt: list[Segment], adapter: str | None = None) -> torch.Tensor:
        """Logits [vocab] for the token after ``prompt`` (scoring, evaluation, tests)."""
        self._no_adapter([adapter])
        pieces = self._pieces(prompt, GenerationParams(max_new_tokens=1))
        self.lc.llama_memory_clear(self._memory, True)
        try:
            return self._prefill(0, pieces)
        finally:
            self.lc.llama_memory_clear(self._memory, True)

    # -- llama.cpp calls -------------------------------------------------------------------------------------------

    def _decode(self, batch, n: int) -> None:
        batch.n_tokens = n
        rc = self.lc.llama_decode(self._ctx, batch)
        if rc != 0:  # 1: no KV slot (admission keeps within room, so a bug), < 0: an error
            raise RuntimeError(f"llama_decode failed ({rc}) on a batch of {n} positions")

    def _logits(self, i: int) -> torch.Tensor:
        ptr = self.lc.llama_get_logits_ith(self._ctx, i)
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(self.vocab_size,)).copy())

    def _prefill(self, seq: int, pieces: list[list[int] | np.ndarray]) -> torch.Tensor:
        """Feed one prompt into sequence ``seq``, in chunks of at most ``N_BATCH`` positions; its last logits."""
        pos, total, last = 0, sum(len(p) for p in pieces), 0
        for piece in pieces:
            for start in range(0, len(piece), N_BATCH):
                chunk = piece[start : start + N_BATCH]
                embeds = isinstance(chunk, np.ndarray)
                batch = self._embeds if embeds else self._tokens
                if embeds:
                    ctypes.memmove(batch.embd, chunk.ctypes.data, chunk.nbytes)
                for j in range(len(chunk)):
                    if not embeds:
                        batch.token[j] = chunk[j]
                    batch.pos[j], batch.n_seq_id[j], batch.logits[j] = pos + j, 1, pos + j == total - 1
                    batch.seq_id[j][0] = seq
                    if pos + j == total - 1:
                        last = j
                self._decode(batch, len(chunk))
                pos += len(chunk)
        return self._logits(last)

    def _step(self, rows: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """One decode step: (sequence, position, token) per row, all in one batch; each row's next logits."""
        batch = self._tokens
        for j, (seq, pos, tok) in enumerate(rows):
            batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.logits[j] = tok, pos, 1, True
            batch.seq_id[j][0] = seq
        self._decode(batch, len(rows))
        return [self._logits(j) for j in range(len(rows))]

    # -- the decode loop -------------------------------------------------------------------------------------------

    def stream(
        self,
        prompts: Sequence[list[Segment]],
        params: GenerationParams | Sequence[GenerationParams],
        adapters: Sequence[str | None] | None = None,
        join: Join | None = None,
    ) -> Iterator[TokenEvent]:
        """All prompts decoded together, one sequence each; with ``join``, requests arriving meanwhile are admitted
        between decode steps while a sequence and KV room (prompt + ``max_new_tokens``) are free, else they wait
        for a running row to finish."""
        n = len(prompts)
        plist, names = self.per_prompt(prompts, params, adapters)
        self._no_adapter(names)
        waiting = [(i, self._pieces(pr, p), p) for i, (pr, p) in enumerate(zip(prompts, plist, strict=True))]
        self.lc.llama_memory_clear(self._memory, True)
        free = list(range(self.max_rows))
        running: list[tuple[Row, int, int, int]] = []  # (row, sequence, next position, reserved KV positions)
        logits: list[torch.Tensor] = []
        try:
            while True:
                room = self.kv_tokens - sum(r for *_, r in running)
                need = lambda w: sum(map(len, w[1])) + w[2].max_new_tokens  # noqa: E731  (prompt + answer)
                while waiting and free and need(waiting[0]) <= room:
                    index, pieces, p = waiting.pop(0)
                    seq = free.pop(0)
                    ids = [t for piece in pieces if isinstance(piece, list) for t in piece]
                    length = sum(len(piece) for piece in pieces)
                    logits.append(self._prefill(seq, pieces))
                    reserved = length + p.max_new_tokens
                    running.append((Row(index, p, None, (), length, ids, self.tokenizer), seq, length, reserved))
                    room -= reserved
                if not running:
                    if waiting:  # cannot happen: one request alone fits (checked against the context)
                        raise RuntimeError("a request does not fit the llama.cpp KV cache")
                    return
                step, keep = [], []
                for (row, seq, pos, reserved), row_logits in zip(running, logits, strict=True):
                    ev = row.next(self.eos_ids, row_logits)
                    yield ev
                    if row.done or (join and join.cancelled(row.index)):
                        self.lc.llama_memory_seq_rm(self._memory, seq, -1, -1)
                        free.append(seq)
                    else:
                        step.append((seq, pos, ev.token_id))
                        keep.append((row, seq, pos + 1, reserved))
                running = keep
                logits = self._step(step) if step else []
                if join is not None:
                    for prompt, p, adapter in join.more(len(running) + len(waiting)):
                        self._no_adapter([adapter])
                        waiting.append((n, self._pieces(prompt, p), p))
                        n += 1
        finally:
            self.lc.llama_memory_clear(self._memory, True)
