import pytest
import torch
from procs import ONE_FP16_STEP
from transformers import CLIPVisionConfig, CLIPVisionModel

from modalink import MODALITIES
from modalink.assistant import UNTRAINED, Assistant
from modalink.encoders import load_encoder
from modalink.engine import GenerationParams
from modalink.errors import InputError
from modalink.modality import get as get_modality
from modalink.projectors import ProjectorConfig, build_projector
from modalink.registry import AdapterRegistry


@pytest.mark.parametrize("modality", MODALITIES)
def test_each_modality_answers_end_to_end(assistant, samples, modality):
    answer = assistant.ask("What is this?", [(modality, samples[modality])], GenerationParams(max_new_tokens=6))
    assert answer.text.strip()
    assert answer.adapters == {modality: UNTRAINED}
    n_tokens = get_modality(modality).projector["n_tokens"]
    from modalink.prompt import Message, build_prompt

    text_prompt = build_prompt(assistant.engine.tokenizer, [Message("user", ["What is this?"])],
                               assistant.settings.system_prompt)  # fmt: skip
    text_only = assistant.engine.prompt_length(text_prompt)
    assert answer.usage["prompt_tokens"] > text_only + n_tokens  # embeddings + boundary markers
    assert answer.usage["completion_tokens"] == 6 or answer.finish_reason == "stop"


def test_embeddings_have_the_llm_width_and_batching_matches_single(assistant, samples):
    for modality in MODALITIES:
        [one], _ = assistant.embed(modality, [samples[modality]])
        assert one.shape == (get_modality(modality).projector["n_tokens"], assistant.engine.hidden_size)
        both, _ = assistant.embed(modality, [samples[modality], samples[modality]])
        torch.testing.assert_close(both[0], one, **ONE_FP16_STEP)
        torch.testing.assert_close(both[1], one, **ONE_FP16_STEP)


def test_the_input_changes_the_answer_distribution(assistant, samples):
    """Different images -> different prefixes -> different next-token logits, through the whole pipeline."""
    from modalink.prompt import Media, Message, build_prompt

    (a, b), _ = assistant.embed("image", [samples["image"], samples["video"]])  # a GIF's first frame differs
    tok = assistant.engine.tokenizer
    la = assistant.engine.next_token_logits(build_prompt(tok, [Message("user", ["What?", Media("image", a)])]))
    lb = assistant.engine.next_token_logits(build_prompt(tok, [Message("user", ["What?", Media("image", b)])]))
    assert (la - lb).abs().max() > 1e-3


def test_a_promoted_adapter_is_used(settings, engine, samples, tmp_path):
    enc = load_encoder("imu", settings)
    torch.manual_seed(1)
    proj = build_projector(ProjectorConfig(kind="mlp", d_in=enc.feature_dim, d_llm=engine.hidden_size, n_tokens=3))
    registry = AdapterRegistry(tmp_path)
    version = registry.publish("imu", proj, metrics={"accuracy": 0.5}, promote=True)
    assistant = Assistant(settings.model_copy(update={"adapters_dir": tmp_path}), engine=engine)
    [emb], used = assistant.embed("imu", [samples["imu"]])
    assert used == version == "v1" and emb.shape == (3, engine.hidden_size)
    answer = assistant.ask("Activity?", [("imu", samples["imu"])], GenerationParams(max_new_tokens=2))
    assert answer.adapters == {"imu": "v1"}


def test_an_adapter_of_the_wrong_width_is_refused(settings, engine, tmp_path):
    proj = build_projector(ProjectorConfig(kind="linear", d_in=7, d_llm=engine.hidden_size, n_tokens=1))
    AdapterRegistry(tmp_path).publish("imu", proj, promote=True)
    assistant = Assistant(settings.model_copy(update={"adapters_dir": tmp_path}), engine=engine)
    with pytest.raises(RuntimeError, match="maps 7->576"):
        assistant.projector("imu")


def test_bad_input_is_refused_before_the_llm_loads(settings, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assistant = Assistant(settings)  # no engine given: it would load lazily
    with pytest.raises(InputError, match="not a decodable image"):
        assistant.ask("hi", [("image", bad)])
    with pytest.raises(InputError, match="unknown modality"):
        assistant.ask("hi", [("smell", bad)])
    assert assistant._engine is None


def test_clip_vision_checkpoint_path(settings, tmp_path, samples):
    """The production image path (CLIP ViT-L/14) with a tiny random CLIP vision tower saved locally."""
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=64, patch_size=16)  # fmt: skip
    CLIPVisionModel(cfg).save_pretrained(tmp_path / "clip")
    enc = load_encoder("image", settings.model_copy(update={"image_encoder": str(tmp_path / "clip")}))
    feats = enc(samples["image"])
    assert feats.shape == ((64 // 16) ** 2, 32) and enc.feature_dim == 32
