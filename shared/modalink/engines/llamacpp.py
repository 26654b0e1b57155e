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

Stage-2 LoRA adapters: llama.cpp applies a LoRA to a whole context, so each loaded adapter gets a context of its
own (the model's weights are shared; each context holds its own KV cache), and a step decodes each adapter's rows
in its context. A peft adapter is converted to a GGUF LoRA on load (``lora_to_gguf``).

KV prefix cache across requests (``modalink.prefix_cache``, ``MODALINK_KV_CACHE_MB``): a sequence's keys and values
are saved from llama.cpp (``llama_state_seq_get_data``) once its prompt is prefilled; a later prompt that starts
the same way has the longest such prefix restored into its sequence (``llama_state_seq_set_data``, cut with
``llama_memory_seq_rm``) and prefills only the rest. The saved states live in host memory, not in the KV cache:
cells held for the cache would widen every step's attention (a unified KV cache attends over all used cells,
masked). Unlike the transformers engine, answers are not kept: llama.cpp's CPU kernels round a batch of one
position differently from a batch of several (the same prompt's logits differ by up to 0.7 fed whole and fed a
position at a time), so an answer's keys and values, computed a position per step, are not those a later prefill
of the same text computes. Prefilled positions are exact (a prompt restored in part and prefilled in a batch of
two or more positions gives the logits of the whole prompt prefilled, bit for bit), so with the cache on a greedy
answer is the one it would be with the cache off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from modalink.engine import Engine, GenerationParams, Join, TokenEvent
from modalink.engines.decoding import Row, argmax
from modalink.errors import ConfigError, InputError
from modalink.prefix_cache import Piece, PrefixCache, add_text, embedding_piece
from modalink.prompt import Segment, text_ids

N_BATCH = 512  # positions per llama_decode call (a longer prompt is fed in chunks)


class _Context:
    """One llama.cpp context (the base model, or the model with one LoRA): its KV cache and free sequences."""

    def __init__(self, engine: LlamaCppEngine, lora=None):
        lc = engine.lc
        params = lc.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = engine.kv_tokens, N_BATCH, N_BATCH
        params.n_seq_max, params.kv_unified = engine.max_rows, True  # every row shares the KV positions
        params.n_threads = params.n_threads_batch = engine.threads
        # flash attention off, as llama-cpp-python's Llama has it: its CPU kernel rounds queries to fp16
        params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.lc, self.ctx = lc, lc.llama_init_from_model(engine.model, params)
        if not self.ctx:
            raise ConfigError(f"llama.cpp could not make a context of {engine.kv_tokens} positions")
        if lora is not None and lc.llama_set_adapters_lora(self.ctx, (lc.llama_adapter_lora_p_ctypes * 1)(lora), 1,
                                                           (ctypes.c_float * 1)(1.0)) != 0:  # fmt: skip
            raise ConfigError("llama.cpp could not apply the LoRA adapter")
        self.memory = lc.llama_get_memory(self.ctx)
        self.free = list(range(engine.max_rows))
        self.room = engine.kv_tokens

    def __del__(self) -> None:
        if getattr(self, "ctx", None):
            self.lc.llama_free(self.ctx)


