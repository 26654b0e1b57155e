"""The service topology as real processes on free loopback ports: two image encoders and an audio encoder on
Triton (PyTriton), the LLM service and the gateway, called with stock clients (tritonclient, grpcio stubs).

They serve the shipped adapters (``adapters/``), so answers are real and must equal the in-process ones. The
LLM runs as ``modalink up`` runs it on a CPU (``MODALINK_QUANTIZE=fp16-cpu``), and so does the in-process one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from procs import ONE_FP16_STEP, Procs, free_port, triton_metric, wait_grpc, wait_triton

from modalink.config import Settings
from modalink.wire import assistant_pb2, common_pb2, from_tensor_msg, llm_pb2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Encoders (image x2, audio), LLM, gateway; yields their addresses; stops them all afterwards."""
    logs = tmp_path_factory.mktemp("logs")
    procs = Procs(
        logs,
        {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "MODALINK_NUM_THREADS": "1",
            "MODALINK_QUANTIZE": "fp16-cpu",
            # no media embedding cache (tests/test_embed_cache.py tests it): these tests count encoder calls per
            # replica and compare the gateway's embeddings with the in-process ones exactly (fp32)
            "MODALINK_EMBED_CACHE_MB": "0",
            "MODALINK_EMBED_CACHE_REDIS": "false",
        },
    )
    modalink = [sys.executable, "-m", "modalink.cli"]

    def start(name: str, args: list[str], extra_env: dict | None = None) -> tuple[subprocess.Popen, Path]:
        return procs.start(name, [*modalink, *args], extra_env)

    encoders: dict[str, list[dict]] = {"image": [], "audio": []}
    try:
        waits = []
        for modality, replicas in (("image", 2), ("audio", 1)):
            for i in range(replicas):
                http, grpc_port, metrics = free_port(), free_port(), free_port()
                proc, log = start(f"{modality}{i}", ["serve", "encoder", "-m", modality, "--http-port", str(http),
                                  "--grpc-port", str(grpc_port), "--metrics-port", str(metrics),
                                  "--max-queue-delay-us", "20000"])  # fmt: skip
                encoders[modality].append({"http": http, "grpc": grpc_port, "metrics": metrics})
                waits.append((http, f"{modality}_encoder", proc, log))
        llm_port, gw_port, tgi_port, http_port = free_port(), free_port(), free_port(), free_port()
        llm = start(
            "llm", ["serve", "llm", "--port", str(llm_port), "--http-port", str(tgi_port), "--max-wait-ms", "50"]
        )
        spec = ",".join(f"{m}=127.0.0.1:{r['grpc']}" for m, reps in encoders.items() for r in reps)
        gateway = start("gateway", ["serve", "gateway", "--port", str(gw_port), "--http-port", str(http_port)],
                        {"MODALINK_ENCODERS": spec, "MODALINK_LLM_ADDRESS": f"127.0.0.1:{llm_port}"})  # fmt: skip
        locked_port = free_port()
        locked_http = free_port()
        locked_args = ["serve", "gateway", "--port", str(locked_port), "--http-port", str(locked_http)]
        locked = start("gateway-locked", locked_args,
                       {"MODALINK_ENCODERS": spec, "MODALINK_LLM_ADDRESS": f"127.0.0.1:{llm_port}",
                        "MODALINK_API_KEYS": "k1,k2"})  # fmt: skip
        for w in waits:
            wait_triton(*w)
        wait_grpc(f"127.0.0.1:{llm_port}", *llm)
        wait_grpc(f"127.0.0.1:{gw_port}", *gateway)
        wait_grpc(f"127.0.0.1:{locked_port}", *locked)
        yield {"encoders": encoders, "llm": f"127.0.0.1:{llm_port}", "gateway": f"127.0.0.1:{gw_port}",
               "tgi": f"http://127.0.0.1:{tgi_port}", "http": f"http://127.0.0.1:{http_port}",
               "locked_http": f"http://127.0.0.1:{locked_http}",
               "locked": f"127.0.0.1:{locked_port}", "logs": logs}  # fmt: skip
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def local():
    """The in-process assistant on the same shipped adapters."""
    from modalink.assistant import Assistant

    return Assistant(Settings(quantize="fp16-cpu"))


@pytest.fixture(scope="module")
def gateway(stack):
    from modalink.v1 import assistant_pb2_grpc

    with grpc.insecure_channel(stack["gateway"]) as ch:
        yield assistant_pb2_grpc.AssistantStub(ch)


