"""Periodic adapter fine-tuning: a new version from the current one, promoted only if it is not worse.

    modalink finetune -m imu          # what Celery beat triggers on the worker (or in a Kubernetes Job)

The curated pairs live in ``MODALINK_PAIRS_DIR/<modality>/`` with the layout ``modalink data build``
writes: ``train.jsonl`` (users may append pairs, e.g. ``{"id", "modality", "path", "caption"}`` with a
corrected caption) and ``val.jsonl``, the held-out set with labels. The run starts from the current
version, trains ``MODALINK_FINETUNE_STEPS`` steps, scores both the current version and the new one on the
held-out set, publishes the new one with its metrics, and promotes it only if it scores at least as well.
Encoder services pick a promotion up between batches, without a restart.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

from modalink import MODALITIES
from modalink.config import Settings
from modalink.errors import ConfigError

log = logging.getLogger(__name__)
LOCK = "modalink:finetune:{}:lock"
LAST = "modalink:finetune:{}:last"


def finetune(modality: str, settings: Settings, steps: int | None = None, lr: float | None = None) -> dict:
    """One fine-tune run in this process; returns {modality, version, promoted, metrics}."""
    from modalink.registry import AdapterRegistry
    from modalink.train.align import AlignConfig
    from modalink.train.run import train_modality

    if modality not in MODALITIES:
        raise ConfigError(f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")
    pairs = Path(settings.pairs_dir)
    for split in ("train", "val"):
        if not (pairs / modality / f"{split}.jsonl").is_file():
            raise ConfigError(f"no curated {split} pairs at {pairs / modality}/{split}.jsonl (MODALINK_PAIRS_DIR)")
    registry = AdapterRegistry(settings.adapters_dir)
    if registry.current(modality) is None:
        raise ConfigError(f"no current {modality} adapter to fine-tune: train one first (`modalink train`)")
    cfg = AlignConfig(modality, steps=steps or settings.finetune_steps, lr=lr or settings.finetune_lr, warmup=5,
                      batch_size=settings.finetune_batch_size, init_from="current",
                      seed=len(registry.versions(modality)))  # fmt: skip
    run_dir = settings.cache_dir / "runs" / f"{modality}-finetune"
    (run_dir / "checkpoint.safetensors").unlink(missing_ok=True)  # a fine-tune starts from today's current version
    result = train_modality(cfg, pairs, settings, run_dir=run_dir, promote="if-better")
    (run_dir / "checkpoint.safetensors").unlink(missing_ok=True)
    m = result["metrics"]
    log.info("fine-tuned %s -> %s: %.1f%% vs current %.1f%% on %d held-out items: %s", modality, result["version"],
             100 * m["val_accuracy"], 100 * m.get("baseline_accuracy", 0), m["val_n"],
             "promoted" if result["promoted"] else "kept unpromoted")  # fmt: skip
    return {**result, "metrics": {k: v for k, v in m.items() if k != "examples"}}


def kubernetes_job(modality: str, settings: Settings, wait_s: float = 6 * 3600, poll_s: float = 10.0) -> dict:
    """Run the fine-tune as a Kubernetes Job (the chart's template) and wait for it; the Job itself publishes
    and promotes. Needs the ``kubernetes`` package and in-cluster credentials (a ServiceAccount whose Role
    allows creating Jobs only)."""
    try:
        import yaml
        from kubernetes import client, config
    except ImportError as e:
        raise ConfigError(f"MODALINK_FINETUNE_RUNNER=kubernetes needs `pip install kubernetes`: {e}") from None
    manifest = job_manifest(modality, settings, yaml.safe_load(Path(settings.finetune_job_template).read_text()))
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    api = client.BatchV1Api()
    namespace = settings.kubernetes_namespace
    api.create_namespaced_job(namespace, manifest)
    name = manifest["metadata"]["name"]
    deadline = time.time() + wait_s
    backoff = manifest["spec"].get("backoffLimit")
    while time.time() < deadline:
        status = api.read_namespaced_job_status(name, namespace).status
        # the Job controller's verdict: Complete, or Failed (backoffLimit, activeDeadlineSeconds, pod failure policy)
        verdict = {c.type for c in status.conditions or [] if c.status == "True"}
        if status.succeeded or "Complete" in verdict:
            return {"modality": modality, "runner": "kubernetes", "job": name, "state": "succeeded"}
        if "Failed" in verdict or (status.failed or 0) > (6 if backoff is None else backoff):  # 6: Kubernetes' default
            log.error("fine-tune Job %s/%s failed: kubectl -n %s describe job %s", namespace, name, namespace, name)
            return {"modality": modality, "runner": "kubernetes", "job": name, "state": "failed"}
        time.sleep(poll_s)
    log.error("fine-tune Job %s/%s did not finish within %.0f s; it may still be running", namespace, name, wait_s)
    return {"modality": modality, "runner": "kubernetes", "job": name, "state": "timed out"}


def job_manifest(modality: str, settings: Settings, template: dict) -> dict:
    """The Job to create from the chart's template: a unique name, and ``modalink finetune -m <modality>`` as
    the first container's command (the template carries image, volumes, env and resources)."""
    if not isinstance(template, dict) or template.get("kind") != "Job":
        raise ConfigError(f"{settings.finetune_job_template}: not a Kubernetes Job manifest")
    job = copy.deepcopy(template)
    job.setdefault("metadata", {})["name"] = f"modalink-finetune-{modality}-{int(time.time())}"
    job["metadata"].setdefault("labels", {})["modalink/modality"] = modality
    containers = job["spec"]["template"]["spec"]["containers"]
    containers[0] = {**containers[0], "command": ["modalink", "finetune", "-m", modality, "--json"]}
    return job


def run_locked(redis, modality: str, settings: Settings, **overrides) -> dict:
    """The scheduled entry point: at most one fine-tune per modality at a time (a Redis lock that expires
    if its holder dies), on this worker or as a Kubernetes Job (``MODALINK_FINETUNE_RUNNER``)."""
    lock = redis.lock(LOCK.format(modality), timeout=settings.finetune_lock_s, blocking=False)
    if not lock.acquire():
        log.info("a %s fine-tune is already running; skipping this one", modality)
        return {"modality": modality, "skipped": "another fine-tune of this modality is running"}
    try:
        if settings.finetune_runner == "kubernetes":
            result = kubernetes_job(modality, settings)
        else:
            result = finetune(modality, settings, **overrides)
        redis.set(LAST.format(modality), json.dumps({**result, "finished": time.time()}))
        return result
    finally:
        try:
            lock.release()
        except Exception:  # noqa: BLE001  (expired and maybe taken by another run: nothing of ours to free)
            log.warning("the %s fine-tune lock expired before the run ended; raise MODALINK_FINETUNE_LOCK_S", modality)
