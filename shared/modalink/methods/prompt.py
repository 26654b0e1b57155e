"""Prompt tuning (Lester et al. 2021): learned embeddings (virtual tokens) read before the prompt.

Nothing in the LLM changes: the engine puts the soft prompt in front of each of its prompts as one more embedding
segment, so it is served by any engine that takes prefix embeddings, shares batches with everything, and the KV
prefix cache keys it like any media embedding. It costs ``tokens`` more positions per prompt.
"""

from __future__ import annotations

import torch
from torch import nn

from modalink.methods.routing import RoutedMethod

DEFAULTS = {"tokens": 16}


class PromptTuning(RoutedMethod):
    defaults = DEFAULTS
    method = "prompt"
    lr = 1e-2  # soft prompts need large steps (Lester et al. use 0.3 with Adafactor)

    def __init__(self, config, settings: dict) -> None:
        super().__init__(config, settings)
        # small random vectors, near the embeddings' scale (set from the vocabulary in ``initialise``)
        self.embeddings = nn.Parameter(torch.randn(int(self.settings["tokens"]), config.hidden_size) * 0.02)

    def initialise(self, model: nn.Module, table: torch.Tensor, seed: int = 0) -> None:
        """Start from the embeddings of random vocabulary tokens (Lester et al.: better than random vectors)."""
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, table.shape[0], (self.embeddings.shape[0],), generator=g)
        with torch.no_grad():
            self.embeddings.copy_(table[ids].float())

    def soft_prompt(self) -> torch.Tensor:
        return self.embeddings
