"""Readers for the data that ships in packages (no hub): Fashion-MNIST, BasicMotions IMU, Asterisk speech."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from modalink.cache import package_dir

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
ASTERISK_DIR = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
BASIC_MOTIONS_CLASSES = ("Badminton", "Running", "Standing", "Walking")


def _need(path: Path, package: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: install the Debian package {package} (make install-system)")
    return path


def fashion_mnist(split: str = "t10k") -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 28, 28] uint8 and labels [N] from the IDX files of Debian's dataset-fashion-mnist."""
    if split not in ("train", "t10k"):
        raise ValueError("split is 'train' or 't10k'")
    d = _need(FASHION_MNIST_DIR, "dataset-fashion-mnist")
    with gzip.open(d / f"{split}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(d / f"{split}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images, labels


def basic_motions(split: str = "TEST") -> tuple[np.ndarray, list[str]]:
    """BasicMotions windows [N, 6, 100] float32 and activity labels, parsed from aeon's packaged .ts file."""
    return aeon_series("BasicMotions", split)


def aeon_series(problem: str, split: str) -> tuple[np.ndarray, list[str]]:
    """Series [N, channels, length] float32 and labels of a classification problem whose .ts files ship in the aeon
    wheel (``aeon/datasets/data/<problem>/<problem>_<TRAIN|TEST>.ts``; equal lengths)."""
    path = package_dir("aeon") / "datasets" / "data" / problem / f"{problem}_{split}.ts"
    rows, labels, in_data = [], [], False
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.lower() == "@data":
            in_data = True
            continue
        if in_data:
            *dims, label = line.split(":")
            rows.append([[float(v) for v in d.split(",")] for d in dims])
            labels.append(label)
    return np.asarray(rows, dtype=np.float32), labels


def asterisk_wav(name: str) -> Path:
    """A recorded Asterisk prompt (8 kHz WAV), e.g. ``digits/7``."""
    return _need(ASTERISK_DIR / f"{name}.wav", "asterisk-core-sounds-en-wav")
