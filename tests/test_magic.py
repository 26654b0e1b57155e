"""MAGIC, the training-free IMU baseline (``modalink.magic``): the frozen LLM, given only a question, is steered by
the similarity of each candidate continuation to the IMU window in MiniLM's space. Real models, the shipped IMU
encoder and its text head, real IMU windows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modalink.config import Settings
from modalink.data import ACTIVITIES, BuildConfig, build, read_manifest
from modalink.evaluate import is_correct, mentioned

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def imu(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    build(out, ("imu",), BuildConfig(seed=0))
    return out


@pytest.fixture(scope="module")
def magic():
    from modalink.encoders import load_encoder
    from modalink.engines.transformers import TransformersEngine
    from modalink.magic import Magic

    settings = Settings(adapters_dir=REPO / "adapters", quantize="none")
    return Magic(TransformersEngine.load(settings=settings), load_encoder("imu", settings), settings.system_prompt)


def test_the_imu_window_steers_the_answer_toward_its_activity(magic, imu):
    rows = read_manifest(imu / "imu" / "val.jsonl")
    one_each = [next(r for r in rows if r["label"] == a) for a in ACTIVITIES if any(r["label"] == a for r in rows)]
    assert len(one_each) >= 3
    steered = [magic.answer(r["path"]) for r in one_each]
    named = [mentioned("imu", a) for a in steered]
    right = sum(is_correct("imu", r["label"], a) for r, a in zip(one_each, steered, strict=True))
    assert right >= len(one_each) - 1, list(zip([r["label"] for r in one_each], steered, strict=True))
    assert len({tuple(n) for n in named}) >= 3  # different windows, different activities named
    blind = {magic.answer(r["path"], beta=0.0) for r in one_each[:2]}
    assert len(blind) == 1  # without the steering the window plays no part: one answer for all


def test_the_target_is_a_unit_vector_in_minilm_space_and_nearest_to_its_own_activity(magic, imu):
    from modalink.data import ACTIVITY_TEXT

    rows = read_manifest(imu / "imu" / "test.jsonl")[:12]
    texts = magic.text.encode([ACTIVITY_TEXT[a] for a in ACTIVITIES], convert_to_tensor=True,
                              normalize_embeddings=True).float().cpu()  # fmt: skip
    targets = [magic.target(r["path"]) for r in rows]
    assert all(abs(float(t.norm()) - 1) < 1e-4 and t.shape == (384,) for t in targets)
    nearest = [ACTIVITIES[int((texts @ t).argmax())] for t in targets]
    assert sum(n == r["label"] for n, r in zip(nearest, rows, strict=True)) >= 9


def test_evaluate_magic_reports_test_accuracy_with_beta_chosen_on_validation_and_writes_its_section(imu, tmp_path):
    from modalink.evaluate import MAGIC_SECTION, magic_section, put_section, sections
    from modalink.magic import evaluate_magic

    result = evaluate_magic(imu, Settings(adapters_dir=REPO / "adapters"), betas=(1.0, 2.0), limit=2)
    assert result["beta"] in (1.0, 2.0) and set(result["val"]) == {"1.0", "2.0"}
    assert result["test_n"] == 2 and 0 <= result["test_accuracy"] <= 1 and 0 <= result["blind_accuracy"] <= 1
    report = tmp_path / "RESULTS.md"
    report.write_text("# Results\n\nthe main table\n\n## Sample answers\n\n| a |\n")
    put_section(report, magic_section(result, 0.9, "modalink eval --magic"))
    text = report.read_text()
    assert text.startswith("# Results\n\nthe main table\n") and "## Sample answers" in text
    assert f"| MAGIC, no training | 2 | **{100 * result['test_accuracy']:.1f}%** |" in text
    put_section(report, magic_section({**result, "test_accuracy": 1.0}, 0.9, "again"))  # replaced, not appended
    assert report.read_text().count(MAGIC_SECTION) == 1 and "**100.0%**" in report.read_text()
    assert list(sections(report.read_text())) == ["## Sample answers", MAGIC_SECTION]


def test_without_a_text_head_the_encoder_says_how_to_get_one(tmp_path):
    import shutil

    from modalink.encoders import load_encoder
    from modalink.errors import ConfigError

    shutil.copytree(REPO / "adapters" / "encoders" / "imu-cnn", tmp_path / "encoders" / "imu-cnn")
    (tmp_path / "encoders" / "imu-cnn" / "text_head.safetensors").unlink()
    enc = load_encoder("imu", Settings(adapters_dir=tmp_path))
    with pytest.raises(ConfigError, match="modalink train -m imu"):
        enc.text_embedding(torch.zeros(4, enc.feature_dim))
