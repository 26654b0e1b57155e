import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modalink.engine import GenerationParams
from modalink.engines.decoding import sample
from modalink.engines.transformers import TransformersEngine
from modalink.errors import InputError
from modalink.prompt import Media, Message, build_prompt


def chat(tokenizer, *parts) -> list:
    """A one-turn chat prompt; tensors become image prefixes."""
    content = [Media("image", p) if isinstance(p, torch.Tensor) else p for p in parts]
    return build_prompt(tokenizer, [Message("user", content)])


def prefix(engine, seed: int, n: int = 4) -> torch.Tensor:
    """Random prefix embeddings with the scale of the LLM's own token embeddings."""
    g = torch.Generator().manual_seed(seed)
    scale = engine.embedding.weight.std().item()
    return torch.randn(n, engine.hidden_size, generator=g) * scale


def test_text_only_answer_is_sensible(engine):
    [out] = engine.generate([chat(engine.tokenizer, "What is the capital of France?")], GenerationParams(16))
    assert "Paris" in out.text
    assert out.finish_reason == "stop" and 0 < out.completion_tokens <= 16
    assert out.prompt_tokens == len(
        engine.tokenizer(chat(engine.tokenizer, "What is the capital of France?")[0]).input_ids
    )


def test_the_prefix_changes_the_output(engine):
    a = engine.next_token_logits(chat(engine.tokenizer, "Describe this.", prefix(engine, 1)))
    b = engine.next_token_logits(chat(engine.tokenizer, "Describe this.", prefix(engine, 2)))
    assert a.shape == (engine.model.config.vocab_size,)
    assert (a - b).abs().max() > 1e-2


def test_batch_equals_one_by_one_for_greedy(engine):
    tok = engine.tokenizer
    prompts = [
        chat(tok, "Name a color."),
        chat(tok, "Count from one to five, please, separated by commas.", prefix(engine, 3, n=6)),
        chat(tok, "Say hi", prefix(engine, 4, n=2)),
    ]
    params = GenerationParams(max_new_tokens=12)
    batched = engine.generate(prompts, params)
    for prompt, b in zip(prompts, batched, strict=True):
        [single] = engine.generate([prompt], params)
        assert single.token_ids == b.token_ids
        assert single.text == b.text


def test_streamed_deltas_add_up_and_stop_sequences_cut(engine):
    prompt = chat(engine.tokenizer, "Count from one to ten in digits, separated by commas.")
    [full] = engine.generate([prompt], GenerationParams(max_new_tokens=30))
    assert "5" in full.text
    events = list(engine.stream([prompt], GenerationParams(max_new_tokens=30, stop=["5"])))
    text = "".join(e.text for e in events)
    assert events[-1].finish_reason == "stop" and all(e.finish_reason is None for e in events[:-1])
    assert "5" not in text and full.text.startswith(text) and text