def image_part(path) -> common_pb2.Part:
    return common_pb2.Part(image=common_pb2.Image(data=Path(path).read_bytes(), mime="image/png"))


def test_stock_tritonclient_gets_the_in_process_embeddings(stack, local, samples):
    import tritonclient.grpc as tg
    import tritonclient.http as th

    raw = Path(samples["image"]).read_bytes()
    expected, version = local.embed("image", [raw])
    data = np.array([[raw]], dtype=object)
    replica = stack["encoders"]["image"][0]
    for client, mod in ((tg.InferenceServerClient(f"127.0.0.1:{replica['grpc']}"), tg),
                        (th.InferenceServerClient(f"127.0.0.1:{replica['http']}"), th)):  # fmt: skip
        inp = mod.InferInput("data", [1, 1], "BYTES")
        inp.set_data_from_numpy(data)
        res = client.infer("image_encoder", [inp])
        assert res.as_numpy("embeddings").shape == (1, *expected[0].shape)
        np.testing.assert_allclose(res.as_numpy("embeddings")[0], expected[0].numpy(), **ONE_FP16_STEP)
        assert res.as_numpy("adapter_version")[0, 0].decode() == version
        assert not res.as_numpy("error")[0, 0]


def test_a_bad_item_fails_alone_in_a_shared_batch(stack, samples):
    """Good and corrupt images from concurrent clients in one forward pass: only the corrupt ones get an error.

    The batch's composition is made certain, not left to timing: two requests of ``max_batch_size`` (32) good
    images hold the replica's two model instances (``--instances`` 2) by themselves (nothing can join them), and
    the 8 single-image requests sent while they run queue up; Triton's dynamic batcher then hands all 8 to the next
    execution. Triton's counters must show exactly that: 3 executions, 72 items, 10 requests."""
    import tritonclient.grpc as tg

    from modalink.remote import EncoderPool

    replica = stack["encoders"]["image"][1]
    pool = EncoderPool({"image": [f"127.0.0.1:{replica['grpc']}"]})

    def counters() -> dict[str, int]:
        names = ("nv_inference_exec_count", "nv_inference_count", "nv_inference_request_success")
        return {n: triton_metric(replica["metrics"], n, "image_encoder") for n in names}

    good = Path(samples["image"]).read_bytes()
    pool.embed("image", good)  # warm: the first request may load what the rest reuse
    before = counters()
    results: dict[int, object] = {}

    def call(i: int, raw: bytes) -> None:
        try:
            results[i] = pool.embed("image", raw)[0].shape
        except Exception as e:  # noqa: BLE001
            results[i] = e

    config = tg.InferenceServerClient(f"127.0.0.1:{replica['grpc']}").get_model_config("image_encoder").config
    assert [g.count for g in config.instance_group] == [2]  # the service's default: two instances
    blockers = [threading.Thread(target=lambda b=b: results.update({b: pool.embed_batch("image", [good] * 32)}))
                for b in ("blocker0", "blocker1")]  # fmt: skip
    for b in blockers:
        b.start()
    time.sleep(1.0)  # both 32-image requests are running (each takes several seconds on one thread)
    threads = [threading.Thread(target=call, args=(i, good if i % 2 else b"\x89PNG not really")) for i in range(8)]
    for t in threads:
        t.start()
    for t in [*blockers, *threads]:
        t.join()
    for b in ("blocker0", "blocker1"):
        assert all(tuple(out[0].shape) == (8, 576) for out in results.pop(b))
    for i, r in results.items():
        if i % 2:
            assert tuple(r) == (8, 576), r
        else:
            assert "not a decodable image" in str(r) and type(r).__name__ == "InputError", r
    after = counters()
    delta = {n: after[n] - before[n] for n in after}
    # 10 requests, 72 items, 3 forward passes: each 32-image request alone, then the 4 good and 4 corrupt images
    # together (the corrupt ones' errors are per item: every request succeeded).
    assert delta == {"nv_inference_exec_count": 3, "nv_inference_count": 72, "nv_inference_request_success": 10}, delta


