"""Data building, a short training run, and registry crash-safety (real processes, real models)."""

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter

import pytest
import torch

from modalink.data import VARIANTS, BuildConfig, build, read_manifest
from modalink.evaluate import is_correct, mentioned
from modalink.methods import METHODS
from modalink.projectors import DEFAULT_PROJECTORS, ProjectorConfig, build_projector, pad_features
from modalink.registry import AdapterRegistry

SMALL = BuildConfig(seed=3, image_train=20, image_val=10, image_test=10, audio_train_per_word=1,
                    audio_val_per_word=1, audio_test_per_word=1, video_train=6, video_val=2, video_test=2,
                    video_train_mixed=12, video_val_single=1, video_test_single=2, video_val_mixed=1,
                    video_test_mixed=3)  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    build(out, ("image", "audio", "imu", "video"), SMALL)
    return out


def test_manifests_have_the_documented_fields_and_files(data):
    for modality in ("image", "audio", "imu", "video"):
        for split in ("train", "val", "test"):
            rows = read_manifest(data / modality / f"{split}.jsonl")
            assert rows, (modality, split)
            for r in rows:
                assert {"id", "modality", "path", "label", "caption", "split"} <= set(r)
                assert r["modality"] == modality and r["split"] == split
                assert os.path.isfile(r["path"])
                assert is_correct(modality, r["label"], r["caption"]), r  # captions name their label
    real = read_manifest(data / "audio" / "real.jsonl")
    assert [r["label"] for r in real[:10]] == ["zero", "one", "two", "three", "four", "five", "six", "seven",
                                               "eight", "nine"]  # fmt: skip


def test_splits_are_disjoint_and_speakers_held_out(data):
    ids = {s: {r["id"] for r in read_manifest(data / "image" / f"{s}.jsonl")} for s in ("train", "val", "test")}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"]
    for split in ("train", "val", "test"):
        for r in read_manifest(data / "audio" / f"{split}.jsonl"):
            assert r["voice"].split("+")[1] in VARIANTS[split]


def test_building_is_reproducible_from_the_seed(data, tmp_path):
    build(tmp_path, ("imu", "image"), SMALL)
    for m in ("imu", "image"):
        assert (tmp_path / m / "train.jsonl").read_text() == (data / m / "train.jsonl").read_text()


def test_class_word_scoring_is_strict():
    assert is_correct("image", "shirt", "It is a shirt.")
    assert not is_correct("image", "shirt", "It is a t-shirt.")
    assert not is_correct("image", "shirt", "A shirt or maybe a coat.")  # hedging is wrong
    assert is_correct("audio", "seven", "The word is 7.")
    assert is_correct("video", "coat|bag", "First a coat, then a bag.")
    assert not is_correct("video", "coat|bag", "First a bag, then a coat.")
    assert not is_correct("video", "coat|bag", "First a coat, then a bag, then a coat.")  # every item, no more
    assert is_correct("video", "coat|bag|coat", "A coat, then a bag, and last a coat.")
    assert is_correct("video", "coat", "The video shows a coat. The coat is grey.")  # a repeat in a row is one item
    assert not is_correct("video", "coat", "A coat, then a bag.")
    assert mentioned("imu", "Someone is walking, not running.") == ["walking", "running"]


def test_video_clips_show_one_two_or_three_items_in_order(data):
    from modalink.data import clip_sampled_items

    for split in ("train", "val", "test"):
        rows = read_manifest(data / "video" / f"{split}.jsonl")
        kinds = [r["kind"] for r in rows]
        assert kinds == sorted(kinds, key=("pair", "single", "mixed").index)  # the two-item clips come first
        for r in rows:
            items = r["label"].split("|")
            assert len(items) == len(r["items"]) == len(r["frames"]) in (1, 2, 3)
            assert all(a != b for a, b in zip(items, items[1:], strict=False))  # neighbours differ
            assert r["kind"] != "pair" or r["frames"] == [4, 4]
            assert sorted(set(clip_sampled_items(r["frames"], 8))) == list(range(len(items)))  # each one is seen
    held_out = read_manifest(data / "video" / "test.jsonl")
    assert [r["kind"] for r in held_out].count("single") == SMALL.video_test_single


