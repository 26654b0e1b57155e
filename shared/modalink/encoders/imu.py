"""IMU encoder: a small 1-D CNN over [channels, time] windows (3-axis accelerometer + gyroscope).

The weights are trained here (IMU2CLIP-style, contrastively against text embeddings) and stored as
``<adapters_dir>/encoders/imu-cnn/{model.safetensors, config.json}``; until then the encoder runs with a
fixed-seed initialization and reports ``trained = False``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from modalink.config import Settings
from modalink.encoders.base import Encoder, Raw, read_bytes
from modalink.errors import InputError

MIN_STEPS, MAX_STEPS = 16, 100_000


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


def save_imu_encoder(model: IMUCNN, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(asdict(model.cfg), indent=2) + "\n")


def _load_npy(raw: bytes) -> np.ndarray:
    """A .npy array whose header is checked against the bytes that follow it before anything is allocated
    (``np.load`` allocates the header's shape first: a 100-byte file could ask for terabytes)."""
    f = io.BytesIO(raw)
    try:  # numpy parses the header dict with tokenize and ast: errors of several types on a corrupt one
        version = np.lib.format.read_magic(f)
        fmt = np.lib.format
        shape, fortran, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(f)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"IMU .npy header is corrupt: {type(e).__name__}: {e}") from None
    if dtype.hasobject or dtype.kind not in "fiu":
        raise InputError(f"IMU .npy must hold numbers, got dtype {dtype}")
    if len(shape) != 2:
        raise InputError(f"IMU data must be 2-D [channels, time], got shape {list(shape)}")
    if math.prod(shape) * dtype.itemsize != len(raw) - f.tell():
        raise InputError(f"IMU .npy header says shape {list(shape)} of {dtype}, which does not match its "
                         f"{len(raw) - f.tell()} data bytes")  # fmt: skip
    return np.frombuffer(raw, dtype, offset=f.tell()).reshape(shape, order="F" if fortran else "C").copy()


def decode_imu(data: Raw | np.ndarray, channels: int = 6) -> torch.Tensor:
    """[channels, time] float32 from .npy bytes/path, CSV text (rows may be time steps) or an array."""
    if isinstance(data, np.ndarray):
        arr = data
    else:
        name = str(data) if isinstance(data, (str, Path)) else ""
        raw = read_bytes(data, "IMU")
        try:
            if raw[:6] == b"\x93NUMPY":
                arr = _load_npy(raw)
            elif name.endswith(".npy"):
                raise InputError("IMU .npy file is corrupt (bad header)")
            else:
                arr = np.loadtxt(io.StringIO(raw.decode("utf-8")), delimiter=",", dtype=np.float32, ndmin=2)
        except InputError:
            raise
        except (ValueError, UnicodeDecodeError, EOFError, OSError, SyntaxError) as e:
            raise InputError(f"IMU data must be .npy or numeric CSV [channels, time]: {e}") from None
    if arr.dtype.kind not in "fiu":
        raise InputError(f"IMU data must be numeric, got dtype {arr.dtype}")
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim != 2:
        raise InputError(f"IMU data must be 2-D [channels, time], got shape {list(arr.shape)}")
    if arr.shape[0] != channels and arr.shape[1] == channels:
        arr = arr.T  # [time, channels] as CSV files usually store it
    if arr.shape[0] != channels:
        raise InputError(f"IMU data must have {channels} channels, got shape {list(arr.shape)}")
    if not MIN_STEPS <= arr.shape[1] <= MAX_STEPS:
        raise InputError(f"IMU window must have {MIN_STEPS}..{MAX_STEPS} time steps, got {arr.shape[1]}")
    if not np.isfinite(arr).all():
        raise InputError("IMU data contains NaN or Inf")
    return torch.from_numpy(np.ascontiguousarray(arr))


class IMUEncoder(Encoder):
    modality = "imu"

    def __init__(self, settings: Settings):
        name = settings.imu_encoder
        self.name = name
        directory = settings.adapters_dir / "encoders" / "imu-cnn" if name == "imu-cnn" else Path(name)
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


def load_imu_encoder(settings: Settings) -> IMUEncoder:
    return IMUEncoder(settings)
