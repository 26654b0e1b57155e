"""The llama.cpp engine (``MODALINK_ENGINE=llamacpp``): llama.cpp itself, under modalink's decode loop. Against
llama.cpp's own API on the same GGUF file (logits and greedy tokens equal), against itself (a row decodes the same
alone, in a batch and when it joins a running batch), with real prefix embeddings (the shipped image adapter's
projection of the demo picture, in process and through the LLM service), with the shipped stage-2 LoRA (audio:
converted from peft to a GGUF LoRA; its effect on the logits that of the transformers engine's), and with bad input
(refused with the reason, and the engine serves on), and with its KV prefix cache (answers as without it). ``make
test`` builds llama-cpp-python from its sdist before these run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from modalink.engine import GenerationParams
from modalink.errors import InputError

REPO = Path(__file__).resolve().parents[1]
PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nCount from one to ten."
          "<|im_end|>\n<|im_start|>assistant\n")  # fmt: skip


@pytest.fixture(scope="module")
def engine(settings):
    from modalink.engines.llamacpp import LlamaCppEngine

    return LlamaCppEngine.load(settings)


@pytest.fixture(scope="module")
def media_prompt(settings):
    """A prompt whose media are the LLM's own input embeddings of a text (real, decisive vectors: random ones give
    near-tied logits, and llama.cpp's sums over a batch's KV cells round differently from one row's on some CPUs,
    which flips such ties; a batching bug changes decisive tokens too)."""
    from modalink.engines.transformers import TransformersEngine

    reference = TransformersEngine.load(settings=settings)
    table = reference.model.get_input_embeddings().weight.detach().float()

    def prompt(text: str) -> list:
        ids = reference.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ["<|im_start|>user\nDescribe this: <image>", table[ids].clone(),
                "</image><|im_end|>\n<|im_start|>assistant\n"]  # fmt: skip

    return prompt


def test_logits_and_greedy_tokens_are_llama_cpps_own(engine):
    from llama_cpp import Llama

    from modalink.cache import package_dir
    from modalink.llm import EMBEDDED_LLMS

    spec = EMBEDDED_LLMS["smollm2-135m-instruct"]
    raw = Llama(model_path=str(package_dir(spec.package) / spec.gguf_file), n_ctx=512,
                n_threads=torch.get_num_threads(), verbose=False, logits_all=True)  # fmt: skip
    ids = raw.tokenize(PROMPT.encode(), add_bos=False, special=True)
    raw.eval(ids)
    first = torch.tensor(raw.scores[len(ids) - 1])
    assert torch.allclose(engine.next_token_logits([PROMPT]), first, atol=1e-4)  # the same kernels, the same sums
    raw.reset()
    theirs = []
    for tok in raw.generate(raw.tokenize(PROMPT.encode(), add_bos=False, special=True), top_k=1, temp=0.0,
                            repeat_penalty=1.0):  # fmt: skip
        theirs.append(tok)
        if len(theirs) == 24:
            break
    [ours] = engine.generate([[PROMPT]], GenerationParams(max_new_tokens=24))
    assert ours.token_ids == theirs[: len(ours.token_ids)] and len(ours.token_ids) >= 16, (ours.text, theirs)
    assert "1" in ours.text and ours.prompt_tokens == len(raw.tokenize(PROMPT.encode(), add_bos=False, special=True))


# Logits this close can swap between a row decoded alone and in a batch (measured on an AVX-512 CPU: swaps at gaps
# of 0.01 and 0.09, the latter 14 tokens in, where small differences have compounded); a batching bug (another
# row's cells, wrong positions) moves logits by whole units from the first token on.
TIE = 0.25


def alone_with_margins(engine, prompt: list, params: GenerationParams) -> tuple[list[int], list[float]]:
    """A prompt's greedy tokens decoded alone, and at each step the gap between its two best logits."""
    out, margins = engine._out, []

    def recording(c, i: int, greedy: bool):
        logits = out(c, i, False)
        best = torch.topk(logits.float(), 2).values
        margins.append(float(best[0] - best[1]))
        return int(logits.argmax()) if greedy else logits

    engine._out = recording
    try:
        return engine.generate([prompt], params)[0].token_ids, margins
    finally:
        engine._out = out


