"""Prefix tuning (Li and Liang 2021): learned keys and values that every position of its prompts attends to, in
every layer, as if a prefix of ``tokens`` positions had been read first.

The prefix lives in the attention function, not in the KV cache: the cache holds the prompt's own positions only,
so a row with a prefix joins any batch, and its positions count from 0 as the bare LLM's do. The tensors are trained
directly (the MLP reparametrization of the paper helps large models converge; here it did not pay).
"""

from __future__ import annotations

import torch
from torch import nn

from modalink.methods.routing import RoutedMethod

DEFAULTS = {"tokens": 8}


class PrefixTuning(RoutedMethod):
    defaults = DEFAULTS
    method = "prefix"
    lr = 1e-2  # keys and values are large vectors
    uses_attention = True

    def __init__(self, config, settings: dict) -> None:
        super().__init__(config, settings)
        head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
        shape = (config.num_hidden_layers, config.num_key_value_heads, int(self.settings["tokens"]), head_dim)
        self.keys = nn.Parameter(torch.randn(shape) * 0.02)
        self.values = nn.Parameter(torch.randn(shape) * 0.02)

    def initialise(self, model: nn.Module, table: torch.Tensor, seed: int = 0) -> None:
        """Start from the keys and values the LLM computes for random vocabulary tokens (Li and Liang: initializing
        with real activations trains more stably than random ones)."""
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, table.shape[0], (1, self.keys.shape[2]), generator=g)
        with torch.no_grad():
            cache = model.model(input_ids=ids.to(table.device), use_cache=True).cache
            for i, layer in enumerate(cache.layers):
                self.keys[i].copy_(layer.keys[0].float())
                self.values[i].copy_(layer.values[0].float())

    def prefix_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer], self.values[layer]