def test_video_order_questions_are_answered_from_the_label():
    import random

    from modalink.data import instruction

    rng = random.Random(0)
    seen = set()
    for _ in range(200):
        q, a = instruction("video", "shirt|bag|sandal", rng, order=1.0)
        if "first" in q.lower() or "start" in q.lower():
            assert mentioned("video", a) == ["shirt"], (q, a)
            seen.add("first")
        elif "last" in q.lower() or "end" in q.lower():
            assert mentioned("video", a) == ["sandal"], (q, a)
            seen.add("last")
        else:
            asked = mentioned("video", q)[0]
            assert a.startswith("Yes." if asked in ("shirt", "bag", "sandal") else "No."), (q, a)
            assert is_correct("video", "shirt|bag|sandal", a.split(". ", 1)[1])
            seen.add("appears")
    assert seen == {"first", "last", "appears"}
    describe = ("What happens in this video?", "Describe the video in order.", "What appears first, and what next?")
    assert instruction("video", "shirt|bag", random.Random(0), order=0.0)[0] in describe


def test_video_scores_per_kind_of_clip():
    from modalink.evaluate import video_scores

    rows = [{"label": "coat|bag", "kind": "pair"}, {"label": "coat|bag"}, {"label": "shirt"},
            {"label": "coat|bag|dress", "kind": "mixed"}]  # fmt: skip
    answers = ["First a coat, then a bag.", "First a bag, then a coat.", "A shirt.", "A coat, then a dress."]
    assert video_scores(rows, answers) == {"pair": (0.5, 2), "first": (0.6667, 3), "last": (0.6667, 3),
                                           "single": (1.0, 1), "mixed": (0.0, 1)}  # fmt: skip


def test_a_short_training_run_lowers_the_loss(data, engine, settings, tmp_path):
    from modalink.encoders import load_encoder
    from modalink.train.align import AlignConfig, AlignTrainer
    from modalink.train.features import encode_rows

    enc = load_encoder("image", settings)
    rows = read_manifest(data / "image" / "train.jsonl")[:8]
    items = list(zip(rows, encode_rows(enc, rows).values(), strict=True))
    cfg = AlignConfig("image", steps=8, batch_size=4, lr=2e-3, warmup=1, eval_every=100, eval_items=8,
                      checkpoint_every=4)  # fmt: skip
    trainer = AlignTrainer(cfg, engine, enc.feature_dim, items, items, tmp_path / "run")
    before = trainer.val_loss()
    trainer.fit()
    after = trainer.val_loss()
    assert after < before - 0.5, (before, after)
    # The checkpoint resumes exactly where training stopped.
    resumed = AlignTrainer(cfg, engine, enc.feature_dim, items, items, tmp_path / "run")
    assert resumed.resume() and resumed.step == 8
    for (k, a), b in zip(trainer.projector.state_dict().items(), resumed.projector.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("stage, method", [(1, "lora"), *((2, m) for m in METHODS)])
def test_shared_prompt_heads_give_the_plain_loss_and_gradients(data, settings, stage, method, tmp_path):
    """Every stage-2 method through the shared-head training path: the loss and gradients of the plain one (each
    method's tensors randomized first, so none sits at its identity start where some gradients vanish)."""
    from modalink.encoders import load_encoder
    from modalink.engines.transformers import TransformersEngine
    from modalink.train.align import AlignConfig, AlignTrainer, answer_loss, plain_answer_loss
    from modalink.train.features import encode_rows

    engine = TransformersEngine.load(settings=settings)
    enc = load_encoder("image", settings)
    rows = read_manifest(data / "image" / "train.jsonl")[:6]
    items = list(zip(rows, encode_rows(enc, rows).values(), strict=True))
    trainer = AlignTrainer(AlignConfig("image", stage=stage, method=method), engine, enc.feature_dim, items, items,
                           tmp_path)  # fmt: skip
    with torch.no_grad():
        for p in trainer.params[len(list(trainer.projector.parameters())) :]:
            p.add_(torch.randn_like(p) * 0.02)
    x, mask = pad_features([f.float() for _, f in items])
    media = trainer.projector(x, mask)
    questions = ["What is this?", "Describe the image briefly.", "What is this?", "What kind of item is this?",
                 "Describe the image briefly.", "What is this?"]  # fmt: skip
    answers = ["It is a " + r["label"] + "." for r in rows]
    batch = trainer.batcher.build(media, "image", questions, answers)
    assert len(batch.heads) == 3 and len({len(h) for h in batch.heads}) > 1  # heads of different lengths
    losses, grads = [], []
    for fn in (lambda: answer_loss(engine, trainer.heads, batch), lambda: plain_answer_loss(engine, batch)):
        trainer.opt.zero_grad()
        with engine.route(trainer.adapter):
            loss = fn()
        loss.backward(retain_graph=True)
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in trainer.params]))
    assert abs(losses[0] - losses[1]) < 1e-4 * losses[1], losses
    assert torch.allclose(grads[0], grads[1], atol=1e-5 + 1e-3 * grads[1].abs().max().item())


