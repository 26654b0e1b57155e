"""The transformers runtime (default; CPU or GPU): our own batched decode loop over a Hugging Face causal LM.

The decode loop is our own, not ``generate``: it needs per-request sampling, seeds and stop sequences in one
batch, and it is the hot path a later optimization (static KV cache, compile) works on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from modalink.engine import Engine, GenerationParams, Join, TokenEvent
from modalink.engines.decoding import Row
from modalink.errors import InputError
from modalink.methods import Router, load_routed, method_of, read_config, routed_class, routed_state
from modalink.methods.lora import BASE as LORA_BASE
from modalink.prefix_cache import Layers, Piece, PrefixCache, add_text, cut, embedding_piece
from modalink.prompt import Segment, text_ids


class TransformersEngine(Engine):
    """Any causal LM from transformers (LLaMA-2-chat, SmolLM2) fed with ``inputs_embeds``."""

    joins = True  # stream(join=...): requests join a running batch between decode steps

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
        self.peft = None  # a peft.PeftModel around ``model`` once a LoRA adapter is loaded or trained
        self.adapters: set[str] = set()  # every loaded LLM adapter, of any stage-2 method
        self.router = Router()  # the other methods' adapters, and which rows of a forward use which
        self.prefix_cache = PrefixCache(0)  # off until ``load`` sizes it from the settings (MODALINK_KV_CACHE_MB)

    def load_adapter(self, name: str, path) -> None:
        """Load the LLM adapter folder ``path`` (any stage-2 method, as its ``adapter_config.json`` says)."""
        if name in self.adapters:
            return
        if method_of(read_config(path)) == "lora":
            from peft import PeftModel

            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.model, str(path), adapter_name=name, is_trainable=False)
            else:
                self.peft.load_adapter(str(path), adapter_name=name, is_trainable=False)
            self.peft.eval()  # also the base model: peft routes mixed batches only in eval mode
        else:
            module = load_routed(path, self.model.config).to(self.device)
            module.attach(self.model, self.router, name)
        self.adapters.add(name)

    def train_adapter(self, name: str, method: str = "lora", settings: dict | None = None) -> list[torch.nn.Parameter]:
        """Add a fresh adapter ``name`` of a stage-2 method; returns its trainable tensors. For direct ``self.model``
        calls (training), a LoRA is peft's active adapter and the other methods act under ``route(name)``."""
        if method == "lora":
            from modalink.methods import lora

            self.peft = lora.attach(self.peft or self.model, name, settings)
            self.peft.eval()  # also the base model: peft routes mixed batches only in eval mode
            self.adapters.add(name)
            return lora.parameters(self.peft, name)
        module = routed_class(method)(self.model.config, settings or {}).to(self.device)
        module.initialise(self.model, self.embedding.weight.detach())
        module.attach(self.model, self.router, name)
        self.adapters.add(name)
        return module.trainable()

    def adapter_state(self, name: str) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, adapter_config) of adapter ``name``, as ``methods.save`` writes them."""
        if name in self.router.methods:
            return routed_state(self.router.methods[name])
        from modalink.methods import lora

        return lora.state(self.peft, name)

    def load_adapter_state(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        if name in self.router.methods:
            self.router.methods[name].load_state_dict(tensors)
        else:
            from modalink.methods import lora

            lora.load_state(self.peft, name, tensors)

    def route(self, name: str | None):
        """Direct ``self.model`` calls under this context apply adapter ``name`` (a routed method's) to every row."""
        return self.router.route(name)

    def soft_prompt(self, name: str | None) -> torch.Tensor | None:
        """The embeddings adapter ``name`` reads before its prompts (prompt tuning), or None."""
        method = self.router.methods.get(name) if name else None
        return method.soft_prompt() if method is not None else None

    def _adapter_kw(self, adapters: Sequence[str | None] | None, n: int) -> dict:
        """Per-row routing: every row names its adapter (or none). peft routes LoRA rows (``adapter_names``, the
        others run its base); the other methods read the ``routes`` the forward is run under."""
        names = list(adapters) if adapters is not None else [None] * n
        if len(names) != n:
            raise ValueError("one adapter name (or None) per prompt")
        unknown = {a for a in names if a and a not in self.adapters}
        if unknown:
            raise InputError(f"unknown LLM adapter(s) {sorted(unknown)}; loaded: {sorted(self.adapters) or 'none'}")
        kw: dict = {"routes": names}
        if self.peft is not None:
            kw["adapter_names"] = [a if a and a not in self.router.methods else LORA_BASE for a in names]
        return kw

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
                self.check_embeddings(piece)
        if params is not None:
            self._check_budget(sum(len(p) for p in pieces), params)
        parts, ids = [], []
        for piece in pieces:
            if isinstance(piece, list):
                ids += piece
                parts.append(self.embedding(torch.tensor(piece, device=self.device)))
                if key is not None:
                    add_text(key, piece)
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
        return self.check_prompt(self._with_soft_prompt(prompt, adapter), params)

    @property
    def _runner(self):
        return self.peft if self.peft is not None else self.model

    @torch.inference_mode()
    def next_token_logits(self, prompt: list[Segment], adapter: str | None = None) -> torch.Tensor:
        """Logits [vocab] for the token after ``prompt`` (scoring, evaluation, tests)."""
        embeds, _ = self._embed_prompt(self._with_soft_prompt(prompt, adapter))
        kw = self._adapter_kw([adapter], 1)
        with self.router.route(kw.pop("routes")):
            return self._runner(inputs_embeds=embeds[None], **kw).logits[0, -1].float()

    def _with_soft_prompt(self, prompt: list[Segment], adapter: str | None) -> list[Segment]:
        soft = self.soft_prompt(adapter)
        return prompt if soft is None else [soft.detach().to(self.dtype), *prompt]

    @torch.inference_mode()
    def _forward(self, routes: Sequence[str | None] = (), **kw):
        with self.router.route(list(routes) or None):
            out = self._runner(use_cache=True, **kw)
        return out.logits[:, -1], out.cache

    def stream(
        self,
        prompts: Sequence[list[Segment]],
        params: GenerationParams | Sequence[GenerationParams],
        adapters: Sequence[str | None] | None = None,
        join: Join | None = None,
    ) -> Iterator[TokenEvent]:
        """Continuous batching with ``join``: between decode steps, requests ``join.more`` returns are prefilled and
        decode on with the running ones (event indices continue after the prompts'); finished and cancelled rows
        leave the batch. Each finished prompt's keys and values, its answer included, go to the prefix cache, so
        a chat's next turn, which repeats that answer in its history, prefills only its new text."""
        n = len(prompts)
        plist, names = self.per_prompt(prompts, params, adapters)
        rows, logits, cache, pos, mask = self._admit(list(zip(prompts, plist, names, strict=True)), 0)
        while True:
            step = []  # each row's sampled token: its input to the next forward
            for row, row_logits in zip(rows, logits, strict=True):
                ev = row.next(self.eos_ids, row_logits)
                step.append(ev.token_id)
                yield ev
            keep = [i for i, r in enumerate(rows) if not r.done and not (join and join.cancelled(r.index))]
            if self.prefix_cache:
                for i, r in enumerate(rows):
                    if r.done:  # positions held: the prompt and every answer token but the last
                        self._keep_answer(r, cache, mask, i)
            if len(keep) < len(rows):
                rows, step = [rows[i] for i in keep], [step[i] for i in keep]
                cache, mask, pos = _select(cache, mask, pos, keep, self.model.config)
            if rows:
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                ids = torch.tensor(step, device=self.device).unsqueeze(1)
                logits, cache = self._forward(input_ids=ids, attention_mask=mask, position_ids=pos,
                                              cache=cache, **self._route(rows))  # fmt: skip
                pos = pos + 1
            new = join.more(len(rows)) if join is not None else []
            if new:
                more, more_logits, more_cache, more_pos, more_mask = self._admit(new, n)
                n += len(new)
                if rows:
                    cache, mask = _concat(cache, mask, more_cache, more_mask, self.model.config)
                    rows, logits, pos = rows + more, torch.cat([logits, more_logits]), torch.cat([pos, more_pos])
                else:
                    rows, logits, cache, pos, mask = more, more_logits, more_cache, more_pos, more_mask
            if not rows:
                return

    def _admit(self, requests: list[tuple[list[Segment], GenerationParams, str | None]], first: int):
        """Prefill new requests: (their rows, numbered from ``first``, and ``_prefill``'s logits, cache, next
        positions and mask). Each prompt's tokens are checked against the context before it is embedded."""
        names = [a for _, _, a in requests]
        route = self._adapter_kw(names, len(names))  # unknown adapters: refused before any work
        keys: list[list[Piece] | None] = [[] if self.prefix_cache else None for _ in requests]
        with torch.inference_mode():
            embedded = [self._embed_prompt(self._with_soft_prompt(pr, a), p, k)
                        for (pr, p, a), k in zip(requests, keys, strict=True)]  # fmt: skip
        logits, cache, pos, mask = self._prefill([e for e, _ in embedded], keys, names, route)
        rows = [Row(first + i, p, a, tuple(k) if k is not None else (), e.shape[0], ids, self.tokenizer)
                for i, ((_, p, a), k, (e, ids)) in enumerate(zip(requests, keys, embedded, strict=True))]  # fmt: skip
        return rows, logits, cache, pos, mask

    def _route(self, rows: list[Row]) -> dict:
        return self._adapter_kw([r.adapter for r in rows], len(rows))

    def _keep_answer(self, row: Row, cache, mask: torch.Tensor, i: int) -> None:
        """Store a finished row's prompt and answer (all but the last token, whose keys were never computed)."""
        answer = row.tokens[:-1]
        if not answer:
            return
        key = list(row.key)
        add_text(key, answer)
        held = mask[i].bool()

        @torch.inference_mode()
        def layers() -> Layers:
            return [(k[i][:, held].clone(), v[i][:, held].clone()) for k, v in _layers(cache)]

        self.prefix_cache.store(row.adapter, tuple(key), row.length + len(answer), layers)

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
        reused = [(r, cut(layers, r) if layers is not None else None) for r, layers in reused]
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
                                      cache=past, logits_to_keep=1, **route)  # fmt: skip
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


