"""The stage-2 methods side by side on one benchmark (``modalink eval --methods``).

Each method is trained from the same stage-1 projector (the one the modality's shipped stage-2 version started
from, or its current stage-1 version), on the same data, steps, batch size and seed, each at its own default
learning rate (``methods.default_lr``), into a scratch registry (``<work>/adapters``, never the shipped one). Then
each is scored on the held-out test split by the in-process assistant, and its decode speed is measured in one run
beside the others (batch 1, the same media prompt, EOS ignored so every method decodes the same number of tokens).
A finished method's result is kept in ``<work>/<modality>/<method>.json``, so an interrupted comparison resumes.
``ship`` copies the best method by validation accuracy into the real registry (``make adapters``).
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from modalink.config import Settings
from modalink.registry import AdapterRegistry

log = logging.getLogger(__name__)


def stage1_version(registry: AdapterRegistry, modality: str) -> str:
    """The stage-1 version every method starts from: the current version, or the one a stage-2 current came from."""
    current = registry.current(modality)
    if current is None:
        raise ValueError(f"no {modality} adapter to start from: train stage 1 first")
    metrics = next(v.metrics for v in registry.list(modality) if v.version == current)
    return metrics["init_from"] if metrics.get("stage") == 2 else current


def train_methods(modality: str, data_dir: Path, settings: Settings, work: Path, methods: Sequence[str],
                  steps: int = 100, lr: float = 5e-4, checks: float = 0.3) -> dict[str, dict]:  # fmt: skip
    """Train each of ``methods`` (those without a result in ``work``) and return every method's training result."""
    from modalink.train.align import AlignConfig
    from modalink.train.run import train_modality

    base = stage1_version(AdapterRegistry(settings.adapters_dir), modality)
    scratch = settings.model_copy(update={"adapters_dir": work / "adapters"})
    target = work / "adapters" / modality / base
    if not target.exists():  # the scratch registry starts with the shared stage-1 version
        shutil.copytree(settings.adapters_dir / modality / base, target)
    AdapterRegistry(scratch.adapters_dir).verify(modality, base)
    results = {}
    for method in methods:
        out = work / modality / f"{method}.json"
        if out.exists() and (old := json.loads(out.read_text()))["steps"] == steps and old["init_from"] == base:
            results[method] = old
            continue
        log.info("%s: training stage 2 with %s from %s, %d steps", modality, method, base, steps)
        cfg = AlignConfig(modality, stage=2, method=method, steps=steps, lr=lr, init_from=base, checks=checks)
        run = train_modality(cfg, data_dir, scratch, run_dir=work / "runs" / f"{modality}-{method}", promote="never")
        m = run["metrics"]
        results[method] = {"method": method, "version": run["version"], "init_from": base, "steps": m["steps"],
                           "val_accuracy": m["val_accuracy"], "val_n": m["val_n"], "lr": cfg.method_lr,
                           "trainable_llm": m["trainable_llm"], "trainable_projector": m["trainable_projector"],
                           "step_seconds": m["step_seconds"], "train_seconds": m["train_seconds"]}  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results[method], indent=2) + "\n")
    return results


def score_methods(modality: str, data_dir: Path, settings: Settings, work: Path, results: dict[str, dict],
                  limit: int = 0, decode_tokens: int = 48, repeats: int = 3) -> dict[str, dict]:  # fmt: skip
    """Test-split accuracy of each trained method, and its decode tokens/s (and the bare LLM's) measured together."""
    from modalink.assistant import Assistant
    from modalink.data import read_manifest
    from modalink.evaluate import accuracy, answer_rows

    scratch = settings.model_copy(update={"adapters_dir": work / "adapters"})
    test = read_manifest(data_dir / modality / "test.jsonl")
    if modality == "video":
        test = [r for r in test if r.get("kind", "pair") == "pair"]
    test = test[:limit] if limit else test
    engine = None
    for method, r in results.items():
        assistant = Assistant(scratch, engine, {modality: r["version"]})
        engine = assistant.engine  # one engine: every method's adapter loads beside the others
        r["test_accuracy"] = accuracy(list(answer_rows(assistant, test)))[modality]["accuracy"]
        r["test_n"] = len(test)
        log.info("%s %s: test accuracy %.1f%%", modality, method, 100 * r["test_accuracy"])
    speeds = decode_speeds(engine, scratch, modality, test[0], [(m, r["version"]) for m, r in results.items()],
                           decode_tokens, repeats)  # fmt: skip
    for method, r in results.items():
        r["decode_tok_s"] = speeds[method]
    return {**results, "base LLM": {"method": "none (bare LLM)", "decode_tok_s": speeds[None]}}


