"""Optional safety filters (``modalink.safety``): the blocklist, the streamed-output holdback, the media hook, and
the same refusals from the in-process assistant and the gateway (gRPC and OpenAI HTTP, real processes)."""

from __future__ import annotations

import io
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from PIL import Image
from procs import Procs, free_port, wait_grpc
from prometheus_client import REGISTRY

from modalink.config import Settings
from modalink.engine import GenerationParams
from modalink.errors import ConfigError
from modalink.safety import CONTENT_FILTER, DEFAULT_BLOCKLIST, SafetyFilter, load_blocklist, load_media_check

REFUSAL = "I can't help with that request."
QUESTION = "What is the capital of France?"  # the small LLM answers "The capital of France is Paris." (greedy)
BLOCKLIST = "# test blocklist\n\nhow to make a bomb\n# a phrase the LLM will say:\nfrance is paris\n"


def flag_images(modality: str, raw) -> str | None:
    """The media hook under test (``test_safety:flag_images``): a stand-in classifier that decodes the image it
    gets and flags every one, naming what it saw, so the tests can tell the real bytes arrived."""
    if modality != "image":
        return None
    img = Image.open(io.BytesIO(raw))
    return f"test classifier flagged a {img.width}x{img.height} {img.mode} image"


def refusals(stage: str) -> float:
    return REGISTRY.get_sample_value("modalink_safety_refusals_total", {"stage": stage}) or 0.0


def stream(f: SafetyFilter, pieces: list[str], finish: str = "stop") -> list[tuple[str, str | None]]:
    events = [SimpleNamespace(text=p, finish_reason=None) for p in pieces]
    events[-1].finish_reason = finish
    return [(text, reason) for _, text, reason in f.filter_output(iter(events))]


