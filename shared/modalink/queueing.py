"""Captioning jobs and fine-tunes on Celery over Redis, as every side of them sees it: the Celery app's
configuration, the job store, and submitting a job. The gateway, the CLI and the workers share this module; the
tasks run in ``services/worker``, and a job is queued by task name, so a submitter never imports the worker.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

from celery import Celery

from modalink.config import Settings, get_settings
from modalink.engine import GenerationParams
from modalink.errors import InputError
from modalink.jobs import JobStore, batches, check_path, deterministic, manifest_roots

CAPTION_TASK, FINETUNE_TASK = "modalink.caption_batch", "modalink.finetune"
SWEEP_LOCK = "modalink:jobs:sweeping"
RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
MAX_PROMPT_CHARS = 4000
MAX_ID_CHARS = 256


def celery_app(settings: Settings | None = None) -> Celery:
    """A Celery app on ``MODALINK_REDIS_URL`` (no result backend: job state lives in the job store)."""
    settings = settings or get_settings()
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
        broker_connection_max_retries=100,  # about an hour of backoff, then the worker exits (its supervisor restarts)
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_transport_options={"visibility_timeout": settings.job_visibility_timeout_s, "socket_connect_timeout": 5},
    )  # fmt: skip
    app.conf.beat_schedule = {
        f"finetune-{m}": {
            "task": FINETUNE_TASK,
            "schedule": settings.finetune_interval_s,
            "args": (m,),
            "options": {"queue": "finetune", "expires": settings.finetune_interval_s},  # a missed turn is dropped
        }
        for m in filter(None, (x.strip() for x in settings.finetune_modalities.split(",")))
        if settings.finetune_interval_s > 0
    }
    return app


@lru_cache(maxsize=4)
def _store(redis_url: str, retry_s: float, ttl_s: int) -> JobStore:
    from redis import Redis

    client = Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=30)
    return JobStore(client, retry_s=retry_s, ttl_s=ttl_s)


def store(settings: Settings | None = None) -> JobStore:
    """The job store on ``MODALINK_REDIS_URL`` (one client per URL)."""
    settings = settings or get_settings()
    return _store(settings.redis_url, settings.redis_retry_s, settings.job_ttl_s)


@lru_cache(maxsize=4)
def _sender(redis_url: str) -> Celery:
    return celery_app(get_settings().model_copy(update={"redis_url": redis_url}))


def submit(
    rows: list[dict],
    results: str,
    batch_size: int = 16,
    params: GenerationParams | None = None,
    prompt: str = "",
    roots: Sequence[str | Path] | None = None,
    settings: Settings | None = None,
    caller: str = "",
    salt: str = "",
) -> str:
    """Create a job for manifest rows (``modalink.data.read_manifest``) and queue its batches per modality
    (``caption.<modality>``); returns the job id. ``results`` may contain ``{job_id}``. The results file and the
    items must lie inside ``roots`` (default: ``manifest_roots()``; a trusted local submitter may pass
    ``jobs.ANYWHERE``). A ``caller`` (the gateway's: an API key's id or an address) may have at most
    ``MODALINK_MAX_JOBS_PER_CALLER`` jobs running. ``salt``: the submitter's media embedding cache salt (its key
    id), so the workers' encodings of its items are cached as its own (``modalink.embed_cache``)."""
    settings = settings or get_settings()
    roots = [str(r) for r in (manifest_roots(settings) if roots is None else roots)]
    check_path(results.replace("{job_id}", "job"), roots, "results path")
    params = params or GenerationParams(max_new_tokens=48)
    params.validate()
    if not rows:
        raise InputError("the manifest has no items")
    if len(rows) > settings.max_job_rows:
        raise InputError(f"the manifest has {len(rows)} items; the limit is {settings.max_job_rows} "
                         "(MODALINK_MAX_JOB_ROWS)")  # fmt: skip
    long = next((i for i, r in enumerate(rows) if len(str(r.get("id", ""))) > MAX_ID_CHARS), None)
    if long is not None:
        raise InputError(f"row {long + 1}: an item id is at most {MAX_ID_CHARS} characters")
    if Path(results.replace("{job_id}", "job")).is_dir():
        raise InputError("results path is a directory; name a file")
    if not 1 <= batch_size <= 256:
        raise InputError(f"batch_size must be in 1..256, got {batch_size}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"prompt is longer than {MAX_PROMPT_CHARS} characters")
    jobs = store(settings)
    job_id = jobs.create(rows, results, prompt, caller, settings.max_jobs_per_caller)
    payloads = [
        {"modality": modality, "rows": chunk, "params": asdict(params), "prompt": prompt, "roots": roots, "salt": salt}
        for modality, chunk in batches(rows, batch_size, repeats=deterministic(params))
    ]
    jobs.keep_batches(job_id, payloads)
    for payload in payloads:
        _send(settings, job_id, payload)
    return job_id


def _send(settings: Settings, job_id: str, payload: dict) -> None:
    """Queue one caption batch (a kept payload: ``JobStore.keep_batches``) on its modality's queue."""
    p = payload
    _sender(settings.redis_url).send_task(
        CAPTION_TASK, (job_id, p["modality"], p["rows"], p["params"], p["prompt"], p["roots"]),
        {"salt": p["salt"]} if p["salt"] else None, queue=f"caption.{p['modality']}",
    )  # fmt: skip


def queued_jobs(redis) -> set[str]:
    """The ids of the jobs with a caption batch in the broker: queued (kombu's ``caption.*`` lists, priority
    lists included) or delivered and not acknowledged yet (kombu's ``unacked`` hash: in a worker's hand, or
    waiting out a retry's countdown there)."""
    import base64
    import json

    def job_of(raw: bytes) -> str | None:
        message = json.loads(raw)
        message = message[0] if isinstance(message, list) else message  # unacked: [message, exchange, routing key]
        if message.get("headers", {}).get("task") != CAPTION_TASK:
            return None
        body = message["body"]
        body = base64.b64decode(body) if message.get("properties", {}).get("body_encoding") == "base64" else body
        return json.loads(body)[0][0]

    jobs = {job for raw in redis.hvals("unacked") if (job := job_of(raw))}
    for key in redis.scan_iter(match="caption.*", count=100):
        if redis.type(key) == b"list":
            for start in range(0, redis.llen(key), 500):  # a chunk at a time: a long queue is never held whole
                jobs |= {job for raw in redis.lrange(key, start, start + 499) if (job := job_of(raw))}
    return jobs


def sweep(settings: Settings | None = None, stall_s: float | None = None) -> dict[str, int]:
    """Queue again the unfinished batches of each running job that has made no progress for ``stall_s``
    (default ``MODALINK_JOB_STALL_S``) and has no batch left in the broker: a batch the broker lost (a worker
    killed between kombu's pop and its unacked note). Sends again are harmless (each item's first result is
    kept). One sweeper at a time (a Redis lock), so every worker may run it. Returns {job id: batches queued}."""
    settings = settings or get_settings()
    stall_s = settings.job_stall_s if stall_s is None else stall_s
    jobs = store(settings)
    token = uuid.uuid4().hex  # released only by its holder: a sweep outliving the lock frees no one else's
    if not jobs.redis.set(SWEEP_LOCK, token, nx=True, ex=max(int(stall_s), 10)):
        return {}
    try:
        stalled = [j for j in jobs.running() if jobs.stalled(j, stall_s)]
        if not stalled:
            return {}
        in_broker = queued_jobs(jobs.redis)
        sent = {}
        for job_id in stalled:
            if job_id in in_broker:  # (a job that ended meanwhile has no kept batches left: nothing is sent)
                continue
            sent[job_id] = len(todo := jobs.unfinished_batches(job_id))
            for payload in todo:
                _send(settings, job_id, payload)
        return {j: n for j, n in sent.items() if n}
    finally:
        jobs.redis.eval(RELEASE, 1, SWEEP_LOCK, token)
