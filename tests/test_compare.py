"""The stage-2 method comparison (``modalink eval --methods``, ``modalink.train.compare``): every method trained from
the same stage-1 projector into a scratch registry, scored on the test split, its decoding timed beside the others,
and the best one by validation accuracy shipped into the real registry. Real models, a tiny audio set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from modalink.config import Settings
from modalink.data import BuildConfig, build
from modalink.registry import AdapterRegistry

REPO = Path(__file__).resolve().parents[1]
TINY = BuildConfig(seed=4, audio_train_per_word=1, audio_val_per_word=1, audio_test_per_word=1)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    from modalink.train.compare import score_methods, stage1_version, train_methods

    data = tmp_path_factory.mktemp("data")
    build(data, ("audio",), TINY)
    adapters = tmp_path_factory.mktemp("adapters")
    shutil.copytree(REPO / "adapters" / "audio", adapters / "audio")  # the shipped audio versions (stage 2 current)
    settings = Settings(adapters_dir=adapters)
    work = tmp_path_factory.mktemp("work")
    trained = train_methods("audio", data, settings, work, ["lora", "prompt"], steps=2)
    scored = score_methods("audio", data, settings, work, {m: dict(r) for m, r in trained.items()}, limit=4,
                           decode_tokens=6, repeats=1)  # fmt: skip
    return {"data": data, "settings": settings, "work": work, "trained": trained, "scored": scored,
            "base": stage1_version(AdapterRegistry(REPO / "adapters"), "audio")}  # fmt: skip


def test_each_method_starts_from_the_shipped_stage1_projector_and_reports_its_cost(compared):
    base, trained = compared["base"], compared["trained"]
    shipped = AdapterRegistry(REPO / "adapters")
    assert base != shipped.current("audio") and shipped.llm_adapter_path("audio", base) is None  # stage 1
    scratch = AdapterRegistry(compared["work"] / "adapters")
    for method, r in trained.items():
        assert r["init_from"] == base and r["steps"] == 2 and r["step_seconds"] > 0 and 0 <= r["val_accuracy"] <= 1
        meta = next(v.metrics for v in scratch.list("audio") if v.version == r["version"])
        assert meta["method"] == method and meta["init_from"] == base
    # LoRA rank 8 on q_proj (576 -> 576) and v_proj (576 -> 192) of 30 layers; 16 soft-prompt vectors of 576
    assert trained["lora"]["trainable_llm"] == 30 * 8 * ((576 + 576) + (576 + 192))
    assert trained["prompt"]["trainable_llm"] == 16 * 576
    assert trained["lora"]["lr"] == 5e-4 and trained["prompt"]["lr"] == 1e-2  # each at its own default
    assert AdapterRegistry(compared["settings"].adapters_dir).versions("audio") == shipped.versions("audio")


def test_scores_and_decode_speeds_of_every_method_and_the_bare_llm(compared):
    scored = compared["scored"]
    assert set(scored) == {"lora", "prompt", "base LLM"}
    for method in ("lora", "prompt"):
        assert scored[method]["test_n"] == 4 and 0 <= scored[method]["test_accuracy"] <= 1
    assert all(r["decode_tok_s"] > 0 for r in scored.values())


def test_a_finished_method_is_not_trained_again(compared):
    from modalink.train.compare import train_methods

    again = train_methods("audio", compared["data"], compared["settings"], compared["work"], ["lora", "prompt"], 2)
    assert again == compared["trained"]  # read back from <work>/audio/<method>.json
    assert json.loads((compared["work"] / "audio" / "prompt.json").read_text()) == compared["trained"]["prompt"]


def test_the_best_method_by_validation_is_shipped_with_its_adapter(compared):
    from modalink.methods import method_of, read_config
    from modalink.train.compare import best_method, ship

    trained, settings = compared["trained"], compared["settings"]
    registry = AdapterRegistry(settings.adapters_dir)
    before = registry.versions("audio")
    out = ship("audio", settings, compared["work"], trained)
    assert out["method"] == best_method(trained)
    assert trained[out["method"]]["val_accuracy"] == max(r["val_accuracy"] for r in trained.values())
    assert registry.versions("audio") == [*before, out["version"]]
    registry.verify("audio", out["version"])
    assert method_of(read_config(registry.llm_adapter_path("audio", out["version"]))) == out["method"]
    meta = next(v.metrics for v in registry.list("audio") if v.version == out["version"])
    assert meta["chosen_from"] == {m: r["val_accuracy"] for m, r in trained.items()}
    # two steps do not beat the shipped 100-step adapter on its own validation figure: published, not promoted
    assert out["promoted"] == (registry.current("audio") == out["version"])


def test_the_methods_section_puts_each_method_next_to_lora(compared, tmp_path):
    from modalink.evaluate import METHODS_SECTION, methods_section, put_section

    report = tmp_path / "RESULTS.md"
    put_section(report, methods_section({"audio": compared["scored"]}, "modalink eval --methods"))
    text = report.read_text()
    assert text.count(METHODS_SECTION) == 1
    assert "| audio | `lora` | 0.0005 | 460,800 |" in text and "| audio | `prompt` | 0.01 | 9,216 |" in text
    assert "1.00x |" in text  # LoRA against itself