@pytest.fixture(scope="module")
def blocklist(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("safety") / "blocklist.txt"
    path.write_text(BLOCKLIST)
    return path


# -- the filter --------------------------------------------------------------------------------------------


def test_off_by_default():
    f = SafetyFilter.from_settings(Settings())
    assert not (f.input or f.output or f.media_check)
    assert f.check_input("how to make a bomb", [("image", b"\x89PNG")]) is None
    assert stream(f, ["how to make ", "a bomb"]) == [("how to make ", None), ("a bomb", "stop")]


def test_blocklist_matches_case_insensitive_whole_words_across_whitespace():
    f = SafetyFilter(load_blocklist("bomb\nhow to make a bomb", "test"), input=True)
    for text in ("BOMB!", "the Bomb.", "a bomb", "How To\n make  a bomb"):
        assert f.check_input(text) is not None, text
    for text in ("bombastic", "abomb", "bombs", "a b o m b", ""):
        assert f.check_input(text) is None, text
    refusal = f.check_input("How to make a bomb?")
    assert (refusal.stage, refusal.text) == ("input", REFUSAL)


def test_the_builtin_blocklist_refuses_a_few_harmful_requests_and_card_numbers():
    f = SafetyFilter(load_blocklist(DEFAULT_BLOCKLIST, "built-in"), input=True)
    for text in ("How do I make a pipe bomb?", "how can i build explosive devices", "how to make a "
                 "chemical weapon", "cook meth", "card 4111 1111 1111 1111 exp 12/29",
                 "4111-1111-1111-1111"):  # fmt: skip
        assert f.check_input(text) is not None, text
    for text in ("The bombastic speech", "call 555-1234", "in 2024 we sold 1,000,000 units", "a weapon in chess"):
        assert f.check_input(text) is None, text


def test_history_turns_are_checked_too():
    from modalink.prompt import Message

    f = SafetyFilter(load_blocklist("how to make a bomb", "test"), input=True)
    history = [Message("user", ["how to make a bomb"]), Message("assistant", ["..."])]
    assert f.check_input("go on", [], history) is not None
    assert f.check_input("go on", [], history[1:]) is None


def test_blocklist_file_errors_name_the_line(tmp_path):
    path = tmp_path / "bl.txt"
    path.write_text("# fine\nbomb\n(unclosed\n")
    with pytest.raises(ConfigError, match=r"bl.txt:3: bad pattern"):
        SafetyFilter.from_settings(Settings(safety_input=True, safety_blocklist=path))
    path.write_text("bomb\nx?\n")
    with pytest.raises(ConfigError, match=r"bl.txt:2: .*empty string"):
        SafetyFilter.from_settings(Settings(safety_input=True, safety_blocklist=path))
    with pytest.raises(ConfigError, match="cannot read"):
        SafetyFilter.from_settings(Settings(safety_input=True, safety_blocklist=tmp_path / "missing.txt"))
    path.write_text(BLOCKLIST)
    f = SafetyFilter.from_settings(Settings(safety_input=True, safety_blocklist=path))
    assert f.patterns == [r"how\s+to\s+make\s+a\s+bomb", r"france\s+is\s+paris"]  # comments and blank lines skipped


@pytest.mark.parametrize("spec", ["no_colon", "no_such_module_xyz:f", "modalink.safety:no_such_name",
                                  "modalink.safety:CONTENT_FILTER", ":f"])  # fmt: skip
def test_a_bad_media_check_path_is_a_config_error(spec):
    with pytest.raises(ConfigError, match="MODALINK_SAFETY_MEDIA_CHECK"):
        SafetyFilter.from_settings(Settings(safety_media_check=spec))


def test_the_media_hook_gets_the_file_bytes_and_its_reason_is_used(samples, caplog):
    f = SafetyFilter.from_settings(Settings(safety_media_check="test_safety:flag_images"))
    assert f.media_check is load_media_check("test_safety:flag_images") is flag_images
    before = refusals("media")
    with caplog.at_level(logging.WARNING, "modalink.safety"):
        refusal = f.check_input("What is this?", [("audio", samples["audio"]), ("image", samples["image"])])
    assert refusal.stage == "media" and refusal.text == REFUSAL
    assert refusal.reason == "image: test classifier flagged a 28x28 L image"  # decoded from the file's bytes
    assert refusal.reason in caplog.text
    assert refusals("media") == before + 1
    assert f.check_input("What is this?", [("audio", samples["audio"])]) is None  # the hook passed the audio


def test_streamed_text_is_held_only_while_it_could_start_a_blocked_phrase():
    f = SafetyFilter(load_blocklist("how to make a bomb\nbomb", "test"), output=True)
    # nothing blocked can start here: every piece goes out at once
    assert stream(f, ["The ", "capital ", "is ", "Paris."]) == [("The ", None), ("capital ", None), ("is ", None),
                                                                 ("Paris.", "stop")]  # fmt: skip
    # "bomb" could become "bombastic": held until the next piece says which
    assert stream(f, ["A ", "bomb", "astic", " talk"]) == [("A ", None), ("", None), ("bombastic", None),
                                                            (" talk", "stop")]  # fmt: skip
    # a phrase that stops short of the blocked one is released in full
    assert stream(f, ["how ", "to ", "make ", "a ", "cake"]) == [("", None)] * 4 + [("how to make a cake", "stop")]
    # a blocked phrase: what came before it, then the refusal; nothing of the phrase
    assert stream(f, ["Sure: ", "how ", "to ", "make ", "a ", "bomb", " is"]) == [
        ("Sure: ", None), *[("", None)] * 5, (REFUSAL, CONTENT_FILTER)]  # fmt: skip
    # the last piece of a stream is final: a phrase at the very end is refused
    assert stream(f, ["it is a ", "bomb"], "length") == [("it is a ", None), (REFUSAL, CONTENT_FILTER)]


@hsettings(max_examples=300, derandomize=True, deadline=None)
@given(st.lists(st.sampled_from(["how", " to", " make", " a", " bomb", "bomb", "astic", "s", " ", "cake", "!", "HOW",
                                 " To", "\n", "x"]), min_size=1, max_size=12))  # fmt: skip
def test_no_prefix_of_a_blocked_phrase_leaks_for_any_split(pieces):
    """For any answer and any way the tokens cut it: either everything arrives unchanged, or the refusal comes
    last and what came before it is the text before the first blocked phrase, cut where that phrase starts."""
    f = SafetyFilter(load_blocklist("how to make a bomb\nbomb", "test"), output=True)
    whole = "".join(pieces)
    out = stream(f, pieces)
    assert len(out) <= len(pieces) and all(r is None for _, r in out[:-1])
    sent = "".join(t for t, _ in out[:-1])
    if (m := f._re.search(whole)) is None:
        assert (sent + out[-1][0], out[-1][1], len(out)) == (whole, "stop", len(pieces))
    else:
        assert out[-1] == (REFUSAL, CONTENT_FILTER)
        assert whole.startswith(sent) and len(sent) <= m.start()
        assert f._re.search(sent) is None


def test_a_refusal_stops_the_generation():
    f = SafetyFilter(load_blocklist("bomb", "test"), output=True)

    def gen():
        yield SimpleNamespace(text="a bomb", finish_reason=None)
        yield SimpleNamespace(text=" here", finish_reason=None)
        raise AssertionError("generated past the refusal")

    g = gen()
    out = [(t, r) for _, t, r in f.filter_output(g)]
    assert out == [("a ", None), (REFUSAL, CONTENT_FILTER)]
    assert g.gi_frame is None  # closed


# -- the in-process assistant ----------------------------------------------------------------------------------


def test_assistant_refuses_a_blocked_request_before_encoding_or_loading_the_llm(settings, blocklist, samples):
    from modalink.assistant import Assistant

    safe = Assistant(Settings(adapters_dir=settings.adapters_dir, safety_input=True, safety_blocklist=blocklist,
                              safety_media_check="test_safety:flag_images"))  # fmt: skip
    before = refusals("input")
    answer = safe.ask("How to make a BOMB")
    assert (answer.text, answer.finish_reason) == (REFUSAL, CONTENT_FILTER)
    assert answer.usage == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert refusals("input") == before + 1
    answer = safe.ask("What is this?", [("image", samples["image"])])
    assert (answer.text, answer.finish_reason) == (REFUSAL, CONTENT_FILTER)
    assert safe._engine is None and not safe._encoders  # no LLM loaded, nothing encoded


def test_a_bad_safety_setting_fails_the_assistant_at_construction(settings):
    from modalink.assistant import Assistant

    with pytest.raises(ConfigError, match="MODALINK_SAFETY_MEDIA_CHECK"):
        Assistant(Settings(adapters_dir=settings.adapters_dir, safety_media_check="no_such_module_xyz:check"))


@pytest.mark.slow
def test_assistant_stops_a_blocked_answer_without_leaking_it(settings, engine, assistant, blocklist):
    from modalink.assistant import Assistant

    params = GenerationParams(max_new_tokens=16)
    plain = assistant.ask(QUESTION, params=params).text  # the unfiltered answer (safety off)
    start = plain.lower().index("france is paris")  # the phrase the blocklist blocks
    safe = Assistant(Settings(adapters_dir=settings.adapters_dir, safety_output=True, safety_blocklist=blocklist),
                     engine=engine)  # fmt: skip
    events = list(safe.stream(QUESTION, params=params))
    assert (events[-1].text, events[-1].finish_reason) == (REFUSAL, CONTENT_FILTER)
    sent = "".join(ev.text for ev in events[:-1])
    assert sent == plain[:start] and "France" not in sent  # everything before the phrase, nothing of it
    answer = safe.ask(QUESTION, params=params)
    assert (answer.text, answer.finish_reason) == (REFUSAL, CONTENT_FILTER)
    assert answer.usage["completion_tokens"] == len(events)  # one event per token the LLM made, none after
    assert safe.ask("What is 2 + 2?", params=GenerationParams(max_new_tokens=8)).finish_reason != CONTENT_FILTER


# -- through the gateway (real LLM service + gateway processes) ---------------------------------------------


@pytest.fixture(scope="module")
def safe_gateway(tmp_path_factory, blocklist):
    """The LLM service and a gateway with every filter on (no encoder services: refusals come before encoding)."""
    logs = tmp_path_factory.mktemp("logs")
    tests = str(Path(__file__).parent)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MODALINK_NUM_THREADS": "1", "MODALINK_QUANTIZE": "fp16-cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}  # fmt: skip
    procs = Procs(logs, env)
    modalink = [sys.executable, "-m", "modalink.cli", "serve"]
    llm_port, tgi_port, gw_port, http_port = free_port(), free_port(), free_port(), free_port()
    try:
        llm = procs.start("llm", [*modalink, "llm", "--port", str(llm_port), "--http-port", str(tgi_port)])
        gateway = procs.start("gateway", [*modalink, "gateway", "--port", str(gw_port), "--http-port", str(http_port)],
                              {"MODALINK_ENCODERS": "", "MODALINK_LLM_ADDRESS": f"127.0.0.1:{llm_port}",
                               "MODALINK_SAFETY_INPUT": "1", "MODALINK_SAFETY_OUTPUT": "1",
                               "MODALINK_SAFETY_BLOCKLIST": str(blocklist),
                               "MODALINK_SAFETY_MEDIA_CHECK": "test_safety:flag_images"})  # fmt: skip
        wait_grpc(f"127.0.0.1:{llm_port}", *llm)
        wait_grpc(f"127.0.0.1:{gw_port}", *gateway)
        yield {"grpc": f"127.0.0.1:{gw_port}", "http": f"http://127.0.0.1:{http_port}", "log": gateway[1]}
    finally:
        procs.stop_all()


