"""``modalink train``: one modality's stage 1 (alignment) or stage 2 (LoRA instruction tuning), end to end,
published to the adapter registry."""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from modalink.config import Settings
from modalink.data import read_manifest
from modalink.embedder import check_video_tokens
from modalink.encoders import load_encoder
from modalink.engines.transformers import TransformersEngine
from modalink.evaluate import default_question, is_correct
from modalink.registry import AdapterRegistry
from modalink.train.align import AlignConfig, AlignTrainer
from modalink.train.features import features_for

log = logging.getLogger(__name__)


def ensure_imu_encoder(data_dir: Path, settings: Settings, retrain: bool = False) -> dict | None:
    """Train the IMU CNN (once) into ``<adapters>/encoders/imu-cnn`` unless it is there already; an encoder trained
    before its text head was kept gets the head fitted, the CNN frozen."""
    import numpy as np

    from modalink.encoders.imu import TEXT_HEAD
    from modalink.train.imu_encoder import train_imu_encoder

    out = settings.adapters_dir / "encoders" / "imu-cnn"
    cnn = None
    if (out / "model.safetensors").exists() and not retrain:
        if (out / TEXT_HEAD).exists():
            return None
        cnn = load_encoder("imu", settings).model
    load = lambda split: read_manifest(data_dir / "imu" / f"{split}.jsonl")  # noqa: E731
    train, val = load("train"), load("val")
    windows = lambda rows: np.stack([np.load(r["path"]) for r in rows])  # noqa: E731
    return train_imu_encoder(windows(train), [r["label"] for r in train], out,
                             val=(windows(val), [r["label"] for r in val]), cnn=cnn)  # fmt: skip


def ground_projector(projector, modality: str, data_dir: Path, settings: Settings, encoder, engine,
                     cfg: AlignConfig) -> dict:  # fmt: skip
    """Word-ground a fresh projector on single labelled items (``train.ground``): a video's on the image train
    split (its frames are such images), another modality's on its own train split; features mean-pooled."""
    import torch

    from modalink.data import class_words
    from modalink.train.ground import ground

    source, enc = ("image", encoder.image) if modality == "video" else (modality, encoder)
    items = features_for(source, "train", data_dir, settings, enc)
    feats = torch.stack([f.float().mean(0) for _, f in items])
    torch.manual_seed(cfg.seed)
    return ground(projector, feats, [r["label"] for r, _ in items], list(class_words(modality)), engine,
                  epochs=cfg.ground, seed=cfg.seed)  # fmt: skip