class LlamaCppEngine(Engine):
    """A GGUF model run by llama.cpp, with prefix embeddings, continuous batching and LoRA adapters."""

    joins = True

    def __init__(self, gguf: Path, tokenizer, threads: int, max_rows: int = 32, kv_tokens: int | None = None,
                 lora_dir: Path | None = None):  # fmt: skip
        import llama_cpp as lc
        from llama_cpp import _logger  # noqa: F401  (routes llama.cpp's log through Python logging, quiet)

        _logger.set_verbose(False)
        self.lc, self.tokenizer, self.max_rows, self.threads = lc, tokenizer, max_rows, threads
        self.lora_dir = lora_dir  # where converted GGUF LoRAs are kept (None: a temporary folder)
        lc.llama_backend_init()
        self.model = lc.llama_model_load_from_file(str(gguf).encode(), lc.llama_model_default_params())
        if not self.model:
            raise ConfigError(f"llama.cpp could not load {gguf}")
        self.hidden_size = lc.llama_model_n_embd(self.model)
        self.max_context = lc.llama_model_n_ctx_train(self.model)
        self.kv_tokens = kv_tokens or self.max_context  # per context, shared by its rows
        vocab = lc.llama_model_get_vocab(self.model)
        self.vocab_size = lc.llama_vocab_n_tokens(vocab)
        eos = {tokenizer.eos_token_id, *(t for t in range(self.vocab_size) if lc.llama_vocab_is_eog(vocab, t))}
        self.eos_ids = {t for t in eos if t is not None}
        self._contexts: dict[str | None, _Context] = {None: _Context(self)}
        self._loras: dict[str, object] = {}
        self._tokens = lc.llama_batch_init(N_BATCH, 0, max_rows)
        self._embeds = lc.llama_batch_init(N_BATCH, self.hidden_size, 1)
        self._row_type = ctypes.c_float * self.vocab_size  # a logits row, read in place
        self.prefix_cache = PrefixCache(0, nbytes=len)  # off until ``load`` sizes it (MODALINK_KV_CACHE_MB)

    @property
    def adapters(self) -> set[str]:
        """The LoRA adapters loaded (``load_adapter``), each in a context of its own."""
        return set(self._loras)

    def __del__(self) -> None:
        lc = getattr(self, "lc", None)
        if lc is None:
            return
        for batch in ("_tokens", "_embeds"):
            if hasattr(self, batch):
                lc.llama_batch_free(getattr(self, batch))
        self._contexts = {}
        for lora in getattr(self, "_loras", {}).values():
            lc.llama_adapter_lora_free(lora)
        if getattr(self, "model", None):
            lc.llama_model_free(self.model)

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
        threads = max(1, torch.get_num_threads())
        if settings.llamacpp_weights == "f16":
            gguf = f16_copy(gguf, settings.cache_dir / "gguf")
        engine = cls(gguf, tokenizer, threads=threads, lora_dir=settings.cache_dir / "gguf-lora")
        engine.prefix_cache = PrefixCache(settings.kv_cache_mb * 2**20, nbytes=len)
        return engine

    def load_adapter(self, name: str, path) -> None:
        """A peft LoRA folder, converted to a GGUF LoRA (once, kept by its checksum), in a context of its own."""
        if name in self._loras:
            return
        from modalink.methods import require_lora

        require_lora(Path(path), "llama.cpp")
        weights = Path(path) / "adapter_model.safetensors"
        digest = hashlib.sha256(weights.read_bytes() + (Path(path) / "adapter_config.json").read_bytes()).hexdigest()
        folder = self.lora_dir = _writable_folder(self.lora_dir, "modalink-gguf-lora-")
        out = folder / f"{digest[:16]}.gguf"
        if not out.is_file():
            lc = self.lc
            lora_to_gguf(Path(path), out, lc.llama_model_n_head(self.model), lc.llama_model_n_head_kv(self.model))
        lora = self.lc.llama_adapter_lora_init(self.model, str(out).encode())
        if not lora:
            raise ConfigError(f"llama.cpp could not load the LoRA adapter {name} ({out})")
        self._contexts[name] = _Context(self, lora)
        self._loras[name] = lora

    # -- checks, before any work -----------------------------------------------------------------------------------

    def check(self, prompt: list[Segment], params: GenerationParams, adapter: str | None = None) -> int:
        self._known([adapter])
        return self.check_prompt(prompt, params)

    def _known(self, adapters: Sequence[str | None]) -> None:
        unknown = sorted({a for a in adapters if a and a not in self._loras})
        if unknown:
            raise InputError(f"unknown LLM adapter(s) {unknown}; loaded: {sorted(self._loras)}")

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
        self._known([adapter])
        pieces = self._pieces(prompt, GenerationParams(max_new_tokens=1))
        c = self._contexts[adapter]
        self._clear(c)
        try:
            return self._prefill(c, 0, pieces)
        finally:
            self._clear(c)

    # -- llama.cpp calls -------------------------------------------------------------------------------------------

    def _clear(self, c: _Context) -> None:
        """Free every cell of ``c``'s KV cache: the metadata only. Free cells are masked out of attention and written
        over when used again; clearing the data too would zero the whole buffer (about 190 MB at 8192 positions, ~8 ms
        a call on 2 cores), which each request paid twice, once before its first token."""
        self.lc.llama_memory_clear(c.memory, False)

    def _decode(self, c: _Context, batch, n: int) -> None:
        batch.n_tokens = n
        rc = self.lc.llama_decode(c.ctx, batch)
        if rc != 0:  # 1: no KV slot (admission keeps within room, so a bug), < 0: an error
            raise RuntimeError(f"llama_decode failed ({rc}) on a batch of {n} positions")

    def _logits(self, c: _Context, i: int) -> torch.Tensor:
        """Row ``i``'s logits of the last decode, copied: the next ``llama_decode`` in ``c`` writes over them."""
        out = torch.empty(self.vocab_size)
        ctypes.memmove(out.data_ptr(), self.lc.llama_get_logits_ith(c.ctx, i), self.vocab_size * 4)
        return out

    def _out(self, c: _Context, i: int, greedy: bool) -> torch.Tensor | int:
        """What row ``i``'s sampling needs of the last decode: a greedy row's token, its argmax read where llama.cpp
        wrote the logits (a copy of a 49152-logit row and a second pass over it cost more than the argmax, each
        token), else the logits, copied."""
        if not greedy:
            return self._logits(c, i)
        address = ctypes.cast(self.lc.llama_get_logits_ith(c.ctx, i), ctypes.c_void_p).value
        return argmax(np.frombuffer(self._row_type.from_address(address), dtype=np.float32))

    def _prefill(
        self, c: _Context, seq: int, pieces: list[list[int] | np.ndarray], skip: int = 0, greedy: bool = False
    ) -> torch.Tensor | int:
        """Feed one prompt into sequence ``seq``, in chunks of at most ``N_BATCH`` positions, from position ``skip``
        (those before it are in the sequence already: a restored prefix); its last logits (``_out``)."""
        pos, total, last = 0, sum(len(p) for p in pieces), 0
        for piece in pieces:
            if pos + len(piece) <= skip:
                pos += len(piece)
                continue
            first = max(0, skip - pos)
            pos += first
            for start in range(first, len(piece), N_BATCH):
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
                self._decode(c, batch, len(chunk))
                pos += len(chunk)
        return self._out(c, last, greedy)

    def _step(self, c: _Context, rows: list[tuple[int, int, int, bool]]) -> list[torch.Tensor | int]:
        """One decode step in context ``c``: (sequence, position, token, greedy) per row, in one batch; what each
        row samples from next (``_out``)."""
        batch = self._tokens
        for j, (seq, pos, tok, _) in enumerate(rows):
            batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.logits[j] = tok, pos, 1, True
            batch.seq_id[j][0] = seq
        self._decode(c, batch, len(rows))
        return [self._out(c, j, greedy) for j, (_, _, _, greedy) in enumerate(rows)]

    # -- the KV prefix cache: sequences saved to and restored from host memory -------------------------------------

    def _key(self, pieces: list[list[int] | np.ndarray]) -> tuple[Piece, ...]:
        key: list[Piece] = []
        for piece in pieces:
            if isinstance(piece, list):
                add_text(key, piece)
            else:
                key.append(embedding_piece(torch.from_numpy(piece)))
        return tuple(key)

    def _save(self, c: _Context, seq: int) -> bytearray:
        """Sequence ``seq``'s keys and values (all its positions), as llama.cpp serializes them."""
        size = self.lc.llama_state_seq_get_size(c.ctx, seq)
        state = bytearray(size)
        n = self.lc.llama_state_seq_get_data(c.ctx, (ctypes.c_uint8 * size).from_buffer(state), size, seq)
        del state[n:]
        return state

    def _restore(self, c: _Context, seq: int, state: bytearray, n: int) -> int:
        """Put a saved prefix into the empty sequence ``seq``, cut to its first ``n`` positions: ``n``, or 0 where
        llama.cpp found no room for it (the prompt is then prefilled whole)."""
        buf = (ctypes.c_uint8 * len(state)).from_buffer(state)
        if not self.lc.llama_state_seq_set_data(c.ctx, buf, len(state), seq):
            self.lc.llama_memory_seq_rm(c.memory, seq, -1, -1)
            return 0
        self.lc.llama_memory_seq_rm(c.memory, seq, n, -1)
        return n

    # -- the decode loop -------------------------------------------------------------------------------------------

    def stream(
        self,
        prompts: Sequence[list[Segment]],
        params: GenerationParams | Sequence[GenerationParams],
        adapters: Sequence[str | None] | None = None,
        join: Join | None = None,
    ) -> Iterator[TokenEvent]:
        """All prompts decoded together, one sequence each in its adapter's context; with ``join``, requests arriving
        meanwhile are admitted between decode steps while their context has a sequence and KV room (prompt +
        ``max_new_tokens``) free, else they wait for a running row to finish."""
        n = len(prompts)
        plist, names = self.per_prompt(prompts, params, adapters)
        self._known(names)
        waiting = [
            (i, self._pieces(pr, p), p, a) for i, (pr, p, a) in enumerate(zip(prompts, plist, names, strict=True))
        ]
        for c in self._contexts.values():
            self._clear(c)
            c.free, c.room = list(range(self.max_rows)), self.kv_tokens
        pc = self.prefix_cache
        running: list[tuple[Row, _Context, int, int, int]] = []  # (row, context, sequence, next position, reserved)
        logits: list[torch.Tensor | int] = []  # per running row: its logits, or its greedy token
        try:
            while True:
                for w in list(waiting):  # in arrival order, each when its context has room
                    index, pieces, p, adapter = w
                    c = self._contexts[adapter]
                    length = sum(len(piece) for piece in pieces)
                    if not c.free or length + p.max_new_tokens > c.room:
                        continue
                    waiting.remove(w)
                    seq = c.free.pop(0)
                    c.room -= length + p.max_new_tokens
                    ids = [t for piece in pieces if isinstance(piece, list) for t in piece]
                    key = self._key(pieces) if pc else ()
                    # at least two positions left to prefill: a one-position batch rounds differently (see above)
                    reused, state = pc.lookup(adapter, key, length - 1) if pc else (0, None)
                    skip = self._restore(c, seq, state, reused) if state is not None else 0
                    row = Row(index, p, adapter, key, length, ids, self.tokenizer)
                    logits.append(self._prefill(c, seq, pieces, skip, row.greedy))
                    if pc:
                        pc.store(adapter, key, length, lambda c=c, seq=seq: self._save(c, seq))
                    running.append((row, c, seq, length, length + p.max_new_tokens))
                if not running:
                    if waiting:  # cannot happen: one request alone fits (checked against the context)
                        raise RuntimeError("a request does not fit the llama.cpp KV cache")
                    return
                keep = []
                for (row, c, seq, pos, reserved), row_logits in zip(running, logits, strict=True):
                    ev = row.next(self.eos_ids, row_logits)
                    yield ev
                    if row.done or (join and join.cancelled(row.index)):
                        self.lc.llama_memory_seq_rm(c.memory, seq, -1, -1)
                        c.free.append(seq)
                        c.room += reserved
                    else:
                        keep.append((row, c, seq, pos + 1, reserved, ev.token_id))
                running, logits = [], []
                for c in {id(k[1]): k[1] for k in keep}.values():  # one batch per context, in a fixed order
                    rows = [k for k in keep if k[1] is c]
                    logits += self._step(c, [(seq, pos - 1, tok, row.greedy) for row, _, seq, pos, _, tok in rows])
                    running += [(row, c, seq, pos, reserved) for row, c, seq, pos, reserved, _ in rows]
                if join is not None:
                    for prompt, p, adapter in join.more(len(running) + len(waiting)):
                        self._known([adapter])
                        waiting.append((n, self._pieces(prompt, p), p, adapter))
                        n += 1
        finally:
            for c in self._contexts.values():
                self._clear(c)