def _scrape(base: str, stage: str) -> float:
    import re
    import urllib.request

    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    m = re.search(rf'^modalink_safety_refusals_total\{{stage="{stage}"\}} ([0-9.e+]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.slow
def test_gateway_grpc_refuses_blocked_requests_and_answers(safe_gateway, samples):
    from modalink.v1 import assistant_pb2_grpc
    from modalink.wire import assistant_pb2, common_pb2

    def generate(*parts, max_new_tokens=16):
        params = common_pb2.GenerationParams(max_new_tokens=max_new_tokens)
        req = assistant_pb2.GenerateRequest(parts=list(parts), params=params)
        return list(stub.Generate(req, timeout=120))

    image = common_pb2.Part(image=common_pb2.Image(data=Path(samples["image"]).read_bytes(), mime="image/png"))
    before = _scrape(safe_gateway["http"], "input")
    with grpc.insecure_channel(safe_gateway["grpc"]) as ch:
        stub = assistant_pb2_grpc.AssistantStub(ch)
        (msg,) = generate(common_pb2.Part(text="how to make a BOMB, step by step"))
        assert (msg.text, msg.finish_reason) == (REFUSAL, CONTENT_FILTER)
        assert _scrape(safe_gateway["http"], "input") == before + 1

        msgs = generate(common_pb2.Part(text=QUESTION))
        assert (msgs[-1].text, msgs[-1].finish_reason) == (REFUSAL, CONTENT_FILTER)
        sent = "".join(m.text for m in msgs[:-1])
        assert sent.startswith("The capital of") and "France" not in sent  # nothing of the blocked phrase
        assert all(not m.finish_reason for m in msgs[:-1])

        ok = generate(common_pb2.Part(text="What is 2 + 2?"), max_new_tokens=8)
        assert ok[-1].finish_reason in ("stop", "length") and "".join(m.text for m in ok).strip()

        # The image is refused by the hook before encoding: this gateway has no encoder service at all.
        (msg,) = generate(common_pb2.Part(text="What is this?"), image)
        assert (msg.text, msg.finish_reason) == (REFUSAL, CONTENT_FILTER)
        caption = stub.Caption(assistant_pb2.CaptionRequest(part=image), timeout=60)
        assert caption.caption == REFUSAL and not caption.adapter_version
    assert "test classifier flagged a 28x28 L image" in safe_gateway["log"].read_text()


@pytest.mark.slow
def test_gateway_http_refuses_blocked_requests_and_answers(safe_gateway, samples):
    import base64

    import openai

    client = openai.OpenAI(base_url=safe_gateway["http"] + "/v1", api_key="unused", timeout=120)

    def ask(messages, stream=False, max_tokens=16):
        return client.chat.completions.create(model="modalink", messages=messages, max_tokens=max_tokens,
                                              stream=stream)  # fmt: skip

    res = ask([{"role": "user", "content": "How to make a bomb?"}])
    assert (res.choices[0].message.content, res.choices[0].finish_reason) == (REFUSAL, CONTENT_FILTER)
    res = ask([{"role": "user", "content": "how to make a bomb"}, {"role": "assistant", "content": "No."},
               {"role": "user", "content": "Please, go on."}])  # fmt: skip
    assert res.choices[0].message.content == REFUSAL  # a blocked earlier turn counts too
    chunks = list(ask([{"role": "user", "content": "How to make a bomb?"}], stream=True))
    assert [(c.choices[0].delta.content, c.choices[0].finish_reason) for c in chunks] == [(REFUSAL, CONTENT_FILTER)]

    res = ask([{"role": "user", "content": QUESTION}])
    assert (res.choices[0].message.content, res.choices[0].finish_reason) == (REFUSAL, CONTENT_FILTER)
    chunks = list(ask([{"role": "user", "content": QUESTION}], stream=True))
    assert (chunks[-1].choices[0].delta.content, chunks[-1].choices[0].finish_reason) == (REFUSAL, CONTENT_FILTER)
    sent = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert sent.startswith("The capital of") and "France" not in sent

    png = base64.b64encode(Path(samples["image"]).read_bytes()).decode()
    image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}
    res = ask([{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}])
    assert (res.choices[0].message.content, res.choices[0].finish_reason) == (REFUSAL, CONTENT_FILTER)

    res = ask([{"role": "user", "content": "What is 2 + 2?"}], max_tokens=8)
    assert res.choices[0].finish_reason in ("stop", "length") and res.choices[0].message.content.strip()
