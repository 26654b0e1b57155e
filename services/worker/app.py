"""Celery worker: captioning batches per modality queue (``caption.image``, ``caption.audio``, ...) and
adapter fine-tunes (queue ``finetune``, scheduled by beat every ``MODALINK_FINETUNE_INTERVAL_S``).

    celery -A services.worker.app worker -Q caption.image,caption.audio,caption.imu,caption.video,caption.unknown
    celery -A services.worker.app worker -Q finetune -c 1
    celery -A services.worker.app beat       # exactly one

Late acks and reject-on-worker-lost: a batch whose worker dies is delivered again, and the job store
keeps each item's first result only (``modalink.jobs``). An encoder or LLM service that is down makes
the task retry with backoff; a bad item is recorded with its error and does not fail the job.
"""

from __future__ import annotations

from dataclasses import asdict
from functools import lru_cache

import grpc
from celery import Celery
from redis import Redis

from modalink.config import get_settings
from modalink.engine import GenerationParams
from modalink.errors import InputError
from modalink.jobs import JobStore, batches, caption_batch

MAX_PROMPT_CHARS = 4000

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
    broker_transport_options={"visibility_timeout": settings.job_visibility_timeout_s},
)


app.conf.beat_schedule = {
    f"finetune-{m}": {
        "task": "modalink.finetune",
        "schedule": settings.finetune_interval_s,
        "args": (m,),
        "options": {"queue": "finetune", "expires": settings.finetune_interval_s},  # a missed turn is dropped
    }
    for m in filter(None, (x.strip() for x in settings.finetune_modalities.split(",")))
    if settings.finetune_interval_s > 0
}


@lru_cache(maxsize=1)
def store() -> JobStore:
    return JobStore(Redis.from_url(settings.redis_url))


@lru_cache(maxsize=1)
def remote():
    from services.gateway.server import build

    return build(settings)


# RuntimeError: every replica of an encoder service is unavailable; grpc.RpcError: the LLM service failed
# (bad input never raises: it becomes the item's error row).
@app.task(name="modalink.caption_batch", bind=True, max_retries=10, retry_backoff=2, retry_backoff_max=60,
          autoretry_for=(RuntimeError, ConnectionError, grpc.RpcError))  # fmt: skip
def caption_task(self, job_id: str, modality: str, rows: list[dict], params: dict, prompt: str = "") -> int:
    """Caption the rows not captioned yet; returns how many results were new."""
    if not store().active(job_id):
        return 0  # cancelled (or already finished by a re-delivered copy)
    done = store().done_ids(job_id)
    todo = [r for r in rows if r["id"] not in done]
    if not todo:
        store().finish_if_complete(job_id)  # in case the worker that recorded the last item died before finishing
        return 0
    results = caption_batch(remote(), modality, todo, GenerationParams(**params), prompt)
    return sum(store().record(job_id, r) for r in results)


@app.task(name="modalink.finetune")
def finetune_task(modality: str, steps: int | None = None, lr: float | None = None) -> dict:
    """A fine-tune of one modality's adapter (``modalink.finetune``), unless one is already running."""
    from modalink.finetune import run_locked

    return run_locked(store().redis, modality, settings, steps=steps, lr=lr)


def submit(
    rows: list[dict], results: str, batch_size: int = 16, params: GenerationParams | None = None, prompt: str = ""
) -> str:
    """Create a job for manifest rows (``modalink.jobs.read_manifest``) and queue its batches per modality;
    returns the job id. ``results`` may contain ``{job_id}``."""
    params = params or GenerationParams(max_new_tokens=48)
    params.validate()
    if not rows:
        raise InputError("the manifest has no items")
    if not 1 <= batch_size <= 256:
        raise InputError(f"batch_size must be in 1..256, got {batch_size}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"prompt is longer than {MAX_PROMPT_CHARS} characters")
    job_id = store().create(rows, results, prompt)
    for modality, chunk in batches(rows, batch_size):
        caption_task.apply_async((job_id, modality, chunk, asdict(params), prompt), queue=f"caption.{modality}")
    return job_id