def same_but_for_a_tie(got: list[int], alone: tuple[list[int], list[float]]) -> bool:
    """``got`` is the alone decode, or leaves it only at a near tie of the alone decode's logits: a batch's KV
    layout changes the order of llama.cpp's sums over cells (on AVX-512 CPUs visibly), which may swap two close
    logits; after that the texts differ by design. A batching bug changes decisive tokens."""
    ids, margins = alone
    k = next((j for j, (a, b) in enumerate(zip(got, ids, strict=False)) if a != b), None)
    return len(got) == len(ids) if k is None else margins[k] < TIE


def test_a_row_decodes_the_same_alone_in_a_batch_and_when_it_joins(engine, media_prompt):
    params = GenerationParams(max_new_tokens=16)
    first, third = media_prompt("a photo of a red shirt"), media_prompt("the spoken word seven, twice over")
    alone = [alone_with_margins(engine, p, params) for p in (first, [PROMPT], third)]
    together = [c.token_ids for c in engine.generate([first, [PROMPT], third], params)]
    assert all(same_but_for_a_tie(t, a) for t, a in zip(together, alone, strict=True)), (together, alone)

    class JoinAfterTwoSteps:  # the batcher's view of its queue: one request arrives while the batch decodes
        calls = 0

        def more(self, running: int):
            self.calls += 1
            return [(third, params, None)] if self.calls == 2 else []

        def cancelled(self, index: int) -> bool:
            return False

    events = list(engine.stream([first], params, join=JoinAfterTwoSteps()))
    rows = {i: [e.token_id for e in events if e.index == i] for i in (0, 1)}
    assert same_but_for_a_tie(rows[0], alone[0]) and same_but_for_a_tie(rows[1], alone[2]), (rows, alone)
    finished = [e for e in events if e.finish_reason]
    assert sorted(e.index for e in finished) == [0, 1]


def test_the_kv_prefix_cache_prefills_only_new_positions_and_answers_as_without_it(engine, media_prompt):
    """A chat's later turns repeat the earlier prompt (system head, picture, history): with the cache on, that
    prefix is restored from a saved llama.cpp state and only the rest is prefilled; greedy answers, alone and two
    rows in one batch, are those of the cache off, turn after turn."""
    from modalink.prefix_cache import PrefixCache

    params = GenerationParams(max_new_tokens=16)
    picture = media_prompt("a photo of a red shirt on a wooden table")[1]
    other = media_prompt("the spoken word seven, twice over")[1]
    head = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>"

    def turn(media, history: list[tuple[str, str]], question: str) -> list:
        text = "".join(f"{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n<|im_start|>user\n" for q, a in history)
        return [head, media, f"</image>\n{text}{question}<|im_end|>\n<|im_start|>assistant\n"]

    def conversation() -> list[str]:
        said: list[tuple[str, str]] = []
        for question in ("What is in the picture?", "What colour is it?", "Where is it?"):
            said.append((question, engine.generate([turn(picture, said, question)], params)[0].text))
        both = engine.generate([turn(picture, said, "Is it new?"), turn(other, said, "Is it new?")], params)
        return [a for _, a in said] + [c.text for c in both]

    fed, decode = [0], engine._decode

    def counted(c, batch, n: int) -> None:  # positions llama.cpp computes, prompts and steps
        fed[0] += n
        decode(c, batch, n)

    before = engine.prefix_cache
    engine._decode = counted
    try:
        engine.prefix_cache = PrefixCache(0, nbytes=len)
        reference, computed = conversation(), fed[0]
        engine.prefix_cache = cache = PrefixCache(64 << 20, nbytes=len)
        first = engine.prompt_length(turn(picture, [], "What is in the picture?"))
        assert conversation() == reference
        # what was reused was read from the restored states, not computed (and llama.cpp refuses a sequence whose
        # positions do not follow on from those it holds, so the restored positions are there)
        assert fed[0] - computed == computed - cache.stats.tokens_reused, (fed[0], computed, cache.stats)
        # turns 2 and 3 and the batch's first row reuse the previous turn's prompt; the other picture's row only
        # the system head before its picture
        assert cache.stats.hits == 4 and cache.stats.tokens_reused >= 3 * (first - 2), cache.stats
        assert 0 < cache.stats.bytes <= cache.max_bytes
        assert conversation() == reference  # every prompt now cached whole (less the two positions prefilled)
    finally:
        engine.prefix_cache, engine._decode = before, decode


