"""Celery worker: captioning batches per modality queue (``caption.image``, ``caption.audio``, ...).

    celery -A services.worker.app worker -Q caption.image,caption.audio,caption.imu,caption.video,caption.unknown

Late acks and reject-on-worker-lost: a batch whose worker dies is delivered again, and the job store
keeps each item's first result only (``modalink.jobs``). An encoder or LLM service that is down makes
the task retry with backoff; a bad item is recorded with its error and does not fail the job.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery
from redis import Redis

from modalink.config import get_settings
from modalink.engine import GenerationParams
from modalink.errors import InputError
from modalink.jobs import JobStore, batches, caption_batch, read_manifest

settings = get_settings()
app = Celery("modalink", broker=settings.redis_url, backend=None)
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue="caption.unknown",
    task_serializer="json",  # never pickle
    accept_content=["json"],
    worker_send_task_events=True,  # Flower
    task_send_sent_event=True,
    broker_transport_options={"visibility_timeout": 3600},
)


@lru_cache(maxsize=1)
def store() -> JobStore:
    return JobStore(Redis.from_url(settings.redis_url))


@lru_cache(maxsize=1)
def remote():
    from services.gateway.server import build

    return build(settings)


@app.task(name="modalink.caption_batch", bind=True, max_retries=8, autoretry_for=(RuntimeError, ConnectionError),
          retry_backoff=2, retry_backoff_max=60)  # fmt: skip
def caption_task(self, job_id: str, modality: str, rows: list[dict], max_new_tokens: int = 48) -> int:
    """Caption the rows not captioned yet; returns how many results were new."""
    done = store().done_ids(job_id)
    todo = [r for r in rows if r["id"] not in done]
    if not todo:
        return 0
    results = caption_batch(remote(), modality, todo, GenerationParams(max_new_tokens=max_new_tokens))
    return sum(store().record(job_id, r) for r in results)


def submit(manifest: str, results: str, batch_size: int = 16, max_new_tokens: int = 48) -> str:
    """Create a job for a manifest and queue its batches; returns the job id."""
    rows = read_manifest(manifest)
    if not rows:
        raise InputError(f"{manifest} has no items")
    job_id = store().create(len(rows), results)
    for modality, chunk in batches(rows, batch_size):
        caption_task.apply_async((job_id, modality, chunk, max_new_tokens), queue=f"caption.{modality}")
    return job_id
