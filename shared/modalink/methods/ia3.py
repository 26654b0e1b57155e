"""IA3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning"):
learned vectors that rescale the keys, the values and the feed-forward's inner activations of every layer.

The fewest trained parameters of all methods (a vector per site, initialized to ones: the bare LLM); nothing is
added to the sequence, so decoding costs what the bare LLM's does plus three multiplications per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from modalink.methods.routing import RoutedMethod, rowwise


class IA3(RoutedMethod):
    defaults = {"feedforward": True}
    method = "ia3"
    lr = 3e-3  # IA3's paper trains its vectors at 3e-3

    def __init__(self, config, settings: dict) -> None:
        super().__init__(config, settings)
        n = config.num_hidden_layers
        kv = config.num_key_value_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
        self.keys = nn.Parameter(torch.ones(n, kv))
        self.values = nn.Parameter(torch.ones(n, kv))
        self.feedforward = nn.Parameter(torch.ones(n, config.intermediate_size)) if self.settings[
            "feedforward"] else None  # fmt: skip

    def install(self, layers: nn.ModuleList) -> None:
        for i, layer in enumerate(layers):
            self._handles.append(layer.self_attn.k_proj.register_forward_hook(self._scale_output(self.keys, i)))
            self._handles.append(layer.self_attn.v_proj.register_forward_hook(self._scale_output(self.values, i)))
            if self.feedforward is not None:
                self._handles.append(layer.mlp.down_proj.register_forward_pre_hook(self._scale_input(i)))

    def _scale(self, x: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        rows = self.rows(x)
        return x if rows is None else rowwise(rows, x * vector.to(x.dtype), x)

    def _scale_output(self, vectors: nn.Parameter, i: int):
        return lambda module, args, out: self._scale(out, vectors[i])

    def _scale_input(self, i: int):
        return lambda module, args: (self._scale(args[0], self.feedforward[i]), *args[1:])
