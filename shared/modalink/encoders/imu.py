"""IMU encoder: a small 1-D CNN over [channels, time] windows (3-axis accelerometer + gyroscope).

The weights are trained here (IMU2CLIP-style, contrastively against text embeddings) and stored as
``<adapters_dir>/encoders/imu-cnn/{model.safetensors, config.json}``; until then the encoder runs with a
fixed-seed initialization and reports ``trained = False``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from modalink_client.imu_data import imu_array
from safetensors.torch import load_file, save_file
from torch import nn

from modalink.config import Settings
from modalink.encoders.base import Encoder, Raw, read_bytes
from modalink.errors import InputError


@dataclass
class IMUConfig:
    channels: int = 6
    width: int = 128
    d_out: int = 256
    n_blocks: int = 3  # each halves the time axis


class IMUCNN(nn.Module):
    """Conv stem + strided residual blocks; output tokens [B, T / 2**n_blocks, d_out]."""

    def __init__(self, cfg: IMUConfig):
        super().__init__()
        self.cfg = cfg
        self.norm_in = nn.BatchNorm1d(cfg.channels, affine=False)  # learns the sensors' scale in training
        self.stem = nn.Sequential(nn.Conv1d(cfg.channels, cfg.width, 5, padding=2), nn.GELU())
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv1d(cfg.width, cfg.width, 5, stride=2, padding=2),
                nn.GroupNorm(8, cfg.width),
                nn.GELU(),
                nn.Conv1d(cfg.width, cfg.width, 3, padding=1),
                nn.GELU(),
            )
            for _ in range(cfg.n_blocks)
        )
        self.out = nn.Linear(cfg.width, cfg.d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(self.norm_in(x))
        for block in self.blocks:
            h = nn.functional.avg_pool1d(h, 2, ceil_mode=True) + block(h)
        return self.out(h.transpose(1, 2))


TEXT_HEAD = "text_head.safetensors"  # the linear map from the CNN's pooled features into MiniLM's space


def load_text_head(encoder_dir: Path, d_in: int, d_out: int = 384) -> nn.Linear:
    head = nn.Linear(d_in, d_out)
    head.load_state_dict(load_file(str(encoder_dir / TEXT_HEAD)))
    return head.eval().requires_grad_(False)


def save_imu_encoder(model: IMUCNN, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(asdict(model.cfg), indent=2) + "\n")


def decode_imu(data: Raw | np.ndarray, channels: int = 6) -> torch.Tensor:
    """[channels, time] float32 from .npy bytes/path, CSV text (rows may be time steps) or an array: the client's
    reader (``modalink_client.imu_data``, so a client checks a window as the encoder will), with InputError."""
    name = str(data) if isinstance(data, (str, Path)) else ""
    try:
        arr = imu_array(data if isinstance(data, np.ndarray) else read_bytes(data, "IMU"), channels, name)
    except InputError:
        raise
    except ValueError as e:
        raise InputError(str(e)) from None
    return torch.from_numpy(arr)


class IMUEncoder(Encoder):
    modality = "imu"

    def __init__(self, settings: Settings):
        name = settings.imu_encoder
        self.name = name
        directory = settings.adapters_dir / "encoders" / "imu-cnn" if name == "imu-cnn" else Path(name)
        self.directory = directory
        self._text_head: nn.Module | None = None
        if (directory / "model.safetensors").exists():
            cfg = IMUConfig(**json.loads((directory / "config.json").read_text()))
            self.model = IMUCNN(cfg)
            self.model.load_state_dict(load_file(str(directory / "model.safetensors")))
            self.trained = True
            self.weights_id = hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()[:16]
        else:
            with torch.random.fork_rng():  # fixed init without touching the caller's RNG
                torch.manual_seed(0)
                self.model = IMUCNN(IMUConfig(channels=settings.imu_channels))
            self.trained = False
        self.channels = self.model.cfg.channels
        self.feature_dim = self.model.cfg.d_out
        self.model.eval().requires_grad_(False)

    def decode(self, data: Raw | np.ndarray) -> torch.Tensor:
        return decode_imu(data, self.channels)

    def encode(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.inference_mode():
            if len({x.shape[1] for x in inputs}) == 1:
                return list(self.model(torch.stack(inputs)))
            return [self.model(x[None])[0] for x in inputs]

    def text_embedding(self, features: torch.Tensor) -> torch.Tensor:
        """A window's encoded features [tokens, d_out] -> its unit vector in all-MiniLM-L6-v2's sentence space (the
        space the CNN was trained against; ``modalink.magic`` compares it with sentences there)."""
        from modalink.errors import ConfigError

        if self._text_head is None:
            if not (self.directory / TEXT_HEAD).exists():
                raise ConfigError(f"no {TEXT_HEAD} beside the IMU encoder in {self.directory}: `modalink train -m imu`"
                                  " fits it (the CNN stays as it is)")  # fmt: skip
            self._text_head = load_text_head(self.directory, self.feature_dim)
        with torch.inference_mode():
            return nn.functional.normalize(self._text_head(features.float().mean(0)), dim=-1)


def load_imu_encoder(settings: Settings) -> IMUEncoder:
    return IMUEncoder(settings)