def lora_to_gguf(peft_dir: Path, out: Path, n_head: int, n_head_kv: int) -> Path:
    """A peft LoRA of a LLaMA-architecture model as a GGUF LoRA llama.cpp loads: the tensors renamed to llama.cpp's
    (``blk.N.attn_q.weight.lora_a`` ...), ``lora_alpha`` kept (llama.cpp scales by alpha / rank, as peft does), and
    the query projection's B rows permuted as llama.cpp's converter permutes the query weights (its rotary layout)."""
    import json

    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    if cfg.get("use_dora") or cfg.get("use_rslora") or cfg.get("fan_in_fan_out") or cfg.get("bias", "none") != "none":
        raise ConfigError(f"{peft_dir}: only plain LoRA converts to llama.cpp (no DoRA, rsLoRA, fan-in-fan-out, bias)")
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}  # fmt: skip
    writer = gguf.GGUFWriter(str(_partial(out)), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(cfg["lora_alpha"]))
    for key, w in sorted(load_file(str(peft_dir / "adapter_model.safetensors")).items()):
        parts = key.split(".")  # base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight
        layer, module, ab = int(parts[parts.index("layers") + 1]), parts[-3], parts[-2]
        if module not in names or ab not in ("lora_A", "lora_B"):
            raise ConfigError(f"{peft_dir}: cannot convert {key} (modules {sorted(names)} only)")
        w = w.float()
        if module in ("q_proj", "k_proj") and ab == "lora_B":
            heads = n_head if module == "q_proj" else n_head_kv
            w = w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
        writer.add_tensor(f"blk.{layer}.{names[module]}.weight.lora_{ab[-1].lower()}", w.numpy())
    return _write(writer, out)


