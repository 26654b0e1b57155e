"""Bottleneck adapters (Houlsby et al. 2019) after each layer's feed-forward, with an optional router over several
of them: the Mixture-of-Modality Adaptation of LaVIN ("Cheap and Quick", Luo et al. 2023).

Each adapter is ``up(gelu(down(h)))`` added to the feed-forward's output, ``up`` initialized to zero so that training
starts from the bare LLM. With ``experts`` > 1 a linear router on the same hidden state weighs the adapters (softmax
with a temperature), per token. LaVIN routes per input, by a token saying whether an image is present; in modalink an
adapter version serves one modality, so a per-input router would always choose alike, and the router here reads the
hidden state instead (it can still tell media positions from text ones).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modalink.methods.routing import RoutedMethod, rowwise

DEFAULTS = {"dim": 16, "experts": 1, "temperature": 5.0, "scale": 1.0}


class Bottleneck(RoutedMethod):
    defaults = DEFAULTS
    method = "adapter"
    lr = 1e-3  # as Houlsby's adapters

    def __init__(self, config, settings: dict) -> None:
        super().__init__(config, settings)
        n, d, r, e = config.num_hidden_layers, config.hidden_size, int(self.settings["dim"]), int(
            self.settings["experts"])  # fmt: skip
        if r < 1 or e < 1:
            raise ValueError(f"adapter dim and experts must be >= 1, got {r} and {e}")
        self.down = nn.Parameter(torch.randn(n, e, d, r) * d**-0.5)
        self.up = nn.Parameter(torch.zeros(n, e, r, d))
        self.router_weight = nn.Parameter(torch.zeros(n, d, e)) if e > 1 else None

    def install(self, layers: nn.ModuleList) -> None:
        for i, layer in enumerate(layers):
            self._handles.append(layer.mlp.register_forward_hook(self._add(i)))

    def _add(self, i: int):
        def hook(module, args, out: torch.Tensor) -> torch.Tensor:
            rows = self.rows(out)
            if rows is None:
                return out
            h = out.float()
            inner = F.gelu(torch.einsum("bld,edr->bler", h, self.down[i].float()))
            delta = torch.einsum("bler,erd->bled", inner, self.up[i].float())
            if self.router_weight is None:
                delta = delta[:, :, 0]
            else:
                weights = torch.softmax(h @ self.router_weight[i].float() / self.settings["temperature"], -1)
                delta = (weights.unsqueeze(-1) * delta).sum(2)
            return rowwise(rows, (h + self.settings["scale"] * delta).to(out.dtype), out)

        return hook