def decode_speeds(engine, settings: Settings, modality: str, row: dict, versions: list[tuple[str, str]],
                  tokens: int, repeats: int) -> dict[str | None, float]:  # fmt: skip
    """Batch-1 decode tokens/s per method on one media prompt, interleaved rounds, median; prefill excluded."""
    from modalink.assistant import Assistant
    from modalink.engine import GenerationParams
    from modalink.evaluate import default_question
    from modalink.methods import choose
    from modalink.prompt import Media, Message, build_prompt

    prompts: dict[str | None, tuple[list, str | None]] = {}
    first = versions[0][1]
    for method, version in [(None, first), *versions]:  # the bare LLM reads the first method's media embeddings
        assistant = Assistant(settings, engine, {modality: version})
        media = assistant.embed(modality, [row["path"]])[0][0]
        content = [default_question(modality), Media(modality, media)]
        prompt = build_prompt(engine.tokenizer, [Message("user", content)], settings.system_prompt)
        name = choose(engine, assistant.registry, [f"{modality}@{version}"]) if method else None
        prompts[method] = (prompt, name)
    from modalink.prefix_cache import PrefixCache

    # every method decodes exactly ``tokens`` tokens, and prefills in full each time (no prefix-cache hits)
    eos, engine.eos_ids = engine.eos_ids, set()
    cache, engine.prefix_cache = engine.prefix_cache, PrefixCache(0)
    times: dict[str | None, list[float]] = {m: [] for m in prompts}
    try:
        for _ in range(repeats):
            for method, (prompt, name) in prompts.items():
                t0 = time.perf_counter()
                engine.next_token_logits(prompt, name)
                prefill = time.perf_counter() - t0
                t0 = time.perf_counter()
                out = engine.generate([prompt], GenerationParams(max_new_tokens=tokens), adapters=[name])[0]
                times[method].append((out.completion_tokens - 1) / max(time.perf_counter() - t0 - prefill, 1e-6))
    finally:
        engine.eos_ids, engine.prefix_cache = eos, cache
    return {m: round(statistics.median(v), 1) for m, v in times.items()}


def best_method(results: dict[str, dict]) -> str:
    """The method with the best validation accuracy (ties: fewer trainable LLM parameters)."""
    trained = {m: r for m, r in results.items() if "val_accuracy" in r}
    return max(trained, key=lambda m: (trained[m]["val_accuracy"], -trained[m]["trainable_llm"]))


def ship(modality: str, settings: Settings, work: Path, results: dict[str, dict]) -> dict:
    """Publish the best method's version from the scratch registry into the real one, promoted if not worse on
    validation than the current version (the same rule as ``modalink train``)."""
    from safetensors.torch import load_file

    from modalink.methods import read_config
    from modalink.train.run import not_worse

    method = best_method(results)
    version = results[method]["version"]
    source = AdapterRegistry(work / "adapters")
    source.verify(modality, version)
    projector, _, meta = source.load(modality, version)
    folder = source.llm_adapter_path(modality, version)
    tensors = {k: v.float() for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
    entry = next(v for v in source.list(modality) if v.version == version)
    extra = {k: v for k, v in meta.items() if k not in ("modality", "version", "projector")}
    registry = AdapterRegistry(settings.adapters_dir)
    promoted = not_worse(registry, modality, entry.metrics)
    metrics = {**entry.metrics, "chosen_from": {m: r["val_accuracy"] for m, r in results.items()}}
    shipped = registry.publish(modality, projector, metrics=metrics, extra=extra,
                               llm_adapter=(tensors, read_config(folder)))  # fmt: skip
    if promoted:
        registry.promote(modality, shipped)
    return {"method": method, "version": shipped, "promoted": promoted, "val_accuracy": metrics["val_accuracy"]}
