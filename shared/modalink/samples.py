"""Sample inputs for every modality, made from packaged data (used by ``make demo`` and the tests)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from modalink.datasets import FASHION_CLASSES, asterisk_wav, basic_motions, fashion_mnist
from modalink.encoders.video import frames_to_gif


def _item(images: np.ndarray, labels: np.ndarray, cls: str, nth: int = 0) -> np.ndarray:
    return images[np.flatnonzero(labels == FASHION_CLASSES.index(cls))[nth]]


def write_samples(out: Path) -> dict[str, dict]:
    """Write one sample per modality into ``out`` and return {modality: {path, truth}} (also samples.json)."""
    out.mkdir(parents=True, exist_ok=True)
    images, labels = fashion_mnist("t10k")
    sneaker = _item(images, labels, "Sneaker")
    Image.fromarray(sneaker).save(out / "sneaker.png")  # native 28x28, a held-out test image

    shutil.copy(asterisk_wav("digits/7"), out / "seven.wav")

    windows, acts = basic_motions("TEST")
    np.save(out / "walking.npy", windows[acts.index("Walking")])

    # A clip whose caption needs time: first a shirt, then a bag.
    frames = [_item(images, labels, "Shirt")] * 4 + [_item(images, labels, "Bag")] * 4
    (out / "shirt_then_bag.gif").write_bytes(frames_to_gif(frames))

    samples = {
        "image": {"path": str(out / "sneaker.png"), "truth": "a sneaker (Fashion-MNIST test image)"},
        "audio": {"path": str(out / "seven.wav"), "truth": "a woman saying the digit seven (recorded speech)"},
        "imu": {"path": str(out / "walking.npy"), "truth": "walking (BasicMotions test window, 6 x 100)"},
        "video": {"path": str(out / "shirt_then_bag.gif"), "truth": "first a shirt, then a bag (8 frames)"},
    }
    (out / "samples.json").write_text(json.dumps(samples, indent=2) + "\n")
    return samples
