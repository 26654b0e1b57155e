"""The service topology against the in-process path, on one live stack, interleaved, medians of repetitions:

1. service overhead: an image question (greedy, 32 new tokens) through the gateway (image encoder service +
   LLM service) vs the in-process assistant with the same weights: time to first token and total latency
   (target <= 1.15x); each request's picture has new pixels (an 8x8 patch), so neither path is served from a cache
   ("same answers": the two paths answer each picture alike);
2. encoder throughput: 16 concurrent tritonclient gRPC clients against one image-encoder service vs the best
   in-process batched throughput of the same encoder + projector code, measured between the loads of each
   repetition (target >= 0.9x, issue 23), and the same
   service with Triton's dynamic batching on vs off (target >= 2x);
3. scaling: the 16 clients spread over two image-encoder replicas vs one (reported: 2 cores bound it);
4. memory: peak RSS of each service (its process tree: PyTriton's tritonserver counts) at idle and under load.

It also profiles the encoder service, the LLM service and the gateway under load with py-spy (collapsed
stacks in build/bench-profiles/, the hottest frames in the results).

    python bench/serving.py [--reps 3] [--asks 7] [--tokens 32] [--results bench/results]
    python bench/serving.py --smoke   # 2 asks, 1 rep, 4 tokens, 2 clients, short profiles: does it still run?
                                      # (results, run dir and profiles under build/bench-smoke/)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
from _common import (  # noqa: E402
    SMOKE,
    add_options,
    cleaning,
    distinct_picture,
    run_dir,
    stack,
    stop_on_sigterm,
    use_engine,
    write_result,
)

PROFILES = Path("build/bench-profiles")  # a smoke run's: build/bench-smoke/profiles
QUESTION = "What is shown in this picture?"
NO_BATCHING = 8200  # HTTP port of the extra image encoder without dynamic batching (gRPC +1, metrics +2)


class RssSampler:
    """Peak resident memory of each service's process tree, sampled every 50 ms while ``phase`` is set."""

    def __init__(self, pids: dict[str, int]):
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.idle: dict[str, float] = {}
        self.peak: dict[str, float] = dict.fromkeys(pids, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self, name: str) -> float:
        proc = self.procs[name]
        tree = [proc, *proc.children(recursive=True)]
        total = 0
        for p in tree:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total / 2**20

    def measure_idle(self) -> None:
        self.idle = {name: self.rss(name) for name in self.procs}

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for name in self.procs:
                self.peak[name] = max(self.peak[name], self.rss(name))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def ask_gateway(client, image_path: str, tokens: int) -> tuple[float, float, str]:
    """(time to first token, total latency, answer) of one streamed gateway request."""
    from modalink.client import image

    t0, first, text = time.perf_counter(), None, []
    for delta in client.generate([image(image_path), QUESTION], max_new_tokens=tokens):
        first = first or time.perf_counter() - t0
        text.append(delta)
    return first, time.perf_counter() - t0, "".join(text)


def ask_in_process(assistant, image_path: str, tokens: int) -> tuple[float, float, str]:
    from modalink.engine import GenerationParams

    t0, first, text = time.perf_counter(), None, []
    events = assistant.stream(QUESTION, [("image", image_path)], GenerationParams(max_new_tokens=tokens))
    for ev in events:
        if ev.text:
            first = first or time.perf_counter() - t0
            text.append(ev.text)
    return first, time.perf_counter() - t0, "".join(text)


def encoder_load(addresses: list[str], raw: bytes, clients: int, per_client: int) -> float:
    """Items/s of ``clients`` threads, each with its own tritonclient gRPC client, round robin over addresses."""
    import tritonclient.grpc as grpcclient

    data = np.array([[raw]], dtype=object)
    start = threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def client(i: int) -> None:
        c = grpcclient.InferenceServerClient(addresses[i % len(addresses)])
        inp = grpcclient.InferInput("data", [1, 1], "BYTES")
        inp.set_data_from_numpy(data)
        start.wait()
        try:
            for _ in range(per_client):
                c.infer("image_encoder", [inp])
        except BaseException as e:  # reported after the run, not swallowed
            errors.append(e)
        finally:
            c.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]}")
    return clients * per_client / (time.perf_counter() - t0)


def in_process_model():
    """The service's own model code (decode + encode + project), called in this process."""
    from modalink.config import Settings
    from modalink.embedder import Embedder
    from modalink.triton import EncoderModel

    return EncoderModel(Embedder(Settings()), "image")


