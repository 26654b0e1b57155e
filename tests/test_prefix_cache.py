"""The LLM's KV prefix cache (modalink.prefix_cache): reuse by content, per adapter, bounded; answers unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modalink.engine import GenerationParams
from modalink.prefix_cache import MIN_REUSE_TOKENS, PrefixCache, common_length, embedding_piece

REPO = Path(__file__).resolve().parents[1]
GREEDY = GenerationParams(max_new_tokens=16)


def chat(engine, picture: torch.Tensor, turns: list[tuple[str, str]], question: str) -> list:
    """A chat prompt as the pipeline builds one: a system head, the picture, earlier turns, the new question."""
    tpl = "<|im_start|>{}\n{}<|im_end|>\n"
    prompt = [tpl.format("system", "You are a helpful assistant that answers about pictures.") + "<|im_start|>user\n",
              picture]  # fmt: skip
    text = ""
    for q, a in turns:
        text += f"{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n<|im_start|>user\n"
    return [*prompt, text + f"{question}<|im_end|>\n<|im_start|>assistant\n"]


def answers(engine, prompts: list[list], adapters=None) -> list[str]:
    out = [""] * len(prompts)
    for ev in engine.stream(prompts, GREEDY, adapters):
        out[ev.index] += ev.text
    return out


@pytest.fixture
def cached(engine):
    """The session engine with a fresh cache of its own for the test (restored after)."""
    before = engine.prefix_cache
    engine.prefix_cache = PrefixCache(64 << 20)
    yield engine
    engine.prefix_cache = before


def conversation(engine) -> list[list]:
    torch.manual_seed(0)
    a, b = torch.randn(8, engine.hidden_size) * 0.02, torch.randn(8, engine.hidden_size) * 0.02
    first = chat(engine, a, [], "What is in the picture?")
    return [
        first,
        chat(engine, a, [("What is in the picture?", "A bag.")], "What colour is it?"),  # next turn, same picture
        chat(engine, b, [("What is in the picture?", "A bag.")], "What colour is it?"),  # same text, other picture
        [*first[:1], "Tell me a joke about cats and dogs, please.<|im_end|>\n<|im_start|>assistant\n"],
    ]


def test_greedy_answers_are_the_same_with_the_cache_on_and_off_alone_and_batched(cached):
    prompts = conversation(cached)
    off = PrefixCache(0)
    on, cached.prefix_cache = cached.prefix_cache, off
    reference = [answers(cached, [p])[0] for p in prompts]
    assert off.stats.hits == off.stats.misses == 0  # off: not even looked up
    cached.prefix_cache = on
    one_by_one = [answers(cached, [p])[0] for p in prompts]
    batched = answers(cached, prompts[::-1])[::-1]  # every row reuses a prefix of another length
    assert one_by_one == reference and batched == reference
    st = on.stats
    assert st.hits >= 3 + 4 and st.tokens_reused > 0, st  # turns 2-4 alone, then every row of the batch
    assert len(set(reference)) > 1  # the prompts do lead to different answers


def test_reused_keys_and_values_are_really_read(cached):
    """Poison what the cache holds: the next turn's answer changes (so a hit is not silently recomputed)."""
    first, second = conversation(cached)[:2]
    answers(cached, [first])
    honest = answers(cached, [second])[0]
    reused_before = cached.prefix_cache.stats.tokens_reused
    with torch.inference_mode():  # the engine made them there
        for entry in cached.prefix_cache._entries.values():
            for k, v in entry.value:
                k.normal_(0, 3)
                v.normal_(0, 3)
    poisoned = answers(cached, [second])[0]
    assert cached.prefix_cache.stats.tokens_reused > reused_before
    assert poisoned != honest


def test_media_match_by_content_and_text_by_token_ids():
    text = ("t", *range(40))
    pic_a, pic_b = embedding_piece(torch.ones(8, 4)), embedding_piece(torch.ones(8, 4) * 2)
    assert pic_a == embedding_piece(torch.ones(8, 4)) and pic_a != pic_b
    assert pic_a != embedding_piece(torch.ones(8, 4, dtype=torch.float64))  # the values the model reads
    assert common_length((text, pic_a, ("t", 1, 2)), (text, pic_a, ("t", 1, 3))) == 40 + 8 + 1
    assert common_length((text, pic_a, ("t", 1)), (text, pic_b, ("t", 1))) == 40  # another picture: stop before it
    assert common_length((("t", 1, 2, 3),), (("t", 1, 2),)) == 2