def test_stop_sequences_lengths_and_seeds_are_the_shared_decode_loops(engine):
    [full] = engine.generate([[PROMPT]], GenerationParams(max_new_tokens=30))
    events = list(engine.stream([[PROMPT]], GenerationParams(max_new_tokens=30, stop=["5"])))
    text = "".join(e.text for e in events)
    assert "5" in full.text and "5" not in text and full.text.startswith(text) and events[-1].finish_reason == "stop"
    [short] = engine.generate([[PROMPT]], GenerationParams(max_new_tokens=3))
    assert short.finish_reason == "length" and short.completion_tokens == 3
    sampled = GenerationParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=11)
    a, b = engine.generate([[PROMPT], [PROMPT]], [sampled, sampled])
    assert a.token_ids == b.token_ids == engine.generate([[PROMPT]], sampled)[0].token_ids
    # greedy rows take their token where llama.cpp wrote the logits, the others a copy: in one batch, each as alone
    greedy, penalized = GenerationParams(max_new_tokens=8), GenerationParams(max_new_tokens=8, repetition_penalty=1.5)
    mixed = engine.generate([[PROMPT]] * 3, [greedy, sampled, penalized])
    alone = [engine.generate([[PROMPT]], p)[0].token_ids for p in (greedy, sampled, penalized)]
    assert [m.token_ids for m in mixed] == alone and alone[0] == full.token_ids[:8] and alone[2] != alone[0]


def test_bad_input_is_refused_with_its_reason_and_the_engine_serves_on(engine, tmp_path):
    from modalink.errors import ConfigError
    from modalink.methods import save

    save(tmp_path / "ia3", {"keys": torch.ones(30, 192)}, {"method": "ia3"})  # llama.cpp has no IA3: refused
    with pytest.raises(ConfigError, match="serves LoRA adapters only.*'ia3'"):
        engine.load_adapter("audio@v9", tmp_path / "ia3")
    assert "audio@v9" not in engine.adapters
    params = GenerationParams(max_new_tokens=4)
    for prompt, message in ((["hi", torch.zeros(3, 100)], r"\[n, 576\]"),
                            (["hi", torch.full((2, 576), float("nan"))], "NaN"),
                            ([""], "empty prompt")):  # fmt: skip
        with pytest.raises(InputError, match=message):
            engine.generate([prompt], params)
    with pytest.raises(InputError, match="context"):
        engine.generate([[PROMPT]], GenerationParams(max_new_tokens=engine.max_context))
    with pytest.raises(InputError, match=r"unknown LLM adapter\(s\) \['nope@v1'\]"):
        engine.generate([[PROMPT]], params, adapters=["nope@v1"])
    assert engine.generate([[PROMPT]], params)[0].completion_tokens == 4