def test_gateway_streams_the_in_process_answer(gateway, local, samples):
    question = "What is shown in this picture?"
    request = assistant_pb2.GenerateRequest(
        parts=[image_part(samples["image"]), common_pb2.Part(text=question)],
        params=common_pb2.GenerationParams(max_new_tokens=24),
    )
    chunks = list(gateway.Generate(request, timeout=120))
    text = "".join(c.text for c in chunks)
    expected = local.ask(question, [("image", samples["image"])], local_params(24))
    assert text == expected.text and text.strip()
    assert chunks[0].adapter_versions["image"] == expected.adapters["image"]
    assert chunks[-1].finish_reason == expected.finish_reason
    assert chunks[-1].usage.prompt_tokens == expected.usage["prompt_tokens"]
    assert chunks[-1].usage.completion_tokens == expected.usage["completion_tokens"]
    assert len(chunks) > 2  # streamed token by token, not in one piece


def test_a_stage_two_adapter_answers_through_its_lora(gateway, local, stack, samples):
    """Audio's shipped adapter has a LoRA: the LLM service loads it from the registry and answers as in-process."""
    from modalink.v1 import llm_pb2_grpc

    question = "What does the voice say?"
    part = common_pb2.Part(audio=common_pb2.Audio(data=Path(samples["audio"]).read_bytes(), mime="audio/wav"))
    request = assistant_pb2.GenerateRequest(parts=[common_pb2.Part(text=question), part],
                                            params=common_pb2.GenerationParams(max_new_tokens=16))  # fmt: skip
    adapter = local.llm_adapter("audio")
    assert adapter, "the shipped audio adapter must be a stage-2 one with a LoRA (this test is about serving it)"
    text = "".join(c.text for c in gateway.Generate(request, timeout=120))
    assert text == local.ask(question, [("audio", samples["audio"])], local_params(16)).text
    with grpc.insecure_channel(stack["llm"]) as ch:
        info = llm_pb2_grpc.LLMStub(ch).Info(llm_pb2.InfoRequest(), timeout=10)
    assert adapter in info.adapters, (adapter, list(info.adapters))


