"""modalink's ``power`` modality: which home appliance draws this electrical power signature?

A plugin like any other (``pyproject.toml`` registers ``MODALITY`` under the ``modalink.modalities`` entry points):
nothing in modalink's services, gateway, workers or chart knows it by name.

Data: ACSF1 (ACS-F1, Gisler et al. 2013), as the aeon wheel ships it: 100 training and 100 test series of 1460
samples, ten appliance classes. The .ts file labels them 0-9; the data set's description lists the classes in the
order used here (``CLASSES``). The 100 training series are split 80 train / 20 validation (two per class).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from modalink.modality import Modality

# The data set's classes in its description's order (labels 0-9), as the words an answer names them by.
CLASSES = ("phone charger", "coffee machine", "computer", "fridge", "hi-fi", "lamp", "laptop charger", "microwave",
           "printer", "television")  # fmt: skip
SYNONYMS = {
    "phone charger": ("phone charger", "mobile phone charger", "phone charging", "mobile phone"),
    "coffee machine": ("coffee machine", "coffee maker", "espresso machine"),
    "computer": ("computer", "computer station", "desktop computer", "pc"),
    "fridge": ("fridge", "freezer", "refrigerator", "fridges"),
    "hi-fi": ("hi-fi", "hifi", "hi-fi system", "cd player", "stereo"),
    "lamp": ("lamp", "cfl lamp", "light bulb", "cfl"),
    "laptop charger": ("laptop charger", "laptop", "laptop charging"),
    "microwave": ("microwave", "microwave oven", "microwaves"),
    "printer": ("printer", "printers"),
    "television": ("television", "tv", "televisions", "tv set"),
}
QUESTIONS = ("Which appliance is this?", "Which appliance draws this power?", "What device is this power signal from?",
             "Describe this power consumption signature.")  # fmt: skip
ANSWERS = ("This is a {label}.", "The power signal is from a {label}.", "A {label}.", "The appliance is a {label}.")
CHECKS = ("Is this a {x}?", "Does this power signal come from a {x}?")
VAL_PER_CLASS = 2
N_KERNELS = 1000


def series(split: str) -> tuple[np.ndarray, list[str]]:
    """ACSF1 series [N, 1, 1460] float32 and class words, ``split`` TRAIN or TEST."""
    from modalink.datasets import aeon_series

    x, labels = aeon_series("ACSF1", split)
    return x, [CLASSES[int(v)] for v in labels]


def build_data(out: Path, cfg) -> dict[str, int]:
    """``out/power/{train,val,test}.jsonl`` and a ``.npy`` per series; validation: two training series per class."""
    from modalink.data import _write_manifest, caption

    rng = random.Random(getattr(cfg, "seed", 0) + 7)
    counts = {}
    train_x, train_y = series("TRAIN")
    test_x, test_y = series("TEST")
    val_idx = {i for c in CLASSES for i in rng.sample([i for i, y in enumerate(train_y) if y == c], VAL_PER_CLASS)}
    splits = {
        "train": [(i, train_x[i], train_y[i]) for i in range(len(train_y)) if i not in val_idx],
        "val": [(i, train_x[i], train_y[i]) for i in sorted(val_idx)],
        "test": [(i, test_x[i], test_y[i]) for i in range(len(test_y))],
    }
    for split, items in splits.items():
        rows = []
        src = "test" if split == "test" else "train"
        for i, x, label in items:
            rel = f"{src}/{i:03d}.npy"
            (out / "power" / rel).parent.mkdir(parents=True, exist_ok=True)
            np.save(out / "power" / rel, x)
            rows.append({"id": f"acsf1-{src}-{i}", "modality": "power", "path": rel, "label": label,
                         "caption": caption("power", label, rng), "split": split})  # fmt: skip
        _write_manifest(out / "power" / f"{split}.jsonl", rows)
        counts[split] = len(rows)
    return counts


def write_sample(out: Path) -> dict:
    """The first series of the test split (a television): the demo asks which appliance it is."""
    x, y = series("TEST")
    np.save(out / "television.npy", x[0])
    return {"path": str(out / "television.npy"), "truth": f"a {y[0]} (ACSF1 test series 0, 1460 samples)",
            "question": QUESTIONS[0]}  # fmt: skip


def rocket_baseline(data_dir: Path, n_kernels: int = 10_000) -> tuple[str, float]:
    """ROCKET as published (10,000 kernels, ridge classifier with cross-validated regularization) trained on the
    train split, scored on the test split: the classical classifier the assistant is compared with."""
    import torch
    from sklearn.linear_model import RidgeClassifierCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from modalink_power.encoder import decode_power, rocket_features, rocket_kernels

    def xy(split: str):
        rows = [json.loads(line) for line in (Path(data_dir) / "power" / f"{split}.jsonl").read_text().splitlines()]
        x = torch.cat([decode_power(Path(data_dir) / "power" / r["path"]) for r in rows])
        return rocket_features(kernels, x).numpy(), [r["label"] for r in rows]

    kernels = rocket_kernels(n_kernels, 1460, seed=1)
    (xtr, ytr), (xte, yte) = xy("train"), xy("test")
    clf = make_pipeline(StandardScaler(), RidgeClassifierCV(alphas=np.logspace(-3, 3, 10))).fit(xtr, ytr)
    return f"ROCKET ({n_kernels:,} kernels + ridge)", float(clf.score(xte, yte))


def _load_encoder(settings):
    from modalink_power.encoder import PowerEncoder

    return PowerEncoder(N_KERNELS, cache_dir=settings.cache_dir)


MODALITY = Modality(
    name="power",
    load_encoder=_load_encoder,
    questions=QUESTIONS,
    answers=ANSWERS,
    words=CLASSES,
    synonyms=SYNONYMS,
    checks=CHECKS,
    projector={"kind": "mlp", "n_tokens": 1},
    input="tensor",
    tensor_rank=2,
    file_types=(".npy",),
    build_data=build_data,
    write_sample=write_sample,
    baseline=rocket_baseline,
)
