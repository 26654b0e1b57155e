"""Celery worker: captioning batches per modality queue (``caption.image``, ``caption.audio``, ...) and
adapter fine-tunes (queue ``finetune``, scheduled by beat every ``MODALINK_FINETUNE_INTERVAL_S``).

    celery -A modalink_services.worker.app worker -Q caption.image,caption.audio,caption.imu,caption.video,\
        caption.unknown
    celery -A modalink_services.worker.app worker -Q finetune -c 1
    celery -A modalink_services.worker.app beat       # exactly one

Late acks and reject-on-worker-lost: a batch whose worker dies is delivered again, and the job store
keeps each item's first result only (``modalink.jobs``); a batch the broker lost is queued again by the job
sweeper each worker runs (``JobSweeper``). An encoder or LLM service that is down makes
the task retry with backoff; a bad item is recorded with its error and does not fail the job. The app's
configuration, the job store and ``submit`` are the serving layer's (``modalink.queueing``).
"""

from __future__ import annotations

import logging
from functools import lru_cache

import grpc
from celery import Celery, bootsteps
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from modalink import queueing
from modalink.config import Settings, get_settings
from modalink.embed_cache import salted
from modalink.engine import GenerationParams
from modalink.errors import BackendError
from modalink.jobs import caption_batch

# BackendError: an encoder service or the LLM service is unavailable, timed out or failed (``modalink.remote``);
# Redis errors: the job store was unreachable for longer than its retries (bad input never raises: it becomes
# the item's error row).
RETRIED = (BackendError, ConnectionError, TimeoutError, grpc.RpcError, RedisConnectionError, RedisTimeoutError)
log = logging.getLogger(__name__)


class JobSweeper(bootsteps.StartStopStep):
    """Every ``MODALINK_JOB_SWEEP_S``, in the worker's main process, queue again the batches the broker lost
    (``queueing.sweep``; one worker at a time)."""

    requires = {"celery.worker.components:Timer"}

    def __init__(self, worker, **kwargs):
        self.tref = None

    def start(self, worker) -> None:
        settings = worker.app.modalink_settings
        if settings.job_sweep_s > 0:
            self.tref = worker.timer.call_repeatedly(settings.job_sweep_s, self.sweep, (settings,), priority=10)

    def stop(self, worker) -> None:
        if self.tref:
            self.tref.cancel()
            self.tref = None

    @staticmethod
    def sweep(settings: Settings) -> None:
        try:
            for job_id, n in queueing.sweep(settings).items():
                log.warning("job %s made no progress and has no batch in the broker: %d batches queued again",
                            job_id, n)  # fmt: skip
        except (RedisConnectionError, RedisTimeoutError) as e:  # Redis restarting: the next sweep tries again
            log.warning("job sweep skipped: %s", e)


def create_app(settings: Settings | None = None) -> Celery:
    """The worker's Celery app with its tasks, on ``settings`` (default: the environment's)."""
    settings = settings or get_settings()
    app = queueing.celery_app(settings)
    app.modalink_settings = settings  # what JobSweeper reads
    app.steps["worker"].add(JobSweeper)

    @lru_cache(maxsize=1)
    def remote():
        from modalink.remote import RemoteAssistant

        return RemoteAssistant.from_settings(settings)

    @app.task(name=queueing.CAPTION_TASK, bind=True, max_retries=10, retry_backoff=2, retry_backoff_max=60,
              autoretry_for=RETRIED)  # fmt: skip
    def caption_task(
        self, job_id: str, modality: str, rows: list[dict], params: dict, prompt: str = "",
        roots: list[str] | None = None, salt: str = "",
    ) -> int:  # fmt: skip
        """Caption the rows not captioned yet; returns how many results were new. ``roots``: where the items may
        be (the submitter's ``manifest_roots``; a message without them gets this worker's); ``salt``: the
        submitter's media embedding cache salt (its key id), so one tenant's items never hit another's entries."""
        store = queueing.store(settings)
        if not store.active(job_id):
            return 0  # cancelled (or already finished by a re-delivered copy)
        done = store.done_ids(job_id)
        todo = [r for r in rows if r["id"] not in done]
        with salted(salt):  # the encoder pool reads it (modalink.embed_cache.SALT)
            results = (
                caption_batch(remote(), modality, todo, GenerationParams(**params), prompt, roots=roots) if todo else []
            )
        new = sum(store.record(job_id, r) for r in results)
        # Also when nothing was new: the worker that recorded the last item may have died (or lost Redis's
        # reply) before finishing the job.
        store.finish_if_complete(job_id)
        return new

    @app.task(name=queueing.FINETUNE_TASK)
    def finetune_task(modality: str, steps: int | None = None, lr: float | None = None) -> dict:
        """A fine-tune of one modality's adapter (``modalink.finetune``), unless one is already running."""
        from modalink.finetune import run_locked

        return run_locked(queueing.store(settings).redis, modality, settings, steps=steps, lr=lr)

    return app


app = create_app()  # what `celery -A modalink_services.worker.app` finds
