"""Encoder features computed once per manifest split and cached (fp16 safetensors), since encoders are frozen."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from modalink.data import clip_sampled_items, read_manifest
from modalink.encoders import Encoder
from modalink.encoders.video import clip_tokens
from modalink.progress import progress


def cache_path(cache_dir: Path, encoder: Encoder, manifest: Path) -> Path:
    digest = hashlib.sha256(Path(manifest).read_bytes()).hexdigest()[:16]
    name = encoder.name.replace("/", "_")
    return cache_dir / "features" / name / f"{Path(manifest).parent.name}-{Path(manifest).stem}-{digest}.safetensors"


def encode_rows(encoder: Encoder, rows: list[dict], batch_size: int = 32, desc: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    with progress(total=len(rows), desc=desc or f"{encoder.modality} features", unit="item") as bar:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            feats = encoder.encode([encoder.decode(r["path"]) for r in chunk])
            for r, f in zip(chunk, feats, strict=True):
                out[r["id"]] = f.to(torch.float16).contiguous()
            bar.update(len(chunk))
    return out


def video_from_image_features(
    items: list[torch.Tensor], frames: list[int] | None = None, k: int = 8, tokens: str = "frames"
) -> torch.Tensor:
    """A built clip's video tokens from its items' cached image features (``frames``: each item's length in frames,
    4 when not given; ``k``: frames sampled; ``tokens``: ``clip_tokens``' kind).

    Equal to ``VideoEncoder`` on the clip (its frames are the items' pixels), at a fraction of the cost.
    """
    shown = clip_sampled_items(frames or [4] * len(items), k)
    f = torch.stack([items[i].float() for i in shown])  # [T, S, d]
    return clip_tokens(f, tokens).to(torch.float16)


def load_or_compute(
    cache_dir: Path, encoder: Encoder, manifest: Path, rows: list[dict], batch_size: int = 32
) -> dict[str, torch.Tensor]:
    path = cache_path(cache_dir, encoder, manifest)
    if path.exists():
        return load_file(str(path))
    feats = encode_rows(encoder, rows, batch_size, desc=f"{Path(manifest).parent.name}/{Path(manifest).stem} features")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(feats, str(tmp), metadata={"manifest": str(manifest), "rows": json.dumps(len(rows))})
    tmp.rename(path)
    return feats


def features_for(modality: str, split: str, data_dir: Path, settings, encoder) -> list[tuple[dict, torch.Tensor]]:
    manifest = data_dir / modality / f"{split}.jsonl"
    rows = read_manifest(manifest)
    if modality == "video":  # clips of still items: pool the items' cached image features
        image_split = {"train": "train", "val": "val", "test": "test"}[split]
        img_manifest = data_dir / "image" / f"{image_split}.jsonl"
        img = load_or_compute(settings.cache_dir, encoder.image, img_manifest, read_manifest(img_manifest))
        return [(r, video_from_image_features([img[i] for i in r["items"]], r.get("frames"), settings.video_frames,
                                              encoder.tokens)) for r in rows]  # fmt: skip
    if modality == "imu":  # tiny, and the encoder itself is trained here: never cached
        feats = encode_rows(encoder, rows)
    else:
        feats = load_or_compute(settings.cache_dir, encoder, manifest, rows)
    return [(r, feats[r["id"]]) for r in rows]
