"""What the hostile-input tests share: one stack of real services (the LLM service, image, video and audio encoders
and a gateway as processes on free loopback ports), a sampler of their resident memory, and ``hostile()``, which
sends one request, records its figures (``build/reliability/hostile-*.json``) and checks the bounds: memory growth
under 300 MiB and an answer to the next good request."""

from __future__ import annotations

import http.client
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import grpc
import psutil
from procs import Procs, free_port, record_figures, wait_grpc, wait_triton

from modalink.v1 import assistant_pb2_grpc
from modalink.wire import assistant_pb2, common_pb2

BIG = 8 << 20  # 8 MB of text: what made the LLM service grow by 18 GB before the bounds
MIB = 1 << 20


def start_stack(tmp_path_factory):
    """The LLM service (gRPC + TGI HTTP), image, video and audio encoder services and a gateway (gRPC + OpenAI
    HTTP) with the input safety filter on."""
    logs = tmp_path_factory.mktemp("hostile-logs")
    procs = Procs(logs, {**os.environ, "HF_HUB_OFFLINE": "1", "MODALINK_NUM_THREADS": "1",
                         "MODALINK_QUANTIZE": "fp16-cpu"})  # fmt: skip
    cli = [sys.executable, "-m", "modalink.cli", "serve"]
    llm_port, tgi, gw_port, http = free_port(), free_port(), free_port(), free_port()
    try:
        llm = procs.start("llm", [*cli, "llm", "--port", str(llm_port), "--http-port", str(tgi)])
        encoders = {}  # modality: (http port, grpc port, (process, log))
        for modality in ("image", "video", "audio"):
            enc_http, enc_grpc, enc_metrics = free_port(), free_port(), free_port()
            encoders[modality] = (enc_http, enc_grpc, procs.start(modality, [
                *cli, "encoder", "-m", modality, "--http-port", str(enc_http), "--grpc-port", str(enc_grpc),
                "--metrics-port", str(enc_metrics)]))  # fmt: skip
        addresses = ",".join(f"{m}=127.0.0.1:{grpc_port}" for m, (_, grpc_port, _) in encoders.items())
        gateway = procs.start("gateway", [*cli, "gateway", "--port", str(gw_port), "--http-port", str(http)],
                              {"MODALINK_ENCODERS": addresses, "MODALINK_SAFETY_INPUT": "1",
                               "MODALINK_LLM_ADDRESS": f"127.0.0.1:{llm_port}"})  # fmt: skip
        for modality, (enc_http, _, proc) in encoders.items():
            wait_triton(enc_http, f"{modality}_encoder", *proc)
        wait_grpc(f"127.0.0.1:{llm_port}", *llm)
        wait_grpc(f"127.0.0.1:{gw_port}", *gateway)
        yield {"gateway": f"127.0.0.1:{gw_port}", "http": f"http://127.0.0.1:{http}", "llm": f"127.0.0.1:{llm_port}",
               "tgi": f"http://127.0.0.1:{tgi}",
               "pids": {"gateway": gateway[0].pid, "llm": llm[0].pid,
                        **{f"{m} encoder": proc[0].pid for m, (_, _, proc) in encoders.items()}}}  # fmt: skip
    finally:
        procs.stop_all()


class PeakMemory:
    """Peak resident-memory growth of each service's process tree while a request is handled (sampled)."""

    def __init__(self, pids: dict[str, int]):
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.base = {name: self._rss(p) for name, p in self.procs.items()}
        self.peak = dict(self.base)
        self._stop = threading.Event()

    @staticmethod
    def _rss(p: psutil.Process) -> int:
        return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)])

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for name, p in self.procs.items():
                self.peak[name] = max(self.peak[name], self._rss(p))

    def __enter__(self) -> PeakMemory:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def growth_mib(self) -> dict[str, float]:
        return {name: round((self.peak[name] - self.base[name]) / MIB, 1) for name in self.procs}


def hostile(stack, case: str, call) -> tuple[str, str]:
    """Send one hostile request; (status, message). Records the figures and checks the bounds."""
    with PeakMemory(stack["pids"]) as mem:
        t0 = time.perf_counter()
        status, message = call()
        seconds = time.perf_counter() - t0
    growth = mem.growth_mib()
    record_figures(f"hostile-{case}", status=status, seconds=round(seconds, 3), rss_growth_mib=growth,
                   message=message[:160])  # fmt: skip
    assert all(g < 300 for g in growth.values()), (case, growth)
    assert good_answer(stack), f"no answer to a good request after {case}"
    return status, message


def good_answer(stack) -> bool:
    with grpc.insecure_channel(stack["gateway"]) as ch:
        req = assistant_pb2.GenerateRequest(parts=[common_pb2.Part(text="Say hi.")],
                                            params=common_pb2.GenerationParams(max_new_tokens=4))  # fmt: skip
        return bool("".join(m.text for m in assistant_pb2_grpc.AssistantStub(ch).Generate(req, timeout=120)))


def grpc_status(fn) -> tuple[str, str]:
    try:
        fn()
    except grpc.RpcError as e:
        return e.code().name, e.details()
    return "OK", ""


def http_status(url: str, body: dict) -> tuple[str, str]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as res:
            return str(res.status), res.read().decode()[:500]
    except urllib.error.HTTPError as e:
        return str(e.code), e.read().decode()[:500]


def generate(stack, text: str, history=(), max_new_tokens: int = 4):
    with grpc.insecure_channel(stack["gateway"], options=[("grpc.max_send_message_length", 64 * MIB)]) as ch:
        req = assistant_pb2.GenerateRequest(
            parts=[common_pb2.Part(text=text)],
            history=list(history),
            params=common_pb2.GenerationParams(max_new_tokens=max_new_tokens),
        )
        return list(assistant_pb2_grpc.AssistantStub(ch).Generate(req, timeout=300))


def send_body(url: str, kind: str) -> tuple[str, str]:
    """POST a body that declares 1 GB and sends almost nothing (``declared``), or 80 MiB chunked without a length
    (``chunked``); (status, body) of the answer."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.putrequest("POST", u.path)
    conn.putheader("content-type", "application/json")
    if kind == "declared":
        conn.putheader("content-length", str(1 << 30))
        conn.endheaders(b'{"messages": [')  # and nothing more: the server must not wait for the rest
    else:
        conn.putheader("transfer-encoding", "chunked")
        conn.endheaders()
        chunk = b" " * (1 << 20)
        try:
            for _ in range(80):  # 80 MiB, past the 64 MiB limit
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            conn.send(b"0\r\n\r\n")
        except OSError:  # the server answered and closed while the body was still coming: what is wanted
            pass
    res = conn.getresponse()
    return str(res.status), res.read().decode()
