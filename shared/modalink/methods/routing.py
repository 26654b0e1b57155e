"""Per-row routing of the stage-2 methods modalink implements itself: one forward may mix them.

Every method but LoRA (peft routes LoRA rows itself, ``adapter_names``) is a :class:`RoutedMethod`: a small module
that hooks into the frozen LLM once and, on every forward, acts only on the rows whose adapter is its own, as
:class:`Router` says. So requests of different methods (and of the bare LLM) share one dynamic batch and one KV
cache, as LoRA requests already did; peft's own prefix, prompt, IA3 and adaption-prompt models apply one adapter to
the whole batch and own the KV cache, which the engine's continuous batching and prefix cache need.

Methods that act inside attention (prefix tuning's extra keys and values, LLaMA-Adapter's gated adaption prompts)
do it through one attention function, ``modalink``: transformers' SDPA attention with those additions, registered
with transformers and switched on only while such an adapter is loaded.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

ATTENTION = "modalink"


class Router:
    """Which adapter each row of the forward being run uses: a name per row, or one name for every row (training)."""

    def __init__(self) -> None:
        self.rows: Sequence[str | None] | str | None = None
        self.methods: dict[str, RoutedMethod] = {}

    @contextmanager
    def route(self, rows: Sequence[str | None] | str | None) -> Iterator[None]:
        before, self.rows = self.rows, rows
        try:
            yield
        finally:
            self.rows = before

    def mask(self, name: str, n: int, device: torch.device) -> torch.Tensor | None:
        """[n] bool, the rows routed to ``name``; None when there are none (the method then costs nothing)."""
        rows = self.rows
        if rows is None:
            return None
        if isinstance(rows, str):
            return torch.ones(n, dtype=torch.bool, device=device) if rows == name else None
        if name not in rows:
            return None
        if len(rows) != n:
            raise ValueError(f"{len(rows)} routed rows for a batch of {n}")
        return torch.tensor([r == name for r in rows], dtype=torch.bool, device=device)

    def active(self) -> list[RoutedMethod]:
        """The methods some row of this forward uses."""
        rows = self.rows
        names = {rows} if isinstance(rows, str) else set(rows or ())
        return [self.methods[n] for n in names if n in self.methods]


class RoutedMethod(nn.Module):
    """One trained adapter of a method modalink implements: its tensors, and the hooks that apply them to its rows.

    A subclass sets ``method``, builds its parameters from the LLM's shape and ``settings`` in ``__init__``, and
    overrides what it changes: ``install`` (forward hooks), ``soft_prompt`` (embeddings before the prompt),
    ``prefix_kv`` and ``attend`` (inside attention)."""

    method: str = ""
    lr = 1e-3  # default peak learning rate (``--method-lr``): the scale its parameters move at differs by method
    uses_attention = False  # needs the ``modalink`` attention function

    defaults: dict = {}  # every setting the method takes, with its default (``--method-arg KEY=VALUE``)

    def __init__(self, config, settings: dict) -> None:
        super().__init__()
        if unknown := set(settings) - set(self.defaults):
            raise ValueError(f"{self.method} settings: unknown {sorted(unknown)}; known: {sorted(self.defaults)}")
        self.settings = {**self.defaults, **settings}
        self.name = ""
        self.router: Router | None = None
        self._handles: list = []

    def attach(self, model: nn.Module, router: Router, name: str) -> None:
        """Hook into ``model`` under ``name``; the module becomes a submodule of ``model`` (its parameters count as
        the model's, so training code that asks whether anything in the LLM trains sees them)."""
        self.name, self.router = name, router
        router.methods[name] = self
        model.add_module(_module_name(name), self)
        for layer in decoder_layers(model):
            layer.self_attn.modalink_router = router
        self.install(decoder_layers(model))
        if self.uses_attention:
            use_attention(model)

    def detach(self, model: nn.Module) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.router is not None:
            self.router.methods.pop(self.name, None)
        delattr(model, _module_name(self.name))

    def install(self, layers: nn.ModuleList) -> None:
        """Register forward hooks on the decoder layers (into ``self._handles``)."""

    def rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """[batch] bool of the rows of ``x`` (batch first) this adapter acts on; None: none of them."""
        return self.router.mask(self.name, x.shape[0], x.device) if self.router is not None else None

    def soft_prompt(self) -> torch.Tensor | None:
        """Embeddings [P, d] read before each of its prompts (prompt tuning)."""
        return None

    def prefix_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Extra keys and values [kv_heads, P, head_dim] its rows attend to in ``layer`` (prefix tuning)."""
        return None

    def attend(self, module: nn.Module, query: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        """An addition to the attention output [b, q, heads, head_dim] of ``module`` for ``rows`` (LLaMA-Adapter)."""
        return None

    def initialise(self, model: nn.Module, table: torch.Tensor, seed: int = 0) -> None:
        """Set a fresh adapter's starting values from the frozen LLM (``model``, its input embeddings ``table``);
        by default the values ``__init__`` chose stay (zero gates, identity vectors)."""

    def trainable(self) -> list[nn.Parameter]:
        params = list(self.parameters())
        for p in params:
            p.requires_grad_(True)
        return params


def _module_name(name: str) -> str:
    return "modalink_adapter_" + name.replace(".", "_")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The LLM's decoder layers (LLaMA architecture: ``model.model.layers``, each with ``self_attn`` and ``mlp``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not all(hasattr(x, "self_attn") and hasattr(x, "mlp") for x in layers):
        raise TypeError(f"{type(model).__name__}: modalink's stage-2 methods need a LLaMA-architecture decoder")
    return layers


def rowwise(rows: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` on ``rows``, ``old`` elsewhere (batch first)."""
    return torch.where(rows.view(-1, *([1] * (old.dim() - 1))), new, old)


def use_attention(model: nn.Module) -> None:
    """Switch ``model`` to the ``modalink`` attention function (SDPA plus the routed methods' additions)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(ATTENTION, attention)
        AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.config._attn_implementation = ATTENTION


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, **kw) -> tuple[torch.Tensor, None]:  # fmt: skip
    """SDPA attention, plus prefix keys and values for rows whose adapter has them, plus gated adapter outputs."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    router: Router | None = getattr(module, "modalink_router", None)
    active = router.active() if router is not None else []
    b, _, q, _ = query.shape
    prefixes = []
    for m in active:
        kv = m.prefix_kv(module.layer_idx)
        if kv is not None and (rows := m.rows(query)) is not None:
            prefixes.append((kv, rows))
    if prefixes:
        if attention_mask is None:  # SDPA's causal shortcut: spell the mask out (prefix columns come first)
            k = key.shape[2]
            causal = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q)
            attention_mask = causal.expand(b, 1, q, k)
        cols_k, cols_v, cols_m = [], [], []
        for (pk, pv), rows in prefixes:
            cols_k.append(pk.to(key.dtype).expand(b, -1, -1, -1))
            cols_v.append(pv.to(value.dtype).expand(b, -1, -1, -1))
            cols_m.append(rows.view(b, 1, 1, 1).expand(b, 1, q, pk.shape[1]))
        key, value = torch.cat([*cols_k, key], 2), torch.cat([*cols_v, value], 2)
        extra = torch.cat(cols_m, 3)
        if attention_mask.dtype != torch.bool:  # an additive float mask
            extra = torch.zeros_like(extra, dtype=attention_mask.dtype).masked_fill(~extra, torch.finfo(
                attention_mask.dtype).min)  # fmt: skip
        attention_mask = torch.cat([extra, attention_mask.expand(b, 1, q, -1)], 3)
        kw.pop("is_causal", None)
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kw)
    for m in active:
        if (rows := m.rows(query)) is not None and (add := m.attend(module, query, rows)) is not None:
            out = out + add.to(out.dtype)
    return out, weights