def test_the_shipped_image_adapter_reads_through_llama_cpp_in_process_and_as_the_llm_service(engine, samples,
                                                                                             tmp_path):  # fmt: skip
    """The demo picture's projection, fed as llama.cpp embeddings: the answer names the sneaker, in process and from
    the LLM service started with MODALINK_ENGINE=llamacpp behind a real gateway and image encoder. (Not the same
    words necessarily: the encoder service's features differ from in-process ones in the last bits, and the LLM
    service runs one thread here.) A bare generated stub and the stock ``openai`` client (the gateway's OpenAI route)
    get the same answer. The same service's TGI port answers the stock ``text-generation`` client with the
    in-process engine's greedy text, whole and streamed."""
    import grpc
    from procs import Procs, free_port, wait_grpc, wait_triton

    from modalink.assistant import Assistant
    from modalink.client import Client, image
    from modalink.config import Settings
    from modalink.evaluate import is_correct
    from modalink.v1 import assistant_pb2, assistant_pb2_grpc, common_pb2

    settings = Settings(adapters_dir=REPO / "adapters")
    question = "What is shown in this picture?"
    local = Assistant(settings, engine=engine).ask(question, [("image", samples["image"])],
                                                   GenerationParams(max_new_tokens=24)).text  # fmt: skip
    assert is_correct("image", "sneaker", local), local

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MODALINK_NUM_THREADS": "1",
           "MODALINK_ADAPTERS_DIR": str(REPO / "adapters")}  # fmt: skip
    procs = Procs(tmp_path, env)
    modalink = [sys.executable, "-m", "modalink.cli"]
    try:
        http, grpc_port, metrics, llm_port, gw_port, tgi_port, gw_http = (free_port() for _ in range(7))
        encoder = procs.start("image", [*modalink, "serve", "encoder", "-m", "image", "--http-port", str(http),
                                        "--grpc-port", str(grpc_port), "--metrics-port", str(metrics)])  # fmt: skip
        llm = procs.start("llm", [*modalink, "serve", "llm", "--port", str(llm_port), "--http-port", str(tgi_port)],
                          {"MODALINK_ENGINE": "llamacpp"})  # fmt: skip
        gateway = procs.start("gateway", [*modalink, "serve", "gateway", "--port", str(gw_port), "--http-port",
                                          str(gw_http)],
                              {"MODALINK_ENCODERS": f"image=127.0.0.1:{grpc_port}",
                               "MODALINK_LLM_ADDRESS": f"127.0.0.1:{llm_port}"})  # fmt: skip
        wait_triton(http, "image_encoder", *encoder)
        wait_grpc(f"127.0.0.1:{llm_port}", *llm)
        wait_grpc(f"127.0.0.1:{gw_port}", *gateway)
        with Client(f"127.0.0.1:{gw_port}") as c:
            served = c.ask([question, image(samples["image"])], max_new_tokens=24)
        # a bare generated stub, as any gRPC client sends it (no deadline, no metadata): the same streamed answer
        picture = common_pb2.Image(data=Path(samples["image"]).read_bytes(), mime="image/png")
        request = assistant_pb2.GenerateRequest(parts=[common_pb2.Part(text=question), common_pb2.Part(image=picture)],
                                                params=common_pb2.GenerationParams(max_new_tokens=24))  # fmt: skip
        with grpc.insecure_channel(f"127.0.0.1:{gw_port}") as ch:
            bare = "".join(m.text for m in assistant_pb2_grpc.AssistantStub(ch).Generate(request))
        # the OpenAI route, as the stock openai client sends it (the picture as a data URI)
        import base64

        import openai

        url = "data:image/png;base64," + base64.b64encode(picture.data).decode()
        content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]
        oa = openai.OpenAI(base_url=f"http://127.0.0.1:{gw_http}/v1", api_key="unused", timeout=120)
        chat = oa.chat.completions.create(
            model="modalink", max_tokens=24, messages=[{"role": "user", "content": content}]
        )
        assert "(engine llamacpp)" in llm[1].read_text()
        from text_generation import Client as TGIClient

        tgi = TGIClient(f"http://127.0.0.1:{tgi_port}", timeout=120)
        text_prompt = "The capital of France is"
        expected = engine.generate([[text_prompt]], GenerationParams(max_new_tokens=12))[0]
        whole = tgi.generate(text_prompt, max_new_tokens=12)
        streamed = list(tgi.generate_stream(text_prompt, max_new_tokens=12))
    finally:
        procs.stop_all()
    assert is_correct("image", "sneaker", served), served
    assert bare == served == chat.choices[0].message.content
    assert whole.generated_text == expected.text and [t.id for t in whole.details.tokens] == expected.token_ids
    assert "".join(r.token.text for r in streamed if not r.token.special) == expected.text
    assert streamed[-1].generated_text == expected.text