def test_stage_two_trains_a_lora_that_the_registry_ships_and_the_assistant_serves(data, settings, tmp_path):
    from modalink.assistant import Assistant
    from modalink.encoders import load_encoder
    from modalink.engine import GenerationParams
    from modalink.engines.transformers import TransformersEngine
    from modalink.prompt import Media, Message, build_prompt
    from modalink.train.align import AlignConfig, AlignTrainer
    from modalink.train.features import encode_rows

    engine = TransformersEngine.load(settings=settings)  # its own: training adds a LoRA to the model in place
    enc = load_encoder("image", settings)
    rows = read_manifest(data / "image" / "train.jsonl")[:8]
    items = list(zip(rows, encode_rows(enc, rows).values(), strict=True))
    cfg = AlignConfig("image", stage=2, steps=8, batch_size=4, lr=2e-3, method_lr=2e-3, warmup=1, eval_every=100,
                      eval_items=8, checkpoint_every=4)  # fmt: skip
    trainer = AlignTrainer(cfg, engine, enc.feature_dim, items, items, tmp_path / "run")
    before = trainer.val_loss()
    trainer.fit()
    assert trainer.val_loss() < before - 0.5
    tensors, lora_config = trainer.adapter_state()
    assert lora_config["r"] == 8 and sorted(lora_config["target_modules"]) == ["q_proj", "v_proj"]
    assert any(v.abs().sum() > 0 for k, v in tensors.items() if "lora_B" in k)  # B starts at zero: it learned

    registry = AdapterRegistry(tmp_path / "adapters")
    version = registry.publish("image", trainer.projector, llm_adapter=(tensors, lora_config), promote=True)
    assert registry.llm_adapter_path("image", version) is not None
    served = Assistant(settings.model_copy(update={"adapters_dir": tmp_path / "adapters"}))
    name = served.llm_adapter("image")
    assert name == f"image@{version}"
    # The served LoRA (fp16 at rest) reproduces the trained one on the same prompt; the bare LLM differs.
    media = trainer.projector(*pad_features([items[0][1].float()]))[0]
    prompt = build_prompt(engine.tokenizer, [Message("user", ["What is this?", Media("image", media.detach())])],
                          settings.system_prompt)  # fmt: skip
    trained = engine.next_token_logits(prompt, adapter=trainer.adapter)
    loaded = served.engine.next_token_logits(prompt, adapter=name)
    bare = served.engine.next_token_logits(prompt)
    assert torch.allclose(trained, loaded, atol=0.05 * trained.abs().max().item())
    assert (trained - bare).abs().max() > 10 * (trained - loaded).abs().max()
    # One batch, one LoRA per row: each row answers as it would alone.
    params = GenerationParams(max_new_tokens=8)
    mixed = served.engine.generate([prompt, prompt], params, [name, None])
    assert mixed[0].text == served.engine.generate([prompt], params, [name])[0].text
    assert mixed[1].text == served.engine.generate([prompt], params)[0].text
    with pytest.raises(Exception, match="unknown LLM adapter"):
        served.engine.generate([prompt], params, ["audio@v9"])
    # The LoRA is checksummed like the projector.
    weights = registry.llm_adapter_path("image", version) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-2] + b"00")
    with pytest.raises(RuntimeError, match="checksum mismatch in lora/adapter_model.safetensors"):
        registry.verify("image", version)


