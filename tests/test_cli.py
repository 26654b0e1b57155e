import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modalink import MODALITIES

BIN = Path(sys.executable).parent / "modalink"
SHIPPED_ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"  # read only here


def run(*args: str, adapters: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MODALINK_ADAPTERS_DIR": str(adapters), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, env=env, timeout=300)


def test_ask_help_documents_every_option(tmp_path):
    out = run("ask", "--help", adapters=tmp_path)
    assert out.returncode == 0
    for option in ("--image", "--audio", "--imu", "--video", "--max-new-tokens", "--temperature", "--top-p",
                   "--top-k", "--repetition-penalty", "--stop", "--seed", "--system", "--json"):  # fmt: skip
        assert option in out.stdout, option
    assert "<image>" in out.stdout and "AnyMAL" in out.stdout


def test_ask_json_with_two_modalities(tmp_path, samples):
    out = run("ask", "--image", samples["image"], "--imu", samples["imu"], "Compare <imu> and <image>.",
              "-n", "4", "--json", adapters=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) == {"text", "finish_reason", "adapters", "usage"}
    assert result["adapters"] == {"image": "untrained", "imu": "untrained"}
    assert result["usage"]["completion_tokens"] <= 4 and result["usage"]["prompt_tokens"] > 20
    assert "untrained" in out.stderr  # said plainly


def test_ask_streams_plain_text(tmp_path):
    out = run("ask", "What is the capital of France? Answer in one word.", "-n", "8", adapters=tmp_path)
    assert out.returncode == 0 and "Paris" in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "/nonexistent.png"], "image file not found"),
        (["--audio", "{image}"], "not a decodable audio file"),
        (["--image", "{corrupt}"], "not a decodable image"),
        (["--imu", "{image}"], "IMU data must be"),
        (["--temperature", "-1"], "temperature"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, samples, args, message):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    args = [a.format(image=samples["image"], corrupt=corrupt) for a in args]
    out = run("ask", *args, "hi", adapters=tmp_path)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_modality_flag_is_a_usage_error(tmp_path):
    out = run("ask", "--smell", "x.bin", "hi", adapters=tmp_path)
    assert out.returncode == 2 and "--smell" in out.stderr


def test_models_lists_configuration(tmp_path):
    out = run("models", "--json", adapters=tmp_path)
    assert out.returncode == 0
    info = json.loads(out.stdout)
    roles = {m["role"]: m for m in info["models"]}
    assert roles["llm"]["model"] == "smollm2-135m-instruct" and roles["llm"]["cached"] is True
    assert set(info["adapters"]) == set(MODALITIES)  # the built-ins and the installed plugins (power)


def test_eval_manifest_json_prints_only_json(tmp_path, samples):
    """Users evaluate on their own manifest; relative paths resolve against the manifest's folder.

    With the shipped adapters, each sample once under its true label and once under a wrong one: exactly half
    right per modality. An eval that scored everything right, or ran without the adapters (the bare LLM names
    neither), or miscounted, would not give 0.5."""
    import shutil

    shutil.copy(samples["imu"], tmp_path / "walk.npy")
    shutil.copy(samples["image"], tmp_path / "shoe.png")
    q = "What is this?"
    rows = [{"id": "a", "modality": "imu", "path": "walk.npy", "label": "walking"},
            {"id": "b", "modality": "image", "path": "shoe.png", "label": "sneaker", "question": q},
            {"id": "c", "modality": "imu", "path": "walk.npy", "label": "running"},
            {"id": "d", "modality": "image", "path": "shoe.png", "label": "bag", "question": q}]  # fmt: skip
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run("eval", "--manifest", str(tmp_path / "mine.jsonl"), "--json", adapters=SHIPPED_ADAPTERS)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)  # nothing else on stdout
    assert result == {"imu": {"n": 2, "accuracy": 0.5}, "image": {"n": 2, "accuracy": 0.5}}, result


def test_eval_refuses_a_manifest_without_labels(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"id": "x", "modality": "imu", "path": "x.npy"}) + "\n")
    out = run("eval", "--manifest", str(tmp_path / "bad.jsonl"), adapters=tmp_path)
    assert out.returncode == 2 and "needs id, modality, path and label" in out.stderr


def test_adapters_promote_and_rollback_commands(tmp_path):
    from modalink.projectors import ProjectorConfig, build_projector
    from modalink.registry import AdapterRegistry

    reg = AdapterRegistry(tmp_path)
    proj = build_projector(ProjectorConfig(kind="linear", d_in=4, d_llm=4, n_tokens=1))
    reg.publish("audio", proj, metrics={"val_accuracy": 0.5}, promote=True)
    reg.publish("audio", proj, metrics={"val_accuracy": 0.7})
    listed = json.loads(run("adapters", "list", "--json", adapters=tmp_path).stdout)
    assert [(v["version"], v["current"]) for v in listed["audio"]] == [("v1", True), ("v2", False)]
    assert run("adapters", "promote", "audio", "v2", adapters=tmp_path).returncode == 0
    assert reg.current("audio") == "v2"
    out = run("adapters", "rollback", "audio", adapters=tmp_path)
    assert out.returncode == 0 and "v1" in out.stdout and reg.current("audio") == "v1"
    bad = run("adapters", "promote", "audio", "v9", adapters=tmp_path)
    assert bad.returncode == 2 and "no adapter version" in bad.stderr