def f16_copy(src: Path, folder: Path) -> Path:
    """``src`` with every quantized matrix dequantized to float16 (vectors in float32), its metadata as it is: written
    once into ``folder`` (``MODALINK_LLAMACPP_WEIGHTS=f16``). These are the weights the transformers engine serves as
    fp16; llama.cpp multiplies float16 with batched kernels (tinyBLAS) where its Q4_1 dot products are one row
    at a time, which pays in prefill and batched decode on some CPUs (docs/PERFORMANCE.md)."""
    import gguf

    out = folder / f"{src.stem}.f16.gguf"
    if out.is_file():
        return out
    out = _writable_folder(folder, "modalink-gguf-f16-") / out.name
    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(_partial(out)), str(reader.fields["general.architecture"].contents()))
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(field.name, field.contents())
        else:
            writer.add_key_value(field.name, field.contents(), kind)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        writer.add_tensor(t.name, data.astype(np.float32 if data.ndim == 1 else np.float16))
    return _write(writer, out)


def _writable_folder(folder: Path | None, prefix: str) -> Path:
    """``folder`` (made if need be) where it can be written, else a new temporary folder: the files derived from the
    model and adapters go to the cache, which the chart's pods mount read-only (only /tmp and two cache folders are
    writable there), so they are derived again in each such process."""
    if folder is not None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                return folder
        except OSError:
            pass
    return Path(tempfile.mkdtemp(prefix=prefix))


def _partial(out: Path) -> Path:
    """Where a GGUF file is written before it is moved to ``out`` whole (no reader ever sees half a file)."""
    return out.with_suffix(f".{os.getpid()}.tmp")


def _write(writer, out: Path) -> Path:
    """``writer``'s file, opened at ``_partial(out)``, written and moved to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _partial(out).replace(out)
    return out
