"""Claims of the README and the code that no other test exercised (issue 21): gRPC reflection on the services (open
without an API key when keys are set), MODALINK_QUANTIZE=4bit/8bit refused clearly on a CPU, and the first-input
LoRA rule of a prompt with two modalities. Real processes and models, no mocks.

The services are ``hostile_stack``'s (tests/hostile.py: LLM, image/video/audio encoders, gateway, shipped adapters),
plus one gateway of this module's own with API keys."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from procs import Procs, free_port, wait_grpc

from modalink.config import Settings
from modalink.engine import GenerationParams
from modalink.errors import ConfigError

pytestmark = pytest.mark.slow

KEY = "claims-key"


@pytest.fixture(scope="module")
def keyed_gateway(hostile_stack, tmp_path_factory):
    """A gateway with ``MODALINK_API_KEYS`` set, in front of the hostile stack's LLM service."""
    procs = Procs(tmp_path_factory.mktemp("claims-logs"), {**os.environ, "HF_HUB_OFFLINE": "1",
                                                           "MODALINK_NUM_THREADS": "1"})  # fmt: skip
    port = free_port()
    try:
        gateway = procs.start("gateway-keyed",
                              [sys.executable, "-m", "modalink.cli", "serve", "gateway", "--port", str(port),
                               "--http-port", "0", "--host", "127.0.0.1"],
                              {"MODALINK_API_KEYS": KEY, "MODALINK_LLM_ADDRESS": hostile_stack["llm"]})  # fmt: skip
        wait_grpc(f"127.0.0.1:{port}", *gateway)
        yield f"127.0.0.1:{port}"
    finally:
        procs.stop_all()


# --- 1. gRPC reflection -----------------------------------------------------------------------------------------


def reflected(address: str) -> tuple[list[str], object, grpc.Channel]:
    """(services listed, descriptor pool) through grpc_reflection's client, with no metadata at all (no API key)."""
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    channel = grpc.insecure_channel(address)
    db = ProtoReflectionDescriptorDatabase(channel)
    return list(db.get_services()), DescriptorPool(db), channel


@pytest.mark.parametrize("which", ["gateway", "llm", "keyed gateway"])
def test_reflection_lists_and_resolves_the_services_without_an_api_key(hostile_stack, keyed_gateway, which):
    address = keyed_gateway if which == "keyed gateway" else hostile_stack[which]
    services, pool, channel = reflected(address)
    with channel:
        assert "grpc.health.v1.Health" in services and "grpc.reflection.v1alpha.ServerReflection" in services
        name = "modalink.v1.LLM" if which == "llm" else "modalink.v1.Assistant"
        assert name in services, services
        service = pool.FindServiceByName(name)  # the file descriptor and its dependencies, resolved over the wire
        methods = {m.name for m in service.methods}
        assert methods >= ({"Generate", "Info"} if which == "llm" else {"Generate", "Embed", "Caption"}), methods
        if which != "llm":
            assert service.file.package == "modalink.v1"
            generate = service.methods_by_name["Generate"]
            assert generate.input_type.full_name == "modalink.v1.GenerateRequest" and generate.server_streaming
            assert "parts" in generate.input_type.fields_by_name  # message types resolved too, not just names
    if which == "keyed gateway":  # the keys are really on: the API itself refuses the same keyless caller
        from modalink.v1 import assistant_pb2_grpc
        from modalink.wire import assistant_pb2, common_pb2

        with grpc.insecure_channel(address) as ch:
            stub = assistant_pb2_grpc.AssistantStub(ch)
            req = assistant_pb2.GenerateRequest(parts=[common_pb2.Part(text="hi")])
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(req, timeout=30))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