def _layers(length: int, nbytes_per_position: int = 1024) -> list:
    k = torch.zeros(1, length, nbytes_per_position // 8)  # float32: 4 bytes, keys and values: 2x
    return [(k, k.clone())]


def test_lookup_is_per_adapter_leaves_the_last_position_and_skips_short_prefixes():
    pc = PrefixCache(1 << 20)
    key = (("t", *range(100)),)
    pc.store(None, key, 100, lambda: _layers(100))
    assert pc.lookup("audio@v3", key, 100) == (0, None)  # a LoRA changes keys and values
    n, layers = pc.lookup(None, key, 100)
    assert n == 99 and layers[0][0].shape[1] == 100  # 99 of the 100 held: the last is prefilled (its logits pick)
    short = (("t", *range(MIN_REUSE_TOKENS - 1), 999),)
    assert pc.lookup(None, short, MIN_REUSE_TOKENS)[0] == 0
    assert pc.covers(None, (("t", *range(50)),), 50) and not pc.covers(None, (("t", *range(101)),), 101)
    assert (pc.stats.hits, pc.stats.misses) == (1, 2)


def test_memory_is_bounded_least_recently_used_first_and_longer_prompts_replace_their_prefixes():
    pc = PrefixCache(200 * 1024)  # 200 positions of 1 KiB
    a, b = (("t", *range(100)),), (("t", *range(1000, 1080)),)
    pc.store(None, a, 100, lambda: _layers(100))
    pc.store(None, b, 80, lambda: _layers(80))
    assert pc.stats.bytes == 180 * 1024 and pc.stats.entries == 2
    pc.store(None, (("t", *range(100), 7, 8, 9),), 103, lambda: _layers(103))  # extends a: replaces it
    assert pc.stats.entries == 2 and pc.stats.evictions == 0 and pc.stats.bytes == 183 * 1024
    pc.lookup(None, b, 80)  # b is now the most recent
    pc.store(None, (("t", *range(2000, 2050)),), 50, lambda: _layers(50))  # over 200 KiB: the oldest (a + 3) goes
    assert pc.stats.evictions == 1 and pc.lookup(None, a, 100)[0] == 0 and pc.lookup(None, b, 80)[0] == 79
    assert pc.stats.bytes <= pc.max_bytes
    pc.store(None, (("t", *range(3000, 3300)),), 300, lambda: _layers(300))  # bigger than the whole cache: not kept
    assert pc.stats.bytes <= pc.max_bytes and pc.lookup(None, b, 80)[0] == 79


def test_answers_with_a_lora_adapter_are_the_same_and_cached_per_adapter(settings):
    """A stage-2 adapter's LoRA (the shipped audio one), in an engine of the test's own."""
    from modalink import methods
    from modalink.engines.transformers import TransformersEngine
    from modalink.registry import AdapterRegistry

    registry = AdapterRegistry(REPO / "adapters")
    engine = TransformersEngine.load(settings=settings)
    versions = [v for v in registry.versions("audio") if registry.llm_adapter_path("audio", v) is not None]
    assert versions, "the shipped audio adapter is a stage-2 one (with a LoRA)"
    name = methods.serve(engine, registry, "audio", versions[-1])
    prompts = conversation(engine)
    engine.prefix_cache = PrefixCache(0)
    reference = [answers(engine, [p], [name])[0] for p in prompts] + [answers(engine, [prompts[1]])[0]]
    engine.prefix_cache = PrefixCache(64 << 20)
    got = [answers(engine, [p], [name])[0] for p in prompts]
    bare = answers(engine, [prompts[1]], [None])[0]  # the base model's entry is not the LoRA's
    assert got + [bare] == reference
    mixed = answers(engine, [prompts[1], prompts[1]], [name, None])  # one batch, one row each way
    assert mixed == [reference[1], reference[-1]]
    assert reference[1] != reference[-1]  # the LoRA does change this answer, so a mix-up would show


def test_the_next_turn_reuses_the_first_turns_answer_too(cached):
    """A finished answer's keys and values are kept with its prompt's: the next turn, whose history repeats that
    answer, prefills only its new question, and answers as with the cache off."""
    torch.manual_seed(0)
    picture = torch.randn(8, cached.hidden_size) * 0.02
    first = chat(cached, picture, [], "What is in the picture?")
    answer = answers(cached, [first])[0]
    second = chat(cached, picture, [("What is in the picture?", answer)], "What colour is it?")
    before = cached.prefix_cache.stats.tokens_reused
    with_cache = answers(cached, [second])[0]
    reused = cached.prefix_cache.stats.tokens_reused - before
    answer_tokens = len(cached.tokenizer(answer, add_special_tokens=False).input_ids)
    assert reused >= cached.prompt_length(first) + answer_tokens - 2, (reused, cached.prompt_length(first))
    off, cached.prefix_cache = cached.prefix_cache, PrefixCache(0)
    try:
        assert answers(cached, [second])[0] == with_cache
    finally:
        cached.prefix_cache = off