def test_the_shipped_stage2_lora_converts_and_acts_as_in_the_transformers_engine(engine, samples):
    """The audio adapter's LoRA (peft, q_proj and v_proj) converted to a GGUF LoRA and served in a context of its own:
    it moves the logits as it does in the transformers engine, its rows decode beside base rows in one stream as they
    do alone, and the demo's recorded "seven" is heard through it."""
    from modalink.assistant import Assistant
    from modalink.config import Settings
    from modalink.engines.transformers import TransformersEngine
    from modalink.evaluate import is_correct
    from modalink.registry import AdapterRegistry

    registry = AdapterRegistry(REPO / "adapters")
    version = registry.current("audio")
    path = registry.llm_adapter_path("audio", version)
    assert path is not None, "the shipped audio adapter is a stage-2 one (with a LoRA)"
    name = f"audio@{version}"
    engine.load_adapter(name, path)
    assert name in engine.adapters
    reference = TransformersEngine.load(settings=Settings())
    reference.load_adapter(name, path)
    moved = {e: e.next_token_logits([PROMPT], name) - e.next_token_logits([PROMPT]) for e in (engine, reference)}
    assert moved[engine].abs().max() > 1.0  # the LoRA does something ...
    assert torch.corrcoef(torch.stack(list(moved.values())))[0, 1] > 0.9  # ... and the same thing in both engines

    params = GenerationParams(max_new_tokens=12)
    alone = [engine.generate([[PROMPT]], params, adapters=[a])[0].token_ids for a in (name, None)]
    together = engine.generate([[PROMPT], [PROMPT]], params, adapters=[name, None])
    assert [c.token_ids for c in together] == alone

    answer = Assistant(Settings(adapters_dir=REPO / "adapters"), engine=engine).ask(
        "What does the voice say?", [("audio", samples["audio"])], GenerationParams(max_new_tokens=24)
    )
    assert is_correct("audio", "seven", answer.text), answer.text


def test_auto_picks_llama_cpp_on_a_cpu_where_it_can_serve_and_says_why_not_elsewhere(settings, tmp_path):
    """MODALINK_ENGINE=auto (make image-test's chart values): llama.cpp on a CPU with llama-cpp-python, a GGUF LLM
    and LoRA adapters only; the transformers engine otherwise, with the reason."""
    import json

    from modalink.engines import choose, load_engine

    auto = settings.model_copy(update={"engine": "auto", "adapters_dir": REPO / "adapters"})
    assert choose(auto)[0] == "llamacpp"
    engine = load_engine(auto)
    assert engine.runtime == "llamacpp" and type(engine).__name__ == "LlamaCppEngine"
    del engine
    runtime, why = choose(auto.model_copy(update={"llm": str(tmp_path / "Llama-2-7b-chat-hf")}))
    assert runtime == "transformers" and "not a GGUF file" in why
    runtime, why = choose(auto.model_copy(update={"device": "cuda"}))
    assert runtime == "transformers" and "cuda" in why
    ia3 = tmp_path / "adapters" / "audio" / "v1" / "llm-adapter"  # a promoted stage-2 IA3 adapter
    ia3.mkdir(parents=True)
    (ia3 / "adapter_config.json").write_text(json.dumps({"method": "ia3"}))
    (tmp_path / "adapters" / "audio" / "CURRENT").write_text("v1")
    runtime, why = choose(auto.model_copy(update={"adapters_dir": tmp_path / "adapters"}))
    assert runtime == "transformers" and "audio (v1, 'ia3')" in why


