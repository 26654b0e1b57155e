"""The frozen power encoder: ROCKET (Dempster, Petitjean & Webb, 2020), random convolution kernels.

Why ROCKET and not a small CNN trained contrastively (as IMU's): ACS-F1 has 100 training series, ten per class;
ROCKET needs no training at all (its kernels are random, fixed by a seed, so every process builds the same
encoder and there are no weights to ship), and with a linear read-out it is one of the strongest classifiers
on the UCR archive. Each kernel has a random length (7, 9 or 11), weights (normal, centred), bias (uniform in
[-1, 1]), dilation (exponential up to the series length) and padding (half of the kernels), and gives two
features over the series: the proportion of positive values (PPV) and the maximum. Kernels of one shape run
as one grouped ``conv1d``.

Every feature is then standardized by its mean and standard deviation over the 100 ACS-F1 training series
(no labels, no test series), as ROCKET's own pipeline does before its linear classifier. The projector reads
the features through a per-item LayerNorm, which cannot do this: PPVs (in [0, 1]) and maxima (unbounded) on
one scale let a few large maxima drown the rest. Measured by 5-fold cross-validation on the training series
(an MLP shaped like the projector, three fold seeds): 59% raw, 66% with a fixed map (PPV centred, arcsinh of
the maxima), 70% standardized, where a logistic probe gets 70%. The scale is computed once, in seconds, and
kept in the cache directory; it is not hashed into ``weights_id`` (floating point differs in the last bits
between CPUs) but named in the encoder's ``name``, which adapters record.

Input: one power series, float32 ``[1, time]`` (watts as the data set has them: z-normalized per series
here, so the kernels' biases are on the scale ROCKET chose them for), from an array, a ``.npy`` file or its
bytes; checked before any convolution (one channel, 64 to ``MAX_STEPS`` samples, finite).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from modalink_client import load_npy

from modalink.encoders.base import Encoder, read_bytes
from modalink.errors import InputError

log = logging.getLogger(__name__)
MAX_STEPS = 20_000  # ACS-F1 series have 1460 samples; longer recordings fit, and the convolutions stay bounded
MIN_STEPS = 64
LENGTHS = (7, 9, 11)


def rocket_kernels(n: int, series_length: int, seed: int = 0) -> list[tuple[int, int, int, torch.Tensor, torch.Tensor]]:
    """``n`` ROCKET kernels grouped by shape: [(length, dilation, padding, weights [k, length], biases [k])]."""
    g = torch.Generator().manual_seed(seed)
    groups: dict[tuple[int, int, int], list[tuple[torch.Tensor, float]]] = {}
    for _ in range(n):
        length = LENGTHS[int(torch.randint(0, 3, (1,), generator=g))]
        w = torch.randn(length, generator=g)
        bias = float(torch.rand(1, generator=g)) * 2 - 1
        dilation = int(2 ** (float(torch.rand(1, generator=g)) * math.log2((series_length - 1) / (length - 1))))
        padding = ((length - 1) * dilation) // 2 if float(torch.rand(1, generator=g)) < 0.5 else 0
        groups.setdefault((length, dilation, padding), []).append((w - w.mean(), bias))
    return [(ln, d, p, torch.stack([w for w, _ in ks]), torch.tensor([b for _, b in ks]))
            for (ln, d, p), ks in sorted(groups.items())]  # fmt: skip


def rocket_features(kernels, x: torch.Tensor) -> torch.Tensor:
    """[B, 2 n] PPV and max of every kernel over z-normalized series ``x`` [B, time]."""
    x = ((x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-8))[:, None]
    ppv, mx = [], []
    for length, dilation, padding, w, b in kernels:
        if (length - 1) * dilation + 1 > x.shape[-1] + 2 * padding:  # a kernel wider than a short series
            dilation = max(1, (x.shape[-1] + 2 * padding - 1) // (length - 1))
        out = F.conv1d(x, w[:, None], b, dilation=dilation, padding=padding)
        ppv.append((out > 0).float().mean(-1))
        mx.append(out.amax(-1))
    return torch.cat([torch.cat(ppv, 1), torch.cat(mx, 1)], 1)


def decode_power(data: Any) -> torch.Tensor:
    """A checked ``[1, time]`` float32 series from an array, a ``.npy`` path or its bytes (never unpickled)."""
    if isinstance(data, torch.Tensor):
        data = data.numpy()
    if not isinstance(data, np.ndarray):
        raw = read_bytes(data, "power series") if isinstance(data, (bytes, str, Path)) else None
        if raw is None:
            raise InputError(f"power input must be an array or a .npy file, got {type(data).__name__}")
        try:  # its header checked against its bytes before anything is allocated, never unpickled
            data = load_npy(raw, "power series", None)  # [time] or [1, time]: checked below
        except ValueError as e:
            raise InputError(f"power series is not a .npy array: {e}") from None
    if data.ndim == 1:
        data = data[None]
    if data.ndim != 2 or data.shape[0] != 1:
        raise InputError(f"power series must be [1, time] (one channel), got shape {list(data.shape)}")
    if data.dtype.kind not in "fiu":
        raise InputError(f"power series must be numbers, got dtype {data.dtype}")
    if not MIN_STEPS <= data.shape[1] <= MAX_STEPS:
        raise InputError(f"power series has {data.shape[1]} samples; {MIN_STEPS} to {MAX_STEPS} are accepted")
    arr = np.asarray(data, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise InputError("power series has NaN or infinite values")
    return torch.from_numpy(arr.copy())


def feature_scale(kernels, cache: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation [2 n] of every feature over the ACS-F1 training series (1 for a constant one),
    read from ``cache`` (a .safetensors file) when it is there, else computed and written there."""
    from safetensors.torch import load_file, save_file

    if cache is not None and cache.is_file():
        saved = load_file(str(cache))
        if saved["mean"].shape[0] == sum(2 * len(b) for *_, b in kernels):
            return saved["mean"], saved["std"]
    from modalink_power import series

    x, _ = series("TRAIN")
    f = rocket_features(kernels, torch.from_numpy(x[:, 0]))
    mean, std = f.mean(0), f.std(0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            save_file({"mean": mean.contiguous(), "std": std.contiguous()}, str(tmp))
            tmp.replace(cache)  # atomic: encoder processes starting together never read half a file
        except OSError as e:  # a read-only cache: computed again at the next start, nothing else changes
            log.warning("power encoder: could not keep its feature scale in %s (%s)", cache, e)
    return mean, std


class PowerEncoder(Encoder):
    """Standardized ROCKET features of a power series as one token ``[1, 2 n_kernels]``."""

    modality = "power"

    def __init__(self, n_kernels: int = 1000, seed: int = 0, series_length: int = 1460, cache_dir: Path | None = None):
        self.name = f"rocket-{n_kernels}-s{seed}-std"
        self.feature_dim = 2 * n_kernels
        self.kernels = rocket_kernels(n_kernels, series_length, seed)
        cache = Path(cache_dir) / "encoders" / "power" / f"{self.name}-scale.safetensors" if cache_dir else None
        self.mean, self.std = feature_scale(self.kernels, cache)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return (rocket_features(self.kernels, x) - self.mean) / self.std

    def decode(self, data: Any) -> torch.Tensor:
        return decode_power(data)

    def encode(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.inference_mode():
            if len({x.shape[1] for x in inputs}) == 1:
                return [f[None] for f in self.features(torch.cat(inputs))]
            return [self.features(x) for x in inputs]
