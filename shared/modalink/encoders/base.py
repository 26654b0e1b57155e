"""The one interface every frozen encoder has: raw input -> feature tensor [n, d_enc]."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch

Raw = bytes | str | Path


def read_bytes(data: Raw, what: str) -> bytes:
    """File contents from a path or the bytes themselves, with a clear error for a missing/empty file."""
    from modalink.errors import InputError

    if isinstance(data, (str, Path)):
        p = Path(data)
        if not p.is_file():
            raise InputError(f"{what} file not found: {p}")
        data = p.read_bytes()
    if not data:
        raise InputError(f"{what} is empty (0 bytes)")
    return data


class Encoder(ABC):
    """Frozen feature extractor for one modality, with its own decoding and preprocessing.

    ``decode`` turns raw input (bytes or a path) into a checked, model-ready input and raises
    ``InputError`` for anything unusable; ``encode`` runs one batched forward pass.
    """

    modality: ClassVar[str]
    name: str
    feature_dim: int
    trained: bool = True  # False for an encoder whose weights are not trained yet (IMU before training)
    # Digest of weights trained in this project (IMU): adapters record it, so one trained against other
    # encoder weights is refused instead of silently answering wrong.
    weights_id: str | None = None

    @abstractmethod
    def decode(self, data: Any) -> Any: ...

    @abstractmethod
    def encode(self, inputs: list[Any]) -> list[torch.Tensor]:
        """Features for a batch of decoded inputs, each [n_i, feature_dim] float32 on the CPU."""

    def __call__(self, data: Any) -> torch.Tensor:
        return self.encode([self.decode(data)])[0]
