"""Helpers for tests that start real service processes: free ports and readiness waits."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