WRITER = """
import os, signal, sys, torch
from pathlib import Path
from modalink import registry
from modalink.projectors import ProjectorConfig, build_projector
registry.STEP_HOOKS.append(lambda name: os.kill(os.getpid(), signal.SIGKILL) if name == sys.argv[2] else None)
reg = registry.AdapterRegistry(Path(sys.argv[1]))
proj = build_projector(ProjectorConfig(kind="linear", d_in=2048, d_llm=2048, n_tokens=8))  # 67 MB at rest (fp16)
lora = ({"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(8, 576),
         "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(576, 8)},
        {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA"})
reg.publish("image", proj, metrics={"val_accuracy": 0.1}, promote=True, llm_adapter=lora)
print("finished", flush=True)
"""


def test_a_writer_killed_mid_publish_leaves_current_complete(tmp_path):
    """A stage-2 publish (a large projector and its LoRA) SIGKILLed at each write step (``registry.STEP_HOOKS``),
    so every kill lands inside the write it names: CURRENT always names a complete, checksum-valid version (its
    LoRA included), no half-written version is listed, and the version appears, and becomes current, only at the
    steps that make it so."""
    from modalink.registry import WRITE_STEPS

    reg = AdapterRegistry(tmp_path)
    reg.publish("image", build_projector(ProjectorConfig(kind="linear", d_in=4, d_llm=4, n_tokens=1)), promote=True)
    for step in WRITE_STEPS:
        before, before_current = reg.versions("image"), reg.current("image")
        target = f"v{int(before[-1][1:]) + 1}"
        proc = subprocess.run([sys.executable, "-c", WRITER, str(tmp_path), step], capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert proc.returncode == -signal.SIGKILL, (step, proc.returncode, proc.stderr[-2000:])
        current = reg.current("image")
        assert current in reg.versions("image")
        reg.verify("image", current)  # complete and checksum-valid
        for v in reg.versions("image"):
            reg.verify("image", v)  # no half-written version is visible
            assert (reg.llm_adapter_path("image", v) is not None) == (v != "v1")  # a stage-2 version has its LoRA
        assert reg.promotions("image")[-1] == current
        renamed = WRITE_STEPS.index(step) >= WRITE_STEPS.index("version-renamed")
        assert reg.versions("image") == before + [target] * renamed, step
        assert current == (target if step == "CURRENT-replaced" else before_current), step
        for leftover in (tmp_path / "image").iterdir():
            assert leftover.name in {"CURRENT", "HISTORY"} or leftover.name.startswith(("v", "."))
            if leftover.name.startswith("."):  # a killed writer's temp dir or file: not a version
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()


def test_rollback_returns_to_the_previous_promotion(tmp_path):
    reg = AdapterRegistry(tmp_path)
    proj = build_projector(ProjectorConfig(kind="linear", d_in=4, d_llm=4, n_tokens=1))
    v1 = reg.publish("audio", proj, promote=True)
    v2 = reg.publish("audio", proj, promote=True)
    assert reg.current("audio") == v2
    assert reg.rollback("audio") == v1 and reg.current("audio") == v1
    with pytest.raises(ValueError, match="no earlier"):
        reg.rollback("audio")
    history = [json.loads(x) for x in (tmp_path / "audio" / "HISTORY").read_text().splitlines()]
    assert [h["version"] for h in history] == [v1, v2, v1]


def test_imu_encoder_aligns_to_text_and_loads_as_trained(data, tmp_path):
    import numpy as np

    from modalink.config import Settings
    from modalink.encoders.imu import IMUEncoder
    from modalink.train.imu_encoder import train_imu_encoder

    train = read_manifest(data / "imu" / "train.jsonl")
    windows = np.stack([np.load(r["path"]) for r in train])
    # Measured on windows it never trained on: the val split and BasicMotions' official TEST split.
    held_out = read_manifest(data / "imu" / "val.jsonl") + read_manifest(data / "imu" / "test.jsonl")
    assert not {r["id"] for r in held_out} & {r["id"] for r in train}
    val = (np.stack([np.load(r["path"]) for r in held_out]), [r["label"] for r in held_out])
    metrics = train_imu_encoder(windows, [r["label"] for r in train], tmp_path / "encoders" / "imu-cnn", steps=60,
                                val=val)  # fmt: skip
    assert metrics["val_zero_shot_accuracy"] >= 0.75  # 4 classes: chance is 0.25 (one step scores 0.25 here)
    enc = IMUEncoder(Settings(adapters_dir=tmp_path))
    assert enc.trained and enc(windows[0]).shape == (13, 256)
    # An IMU adapter records the encoder weights it was trained on; other weights are refused, not misread.
    from modalink.assistant import Assistant

    proj = build_projector(ProjectorConfig(kind="linear", d_in=256, d_llm=576, n_tokens=4))
    AdapterRegistry(tmp_path).publish("imu", proj, extra={"encoder_weights": enc.weights_id}, promote=True)
    settings = Settings(adapters_dir=tmp_path)
    assert Assistant(settings).projector("imu")[1] == "v1"
    train_imu_encoder(windows, [r["label"] for r in train], tmp_path / "encoders" / "imu-cnn", steps=2, seed=1)
    with pytest.raises(RuntimeError, match="trained on encoder weights"):
        Assistant(settings).projector("imu")


@pytest.mark.parametrize("tokens", ["frames", "st-pool"])
def test_cached_video_features_equal_the_video_encoder(data, settings, tokens):
    """Training derives clip features from the items' image features; that must equal the real encoder path, for
    clips of one, two and three items of any length."""
    from modalink.encoders import load_encoder
    from modalink.train.features import encode_rows, video_from_image_features

    video = load_encoder("video", settings.model_copy(update={"video_tokens": tokens}))
    assert video.name == f"efficientnet-lite0+{tokens}"
    rows = read_manifest(data / "video" / "train.jsonl")
    clips = [rows[0]] + [next(r for r in rows if len(r["items"]) == n and r["kind"] == "mixed") for n in (1, 2, 3)]
    images = {r["id"]: r for r in read_manifest(data / "image" / "train.jsonl")}
    for clip in clips:
        feats = encode_rows(video.image, [images[i] for i in clip["items"]])
        derived = video_from_image_features([feats[i] for i in clip["items"]], clip["frames"], 8, tokens).float()
        direct = video(clip["path"])
        n_frames = 1 if len(clip["items"]) == 1 else 8  # a clip of one item is a still image
        assert derived.shape == direct.shape == ((n_frames,) if tokens == "frames" else (49 + n_frames,)) + (1280,)
        torch.testing.assert_close(derived, direct, atol=2e-2, rtol=2e-2)  # fp16 cache


def test_a_video_adapter_reads_the_clip_tokens_it_was_trained_on(settings, tmp_path):
    from modalink.embedder import Embedder

    reg = AdapterRegistry(tmp_path)
    proj = build_projector(ProjectorConfig(kind="mlp", d_in=1280, d_llm=576, n_tokens=8))
    reg.publish("video", proj, extra={"encoder": "efficientnet-lite0+st-pool"}, promote=True)
    other = settings.model_copy(update={"adapters_dir": tmp_path, "video_tokens": "frames"})
    with pytest.raises(RuntimeError, match="'st-pool' clip tokens but the encoder makes 'frames'"):
        Embedder(other).projector("video")
    same = settings.model_copy(update={"adapters_dir": tmp_path, "video_tokens": "st-pool"})
    assert Embedder(same).projector("video")[1] == "v1"


def test_word_grounding_puts_each_frame_token_on_its_items_class_word(data, engine, settings):
    """A fresh video projector grounded on the image train split (``--ground``): each frame token of a clip lies
    nearest the LLM embedding of the garment that frame shows, so the clip's tokens name its items in order."""
    from modalink.data import GARMENTS, clip_sampled_items
    from modalink.encoders import load_encoder
    from modalink.train.align import AlignConfig
    from modalink.train.features import features_for
    from modalink.train.ground import class_embeddings, ground
    from modalink.train.run import ground_projector

    video = load_encoder("video", settings)  # 'frames' tokens, the default
    cfg = AlignConfig("video", ground=60)
    proj = build_projector(ProjectorConfig(d_in=1280, d_llm=engine.hidden_size, **DEFAULT_PROJECTORS["video"]))
    words = class_embeddings(engine, list(GARMENTS))

    def named(clip_feats: torch.Tensor) -> list[str]:
        with torch.no_grad():
            out = proj(clip_feats.float()[None])[0]
        return [GARMENTS[i] for i in torch.nn.functional.cosine_similarity(out[:, None], words[None], -1).argmax(1)]

    clips = [c for c in features_for("video", "train", data, settings, video) if len(c[0]["items"]) > 1][:6]
    labels = {r["id"]: r["label"] for r in read_manifest(data / "image" / "train.jsonl")}
    truth = [[labels[c["items"][i]] for i in clip_sampled_items(c["frames"], 8)] for c, _ in clips]
    before = sum(a == b for (_, f), t in zip(clips, truth, strict=True) for a, b in zip(named(f), t, strict=True))
    result = ground_projector(proj, "video", data, settings, video, engine, cfg)
    assert result["ground_accuracy"] >= 0.95, result
    after = [named(f) for _, f in clips]
    assert after == truth, (after, truth)
    assert before < 0.5 * sum(map(len, truth)), before  # an untrained projector does not already do it
    with pytest.raises(ValueError, match="needs an 'mlp' projector"):
        ground(build_projector(ProjectorConfig(kind="perceiver", d_in=1280, d_llm=576)), torch.zeros(2, 1280),
               ["bag", "coat"], list(GARMENTS), engine)  # fmt: skip
    with pytest.raises(ValueError, match="labels without a class word"):
        ground(proj, torch.zeros(1, 1280), ["banana"], list(GARMENTS), engine)


def test_balanced_batches_draw_clips_of_one_two_and_three_items_alike(engine, tmp_path):
    """``--balance``: the built training clips are 12% single items; balanced batches draw each item count a third of
    the time (a plain batch draws distinct items as built)."""
    from modalink.train.align import AlignConfig, AlignTrainer

    labels = ["bag"] * 6 + ["bag|coat"] * 32 + ["bag|coat|bag"] * 12
    items = [({"label": label}, torch.zeros(1, 8)) for label in labels]
    counts = lambda batch: Counter(len(r["label"].split("|")) for r, _ in batch)  # noqa: E731
    balanced = AlignTrainer(AlignConfig("video", balance=True), engine, 8, items, items, tmp_path / "a")
    got = counts(balanced.draw(3000))
    assert all(850 < got[k] < 1150 for k in (1, 2, 3)), got
    plain = AlignTrainer(AlignConfig("video"), engine, 8, items, items, tmp_path / "b").draw(50)
    assert counts(plain) == {1: 6, 2: 32, 3: 12}
