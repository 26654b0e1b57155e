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

from collections.abc import Sequence
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import grpc
from celery import Celery
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from modalink.config import get_settings
from modalink.engine import GenerationParams
from modalink.errors import BackendError, InputError
from modalink.jobs import JobStore, batches, caption_batch, check_path, manifest_roots

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
    # A Redis restart (it keeps its data: append-only file): the worker reconnects, with a bound, and a batch
    # whose ack was lost with the old connection is delivered again after the visibility timeout, where the
    # store skips its recorded items. A batch in hand finishes (its store writes retry until Redis is back).
    broker_connection_retry=True,
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=100,  # about an hour of backoff, then the worker exits (its supervisor restarts it)
    worker_cancel_long_running_tasks_on_connection_loss=False,
    broker_transport_options={"visibility_timeout": settings.job_visibility_timeout_s, "socket_connect_timeout": 5},
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
    return JobStore(Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=30),
                    retry_s=settings.redis_retry_s)  # fmt: skip


@lru_cache(maxsize=1)
def remote():
    from services.gateway.server import build

    return build(settings)


# BackendError: an encoder service or the LLM service is unavailable, timed out or failed (``modalink.remote``);
# Redis errors: the job store was unreachable for longer than its retries (bad input never raises: it becomes
# the item's error row).
RETRIED = (BackendError, ConnectionError, TimeoutError, grpc.RpcError, RedisConnectionError, RedisTimeoutError)


@app.task(name="modalink.caption_batch", bind=True, max_retries=10, retry_backoff=2, retry_backoff_max=60,
          autoretry_for=RETRIED)  # fmt: skip
def caption_task(
    self, job_id: str, modality: str, rows: list[dict], params: dict, prompt: str = "", roots: list[str] | None = None
) -> int:
    """Caption the rows not captioned yet; returns how many results were new. ``roots``: where the items may
    be (the submitter's ``manifest_roots``; a message without them gets this worker's)."""
    if not store().active(job_id):
        return 0  # cancelled (or already finished by a re-delivered copy)
    done = store().done_ids(job_id)
    todo = [r for r in rows if r["id"] not in done]
    results = caption_batch(remote(), modality, todo, GenerationParams(**params), prompt, roots=roots) if todo else []
    new = sum(store().record(job_id, r) for r in results)
    # Also when nothing was new: the worker that recorded the last item may have died (or lost Redis's
    # reply) before finishing the job.
    store().finish_if_complete(job_id)
    return new


@app.task(name="modalink.finetune")
def finetune_task(modality: str, steps: int | None = None, lr: float | None = None) -> dict:
    """A fine-tune of one modality's adapter (``modalink.finetune``), unless one is already running."""
    from modalink.finetune import run_locked

    return run_locked(store().redis, modality, settings, steps=steps, lr=lr)


def submit(
    rows: list[dict],
    results: str,
    batch_size: int = 16,
    params: GenerationParams | None = None,
    prompt: str = "",
    roots: Sequence[str | Path] | None = None,
) -> str:
    """Create a job for manifest rows (``modalink.jobs.read_manifest``) and queue its batches per modality;
    returns the job id. ``results`` may contain ``{job_id}``. The results file and the items must lie inside
    ``roots`` (default: ``manifest_roots()``; a trusted local submitter may pass ``jobs.ANYWHERE``)."""
    roots = [str(r) for r in (manifest_roots() if roots is None else roots)]
    check_path(results.replace("{job_id}", "job"), roots, "results path")
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
        caption_task.apply_async((job_id, modality, chunk, asdict(params), prompt, roots), queue=f"caption.{modality}")
    return job_id