def test_embed_and_caption(gateway, local, samples):
    res = gateway.Embed(assistant_pb2.EmbedRequest(part=image_part(samples["image"])), timeout=60)
    expected, version = local.embed("image", [samples["image"]])
    # every path rounds embeddings as the embedding cache keeps them at rest (fp16 by default): the in-process ones
    # are fp16 values, and the gateway's within one fp16 step of them (a value on a rounding boundary in one process
    # may round the other way in another)
    expected = expected[0].numpy()
    assert np.array_equal(expected, expected.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(from_tensor_msg(res.embeddings), expected, **ONE_FP16_STEP)
    assert (res.adapter_version, res.modality) == (version, "image")
    cap = gateway.Caption(assistant_pb2.CaptionRequest(part=image_part(samples["image"])), timeout=120)
    assert cap.caption and cap.modality == "image"


@pytest.mark.parametrize(
    "part, message",
    [
        (common_pb2.Part(image=common_pb2.Image(data=b"GIF89a broken")), "image"),
        (common_pb2.Part(imu=common_pb2.Imu(data=common_pb2.Tensor(dtype="float32", shape=[6, 10], data=b"x"))),
         "needs 240 bytes"),
        (common_pb2.Part(), "empty part"),
    ],
)  # fmt: skip
def test_bad_input_is_invalid_argument_and_the_gateway_keeps_serving(gateway, samples, part, message):
    with pytest.raises(grpc.RpcError) as err:
        list(gateway.Generate(assistant_pb2.GenerateRequest(parts=[part]), timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    ok = gateway.Embed(assistant_pb2.EmbedRequest(part=image_part(samples["image"])), timeout=60)
    assert ok.embeddings.shape == [8, 576]


def test_unconfigured_modality_and_bad_params_are_refused(gateway, samples):
    zeros = common_pb2.Tensor(dtype="float32", shape=[6, 100], data=np.zeros((6, 100), np.float32).tobytes())
    imu = common_pb2.Part(imu=common_pb2.Imu(data=zeros))
    with pytest.raises(grpc.RpcError) as err:
        gateway.Embed(assistant_pb2.EmbedRequest(part=imu), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no encoder service" in err.value.details()
    bad = assistant_pb2.GenerateRequest(parts=[common_pb2.Part(text="hi")],
                                        params=common_pb2.GenerationParams(temperature=-1))  # fmt: skip
    with pytest.raises(grpc.RpcError) as err:
        list(gateway.Generate(bad, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in err.value.details()


def test_both_image_replicas_receive_traffic(gateway, stack, samples):
    before = [
        triton_metric(r["metrics"], "nv_inference_request_success", "image_encoder") for r in stack["encoders"]["image"]
    ]
    for _ in range(4):
        gateway.Embed(assistant_pb2.EmbedRequest(part=image_part(samples["image"])), timeout=60)
    after = [
        triton_metric(r["metrics"], "nv_inference_request_success", "image_encoder") for r in stack["encoders"]["image"]
    ]
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 2]


def test_concurrent_requests_share_llm_batches(gateway, stack):
    from modalink.v1 import llm_pb2_grpc

    with grpc.insecure_channel(stack["llm"]) as ch:
        llm = llm_pb2_grpc.LLMStub(ch)
        before = llm.Info(llm_pb2.InfoRequest(), timeout=10)
        questions = ["Name a color.", "Name a fruit.", "Name an animal.", "Name a city."]
        answers: dict[str, str] = {}

        def ask(q: str) -> None:
            req = assistant_pb2.GenerateRequest(parts=[common_pb2.Part(text=q)],
                                                params=common_pb2.GenerationParams(max_new_tokens=8))  # fmt: skip
            answers[q] = "".join(c.text for c in gateway.Generate(req, timeout=120))

        threads = [threading.Thread(target=ask, args=(q,)) for q in questions]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = llm.Info(llm_pb2.InfoRequest(), timeout=10)
    assert all(answers.get(q) for q in questions), answers
    batches, requests = after.batches - before.batches, after.batched_requests - before.batched_requests
    assert requests == 4 and batches < 4, (batches, requests)  # at least two requests shared a batch


LONG = assistant_pb2.GenerateRequest(parts=[common_pb2.Part(text="Write a long story about a dragon.")],
                                     params=common_pb2.GenerationParams(max_new_tokens=300))  # fmt: skip


def tokens_made_while(gateway, stack, abandon) -> int:
    """Tokens the LLM service generated while ``abandon`` started LONG and gave it up, plus one short request
    served after it. Left alone, LONG runs to its 300-token limit (greedy)."""
    from modalink.v1 import llm_pb2_grpc

    with grpc.insecure_channel(stack["llm"]) as ch:
        llm = llm_pb2_grpc.LLMStub(ch)
        before = llm.Info(llm_pb2.InfoRequest(), timeout=10).generated_tokens
        abandon()
        short = assistant_pb2.GenerateRequest(parts=[common_pb2.Part(text="Say hi.")],
                                              params=common_pb2.GenerationParams(max_new_tokens=4))  # fmt: skip
        assert "".join(c.text for c in gateway.Generate(short, timeout=120))  # served after the abandoned one
        return llm.Info(llm_pb2.InfoRequest(), timeout=10).generated_tokens - before


def test_client_cancel_stops_the_generation(gateway, stack):
    def cancel() -> None:
        call = gateway.Generate(LONG, timeout=120)
        next(call)
        call.cancel()

    generated = tokens_made_while(gateway, stack, cancel)
    assert generated < 100, generated  # the cancelled request stopped long before its 300 tokens


def test_python_client_sync_async_and_cli(stack, local, samples):
    import asyncio

    from modalink import client

    question = "What is shown in this picture?"
    expected = local.ask(question, [("image", samples["image"])], local_params(16)).text
    with client.Client(stack["gateway"]) as c:
        assert c.ask([question, client.image(samples["image"])], max_new_tokens=16) == expected
        assert c.versions["image"] == local.projector("image")[1] and c.last.finish_reason
        emb = c.embed(client.image(samples["image"]))
        assert emb.embeddings.shape == (8, 576) and emb.modality == "image"

    async def run() -> str:
        async with client.AsyncClient(stack["gateway"]) as c:
            return await c.ask([question, client.image(samples["image"])], max_new_tokens=16)

    assert asyncio.run(run()) == expected
    cmd = [sys.executable, "-m", "modalink.cli", "ask", "--remote", stack["gateway"], "-i", samples["image"], question]
    out = subprocess.run([*cmd, "-n", "16"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected.strip()


def test_api_keys_are_required_when_configured(stack, samples):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from modalink import client

    with client.Client(stack["locked"]) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.ask("Say hi.", max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            c.embed(client.image(samples["image"]))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(c.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no key
    with client.Client(stack["locked"], api_key="k2") as c:
        assert c.ask("Say hi.", max_new_tokens=2)


def local_params(n: int):
    from modalink.engine import GenerationParams

    return GenerationParams(max_new_tokens=n)


def test_encoder_hot_reloads_a_promoted_adapter_without_failing_requests(tmp_path, samples):
    """Promote a new IMU version while requests stream in: they all succeed and switch to it."""
    import shutil

    from modalink.registry import AdapterRegistry
    from modalink.remote import EncoderPool

    adapters = tmp_path / "adapters"
    shutil.copytree(Settings().adapters_dir, adapters, ignore=shutil.ignore_patterns("image", "audio", "video"))
    registry = AdapterRegistry(adapters)
    old = registry.current("imu")
    http, grpc_port, metrics = free_port(), free_port(), free_port()
    log = tmp_path / "imu.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "modalink.cli", "serve", "encoder", "-m", "imu", "--http-port", str(http),
         "--grpc-port", str(grpc_port), "--metrics-port", str(metrics)],
        env={**os.environ, "MODALINK_ADAPTERS_DIR": str(adapters), "MODALINK_NUM_THREADS": "1"},
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_triton(http, "imu_encoder", proc, log)
        pool = EncoderPool({"imu": [f"127.0.0.1:{grpc_port}"]})
        x = np.load(samples["imu"])
        seen, errors, stop = [], [], threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                try:
                    emb, version = pool.embed("imu", x)
                    seen.append((version, emb))
                except Exception as e:  # noqa: BLE001
                    errors.append(e)

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            deadline = time.time() + 60
            while len(seen) < 5 and not errors and time.time() < deadline:
                time.sleep(0.05)
            assert len(seen) >= 5, f"IMU encoder: {len(seen)} of 5 first answers (60 s deadline); errors: {errors[:3]}"
            projector = registry.load("imu")[0]
            with torch.no_grad():
                for p in projector.parameters():
                    p.mul_(-1.0)  # a visibly different adapter
            weights = registry.load("imu", old)[2].get("encoder_weights")
            new = registry.publish("imu", projector, promote=True, extra={"encoder_weights": weights})
            deadline = time.time() + 60
            while not any(v == new for v, _ in seen[-3:]) and time.time() < deadline:
                time.sleep(0.1)
        finally:
            stop.set()
            for t in threads:
                t.join()
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a loaded machine: cleanup, not what this test is about
            os.killpg(proc.pid, 9)
            proc.wait(timeout=30)
    assert not errors, errors[:3]
    versions = [v for v, _ in seen]
    assert versions[0] == old and versions[-1] == new, (old, new, versions[-5:])
    first_new = versions.index(new)
    assert set(versions[first_new:]) == {new}  # switched once, never back
    assert (seen[-1][1] - seen[0][1]).abs().max() > 0.1  # the new projector's embeddings, not the old ones


def test_a_one_frame_video_is_one_token_through_the_video_encoder_service(tmp_path, samples):
    """The shipped video adapter does not stretch: a still image sent as a video is one frame token, the demo clip
    eight. Batched in one Triton request the short item's rows past its ``tokens`` are zero padding, and the gateway's
    pool trims them: each item's embeddings equal the in-process ones, of their own length."""
    import tritonclient.grpc as tg

    from modalink.embedder import Embedder
    from modalink.remote import EncoderPool

    settings = Settings()
    local = Embedder(settings)
    assert local.projector("video")[0].cfg.stretch is False
    still, clip = Path(samples["image"]).read_bytes(), Path(samples["video"]).read_bytes()
    expected, version = local.embed("video", [still, clip])
    assert [len(e) for e in expected] == [1, 8]
    http, grpc_port, metrics = free_port(), free_port(), free_port()
    log = tmp_path / "video.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "modalink.cli", "serve", "encoder", "-m", "video", "--http-port", str(http),
         "--grpc-port", str(grpc_port), "--metrics-port", str(metrics)],
        env={**os.environ, "MODALINK_NUM_THREADS": "1"}, stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_triton(http, "video_encoder", proc, log)
        inp = tg.InferInput("data", [2, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[still], [clip]], dtype=object))
        res = tg.InferenceServerClient(f"127.0.0.1:{grpc_port}").infer("video_encoder", [inp])
        embs, tokens = res.as_numpy("embeddings"), res.as_numpy("tokens")
        assert embs.shape == (2, 8, expected[1].shape[1]) and tokens[:, 0].tolist() == [1, 8]
        assert not embs[0, 1:].any()  # padding
        for row, n, e in zip(embs, tokens[:, 0], expected, strict=True):
            np.testing.assert_allclose(row[:n], e.numpy(), **ONE_FP16_STEP)
        pool = EncoderPool({"video": [f"127.0.0.1:{grpc_port}"]})
        for raw, e in ((still, expected[0]), (clip, expected[1])):
            emb, served = pool.embed("video", raw)
            assert emb.shape == e.shape and served == version
            torch.testing.assert_close(emb, e, **ONE_FP16_STEP)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


def test_stock_text_generation_client_against_the_tgi_api(stack, engine):
    """The PyPI ``text-generation`` client, unchanged: generate, stream, chat; same text as the engine."""
    import json as _json
    import urllib.error
    import urllib.request

    from text_generation import Client as TGIClient

    from modalink.engine import GenerationParams

    tgi = TGIClient(stack["tgi"], timeout=120)
    prompt = "The capital of France is"
    expected = engine.generate([[prompt]], GenerationParams(max_new_tokens=8))[0]
    res = tgi.generate(prompt, max_new_tokens=8)
    assert res.generated_text == expected.text
    assert res.details.generated_tokens == len(expected.token_ids)
    assert [t.id for t in res.details.tokens] == expected.token_ids
    streamed = list(tgi.generate_stream(prompt, max_new_tokens=8))
    assert "".join(r.token.text for r in streamed if not r.token.special) == expected.text
    assert streamed[-1].generated_text == expected.text and streamed[-1].details.finish_reason.value in (
        "length", "eos_token")  # fmt: skip
    chat = tgi.chat(messages=[{"role": "user", "content": "Say hello."}], max_tokens=8)
    assert chat.choices[0].message.content and chat.usage["completion_tokens"] <= 8
    chunks = list(tgi.chat(messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content

    def post(path: str, body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(stack["tgi"] + path, _json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, _json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, _json.loads(e.read())

    status, body = post("/generate", {"inputs": "hi", "parameters": {"temperature": -2}})
    assert status == 422 and "temperature" in body["error"] and body["error_type"] == "validation"
    status, body = post("/generate", {"inputs": ""})
    assert status == 422 and "inputs" in body["error"]
    status, body = post("/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
    assert status == 200 and body["generated_text"]  # still serving
    info = _json.loads(urllib.request.urlopen(stack["tgi"] + "/info", timeout=10).read())
    assert info["model_id"] == "smollm2-135m-instruct" and info["max_total_tokens"] > 0
    assert urllib.request.urlopen(stack["tgi"] + "/health", timeout=10).status == 200
    metrics = urllib.request.urlopen(stack["tgi"] + "/metrics", timeout=10).read().decode()
    assert re.search(r"^modalink_llm_batches_total \d", metrics, re.M), metrics[:500]

    def prefix_metric(name: str) -> float:
        text = urllib.request.urlopen(stack["tgi"] + "/metrics", timeout=10).read().decode()
        return float(re.search(rf"^modalink_llm_prefix_cache_{name} ([0-9.e+-]+)$", text, re.M).group(1))

    # the same long prompt twice: the second prefills only its last position (the KV prefix cache, on /metrics)
    long = {"inputs": "Describe, in one short sentence, a quiet morning in a small town by the sea. " * 2,
            "parameters": {"max_new_tokens": 2}}  # fmt: skip
    assert post("/generate", long)[0] == 200
    hits, reused = prefix_metric("hits_total"), prefix_metric("reused_tokens_total")
    assert post("/generate", long)[0] == 200
    assert prefix_metric("hits_total") == hits + 1 and prefix_metric("reused_tokens_total") - reused >= 16
    assert prefix_metric("bytes") > 0


def test_openai_client_against_the_gateway(stack, local, samples):
    import base64

    import openai

    question = "What is shown in this picture?"
    png = base64.b64encode(Path(samples["image"]).read_bytes()).decode()
    content = [{"type": "text", "text": question},
               {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}]  # fmt: skip
    expected = local.ask(question, [("image", samples["image"])], local_params(16)).text
    client = openai.OpenAI(base_url=stack["http"] + "/v1", api_key="unused", timeout=120)
    res = client.chat.completions.create(model="modalink", messages=[{"role": "user", "content": content}],
                                         max_tokens=16)  # fmt: skip
    assert res.choices[0].message.content == expected
    assert res.usage.completion_tokens > 0 and "image@" in res.system_fingerprint
    chunks = list(client.chat.completions.create(model="modalink", messages=[{"role": "user", "content": content}],
                                                 max_tokens=16, stream=True))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")

    wav = base64.b64encode(Path(samples["audio"]).read_bytes()).decode()
    audio_q = "What does the voice say?"
    sound = {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}
    res = client.chat.completions.create(model="modalink", max_tokens=16, messages=[
        {"role": "user", "content": [{"type": "text", "text": audio_q}, sound]}])  # fmt: skip
    assert res.choices[0].message.content == local.ask(audio_q, [("audio", samples["audio"])], local_params(16)).text

    for url, message in (("https://example.com/cat.png", "data: URL"), ("data:image/png;base64,%%%", "base64"),
                         ("data:image/png;base64,aGVsbG8=", "image")):  # fmt: skip
        bad = {"type": "image_url", "image_url": {"url": url}}
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="modalink", max_tokens=4,
                                           messages=[{"role": "user", "content": [bad]}])  # fmt: skip
        assert message in str(err.value)
    locked = openai.OpenAI(base_url=stack["locked_http"] + "/v1", api_key="wrong", timeout=60)
    with pytest.raises(openai.AuthenticationError):
        locked.chat.completions.create(model="modalink", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    ok = openai.OpenAI(base_url=stack["locked_http"] + "/v1", api_key="k1", timeout=60)
    assert ok.chat.completions.create(model="modalink", messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def test_gateway_metrics_count_grpc_http_and_encoder_calls(gateway, stack, samples):
    import urllib.request

    def scrape() -> str:
        return urllib.request.urlopen(stack["http"] + "/metrics", timeout=10).read().decode()

    def value(text: str, pattern: str) -> float:
        m = re.search(pattern + r" ([0-9.e+]+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    ok = r'modalink_requests_total\{api="grpc",code="OK",method="Embed"\}'
    bad = r'modalink_requests_total\{api="grpc",code="INVALID_ARGUMENT",method="Embed"\}'
    calls = r'modalink_encoder_call_seconds_count\{modality="image"\}'
    before = scrape()
    gateway.Embed(assistant_pb2.EmbedRequest(part=image_part(samples["image"])), timeout=60)
    with pytest.raises(grpc.RpcError):
        gateway.Embed(assistant_pb2.EmbedRequest(part=common_pb2.Part(text="no")), timeout=60)
    after = scrape()
    assert value(after, ok) == value(before, ok) + 1
    assert value(after, bad) == value(before, bad) + 1
    assert value(after, calls) == value(before, calls) + 1


def test_a_deadline_reaches_the_llm(gateway, stack):
    """A client deadline ends the call with DEADLINE_EXCEEDED and stops the generation behind it."""

    def expire() -> None:
        with pytest.raises(grpc.RpcError) as err:
            list(gateway.Generate(LONG, timeout=2.0))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(3)  # let the LLM service notice

    generated = tokens_made_while(gateway, stack, expire)
    assert generated < 100, generated  # not the 300 the expired request asked for


def test_an_unavailable_replica_is_skipped(stack, samples):
    """A replica that refuses connections, and one whose Triton is up without the model loaded (NOT_FOUND: a pod
    still loading it, or retrying a failed load; the audio encoder's Triton stands in for it), are skipped."""
    from modalink.remote import EncoderPool

    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    not_loaded = f"127.0.0.1:{stack['encoders']['audio'][0]['grpc']}"  # serves audio_encoder, not image_encoder
    live = f"127.0.0.1:{stack['encoders']['image'][0]['grpc']}"
    pool = EncoderPool({"image": [dead, not_loaded, live]}, retries=1)
    raw = Path(samples["image"]).read_bytes()
    assert [tuple(pool.embed("image", raw)[0].shape) for _ in range(4)] == [(8, 576)] * 4
    with pytest.raises(ConnectionError, match="every image encoder replica is unavailable"):
        EncoderPool({"image": [dead]}, retries=1).embed("image", raw)


def test_the_charts_encoder_probes_pass_only_with_the_model_loaded(stack):
    """The chart's startup and readiness probes ask for the model, not the server: Triton's /v2/health/ready says
    200 with no model loaded, and a pod ready that early gets requests it answers NOT_FOUND. The audio encoder's
    Triton stands in for an image encoder whose model is not loaded."""
    import urllib.error
    import urllib.request

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "charts"))
    import validate

    pod = next(o for o in validate.render() if o["kind"] == "Deployment" and o["metadata"]["name"].endswith(
        "image-encoder"))["spec"]["template"]["spec"]["containers"][0]  # fmt: skip

    def status(port: int, path: str) -> int:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10).status
        except urllib.error.HTTPError as e:
            return e.code

    loaded, not_loaded = stack["encoders"]["image"][0]["http"], stack["encoders"]["audio"][0]["http"]
    assert status(not_loaded, "/v2/health/ready") == 200  # what the probes asked before: no help
    for probe in ("startupProbe", "readinessProbe"):
        path = pod[probe]["httpGet"]["path"]
        assert status(loaded, path) == 200, path
        assert status(not_loaded, path) != 200, path


def test_history_continues_the_conversation_as_in_process(stack, local):
    from modalink import client
    from modalink.prompt import Message

    history = [("user", "My name is Ada and I like green tea."), ("assistant", "Nice to meet you, Ada!")]
    with client.Client(stack["gateway"]) as c:
        remote = c.ask("What is my name?", max_new_tokens=12, history=history)
        without = c.ask("What is my name?", max_new_tokens=12)
    events = local.stream("What is my name?", [], local_params(12), [Message(r, [t]) for r, t in history])
    assert remote == "".join(ev.text for ev in events)
    assert remote != without  # the history reached the LLM
    with client.Client(stack["gateway"]) as c, pytest.raises(grpc.RpcError) as err:
        c.ask("Hi.", max_new_tokens=2, history=[("robot", "beep")])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "history[0]: role" in err.value.details()


def test_adapters_are_listed_and_promotion_needs_an_api_key(stack, local):
    from modalink import MODALITIES, client

    with client.Client(stack["gateway"]) as c:
        table = c.adapters()
        assert set(table) == set(MODALITIES)  # the built-ins and the installed plugins (power)
        image = table["image"]
        assert image["current"] == local.projector("image")[1]
        assert [v["version"] for v in image["versions"] if v["current"]] == [image["current"]]
        assert all("val_accuracy" in v["metrics"] for v in image["versions"])
        with pytest.raises(grpc.RpcError) as err:  # this gateway has no keys: nobody may promote
            c.promote("image", image["versions"][0]["version"])
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "API key" in err.value.details()
        assert c.adapters("image")["image"]["current"] == image["current"]


def test_earlier_turns_media_are_sent_again_and_read_as_in_process(stack, local, samples):
    """The gateway keeps no conversation: a follow-up carries the first turn's picture, which is encoded again
    and placed in that turn, giving the in-process answer to the same conversation."""
    from modalink import client
    from modalink.prompt import Message, place_media

    question, follow_up = "What is shown in this picture?", "Is it something you wear?"
    with client.Client(stack["gateway"]) as c:
        first = c.ask([question, client.image(samples["image"])], max_new_tokens=16)
        history = [("user", question, [client.image(samples["image"])]), ("assistant", first)]
        second = c.ask(follow_up, max_new_tokens=16, history=history)
        assert c.versions == {"image": local.projector("image")[1]}  # the history's picture was encoded
        blind = c.ask(follow_up, max_new_tokens=16, history=[("user", question), ("assistant", first)])
    media, _ = local.media([("image", samples["image"])])
    turns = [Message("user", place_media(question, media)), Message("assistant", [first])]
    events = local.stream(follow_up, [], local_params(16), turns)
    assert second == "".join(ev.text for ev in events)
    assert second != blind  # without its picture the turn reads differently


def test_the_encoder_service_starts_triton_again_when_its_instances_race(monkeypatch):
    """PyTriton's second model instance can connect to the first's config socket between its bind and listen (a
    loaded machine, several services starting): the load fails with that traceback, and the service starts Triton
    again instead of exiting. The race cannot be provoked on demand, so a stand-in Triton fails the first load."""
    from modalink_services.encoder import server
    from tritonclient.utils import InferenceServerException

    started: list[list] = []

    class RacingTriton:
        def __init__(self, config):
            self.config, self.bound = config, []
            started.append(self.bound)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, **kw):
            if len(started) == 1:
                raise InferenceServerException("load failed for model 'imu_encoder': ... in get_config_from_"
                                               "handshake_server ... ConnectionRefusedError: [Errno 111]")  # fmt: skip
            self.bound.append(len(kw["infer_func"]))

        def serve(self):
            pass

    monkeypatch.setattr(server, "Triton", RacingTriton)
    monkeypatch.setattr(server.signal, "signal", lambda *a: None)
    server.serve("imu", Settings(num_threads=1), 1, 2, 3)
    assert started == [[], [2]]  # the first start failed its load, the second bound the model's two instances
    started.clear()

    def other_failure(self, **kw):
        raise InferenceServerException("load failed for model 'imu_encoder': out of memory")

    monkeypatch.setattr(RacingTriton, "bind", other_failure)
    with pytest.raises(InferenceServerException, match="out of memory"):
        server.serve("imu", Settings(num_threads=1), 1, 2, 3)
    assert len(started) == 1  # any other load failure is not retried