def test_a_lora_converts_where_the_cache_is_read_only(engine, tmp_path):
    """The chart's pods mount the cache read-only (only /tmp and two cache folders are writable): a stage-2 LoRA is
    then converted into a temporary folder instead, and served (found by ``make image-test``: the first audio
    question failed with "Read-only file system: '/cache/gguf-lora'")."""
    from modalink.registry import AdapterRegistry

    registry = AdapterRegistry(REPO / "adapters")
    path = registry.llm_adapter_path("audio", registry.current("audio"))
    (tmp_path / "cache").write_text("a file where the cache's folder would be: no folder can be made under it")
    kept = engine.lora_dir
    engine.lora_dir = tmp_path / "cache" / "gguf-lora"
    try:
        engine.load_adapter("audio@read-only-cache", path)
        used = engine.lora_dir
    finally:
        engine.lora_dir = kept
    assert "audio@read-only-cache" in engine.adapters
    assert used != tmp_path / "cache" / "gguf-lora" and len(list(used.glob("*.gguf"))) == 1
    name = f"audio@{registry.current('audio')}"
    engine.load_adapter(name, path)  # the same LoRA, converted into the cache folder as usual
    params = GenerationParams(max_new_tokens=8)
    ids = [engine.generate([[PROMPT]], params, adapters=[a])[0].token_ids for a in ("audio@read-only-cache", name)]
    assert ids[0] and ids[0] == ids[1]


def test_an_f16_copy_holds_the_reference_weights_and_decodes_as_the_reference_does(settings, tmp_path):
    """MODALINK_LLAMACPP_WEIGHTS=f16: the GGUF with each quantized matrix dequantized to float16 (the weights the
    transformers engine serves in fp16), written once (into a temporary folder where the cache is read-only);
    llama.cpp on it decodes the reference engine's greedy tokens on a decisive prompt (where on the Q4_1 file it
    follows its own rounding)."""
    import shutil

    import gguf
    import numpy as np

    from modalink.cache import package_dir
    from modalink.engines.llamacpp import LlamaCppEngine, f16_copy
    from modalink.engines.transformers import TransformersEngine
    from modalink.llm import EMBEDDED_LLMS

    spec = EMBEDDED_LLMS[settings.llm]
    src = package_dir(spec.package) / spec.gguf_file
    out = f16_copy(src, tmp_path / "gguf")
    assert f16_copy(src, tmp_path / "gguf") == out and len(list(out.parent.iterdir())) == 1  # made once
    (tmp_path / "cache").write_text("a file where a read-only cache's folder would be")
    elsewhere = f16_copy(src, tmp_path / "cache" / "gguf")  # as in the chart's pods: into a temporary folder
    assert elsewhere.name == out.name and elsewhere.read_bytes() == out.read_bytes()
    shutil.rmtree(elsewhere.parent)
    original = {t.name: t for t in gguf.GGUFReader(str(src)).tensors}
    copy = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    assert copy.keys() == original.keys()
    for name in ("blk.0.attn_q.weight", "token_embd.weight", "blk.0.attn_norm.weight"):
        o, c = original[name], copy[name]
        want = gguf.quants.dequantize(o.data, o.tensor_type)
        assert c.tensor_type == (gguf.GGMLQuantizationType.F32 if want.ndim == 1 else gguf.GGMLQuantizationType.F16)
        assert np.array_equal(np.asarray(c.data).reshape(want.shape), want.astype(c.data.dtype))

    f16 = LlamaCppEngine.load(settings.model_copy(update={"llamacpp_weights": "f16", "cache_dir": tmp_path}))
    reference = TransformersEngine.load(settings=settings.model_copy(update={"quantize": "fp16-cpu"}))
    params = GenerationParams(max_new_tokens=16)
    assert f16.generate([[PROMPT]], params)[0].token_ids == reference.generate([[PROMPT]], params)[0].token_ids