def train_modality(
    cfg: AlignConfig, data_dir: Path, settings: Settings, run_dir: Path | None = None, promote: str = "if-better",
    engine: TransformersEngine | None = None,
) -> dict:  # fmt: skip
    """Train, evaluate on the validation split, publish a new version; promote it per ``promote``."""
    if settings.quantize == "fp16-cpu":  # a serving layout without gradients: training reads the fp32 weights
        settings = settings.model_copy(update={"quantize": "none"})
    settings.apply_threads()
    m = cfg.modality
    extra_metrics = {}
    if m == "imu":
        extra_metrics["imu_encoder"] = ensure_imu_encoder(data_dir, settings)
    engine = engine or TransformersEngine.load(settings=settings)
    encoder = load_encoder(m, settings)
    train = features_for(m, "train", data_dir, settings, encoder)
    val = features_for(m, "val", data_dir, settings, encoder)
    run_dir = run_dir or settings.cache_dir / "runs" / m
    registry = AdapterRegistry(settings.adapters_dir)
    init, init_adapter = None, None
    if cfg.stage == 2 and not cfg.init_from:
        cfg.init_from = "current"  # instruction tuning goes on from the aligned projector
    if cfg.init_from:
        version = registry.current(m) if cfg.init_from == "current" else cfg.init_from
        loaded = registry.load(m, version) if version else None
        if loaded is None:
            raise ValueError(f"no {m} adapter version {cfg.init_from!r} to start from (train stage 1 first)")
        check_video_tokens(m, loaded[1], loaded[2], encoder)
        init = loaded[0].train()
        extra_metrics["init_from"] = loaded[1]
        adapter_dir = registry.llm_adapter_path(m, loaded[1])
        if adapter_dir is not None and cfg.stage == 2:  # continue its LLM adapter too if of this method, its shape
            init_adapter, cfg.method_args = continued_adapter(adapter_dir, cfg)
    trainer = AlignTrainer(
        cfg, engine, encoder.feature_dim, train, val, run_dir, settings.system_prompt, init, init_adapter
    )
    question = default_question(m)
    val_accuracy = lambda answers: round(  # noqa: E731
        sum(is_correct(m, r["label"], a) for (r, _), a in zip(val, answers, strict=True)) / len(val), 4
    )
    baseline = None
    if init is not None and extra_metrics["init_from"] == registry.current(m):
        # judge against the current version on today's held-out set (it may have grown since it was trained)
        baseline = val_accuracy(trainer.answers(val, question))
        extra_metrics["baseline_accuracy"] = baseline
    if trainer.resume():
        log.warning("resuming %s from step %d (%s)", m, trainer.step, trainer.checkpoint)
    elif cfg.ground and init is None:
        extra_metrics.update(ground_projector(trainer.projector, m, data_dir, settings, encoder, engine, cfg))
    t0 = time.time()
    projector = trainer.fit()
    train_s = time.time() - t0
    answers = trainer.answers(val, question)
    metrics = {
        "val_accuracy": val_accuracy(answers),
        "val_n": len(val),
        "val_loss": trainer.history[-1].get("val_loss"),
        "stage": cfg.stage,
        "steps": trainer.step,
        "train_seconds": round(train_s, 1),
        "step_seconds": round(statistics.median(trainer.step_seconds), 3) if trainer.step_seconds else None,
        "trainable_projector": sum(p.numel() for p in projector.parameters()),
        **({"method": cfg.method, "trainable_llm": trainer.trainable_llm} if cfg.stage == 2 else {}),
        "examples": [{"label": r["label"], "answer": a} for (r, _), a in list(zip(val, answers, strict=True))[:5]],
        **{k: v for k, v in extra_metrics.items() if v is not None},
    }
    extra = {"train": asdict(cfg), "encoder": encoder.name, "encoder_weights": encoder.weights_id, "llm": settings.llm,
             "system_prompt": settings.system_prompt, "history": trainer.history}  # fmt: skip
    llm_adapter = trainer.adapter_state() if trainer.adapter else None
    version = registry.publish(m, projector, metrics=metrics, extra=extra, llm_adapter=llm_adapter)
    promoted = promote == "always" or (promote == "if-better" and not_worse(registry, m, metrics, baseline))
    if promoted:
        registry.promote(m, version)
    return {"modality": m, "version": version, "promoted": promoted, "metrics": metrics}


def not_worse(registry: AdapterRegistry, modality: str, metrics: dict, baseline: float | None = None) -> bool:
    """The promotion rule: no current version, or validation accuracy not below the current one's (``baseline``:
    the current version measured on today's validation set, which wins over its recorded figure)."""
    if registry.current(modality) is None:
        return True
    current = next((v.metrics.get("val_accuracy", 0) for v in registry.list(modality) if v.current), None)
    return metrics["val_accuracy"] >= ((baseline if baseline is not None else current) or 0)


def continued_adapter(path, cfg: AlignConfig) -> tuple[dict | None, dict]:
    """(tensors, settings) to continue the LLM adapter at ``path`` with, if it is of ``cfg.method``; else (None,
    ``cfg.method_args``): a stage 2 of another method starts its adapter fresh on the version's projector."""
    from safetensors.torch import load_file

    from modalink.methods import method_of, read_config

    config = read_config(path)
    if method_of(config) != cfg.method:
        log.warning("the %s version's LLM adapter is %s, not %s: starting a fresh %s adapter on its projector",
                    cfg.modality, method_of(config), cfg.method, cfg.method)  # fmt: skip
        return None, cfg.method_args
    if cfg.method == "lora":
        settings = {"r": config["r"], "alpha": config["lora_alpha"], "target_modules": config["target_modules"]}
    else:
        settings = {k: v for k, v in config.items() if k != "method"}
    return load_file(str(path / "adapter_model.safetensors")), settings
