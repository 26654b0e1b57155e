"""Every stage-2 method (``modalink.methods``): trained a few steps, published, then served by the LLM service exactly
as by the in-process assistant, all of them in shared batches. Real models, a real LLM service process."""

from __future__ import annotations

import os
import sys
import threading

import grpc
import pytest
import torch
from procs import Procs, free_port, wait_grpc

from modalink.data import BuildConfig, build, read_manifest
from modalink.engine import GenerationParams
from modalink.methods import METHODS
from modalink.projectors import pad_features
from modalink.prompt import Media, Message, build_prompt
from modalink.registry import AdapterRegistry
from modalink.wire import common_pb2, llm_pb2, segments_to_msg

TINY = BuildConfig(seed=5, image_train=12, image_val=4, image_test=4)
SETTINGS = {"adapter": {"experts": 2}, "prompt": {"tokens": 8}, "prefix": {"tokens": 4},
            "llama-adapter": {"tokens": 6, "layers": 6}}  # fmt: skip
PARAMS = GenerationParams(max_new_tokens=12)


@pytest.fixture(scope="module")
def trained(settings, tmp_path_factory):
    """Each method trained 10 steps on a tiny image set, published into one registry (one version per method)."""
    from modalink.encoders import load_encoder
    from modalink.engines.transformers import TransformersEngine
    from modalink.train.align import AlignConfig, AlignTrainer
    from modalink.train.features import encode_rows

    data = tmp_path_factory.mktemp("data")
    build(data, ("image",), TINY)
    enc = load_encoder("image", settings)
    rows = read_manifest(data / "image" / "train.jsonl")
    items = list(zip(rows, encode_rows(enc, rows).values(), strict=True))
    registry = AdapterRegistry(tmp_path_factory.mktemp("adapters"))
    out = {}
    for method in METHODS:
        engine = TransformersEngine.load(settings=settings)  # its own: training adds modules to the model in place
        cfg = AlignConfig("image", stage=2, method=method, method_args=SETTINGS.get(method, {}), steps=10,
                          batch_size=4, lr=2e-3, method_lr=5e-3, warmup=1, eval_every=100, eval_items=12,
                          checkpoint_every=100)  # fmt: skip
        trainer = AlignTrainer(cfg, engine, enc.feature_dim, items, items, tmp_path_factory.mktemp(method))
        start = {k: v.detach().clone() for k, v in trainer.adapter_state()[0].items()}
        before = trainer.val_loss()
        trainer.fit()
        after = trainer.val_loss()
        tensors, config = trainer.adapter_state()
        version = registry.publish("image", trainer.projector, llm_adapter=(tensors, config))
        media = trainer.projector(*pad_features([items[0][1].float()]))[0].detach()
        out[method] = {"version": version, "before": before, "after": after, "start": start, "tensors": tensors,
                       "media": media, "trainer_logits": logits(engine, media, trainer.adapter, settings)}  # fmt: skip
    return registry, out


def prompt_of(tokenizer, media: torch.Tensor, system_prompt: str | None):
    return build_prompt(tokenizer, [Message("user", ["What is this?", Media("image", media)])], system_prompt)


def logits(engine, media: torch.Tensor, adapter: str | None, settings) -> torch.Tensor:
    return engine.next_token_logits(prompt_of(engine.tokenizer, media, settings.system_prompt), adapter=adapter)


@pytest.fixture(scope="module")
def served(trained, settings):
    """The in-process assistant over the registry, with every method's adapter loaded from it (fp16 at rest)."""
    from modalink.assistant import Assistant
    from modalink.methods import serve

    registry, out = trained
    assistant = Assistant(settings.model_copy(update={"adapters_dir": registry.root}))
    names = {}
    for method, run in out.items():
        names[method] = serve(assistant.engine, registry, "image", run["version"])
    return assistant, names


@pytest.fixture(scope="module")
def llm_service(trained, settings, tmp_path_factory):
    """The LLM service over the same registry (it loads each adapter on first use)."""
    registry, _ = trained
    procs = Procs(tmp_path_factory.mktemp("logs"), {**os.environ, "HF_HUB_OFFLINE": "1", "MODALINK_NUM_THREADS": "1",
                  "MODALINK_ADAPTERS_DIR": str(registry.root), "MODALINK_QUANTIZE": settings.quantize})  # fmt: skip
    port = free_port()
    proc, log = procs.start("llm", [sys.executable, "-m", "modalink.cli", "serve", "llm", "--port", str(port),
                                    "--http-port", str(free_port()), "--max-wait-ms", "300"])  # fmt: skip
    try:
        wait_grpc(f"127.0.0.1:{port}", proc, log)
        yield f"127.0.0.1:{port}"
    finally:
        procs.stop_all()


def ask_service(address: str, prompt, adapter: str | None) -> str:
    from modalink.v1 import llm_pb2_grpc

    request = llm_pb2.LLMRequest(segments=segments_to_msg(prompt), adapters=[adapter] if adapter else [],
                                 params=common_pb2.GenerationParams(max_new_tokens=PARAMS.max_new_tokens))  # fmt: skip
    with grpc.insecure_channel(address) as ch:
        return "".join(c.text for c in llm_pb2_grpc.LLMStub(ch).Generate(request, timeout=300))