@torch.inference_mode()
def _select(cache, mask: torch.Tensor, pos: torch.Tensor, keep: list[int], config):
    """The batch's rows ``keep`` only, without the leading columns none of them uses any more."""
    from transformers import DynamicCache

    idx = torch.tensor(keep, dtype=torch.long, device=mask.device)
    mask = mask.index_select(0, idx)
    used = mask.any(0).nonzero()
    start = int(used[0]) if used.numel() else mask.shape[1]
    data = [(k.index_select(0, idx)[:, :, start:], v.index_select(0, idx)[:, :, start:]) for k, v in _layers(cache)]
    return DynamicCache(ddp_cache_data=data, config=config), mask[:, start:], pos.index_select(0, idx)


@torch.inference_mode()
def _concat(a, mask_a: torch.Tensor, b, mask_b: torch.Tensor, config):
    """Two batches' caches and masks as one: both right-aligned to the wider one (left columns masked out)."""
    from transformers import DynamicCache

    w = max(mask_a.shape[1], mask_b.shape[1])
    mask = torch.cat([F.pad(mask_a, (w - mask_a.shape[1], 0)), F.pad(mask_b, (w - mask_b.shape[1], 0))])

    def cat(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.pad(x, (0, 0, w - x.shape[2], 0)), F.pad(y, (0, 0, w - y.shape[2], 0))])

    data = [(cat(ka, kb), cat(va, vb)) for (ka, va), (kb, vb) in zip(_layers(a), _layers(b), strict=True)]
    return DynamicCache(ddp_cache_data=data, config=config), mask


def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) [batch, kv_heads, positions, head_dim] per layer of a transformers DynamicCache."""
    return [(layer.keys, layer.values) for layer in cache.layers]