class CountingTokenizer:
    """The real tokenizer, recording how many ids each decode call is given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.sizes = tokenizer, []

    def decode(self, ids, **kw):
        self.sizes.append(len(ids))
        return self.tokenizer.decode(ids, **kw)


@pytest.mark.parametrize(
    "text",
    ["Plain words, with punctuation: 3.14 and (brackets).", "Emoji 🤖🎉 and accents: café, naïve, Zürich.",
     "汉字と日本語のテキスト、한국어도。", "  leading spaces,\ttabs\nand new lines\n\n"],
)  # fmt: skip
def test_incremental_detokenization_is_the_whole_decode_and_stays_short(tokenizer, text):
    from modalink.engines.decoding import TextStream

    ids = tokenizer(text, add_special_tokens=False).input_ids
    ids = ids + [tokenizer.eos_token_id] + ids * 40  # a special token inside, and a long answer
    counting = CountingTokenizer(tokenizer)
    stream = TextStream(counting, [])
    deltas = [stream.push(i)[0] for i in ids]
    deltas.append(stream.flush())
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(deltas) == whole
    assert max(counting.sizes) <= 16  # each token decodes a short window, however long the answer grows
    fast = TextStream(tokenizer, [])  # the tokenizer itself: its Rust decoder called directly (no clean-up pass)
    assert "".join([fast.push(i)[0] for i in ids]) + fast.flush() == whole


def test_incremental_detokenization_cuts_at_a_stop_sequence_across_tokens(tokenizer):
    from modalink.engines.decoding import TextStream

    ids = tokenizer("one, two, three, four, five", add_special_tokens=False).input_ids
    stream = TextStream(tokenizer, ["e, fo", "zzz"])
    out, hit = "", False
    for i in ids:
        delta, hit = stream.push(i)
        out += delta
        if hit:
            break
    assert hit and out == "one, two, thre"
    stream = TextStream(tokenizer, [])  # an answer cut inside a character still flushes what it decoded
    emoji = tokenizer("🤖", add_special_tokens=False).input_ids
    assert len(emoji) > 1, "the test needs a character spread over several tokens"
    text = "".join(stream.push(i)[0] for i in ids[:3] + emoji[:1]) + stream.flush()
    assert text == tokenizer.decode(ids[:3] + emoji[:1]) and text.endswith("\ufffd")


def test_length_limit_and_sampling_seed(engine):
    prompt = chat(engine.tokenizer, "Write a long story about a cat.")
    [out] = engine.generate([prompt], GenerationParams(max_new_tokens=5))
    assert out.finish_reason == "length" and out.completion_tokens == 5
    sampled = GenerationParams(max_new_tokens=8, temperature=1.2, top_p=0.9, top_k=50, seed=7)
    a, b = engine.generate([prompt, prompt], [sampled, sampled])
    [c] = engine.generate([prompt], sampled)
    assert a.token_ids == b.token_ids == c.token_ids  # same seed, same tokens, batched or not
    other = GenerationParams(max_new_tokens=8, temperature=1.2, top_p=0.9, top_k=50, seed=8)
    draws = {tuple(engine.generate([prompt], other)[0].token_ids)} | {tuple(a.token_ids)}
    assert len(draws) == 2


def test_repetition_penalty_demotes_seen_tokens():
    logits = torch.tensor([1.0, 3.0, 2.5, -1.0])
    seen = torch.tensor([1])
    assert sample(logits, GenerationParams(), seen, None) == 1
    assert sample(logits, GenerationParams(repetition_penalty=1.5), seen, None) == 2  # 3.0 / 1.5 < 2.5
    assert logits[1] == 3.0  # the caller's logits are untouched


def test_top_k_and_top_p_restrict_sampling():
    logits = torch.tensor([5.0, 4.9, 0.0, -2.0])
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, GenerationParams(temperature=1.0, top_k=2), torch.tensor([]), g) for _ in range(200)}
    assert draws == {0, 1}
    draws = {sample(logits, GenerationParams(temperature=1.0, top_p=0.3), torch.tensor([]), g) for _ in range(50)}
    assert draws == {0}


@pytest.mark.parametrize(
    "params, message",
    [
        (GenerationParams(max_new_tokens=0), "max_new_tokens"),
        (GenerationParams(temperature=-1.0), "temperature"),
        (GenerationParams(temperature=float("nan")), "temperature"),
        (GenerationParams(top_p=0.0), "top_p"),
        (GenerationParams(top_k=-3), "top_k"),
        (GenerationParams(stop=[""]), "stop"),
    ],
)
def test_absurd_params_are_refused(engine, params, message):
    with pytest.raises(InputError, match=message):
        engine.generate([chat(engine.tokenizer, "hi")], params)


def test_context_overflow_and_bad_prefix_are_refused(engine):
    with pytest.raises(InputError, match="context"):
        engine.generate([chat(engine.tokenizer, "hi")], GenerationParams(max_new_tokens=engine.max_context))
    with pytest.raises(InputError, match=r"\[n, 576\]"):
        engine.generate([chat(engine.tokenizer, "hi", torch.zeros(3, 100))], GenerationParams(4))
    with pytest.raises(InputError, match="NaN"):
        engine.generate([chat(engine.tokenizer, "hi", torch.full((2, 576), float("nan")))], GenerationParams(4))


def test_tiny_random_llama_exercises_the_llama_path(tokenizer):
    """The production path (LLaMA-2-chat) without its weights: a tiny random LlamaConfig model."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    engine = TransformersEngine(model, tokenizer)
    assert engine.hidden_size == 64 and engine.max_context == 256
    prompts = [chat(tokenizer, "hello", torch.randn(3, 64)), chat(tokenizer, "a longer question here")]
    batched = engine.generate(prompts, GenerationParams(max_new_tokens=6))
    singles = [engine.generate([p], GenerationParams(max_new_tokens=6))[0] for p in prompts]
    assert [b.token_ids for b in batched] == [s.token_ids for s in singles]
    assert all(len(b.token_ids) >= 1 for b in batched)
    assert engine.next_token_logits(prompts[0]).shape == (len(tokenizer),)


def test_vllm_engine_reads_the_embedding_table_and_refuses_a_cpu(engine, settings):
    """The vLLM engine embeds text with the checkpoint's table, read alone from its safetensors: the same one
    the transformers engine uses. On a machine without CUDA, asking for it is a clear configuration error."""
    from modalink.engines import load_engine
    from modalink.engines.vllm import embedding_table
    from modalink.errors import ConfigError
    from modalink.llm import resolve_llm_path

    table = embedding_table(resolve_llm_path(settings.llm, settings))
    assert torch.equal(table.float(), engine.embedding.weight.float())
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA GPU"):
            load_engine(settings.model_copy(update={"engine": "vllm"}))


def test_fp16_packed_linears_keep_the_answers_and_take_a_lora(settings, engine, tmp_path):
    """MODALINK_QUANTIZE=fp16-cpu: the frozen linears become fbgemm fp16 GEMMs; LoRA targets stay float."""
    from modalink import methods
    from modalink.llm import LORA_TARGETS, PackedFp16Linear

    packed = TransformersEngine.load(settings=settings.model_copy(update={"quantize": "fp16-cpu"}))
    layers = dict(packed.model.named_modules())
    assert isinstance(layers["lm_head"], PackedFp16Linear)
    assert isinstance(layers["model.layers.0.mlp.down_proj"], PackedFp16Linear)
    assert all(isinstance(layers[f"model.layers.0.self_attn.{t}"], torch.nn.Linear) for t in LORA_TARGETS)
    prompt = chat(engine.tokenizer, "Describe this.", prefix(engine, 5))
    ref, got = engine.next_token_logits(prompt), packed.next_token_logits(prompt)
    assert (ref - got).abs().max() < 0.1 * ref.abs().max() and ref.argmax() == got.argmax()
    params = GenerationParams(max_new_tokens=16)
    question = [chat(engine.tokenizer, "What is the capital of France?")]
    assert packed.generate(question, params)[0].text == engine.generate(question, params)[0].text
    # a LoRA adapter loads on top (peft's partial state dict has no keys for the packed layers)
    trainee = TransformersEngine.load(settings=settings)
    for p in trainee.train_adapter("probe"):
        torch.nn.init.normal_(p, std=0.05)
    methods.save(tmp_path / "lora", *trainee.adapter_state("probe"))
    packed.load_adapter("probe", tmp_path / "lora")
    with_lora = packed.next_token_logits(prompt, adapter="probe")
    assert (with_lora - got).abs().max() > 1e-2
    assert torch.allclose(packed.next_token_logits(prompt), got)