def in_process_rates(model, raw: bytes, reps: int, sizes: tuple[int, ...] = (1, 8, 16, 32), items: int = 64) -> dict:
    """Items/s of ``model`` (``in_process_model``) by batch size (``items`` per measurement)."""
    rates_by_size = {}
    for size in sizes:
        data = np.array([[raw]] * size, dtype=object)
        model.infer(data)  # warm
        rates = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(max(1, items // size)):
                model.infer(data)
            rates.append(max(1, items // size) * size / (time.perf_counter() - t0))
        rates_by_size[size] = round(statistics.median(rates), 1)
    return rates_by_size


def py_spy(pid: int, seconds: float, name: str) -> subprocess.Popen:
    """Start sampling ``pid`` (all threads, Python frames) for ``seconds`` into build/bench-profiles/<name>.txt."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    PROFILES.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([exe, "record", "--pid", str(pid), "-d", str(int(seconds)), "-r", "100", "--format", "raw",
                             "--nonblocking", "-o", str(PROFILES / f"{name}.txt")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def hottest(name: str, top: int = 6) -> list[dict]:
    """The frames where the sampled process spent its time (self time: the innermost Python frame)."""
    path = PROFILES / f"{name}.txt"
    if not path.exists():
        return []
    counts: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        counts[stack.split(";")[-1].strip()] += int(n)
    total = sum(counts.values()) or 1
    return [{"frame": f, "share": round(c / total, 3)} for f, c in counts.most_common(top)]


@contextlib.contextmanager
def unbatched_encoder(run: Path) -> Iterator[subprocess.Popen]:
    """The same image encoder with Triton's dynamic batching off, in a process group of its own (PyTriton's
    tritonserver is its child), stopped on the way out whatever happens."""
    cmd = [sys.executable, "-m", "modalink.cli", "serve", "encoder", "-m", "image", "--no-dynamic-batching",
           "--host", "127.0.0.1", "--http-port", str(NO_BATCHING), "--grpc-port", str(NO_BATCHING + 1),
           "--metrics-port", str(NO_BATCHING + 2)]  # fmt: skip
    log = run / "logs" / "image-encoder-unbatched.log"
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the unbatched encoder exited: {log.read_text()[-1500:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{NO_BATCHING}/v2/models/image_encoder/ready", timeout=1)
                break
            except OSError:
                if time.time() > deadline:
                    raise TimeoutError("the unbatched encoder did not become ready") from None
                time.sleep(0.5)
        yield proc
    finally:
        with cleaning():
            stop(proc)


def stop(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM to the process group ``proc`` leads, SIGKILL after ``grace`` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each encoder load")
    ap.add_argument("--asks", type=int, default=7, help="requests per path for the overhead row")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--per-client", type=int, default=12, help="requests each encoder client sends")
    add_options(ap, stack=True, engine=True)
    args = ap.parse_args()
    global PROFILES
    sizes, items, profile_s, warm = (1, 8, 16, 32), 64, 6, 2
    if args.smoke:
        args.reps, args.asks, args.tokens, args.clients, args.per_client = 1, 2, 4, 2, 2
        sizes, items, profile_s, warm, PROFILES = (1, 2), 2, 1, 1, SMOKE / "profiles"
    stop_on_sigterm()
    use_engine(args)  # the stack's LLM service and the in-process side run it
    run = run_dir(args, "serving")

    from modalink.assistant import Assistant
    from modalink.client import Client
    from modalink.config import Settings
    from modalink.samples import write_samples

    with stack(run, replicas={"image": 2}, modalities=["image"]) as services, unbatched_encoder(run) as unbatched:
        pids = {s.name: s.pid for s in services if s.name in ("image-encoder-0", "image-encoder-1", "llm", "gateway")}
        pids["image-encoder-unbatched"] = unbatched.pid
        sampler = RssSampler(pids)
        samples = run / "samples"
        image_path = write_samples(samples)["image"]["path"]
        raw = Path(image_path).read_bytes()
        one, two, off = ["127.0.0.1:8001"], ["127.0.0.1:8001", "127.0.0.1:8101"], [f"127.0.0.1:{NO_BATCHING + 1}"]
        # the LLM service's engine and weights (--engine; the transformers engine with fp16-cpu on a CPU)
        assistant = Assistant(Settings(quantize=os.environ.get("MODALINK_QUANTIZE", "fp16-cpu"), engine=args.engine))
        encoder = in_process_model()
        with Client("localhost:50051") as client:
            for _ in range(warm):  # warm every path: lazy loads, first-call allocations
                ask_gateway(client, image_path, args.tokens)
                ask_in_process(assistant, image_path, args.tokens)
            for addresses in (one, two, off):
                encoder_load(addresses, raw, args.clients, 2)
            sampler.measure_idle()
            with sampler:
                overhead: dict[str, list[tuple[float, float]]] = {"gateway": [], "in_process": []}
                answers: dict[int, set[str]] = {}  # per picture: the gateway's and the in-process answer
                for i in range(args.asks):
                    picture = samples / f"ask-{i}.png"  # no cache holds it
                    picture.write_bytes(distinct_picture(image_path, i))
                    picture = str(picture)
                    for path in ("gateway", "in_process") if i % 2 else ("in_process", "gateway"):
                        call = ask_gateway if path == "gateway" else ask_in_process
                        ttft, total, text = call(client if path == "gateway" else assistant, picture, args.tokens)
                        overhead[path].append((ttft, total))
                        answers.setdefault(i, set()).add(text)
                loads: dict[str, list[float]] = {"one": [], "two": [], "off": []}
                in_process: dict[int, list[float]] = {size: [] for size in sizes}
                for rep in range(args.reps):  # the in-process rates between the loads: both see the same noise
                    order = [("one", one), ("in_process", None), ("two", two), ("off", off)]
                    for name, addresses in order if rep % 2 else order[::-1]:
                        if addresses is None:
                            for size, rate in in_process_rates(encoder, raw, 1, sizes, items).items():
                                in_process[size].append(rate)
                        else:
                            loads[name].append(encoder_load(addresses, raw, args.clients, args.per_client))
                # profiles under load (not during the measured runs: sampling costs CPU too)
                spies = [py_spy(pids["image-encoder-0"], profile_s, "image-encoder")]
                encoder_load(one, raw, args.clients, args.per_client * 2)
                spies += [py_spy(pids["llm"], profile_s + 2, "llm"), py_spy(pids["gateway"], profile_s + 2, "gateway")]
                t_end = time.time() + profile_s + 2
                while time.time() < t_end:
                    ask_gateway(client, image_path, args.tokens)
                for spy in spies:
                    spy.wait(timeout=60)
    by_batch = {size: round(statistics.median(rates), 1) for size, rates in in_process.items()}
    best, best_batch = max((v, k) for k, v in by_batch.items())

    med = {p: {"ttft": statistics.median(t for t, _ in v), "total": statistics.median(t for _, t in v)}
           for p, v in overhead.items()}  # fmt: skip
    load_med = {k: statistics.median(v) for k, v in loads.items()}
    ratios = {
        "ttft_gateway_vs_in_process": round(med["gateway"]["ttft"] / med["in_process"]["ttft"], 3),
        "latency_gateway_vs_in_process": round(med["gateway"]["total"] / med["in_process"]["total"], 3),
        "encoder_service_vs_in_process": round(load_med["one"] / best, 3),
        "dynamic_batching_on_vs_off": round(load_med["one"] / load_med["off"], 3),
        "two_replicas_vs_one": round(load_med["two"] / load_med["one"], 3),
    }
    result = {
        "machine": f"{os.cpu_count()} CPU cores, no GPU", "engine": assistant.engine.runtime, "tokens": args.tokens,
        "asks": args.asks,
        "clients": args.clients, "requests_per_load": args.clients * args.per_client, "reps": args.reps,
        "same_answers": all(len(texts) == 1 for texts in answers.values()),
        "overhead_s": {p: {k: round(v, 4) for k, v in m.items()} for p, m in med.items()}, "overhead_runs": overhead,
        "encoder_items_per_s": {**{k: round(v, 1) for k, v in load_med.items()}, "in_process_best": round(best, 1),
                                "in_process_best_batch": best_batch, "in_process_by_batch": by_batch},
        "encoder_runs": loads, "ratios": ratios,
        "targets": {"ttft_gateway_vs_in_process": 1.15, "latency_gateway_vs_in_process": 1.15,
                    "encoder_service_vs_in_process": 0.9, "dynamic_batching_on_vs_off": 2.0},
        "rss_mib": {name: {"idle": round(sampler.idle[name]), "peak": round(sampler.peak[name])} for name in pids},
        "profiles": {name: hottest(name) for name in ("image-encoder", "llm", "gateway")},
    }  # fmt: skip
    write_result(args, "serving", result)
    r, e = ratios, result["encoder_items_per_s"]
    print(f"services (image encoder x2 + unbatched, LLM, gateway; {args.asks} asks, {args.reps} reps):")
    print(
        f"  gateway vs in-process, {args.tokens} tokens: TTFT {med['gateway']['ttft']:.3f} vs "
        f"{med['in_process']['ttft']:.3f} s -> {r['ttft_gateway_vs_in_process']:.2f}x, total "
        f"{med['gateway']['total']:.2f} vs {med['in_process']['total']:.2f} s -> "
        f"{r['latency_gateway_vs_in_process']:.2f}x (target <= 1.15); same answers: {result['same_answers']}"
    )
    print(
        f"  encoder, {args.clients} tritonclient gRPC clients: {e['one']} items/s vs in-process best "
        f"{e['in_process_best']} (batch {best_batch}) -> {r['encoder_service_vs_in_process']:.2f}x (target >= 0.9)"
    )
    print(
        f"  dynamic batching on vs off: {e['one']} vs {e['off']} items/s -> {r['dynamic_batching_on_vs_off']:.2f}x "
        "(target >= 2)"
    )
    print(f"  two replicas vs one: {e['two']} vs {e['one']} items/s -> {r['two_replicas_vs_one']:.2f}x")
    for name, m in result["rss_mib"].items():
        print(f"  RSS {name:<24} idle {m['idle']:>5} MiB, peak under load {m['peak']:>5} MiB")
    for name, frames in result["profiles"].items():
        print(f"  profile {name}: " + "; ".join(f"{f['frame']} {f['share']:.0%}" for f in frames[:3]))


if __name__ == "__main__":
    main()
