"""`modalink up` / `ps` / `down`: the topology as local processes, then gone again. The stack runs in a run dir
of its own and on ports of its own (``--port-offset``), so it never shares state or ports with a developer's
stack or another test's."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from procs import caption_job_cli, modalink_up

pytestmark = pytest.mark.slow


ENV = {**os.environ, "MODALINK_NUM_THREADS": "1"}


def modalink(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modalink.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or ENV)  # fmt: skip


def test_up_serves_through_the_gateway_and_down_stops_everything(tmp_path, samples):
    import json

    from modalink.client import Client, imu

    run = str(tmp_path / "run")
    pids = []
    ports, started = modalink_up(run, "--modalities", "imu", "--replicas", "imu=2", env=ENV)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert "imu-encoder-1" in started.stdout and "redis" in started.stdout
        assert f"gRPC localhost:{ports.gateway} " in started.stdout and f"--run-dir {run}" in started.stdout
        again = modalink("up", "--modalities", "imu", "--run-dir", run)
        assert again.returncode == 2 and "already up" in again.stderr
        with Client(f"localhost:{ports.gateway}") as c:
            answer = c.ask(["What activity is the person doing?", imu(np.load(samples["imu"]))], max_new_tokens=16)
        assert answer.strip()
        captions = caption_job_cli(tmp_path, "imu", samples["imu"], 3, ports.redis, ENV)
        assert all(c["caption"] for c in captions)
        ps = modalink("ps", "--run-dir", run)
        assert ps.stdout.count("healthy") == 7, ps.stdout  # redis, 2 imu encoders, llm, worker, gateway, playground
        state = json.loads((tmp_path / "run" / "state.json").read_text())
        pids = [s["pid"] for s in state]
        listening = {s["name"]: listening_addresses(s["pid"]) for s in state}
        assert {("0.0.0.0", ports.gateway), ("::", ports.gateway)} & listening["gateway"], listening  # the public API
        on = {name: {port for _, port in addrs} for name, addrs in listening.items()}  # on the offset ports
        assert ports.redis in on["redis"] and ports.llm in on["llm"] and ports.playground in on["playground"], on
        assert ports.encoder_http("imu", 1) + 1 in on["imu-encoder-1"], on
        # Redis's append-only file (the job store and the queued batches) is this run dir's, no one else's
        assert any((tmp_path / "run" / "redis").rglob("*.aof")), list((tmp_path / "run").rglob("*"))
        internal = {name: addrs for name, addrs in listening.items() if name not in ("gateway", "worker")}
        assert all(internal.values()) and all(loopback(ip) for ip, _ in set().union(*internal.values())), internal
    finally:
        stopped = modalink("down", "--run-dir", run)
    assert stopped.returncode == 0 and stopped.stdout.count("stopped") == 7
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert "nothing is up" in modalink("ps", "--run-dir", run).stdout


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(address, port) a service's process tree listens on (PyTriton's tritonserver is a child process)."""
    import psutil

    root = psutil.Process(pid)
    return {(c.laddr.ip, c.laddr.port) for p in [root, *root.children(recursive=True)]
            for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}  # fmt: skip


def loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback
