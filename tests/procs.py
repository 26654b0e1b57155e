"""Helpers for tests that start real service processes: free ports and readiness waits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from modalink.ports import free_port  # noqa: F401 (the tests import it from here)

# Every path rounds embeddings to fp16 (``embedder.as_at_rest``): two computations of one item (in another process,
# in another batch) agree to float rounding before it, so within one fp16 step after it (a value on a rounding
# boundary may round either way). Keyword arguments of numpy's assert_allclose and torch's assert_close.
ONE_FP16_STEP = {"rtol": 1e-3, "atol": 1e-4}


def wait_grpc(address: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.time() + timeout
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{address} exited:\n{log.read_text()[-3000:]}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                    return
            except grpc.RpcError:
                time.sleep(0.5)
    raise TimeoutError(f"{address} not healthy:\n{log.read_text()[-3000:]}")


def wait_triton(http: int, model: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    import tritonclient.http as th

    client = th.InferenceServerClient(f"127.0.0.1:{http}")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"encoder on {http} exited:\n{log.read_text()[-3000:]}")
        try:
            if client.is_model_ready(model):
                return
        except Exception:  # noqa: BLE001  (not listening yet)
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{model} on {http} not ready:\n{log.read_text()[-3000:]}")


class Procs:
    """Service processes of one test module, each in its own process group with its log in ``logs``."""

    def __init__(self, logs: Path, env: dict):
        self.logs, self.env = logs, env
        self.running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str], env: dict | None = None) -> tuple[subprocess.Popen, Path]:
        log = self.logs / f"{name}.log"
        proc = subprocess.Popen(cmd, env={**self.env, **(env or {})}, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        self.running[name] = proc
        return proc, log

    def kill(self, name: str, sig: int = signal.SIGKILL, timeout: float = 60) -> None:
        """Signal the whole group (a Celery worker and its pool children), and reap it (SIGKILLed if a gentler
        signal has not ended it within ``timeout``: a test that means to watch a shutdown waits on it itself)."""
        proc = self.running.pop(name)
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

    def stop_all(self) -> None:
        for proc in self.running.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.running.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        self.running.clear()


def wait_log(text: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Until ``text`` appears in the log (a Celery worker prints "ready." once it consumes)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{log.stem} exited:\n{log.read_text()[-3000:]}")
        if text in log.read_text(errors="replace"):
            return
        time.sleep(0.3)
    raise TimeoutError(f"{log.stem}: no {text!r} in the log:\n{log.read_text()[-3000:]}")


def triton_metric(metrics_port: int, name: str, model: str) -> int:
    """A counter from Triton's Prometheus endpoint (PyTriton restricts the statistics API)."""
    import re
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    m = re.search(rf'{name}\{{model="{model}",version="1"\}} (\d+)', text)
    return int(m.group(1)) if m else 0


FIGURES = Path(__file__).resolve().parents[1] / "build" / "reliability"


def record_figures(case: str, **figures) -> None:
    """Numbers a reliability test measured (requests sent, failed, lost...), for docs/RELIABILITY.md."""
    import json

    FIGURES.mkdir(parents=True, exist_ok=True)
    (FIGURES / f"{case}.json").write_text(json.dumps({"case": case, **figures, "when": time.strftime("%F %T")}) + "\n")


def http_chat(base: str, key: str | None = None, max_tokens: int = 2) -> tuple[int, dict, str]:
    """(status, headers with lower-case names, body) of a short OpenAI chat completion at the gateway's HTTP API."""
    import json
    import urllib.error
    import urllib.request

    body = json.dumps({"model": "modalink", "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": "Say hi."}]})  # fmt: skip
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(f"{base}/v1/chat/completions", body.encode(), headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as res:
            return res.status, {k.lower(): v for k, v in res.headers.items()}, res.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode()


def stack_ports(replicas: int = 2):
    """Ports for a test's own ``modalink up --port-offset``: every port of the stack (``modalink.up.Ports``, up to
    ``replicas`` encoder replicas) free now and none of them a default port, so a test's stack never meets a
    developer's running stack (on the defaults) or another test's."""
    import random

    from modalink.ports import ENCODER_HTTP, HANDED_OUT, port_is_free
    from modalink.up import Ports

    def numbers(p: Ports) -> set[int]:
        fixed = {p.redis, p.llm, p.llm_http, p.gateway, p.gateway_http, p.playground}
        return fixed | {p.encoder_http(m, i) + k for m in ENCODER_HTTP for i in range(replicas) for k in range(3)}

    defaults = numbers(Ports(0))
    rng = random.Random()
    for _ in range(200):
        ports = Ports(rng.randrange(100, 15000))
        if not numbers(ports) & defaults and all(map(port_is_free, numbers(ports))):
            HANDED_OUT.update(numbers(ports))
            return ports
    raise RuntimeError("no port offset with every port of a stack free")


def modalink_up(run_dir: Path, *args: str, env: dict, timeout: float = 600):
    """``modalink up`` in ``run_dir`` on ports of its own (``stack_ports``), with a Redis of its own (a
    ``MODALINK_REDIS_URL`` in ``env`` is dropped): (its ``Ports``, the finished process). Tried again on other
    ports when another process took one of them meanwhile."""
    env = {k: v for k, v in env.items() if k != "MODALINK_REDIS_URL"}
    for _ in range(3):
        ports = stack_ports()
        cmd = [sys.executable, "-m", "modalink.cli", "up", "--run-dir", str(run_dir), "--port-offset",
               str(ports.offset), *args]  # fmt: skip
        started = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if "ports in use" not in started.stderr:
            break
    return ports, started


def caption_job_cli(tmp_path: Path, modality: str, path: str, n: int, redis_port: int, env: dict) -> list[dict]:
    """``modalink caption submit --wait`` of ``n`` rows of one file against a stack's Redis: the captions, after
    checking every row was captioned."""
    import json

    manifest = tmp_path / "items.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"{modality}{i}", "modality": modality, "path": path}) + "\n"
                                for i in range(n)))  # fmt: skip
    job = subprocess.run([sys.executable, "-m", "modalink.cli", "caption", "submit", str(manifest), "--wait", "--json"],
                         capture_output=True, text=True, timeout=300,
                         env={**env, "MODALINK_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"})  # fmt: skip
    assert job.returncode == 0, job.stderr
    summary = json.loads(job.stdout)
    assert (summary["state"], summary["items"], summary["ok"], summary["errors"]) == ("done", n, n, 0), summary
    captions = [json.loads(line) for line in open(summary["results"])]
    assert sorted(c["id"] for c in captions) == [f"{modality}{i}" for i in range(n)], captions
    return captions
