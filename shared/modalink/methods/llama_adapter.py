"""LLaMA-Adapter (Zhang et al. 2023): learned adaption prompts in the top ``layers`` layers, attended to through a
zero-initialized gate.

In each of those layers the queries also attend to ``tokens`` learned prompt vectors (projected by the layer's own
key and value projections, without rotary positions), in a softmax of their own, scaled by a per-head gate that
starts at zero: training starts from the bare LLM and cannot be thrown off by the random prompts. peft's
``AdaptionPromptConfig`` computes the same thing; this one routes per row, so its rows share batches with others.
"""

from __future__ import annotations

import torch
from torch import nn

from modalink.methods.routing import RoutedMethod

DEFAULTS = {"tokens": 10, "layers": 8}


class LlamaAdapter(RoutedMethod):
    defaults = DEFAULTS
    method = "llama-adapter"
    lr = 1e-2  # LLaMA-Adapter trains at 9e-3
    uses_attention = True

    def __init__(self, config, settings: dict) -> None:
        super().__init__(config, settings)
        self.top = min(int(self.settings["layers"]), config.num_hidden_layers)
        self.first = config.num_hidden_layers - self.top
        self.prompts = nn.Parameter(torch.randn(self.top, int(self.settings["tokens"]), config.hidden_size) * 0.02)
        self.gates = nn.Parameter(torch.zeros(self.top, config.num_attention_heads))

    def attend(self, module: nn.Module, query: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        i = module.layer_idx - self.first
        if i < 0:
            return None
        b, heads, q, head_dim = query.shape
        prompt = self.prompts[i].to(query.dtype)
        with self.router.route(None):  # the layer's own projections, without any adapter's (peft's LoRA: its base)
            k_proj, v_proj = (getattr(p, "base_layer", p) for p in (module.k_proj, module.v_proj))
            keys = k_proj(prompt).view(-1, module.config.num_key_value_heads, head_dim).transpose(0, 1)
            values = v_proj(prompt).view(-1, module.config.num_key_value_heads, head_dim).transpose(0, 1)
        groups = heads // keys.shape[0]
        keys, values = keys.repeat_interleave(groups, 0), values.repeat_interleave(groups, 0)  # [heads, P, hd]
        scores = torch.einsum("bhqd,hpd->bhqp", query, keys).float() * module.scaling
        out = torch.einsum("bhqp,hpd->bhqd", torch.softmax(scores, -1).to(values.dtype), values)
        out = out * self.gates[i].to(out.dtype).view(1, heads, 1, 1) * rows.view(b, 1, 1, 1).to(out.dtype)
        return out.transpose(1, 2)  # [b, q, heads, head_dim], as SDPA's output
