"""Sample inputs for every modality, made from packaged data (used by ``make demo`` and the tests)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from modalink.datasets import FASHION_CLASSES, asterisk_wav, basic_motions, fashion_mnist
from modalink.encoders.video import frames_to_gif
from modalink.modality import registry


def _item(images: np.ndarray, labels: np.ndarray, cls: str, nth: int = 0) -> np.ndarray:
    return images[np.flatnonzero(labels == FASHION_CLASSES.index(cls))[nth]]


def _fashion(cls: str, nth: int = 0) -> np.ndarray:
    images, labels = fashion_mnist("t10k")
    return _item(images, labels, cls, nth)


def image_sample(out: Path) -> dict:
    Image.fromarray(_fashion("Sneaker")).save(out / "sneaker.png")  # native 28x28, a held-out test image
    return {"path": str(out / "sneaker.png"), "truth": "a sneaker (Fashion-MNIST test image)"}


def audio_sample(out: Path) -> dict:
    shutil.copy(asterisk_wav("digits/7"), out / "seven.wav")
    return {"path": str(out / "seven.wav"), "truth": "a woman saying the digit seven (recorded speech)"}


def imu_sample(out: Path) -> dict:
    windows, acts = basic_motions("TEST")
    np.save(out / "walking.npy", windows[acts.index("Walking")])
    return {"path": str(out / "walking.npy"), "truth": "walking (BasicMotions test window, 6 x 100)"}


def video_sample(out: Path) -> dict:
    # A clip whose caption needs time: first a shirt, then a bag.
    frames = [_fashion("Shirt")] * 4 + [_fashion("Bag")] * 4
    (out / "shirt_then_bag.gif").write_bytes(frames_to_gif(frames))
    return {"path": str(out / "shirt_then_bag.gif"), "truth": "first a shirt, then a bag (8 frames)"}


SAMPLES = {"image": image_sample, "audio": audio_sample, "imu": imu_sample, "video": video_sample}


def write_samples(out: Path) -> dict[str, dict]:
    """Write one sample per registered modality that has one (its plugin's ``write_sample``) into ``out``; return
    {modality: {path, truth, ...}} (also samples.json)."""
    out.mkdir(parents=True, exist_ok=True)
    samples = {}
    for name, spec in registry().items():
        if spec.write_sample is not None:
            samples[name] = spec.write_sample(out)
    (out / "samples.json").write_text(json.dumps(samples, indent=2) + "\n")
    return samples
