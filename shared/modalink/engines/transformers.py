"""The transformers runtime (default; CPU or GPU): our own batched decode loop over a Hugging Face causal LM.

The decode loop is our own, not ``generate``: it needs per-request sampling, seeds and stop sequences in one
batch, and it is the hot path a later optimization (static KV cache, compile) works on.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from modalink.engine import FINISH_LENGTH, FINISH_STOP, Engine, GenerationParams, TokenEvent
from modalink.errors import InputError
from modalink.lora import BASE as LORA_BASE
from modalink.prefix_cache import Layers, Piece, PrefixCache, embedding_piece
from modalink.prompt import Segment, text_ids


class _TextStream:
    """Incremental detokenization with stop sequences: emits only text that can no longer change."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; returns (newly visible text, whether a stop sequence was hit)."""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            hits = [i for s in self.stop if (i := self.text.find(s)) >= 0]
            if hits:
                end = min(hits)
                delta = self.text[self.emitted : end]
                self.emitted = max(self.emitted, end)
                return delta, True
        safe = len(self.text)
        if self.text.endswith("\ufffd"):  # an incomplete UTF-8 character
            safe -= 1
        for s in self.stop:  # hold back a tail that may grow into a stop sequence
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    safe = min(safe, len(self.text) - k)
                    break
        delta = self.text[self.emitted : safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return delta, False

    def flush(self) -> str:
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta


def _sample(logits: torch.Tensor, p: GenerationParams, seen: torch.Tensor, gen: torch.Generator | None) -> int:
    """Next token for one row: repetition penalty, then greedy or temperature / top-k / top-p sampling."""
    logits = logits.to(torch.float32, copy=True)  # a normal tensor we may edit (the model's is an inference tensor)
    if p.repetition_penalty != 1.0 and seen.numel():
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if p.temperature == 0.0:
        return int(logits.argmax())
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


class TransformersEngine(Engine):
    """Any causal LM from transformers (LLaMA-2-chat, SmolLM2) fed with ``inputs_embeds``."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        self.model, self.tokenizer = model, tokenizer
        self.embedding = model.get_input_embeddings()
        self.hidden_size = model.config.hidden_size
        self.max_context = getattr(model.config, "max_position_embeddings", 4096)
        self.device = self.embedding.weight.device
        self.dtype = self.embedding.weight.dtype
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {i for i in [*eos, tokenizer.eos_token_id] if i is not None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids))
        self.peft = None  # a peft.PeftModel around ``model`` once a LoRA adapter is loaded or trained
        self.adapters: set[str] = set()
        self.prefix_cache = PrefixCache(0)  # off until ``load`` sizes it from the settings (MODALINK_KV_CACHE_MB)

    def load_adapter(self, name: str, path) -> None:
        from peft import PeftModel

        if name in self.adapters:
            return
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.model, str(path), adapter_name=name, is_trainable=False)
        else:
            self.peft.load_adapter(str(path), adapter_name=name, is_trainable=False)
        self.peft.eval()  # also the base model: peft routes mixed batches only in eval mode
        self.adapters.add(name)

    def train_adapter(self, name: str, settings=None) -> list[torch.nn.Parameter]:
        """Add a fresh LoRA adapter ``name`` and make it active for direct ``self.model`` calls (training)."""
        from modalink import lora

        self.peft = lora.attach(self.peft or self.model, name, settings)
        self.peft.eval()  # also the base model: peft routes mixed batches only in eval mode
        self.adapters.add(name)
        return lora.parameters(self.peft, name)

    def _adapter_kw(self, adapters: Sequence[str | None] | None, n: int) -> dict:
        """peft mixed-batch routing: every row names its adapter (or none); without LoRA, nothing to route."""
        if self.peft is None:
            if adapters and any(adapters):
                raise InputError(f"unknown LoRA adapter(s) {sorted({a for a in adapters if a})}: none loaded")
            return {}
        names = list(adapters) if adapters is not None else [None] * n
        if len(names) != n:
            raise ValueError("one adapter name (or None) per prompt")
        unknown = {a for a in names if a and a not in self.adapters}
        if unknown:
            raise InputError(f"unknown LoRA adapter(s) {sorted(unknown)}; loaded: {sorted(self.adapters)}")
        return {"adapter_names": [a or LORA_BASE for a in names]}

    @classmethod
    def from_settings(cls, settings) -> TransformersEngine:
        return cls.load(settings=settings)

    @classmethod
    def load(cls, name: str | None = None, settings=None) -> TransformersEngine:
        from modalink.config import get_settings
        from modalink.llm import load_llm

        settings = settings or get_settings()
        engine = cls(*load_llm(name, settings))
        engine.prefix_cache = PrefixCache(settings.kv_cache_mb * 2**20)
        return engine

    def _embed_prompt(
        self, prompt: list[Segment], params: GenerationParams | None = None, key: list[Piece] | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """(prompt embeddings, its text's token ids). Text is bounded before it is tokenized, once; with
        ``params``, the token count is checked against the context before anything is embedded. ``key`` gets the
        prompt's prefix-cache pieces (runs of text as one piece of token ids, each embedding by its hash)."""
        self.check_text_size(prompt)
        pieces = [text_ids(self.tokenizer, s) if isinstance(s, str) else s for s in prompt]  # client text: plain
        for piece in pieces:
            if not isinstance(piece, list):
                self._check_embeddings(piece)
        if params is not None:
            self._check_budget(sum(len(p) for p in pieces), params)
        parts, ids = [], []
        for piece in pieces:
            if isinstance(piece, list):
                ids += piece
                parts.append(self.embedding(torch.tensor(piece, device=self.device)))
                if key is not None and key and key[-1][0] == "t":
                    key[-1] = (*key[-1], *piece)  # a run of text is one sequence of ids, however it was split
                elif key is not None:
                    key.append(("t", *piece))
            else:
                parts.append(piece.to(self.device, self.dtype))
                if key is not None:
                    key.append(embedding_piece(parts[-1]))  # as the model reads it (its dtype)
        if not parts:
            raise InputError("empty prompt")
        return torch.cat(parts), ids

    def check(self, prompt: list[Segment], params: GenerationParams, adapter: str | None = None) -> int:
        """Bounded before the expensive steps: text by size before it is tokenized, tokens against the context
        before anything is embedded."""
        self._adapter_kw([adapter], 1)
        for seg in prompt:
            if not isinstance(seg, str):
                self._check_embeddings(seg)
        length = self.prompt_length(prompt)
        if not length:
            raise InputError("empty prompt")
        self._check_budget(length, params)
        return length

    def _check_embeddings(self, seg: torch.Tensor) -> None:
        if seg.ndim != 2 or seg.shape[1] != self.hidden_size:
            raise InputError(f"prefix embeddings must be [n, {self.hidden_size}] for this LLM, got {list(seg.shape)}")
        if not torch.isfinite(seg).all():
            raise InputError("prefix embeddings contain NaN or Inf")

    @property
    def _runner(self):
        return self.peft if self.peft is not None else self.model

    @torch.inference_mode()
    def next_token_logits(self, prompt: list[Segment], adapter: str | None = None) -> torch.Tensor:
        """Logits [vocab] for the token after ``prompt`` (scoring, evaluation, tests)."""
        embeds, _ = self._embed_prompt(prompt)
        return self._runner(inputs_embeds=embeds[None], **self._adapter_kw([adapter], 1)).logits[0, -1].float()

    @torch.inference_mode()
    def _forward(self, **kw):
        out = self._runner(use_cache=True, **kw)
        return out.logits[:, -1], out.past_key_values

    def stream(
        self,
        prompts: Sequence[list[Segment]],
        params: GenerationParams | Sequence[GenerationParams],
        adapters: Sequence[str | None] | None = None,
    ) -> Iterator[TokenEvent]:
        n = len(prompts)
        route = self._adapter_kw(adapters, n)
        plist = [params] * n if isinstance(params, GenerationParams) else list(params)
        if len(plist) != n:
            raise ValueError("one GenerationParams per prompt")
        keys: list[list[Piece] | None] = [[] if self.prefix_cache else None for _ in range(n)]
        with torch.inference_mode():  # each prompt's tokens are checked against the context before it is embedded
            embedded = [self._embed_prompt(prompt, p, k) for prompt, p, k in zip(prompts, plist, keys, strict=True)]
        logits, cache, next_pos, mask = self._prefill([e for e, _ in embedded], keys, adapters, route)

        gens = [torch.Generator().manual_seed(p.seed if p.seed is not None else random.getrandbits(63)) for p in plist]
        seen = [torch.tensor(ids, dtype=torch.long) for _, ids in embedded]
        streams = [_TextStream(self.tokenizer, p.stop) for p in plist]
        done = [False] * n
        counts = [0] * n
        while True:
            step = []
            for i in range(n):
                if done[i]:
                    step.append(self.pad_id)
                    continue
                p = plist[i]
                tok = _sample(logits[i].cpu(), p, seen[i], gens[i])
                counts[i] += 1
                step.append(tok)
                if tok in self.eos_ids:
                    done[i] = True
                    yield TokenEvent(i, tok, streams[i].flush(), FINISH_STOP)
                    continue
                if p.repetition_penalty != 1.0:
                    seen[i] = torch.cat([seen[i], torch.tensor([tok])])
                delta, hit_stop = streams[i].push(tok)
                if hit_stop or counts[i] >= p.max_new_tokens:
                    done[i] = True
                    tail = "" if hit_stop else streams[i].flush()
                    yield TokenEvent(i, tok, delta + tail, FINISH_STOP if hit_stop else FINISH_LENGTH)
                else:
                    yield TokenEvent(i, tok, delta)
            if all(done):
                return
            mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
            ids = torch.tensor(step, device=self.device).unsqueeze(1)
            logits, cache = self._forward(
                input_ids=ids, attention_mask=mask, position_ids=next_pos, past_key_values=cache, **route
            )
            next_pos = next_pos + 1

    @torch.inference_mode()
    def _prefill(self, embedded: list[torch.Tensor], keys: list[list[Piece] | None],
                 adapters: Sequence[str | None] | None, route: dict):  # fmt: skip
        """One forward over the prompts' positions the prefix cache does not hold: (last logits, the batch's KV
        cache, each row's next position [n, 1], the attention mask).

        Layout: the reused keys and values right-aligned in the first ``C`` columns, then each row's new
        positions right-aligned in the next ``N``; the mask hides the gaps and position ids continue each row
        from its reused length, so every row's last position lines up and one step decodes all rows."""
        n, pc = len(embedded), self.prefix_cache
        names = list(adapters) if adapters is not None else [None] * n
        lengths = [e.shape[0] for e in embedded]
        keys_t = [tuple(k) if k is not None else () for k in keys]
        reused = [pc.lookup(names[i], keys_t[i], lengths[i]) if pc else (0, None) for i in range(n)]
        c = max(r for r, _ in reused)
        fresh = [length - r for length, (r, _) in zip(lengths, reused, strict=True)]
        w = max(fresh)
        embeds = torch.zeros(n, w, self.hidden_size, device=self.device, dtype=self.dtype)
        mask = torch.zeros(n, c + w, dtype=torch.long, device=self.device)
        positions = torch.zeros(n, w, dtype=torch.long, device=self.device)
        for i, (e, (r, _)) in enumerate(zip(embedded, reused, strict=True)):
            embeds[i, w - fresh[i] :] = e[r:]
            mask[i, c - r : c] = 1
            mask[i, c + w - fresh[i] :] = 1
            positions[i, w - fresh[i] :] = torch.arange(r, lengths[i], device=self.device)
        past = self._assemble(reused, c) if c else None
        # logits of the last position only: the prompt's others would cost a [n * width, vocab] matmul
        logits, cache = self._forward(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                      past_key_values=past, logits_to_keep=1, **route)  # fmt: skip
        if pc:
            for i in range(n):

                def row(i: int = i, r: int = reused[i][0]) -> Layers:  # its reused columns, then its new ones
                    return [(torch.cat([k[i, :, c - r : c], k[i, :, c + w - fresh[i] :]], dim=1),
                             torch.cat([v[i, :, c - r : c], v[i, :, c + w - fresh[i] :]], dim=1))
                            for k, v in _layers(cache)]  # fmt: skip

                pc.store(names[i], keys_t[i], lengths[i], row)
        next_pos = torch.tensor(lengths, device=self.device).unsqueeze(1)
        return logits, cache, next_pos, mask

    def _assemble(self, reused: list[tuple[int, Layers | None]], c: int):
        """The batch's past keys and values from each row's reused ones, right-aligned in ``c`` columns."""
        from transformers import DynamicCache

        some = next(layers for _, layers in reused if layers is not None)
        data = []
        for li, (k0, v0) in enumerate(some):
            k = k0.new_zeros(len(reused), k0.shape[0], c, k0.shape[2])
            v = v0.new_zeros(len(reused), v0.shape[0], c, v0.shape[2])
            for i, (r, layers) in enumerate(reused):
                if layers is not None:
                    k[i, :, c - r :], v[i, :, c - r :] = layers[li]
            data.append((k, v))
        return DynamicCache(ddp_cache_data=data, config=self.model.config)


def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) [batch, kv_heads, positions, head_dim] per layer of a transformers DynamicCache."""
    return [(layer.keys, layer.values) for layer in cache.layers]