@pytest.mark.parametrize("method", METHODS)
def test_a_method_trains_saves_loads_and_serves_as_trained(trained, served, settings, method):
    registry, out = trained
    run = out[method]
    assert run["after"] < run["before"] - 0.3, (run["before"], run["after"])
    moved = max((run["tensors"][k].float() - v.float()).abs().max().item() for k, v in run["start"].items())
    assert moved > 1e-3, f"{method}: its tensors did not move from their start"
    path = registry.llm_adapter_path("image", run["version"])
    assert path is not None and path.name == ("lora" if method == "lora" else "llm-adapter")
    registry.verify("image", run["version"])  # checksummed like the projector
    assistant, names = served
    loaded = logits(assistant.engine, run["media"], names[method], settings)
    bare = logits(assistant.engine, run["media"], None, settings)
    trained_logits = run["trainer_logits"]
    # the served adapter (fp16 at rest, another engine) reproduces the trained one; the bare LLM is further off
    assert torch.allclose(trained_logits, loaded, atol=0.05 * trained_logits.abs().max().item())
    assert (trained_logits - bare).abs().max() > 5 * (trained_logits - loaded).abs().max()


@pytest.mark.parametrize("method", METHODS)
def test_the_llm_service_answers_as_the_in_process_assistant(trained, served, llm_service, settings, method):
    _, out = trained
    assistant, names = served
    prompt = prompt_of(assistant.engine.tokenizer, out[method]["media"], settings.system_prompt)
    expected = assistant.engine.generate([prompt], PARAMS, [names[method]])[0].text
    assert expected.strip()
    assert ask_service(llm_service, prompt, names[method]) == expected


def test_every_method_shares_one_batch_and_each_row_answers_as_alone(trained, served, llm_service, settings):
    """In process: one batch with a row per method and a bare one. Through the service: the same requests sent at
    once are batched together (Info counts them) and answer as in process."""
    from modalink.v1 import llm_pb2_grpc

    _, out = trained
    assistant, names = served
    engine = assistant.engine
    rows = [(names[m], prompt_of(engine.tokenizer, out[m]["media"], settings.system_prompt)) for m in METHODS]
    rows.append((None, rows[0][1]))
    alone = [engine.generate([p], PARAMS, [a])[0].text for a, p in rows]
    together = [r.text for r in engine.generate([p for _, p in rows], PARAMS, [a for a, _ in rows])]
    assert together == alone
    assert len(set(alone)) > 1  # the methods answer differently: the rows were not all served alike

    with grpc.insecure_channel(llm_service) as ch:
        before = llm_pb2_grpc.LLMStub(ch).Info(llm_pb2.InfoRequest(), timeout=10)
    got: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i, a=a, p=p: got.__setitem__(i, ask_service(llm_service, p, a)))
               for i, (a, p) in enumerate(rows)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(rows))] == alone
    with grpc.insecure_channel(llm_service) as ch:
        after = llm_pb2_grpc.LLMStub(ch).Info(llm_pb2.InfoRequest(), timeout=10)
    batches, requests = after.batches - before.batches, after.batched_requests - before.batched_requests
    assert requests == len(rows) and batches < len(rows), (batches, requests)
    assert set(names.values()) <= set(after.adapters)


def test_a_soft_prompt_counts_against_the_context(trained, served, llm_service, settings):
    """A prompt that fits the context alone but not with the prompt-tuning adapter's virtual tokens is refused
    before any work (in process and by the LLM service, INVALID_ARGUMENT); without the adapter it passes."""
    from modalink.errors import InputError
    from modalink.v1 import llm_pb2_grpc

    _, out = trained
    assistant, names = served
    engine, name = assistant.engine, names["prompt"]
    soft = engine.soft_prompt(name).shape[0]
    assert soft == SETTINGS["prompt"]["tokens"]
    params = GenerationParams(max_new_tokens=8)
    base = prompt_of(engine.tokenizer, out["prompt"]["media"], settings.system_prompt)
    target = engine.max_context - params.max_new_tokens - soft // 2  # fits alone; with the soft prompt it does not
    words = target - engine.check(base, params)
    for _ in range(5):  # " ok" is about one token a word: correct the count until it is exact
        prompt = [" ok" * words, *base]
        words += target - engine.check(prompt, params)
    assert engine.check(prompt, params) == target
    with pytest.raises(InputError, match="exceeds the context"):
        engine.check(prompt, params, name)
    request = llm_pb2.LLMRequest(segments=segments_to_msg(prompt), adapters=[name],
                                 params=common_pb2.GenerationParams(max_new_tokens=params.max_new_tokens))  # fmt: skip
    with grpc.insecure_channel(llm_service) as ch, pytest.raises(grpc.RpcError) as e:
        list(llm_pb2_grpc.LLMStub(ch).Generate(request, timeout=120))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and f"{target + soft} tokens" in e.value.details()


def test_a_bad_method_or_setting_is_refused_clearly(settings, tmp_path):
    from modalink.engines.transformers import TransformersEngine
    from modalink.errors import ConfigError
    from modalink.methods import save
    from modalink.train.align import AlignConfig

    with pytest.raises(ValueError, match="unknown stage-2 method 'qlora'"):
        AlignConfig("image", stage=2, method="qlora")
    engine = TransformersEngine.load(settings=settings)
    with pytest.raises(ValueError, match="adapter settings: unknown \\['rank'\\]"):
        engine.train_adapter("x", "adapter", {"rank": 4})
    # a folder whose tensors do not fit this LLM (another model's, or tampered with)
    save(tmp_path / "ia3", {"keys": torch.ones(2, 3), "values": torch.ones(2, 3)}, {"method": "ia3",
         "feedforward": False})  # fmt: skip
    with pytest.raises(ConfigError, match="do not fit this LLM"):
        engine.load_adapter("bad", tmp_path / "ia3")
    assert "bad" not in engine.adapters