# --- 2. MODALINK_QUANTIZE=4bit / 8bit on a CPU --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_bitsandbytes_quantization_is_refused_on_a_cpu_in_process(mode):
    from modalink.llm import load_llm

    with pytest.raises(ConfigError, match=f"MODALINK_QUANTIZE={mode} needs a CUDA device .*got cpu"):
        load_llm(settings=Settings(quantize=mode, device="cpu"))


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_bitsandbytes_quantization_is_refused_on_a_cpu_by_the_llm_service(mode):
    """``modalink serve llm`` exits at once with code 2 and one ``error:`` line, no traceback, nothing bound."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MODALINK_QUANTIZE": mode, "MODALINK_DEVICE": "cpu"}
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "modalink.cli", "serve", "llm", "--port", str(port), "--http-port", "0"]
    res = subprocess.run([*cmd, "--host", "127.0.0.1"], env=env, capture_output=True, text=True, timeout=180)
    seconds = time.perf_counter() - t0
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert f"error: MODALINK_QUANTIZE={mode} needs a CUDA device (bitsandbytes); got cpu" in res.stderr, out
    assert "Traceback" not in out, out
    assert seconds < 90, seconds  # refused before serving (about 12 s of imports on a busy 2-core machine)


# --- 3. The first-input LoRA rule with two modalities --------------------------------------------------------------

QUESTION = "What is in the inputs?"  # the audio LoRA changes its answer in either order (checked)
PARAMS = GenerationParams(max_new_tokens=16)


@pytest.fixture(scope="module")
def shipped():
    """The in-process assistant on the shipped adapters (audio: stage 2 with a LoRA; image: stage 1, none), its LLM as
    the LLM service runs it on a CPU (fp16-cpu)."""
    from modalink.assistant import Assistant

    assistant = Assistant(Settings(quantize="fp16-cpu", device="cpu"))
    audio_lora = assistant.llm_adapter("audio")
    assert audio_lora, "the shipped audio adapter must be a stage-2 one with a LoRA"
    assert assistant.llm_adapter("image") is None, "the shipped image adapter must be a stage-1 one (no LoRA)"
    return assistant


def prompt_of(assistant, inputs):
    """The prompt the pipeline builds for QUESTION + ``inputs`` (AnyMAL order; its media embeddings rounded to fp16
    as every path, the gateway's included, passes them on)."""
    from modalink.prompt import Message, build_prompt, place_media

    media, _ = assistant.media(inputs)
    return build_prompt(assistant.tokenizer, [Message("user", place_media(QUESTION, media))],
                        assistant.settings.system_prompt)  # fmt: skip


def answers(assistant, prompt) -> dict[str, str]:
    """Greedy answers to ``prompt`` with the audio LoRA and with the bare LLM; they must differ for the test to tell."""
    lora, = assistant.engine.generate([prompt], PARAMS, [assistant.llm_adapter("audio")])  # fmt: skip
    bare, = assistant.engine.generate([prompt], PARAMS, [None])  # fmt: skip
    assert lora.text != bare.text, f"the audio LoRA does not change this answer ({lora.text!r}): nothing to tell"
    return {"lora": lora.text, "bare": bare.text}


ORDERS = {"image first": ("image", "audio"), "audio first": ("audio", "image")}


@pytest.mark.parametrize("order", ORDERS)
def test_the_lora_of_the_first_media_with_one_answers_in_process(shipped, samples, order):
    """Image (no LoRA) and audio (LoRA) in one prompt, either order: the audio LoRA is the one applied (the first
    media part whose adapter has one), not the first part's (none) nor the bare LLM."""
    from modalink import methods

    inputs = [(m, samples[m]) for m in ORDERS[order]]
    expected = answers(shipped, prompt_of(shipped, inputs))
    got = shipped.ask(QUESTION, inputs, PARAMS)
    assert got.text == expected["lora"], (got.text, expected)
    assert list(got.adapters) == list(ORDERS[order])  # the adapter names go to the LLM in prompt order
    names = [f"{m}@{got.adapters[m]}" for m in ORDERS[order]]
    assert methods.choose(shipped.engine, shipped.registry, names) == shipped.llm_adapter("audio")


@pytest.mark.parametrize("order", ORDERS)
def test_the_lora_of_the_first_media_with_one_answers_through_the_gateway(hostile_stack, shipped, samples, order):
    """The same through the gateway and the LLM service."""
    from modalink.v1 import assistant_pb2_grpc
    from modalink.wire import assistant_pb2, common_pb2

    def part(modality: str) -> common_pb2.Part:
        data = Path(samples[modality]).read_bytes()
        if modality == "image":
            return common_pb2.Part(image=common_pb2.Image(data=data, mime="image/png"))
        return common_pb2.Part(audio=common_pb2.Audio(data=data, mime="audio/wav"))

    inputs = [(m, samples[m]) for m in ORDERS[order]]
    expected = answers(shipped, prompt_of(shipped, inputs))
    req = assistant_pb2.GenerateRequest(
        parts=[common_pb2.Part(text=QUESTION), *map(part, ORDERS[order])],
        params=common_pb2.GenerationParams(max_new_tokens=PARAMS.max_new_tokens),
    )
    with grpc.insecure_channel(hostile_stack["gateway"]) as ch:
        chunks = list(assistant_pb2_grpc.AssistantStub(ch).Generate(req, timeout=300))
    assert "".join(c.text for c in chunks) == expected["lora"], expected
