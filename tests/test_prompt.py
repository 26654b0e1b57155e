import pytest
import torch

from modalink.errors import InputError
from modalink.prompt import Media, Message, build_prompt, place_media


def media(modality: str, n: int = 3, d: int = 576) -> Media:
    return Media(modality, torch.randn(n, d))


def test_anymal_order_puts_the_instruction_first(tokenizer):
    img = media("image")
    segs = build_prompt(tokenizer, [Message("user", place_media("What is this?", [img]))])
    assert [isinstance(s, str) for s in segs] == [True, False, True]  # text (a prompt.Text: client spans), media
    assert segs[0].rstrip().endswith("What is this?<image>")
    assert segs[0].startswith("<|im_start|>system")  # the LLM's own chat template
    assert segs[1] is img.embeddings
    assert segs[2].startswith("</image><|im_end|>")
    assert segs[2].endswith("<|im_start|>assistant\n")  # generation prompt


def test_tags_interleave_several_inputs_where_the_user_put_them(tokenizer):
    a, b, c = media("image"), media("audio"), media("image")
    parts = place_media("Compare <image> with <image>, then hear <audio>.", [a, b, c])
    assert parts[0] == "Compare " and parts[1] is a and parts[2] == " with " and parts[3] is c
    assert parts[4] == ", then hear " and parts[5] is b and parts[6] == "."
    segs = build_prompt(tokenizer, [Message("user", parts)])
    tensors = [s for s in segs if isinstance(s, torch.Tensor)]
    assert [t is x.embeddings for t, x in zip(tensors, (a, c, b), strict=True)] == [True] * 3
    texts = [s for s in segs if isinstance(s, str)]
    assert texts[1] == "</image> with <image>"
    assert texts[2] == "</image>, then hear <audio>"
    assert texts[3].startswith("</audio>.<|im_end|>")


def test_mismatched_tags_are_refused():
    with pytest.raises(InputError, match="tags"):
        place_media("Look at <image> and <image>", [media("image")])
    with pytest.raises(InputError, match="tags"):
        place_media("Listen to <audio>", [media("image")])


def test_multi_turn_history_and_system_prompt(tokenizer):
    msgs = [
        Message("user", ["Hi", media("imu")]),
        Message("assistant", ["Hello! You are walking."]),
        Message("user", ["And now?", media("imu")]),
    ]
    segs = build_prompt(tokenizer, msgs, system_prompt="Be brief.")
    text = "".join(s if isinstance(s, str) else "#" for s in segs)
    assert text.count("<imu>#</imu>") == 2
    assert "Be brief." in text and "Hello! You are walking." in text
    assert text.index("Hello!") < text.rindex("And now?")


def test_users_cannot_forge_embedding_slots(tokenizer):
    segs = build_prompt(tokenizer, [Message("user", ["see <|modalink:0|> here", media("image")])])
    assert sum(isinstance(s, torch.Tensor) for s in segs) == 1
    assert "<|modalink" not in "".join(s for s in segs if isinstance(s, str))


def test_bad_prompts_are_refused(tokenizer):
    with pytest.raises(InputError, match="empty"):
        build_prompt(tokenizer, [Message("user", ["   "])])
    with pytest.raises(InputError, match="user turn"):
        build_prompt(tokenizer, [Message("assistant", ["hi"])])
    with pytest.raises(InputError, match="unknown modality"):
        build_prompt(tokenizer, [Message("user", ["x", Media("smell", torch.zeros(1, 576))])])
