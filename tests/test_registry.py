"""AdapterRegistry: immutable, checksummed projector versions with an atomically promoted CURRENT pointer."""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from procs import record_figures

from modalink.projectors import LinearProjector, ProjectorConfig, build_projector
from modalink.registry import AdapterRegistry

CFG = ProjectorConfig(kind="linear", d_in=16, d_llm=8, n_tokens=2)


def make_projector(seed: int) -> torch.nn.Module:
    """Weights that fp16 represents exactly, since the registry stores adapters as fp16 at rest."""
    torch.manual_seed(seed)
    module = build_projector(CFG).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())
    return module


@pytest.fixture
def registry(tmp_path) -> AdapterRegistry:
    return AdapterRegistry(tmp_path / "adapters")


@pytest.fixture
def features() -> torch.Tensor:
    return torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(7))


def outputs(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(x)


def test_publish_numbers_versions_per_modality(registry):
    assert registry.versions("imu") == []
    assert registry.list("imu") == []
    assert registry.publish("imu", make_projector(0)) == "v1"
    assert registry.publish("imu", make_projector(1)) == "v2"
    assert registry.publish("audio", make_projector(2)) == "v1"
    assert registry.versions("imu") == ["v1", "v2"]
    d = registry.root / "imu" / "v2"
    assert {p.name for p in d.iterdir()} == {"projector.safetensors", "config.json", "metrics.json", "checksums.json"}
    meta = json.loads((d / "config.json").read_text())
    assert meta["modality"] == "imu" and meta["version"] == "v2"
    assert meta["projector"]["kind"] == "linear" and meta["projector"]["d_in"] == 16


def test_versions_sort_numerically(registry):
    for i in range(11):
        registry.publish("imu", make_projector(i))
    assert registry.versions("imu")[-3:] == ["v9", "v10", "v11"]
    assert registry.publish("imu", make_projector(99)) == "v12"


def test_current_is_none_until_promote(registry):
    registry.publish("imu", make_projector(0))
    registry.publish("imu", make_projector(1))
    assert registry.current("imu") is None
    assert not (registry.root / "imu" / "CURRENT").exists()
    assert registry.load("imu") is None
    registry.promote("imu", "v1")
    assert (registry.root / "imu" / "CURRENT").read_text().strip() == "v1"
    assert registry.current("imu") == "v1"
    registry.promote("imu", "v2")
    assert registry.current("imu") == "v2"
    # No temp files of the atomic write are left beside CURRENT.
    assert sorted(p.name for p in (registry.root / "imu").iterdir()) == ["CURRENT", "HISTORY", "v1", "v2"]


def test_publish_with_promote(registry):
    registry.publish("imu", make_projector(0))
    assert registry.publish("imu", make_projector(1), promote=True) == "v2"
    assert registry.current("imu") == "v2"


def test_load_returns_the_published_weights(registry, features):
    p1, p2 = make_projector(0), make_projector(1)
    registry.publish("imu", p1, metrics={"loss": 1.0}, extra={"encoder": "imu-cnn"})
    registry.publish("imu", p2, promote=True)
    module, version, meta = registry.load("imu")  # current
    assert version == "v2"
    assert isinstance(module, LinearProjector) and not module.training
    assert module.cfg == CFG
    torch.testing.assert_close(outputs(module, features), outputs(p2, features), rtol=0, atol=0)
    module1, version1, meta1 = registry.load("imu", "v1")
    assert version1 == "v1" and meta1["encoder"] == "imu-cnn"
    torch.testing.assert_close(outputs(module1, features), outputs(p1, features), rtol=0, atol=0)
    assert not torch.allclose(outputs(module1, features), outputs(module, features))


@pytest.mark.parametrize("name", ["projector.safetensors", "config.json", "metrics.json"])
def test_tampered_file_fails_checksum(registry, name):
    registry.publish("imu", make_projector(0), metrics={"loss": 0.5}, promote=True)
    f = registry.root / "imu" / "v1" / name
    data = bytearray(f.read_bytes())
    data[-2] ^= 0x01  # one flipped bit
    f.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=f"checksum mismatch in {name}"):
        registry.verify("imu", "v1")
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        registry.load("imu")
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        registry.load("imu", "v1")


def test_tampered_weights_with_same_size_fail(registry):
    """A projector.safetensors swapped for another valid one (same shapes and size) is still caught."""
    registry.publish("imu", make_projector(0))
    registry.publish("imu", make_projector(1))
    v1 = registry.root / "imu" / "v1" / "projector.safetensors"
    v2 = registry.root / "imu" / "v2" / "projector.safetensors"
    assert v1.stat().st_size == v2.stat().st_size and v1.read_bytes() != v2.read_bytes()
    v1.write_bytes(v2.read_bytes())
    with pytest.raises(RuntimeError, match="adapter imu/v1: checksum mismatch in projector.safetensors"):
        registry.load("imu", "v1")
    registry.verify("imu", "v2")  # the untouched version still verifies


def test_promote_refuses_tampered_version_and_keeps_current(registry):
    registry.publish("imu", make_projector(0), promote=True)
    registry.publish("imu", make_projector(1))
    (registry.root / "imu" / "v2" / "projector.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        registry.promote("imu", "v2")
    assert registry.current("imu") == "v1"


def test_promote_nonexistent_version(registry):
    with pytest.raises(ValueError, match="no adapter version imu/v1"):
        registry.promote("imu", "v1")
    registry.publish("imu", make_projector(0))
    for bad in ("v7", "1", "V1", "../imu/v1"):
        with pytest.raises(ValueError, match="no adapter version"):
            registry.promote("imu", bad)
    assert registry.current("imu") is None


def test_list_reports_metrics_and_current(registry):
    registry.publish("audio", make_projector(0), metrics={"val_loss": 2.5, "step": 100})
    registry.publish("audio", make_projector(1), metrics={"val_loss": 1.25, "step": 200})
    registry.publish("audio", make_projector(2))
    registry.promote("audio", "v2")
    listed = registry.list("audio")
    assert [v.version for v in listed] == ["v1", "v2", "v3"]
    assert [v.current for v in listed] == [False, True, False]
    assert listed[0].metrics == {"val_loss": 2.5, "step": 100}
    assert listed[1].metrics == {"val_loss": 1.25, "step": 200}
    assert listed[2].metrics == {}
    assert all(v.modality == "audio" for v in listed)
    assert listed[1].path == registry.root / "audio" / "v2"
    assert registry.list("image") == []


def test_leftover_temp_dir_is_not_a_version(registry):
    registry.publish("imu", make_projector(0))
    registry.publish("imu", make_projector(1), promote=True)
    # A publish that crashed before its rename leaves a half-written temp dir beside the versions.
    crashed = registry.root / "imu" / ".v3.k2j9x1"
    crashed.mkdir()
    (crashed / "projector.safetensors").write_bytes(b"half")
    (registry.root / "imu" / "notes").mkdir()  # other stray dirs are not versions either
    assert registry.versions("imu") == ["v1", "v2"]
    assert [v.version for v in registry.list("imu")] == ["v1", "v2"]
    with pytest.raises(ValueError):
        registry.promote("imu", ".v3.k2j9x1")
    # The next publish still gets v3 and is complete and loadable.
    assert registry.publish("imu", make_projector(2)) == "v3"
    registry.verify("imu", "v3")
    assert registry.load("imu", "v3")[1] == "v3"
    assert crashed.is_dir()


def test_publish_leaves_no_temp_dirs(registry):
    for i in range(3):
        registry.publish("imu", make_projector(i))
    assert sorted(p.name for p in (registry.root / "imu").iterdir()) == ["v1", "v2", "v3"]


def test_registry_is_readable_by_a_fresh_instance(registry, features):
    p = make_projector(5)
    registry.publish("video", p, promote=True)
    other = AdapterRegistry(Path(str(registry.root)))
    module, version, _ = other.load("video")
    assert version == "v1" and other.current("video") == "v1"
    torch.testing.assert_close(outputs(module, features), outputs(p, features), rtol=0, atol=0)


class _RacingRegistry(AdapterRegistry):
    """Lets a second writer publish the same next version right after this one has listed the versions."""

    def __init__(self, root: Path, rival: torch.nn.Module):
        super().__init__(root)
        self.rival = rival

    def versions(self, modality: str) -> list[str]:
        found = super().versions(modality)
        if self.rival is not None:
            rival, self.rival = self.rival, None
            AdapterRegistry(self.root).publish(modality, rival)  # another process, same root
        return found


def test_concurrent_publish_does_not_silently_lose_a_version(tmp_path, features):
    mine, rival = make_projector(0), make_projector(1)
    registry = _RacingRegistry(tmp_path / "adapters", rival)
    try:
        version = registry.publish("imu", mine, metrics={"who": "mine"})
    except (OSError, RuntimeError, ValueError):
        return  # refusing loudly is acceptable; handing back someone else's version is not
    module, _, _ = AdapterRegistry(registry.root).load("imu", version)
    torch.testing.assert_close(outputs(module, features), outputs(mine, features), rtol=0, atol=0)


def test_adapters_are_stored_as_fp16_and_load_as_fp32(registry):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    proj = build_projector(CFG).eval()
    version = registry.publish("imu", proj)
    stored = load_file(str(registry.root / "imu" / version / "projector.safetensors"))
    assert all(t.dtype == torch.float16 for t in stored.values())
    module, _, _ = registry.load("imu", version)
    assert all(p.dtype == torch.float32 for p in module.parameters())
    x = torch.randn(2, 5, CFG.d_in)
    torch.testing.assert_close(module(x), proj(x), atol=2e-3, rtol=2e-3)


WRITER = """
import random, sys, torch
from modalink.projectors import ProjectorConfig, build_projector
from modalink.registry import AdapterRegistry
reg, rng = AdapterRegistry(sys.argv[1]), random.Random(int(sys.argv[2]))
cfg = ProjectorConfig(kind="linear", d_in=256, d_llm=256, n_tokens=4)  # 0.5 MB at rest: writes take a while
print("ready", flush=True)
while True:
    torch.manual_seed(rng.randrange(1 << 30))
    reg.publish("imu", build_projector(cfg), metrics={"loss": rng.random()}, promote=True)
    if rng.random() < 0.3 and len(reg.promotions("imu")) >= 2:
        reg.rollback("imu")
"""


def test_a_writer_killed_at_random_points_never_leaves_a_broken_registry(tmp_path):
    """20 SIGKILLs of a process publishing, promoting and rolling back in a loop, at seeded random moments:
    after each, CURRENT names a complete, checksum-valid version, every listed version verifies, the promotion
    log agrees with CURRENT, and the next publish works."""
    registry = AdapterRegistry(tmp_path / "adapters")
    registry.publish("imu", make_projector(0), promote=True)
    rng, outcomes = random.Random(9), {"mid-version": 0, "mid-pointer": 0, "between": 0}
    for kill in range(20):
        before = set(registry.versions("imu"))
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(registry.root), str(kill)], stdout=subprocess.PIPE,
                                text=True)  # fmt: skip
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        folder = registry.root / "imu"
        assert re.fullmatch(r"v\d+\n", (folder / "CURRENT").read_text())  # never empty or cut short
        current = registry.current("imu")
        assert current in registry.versions("imu")
        registry.verify("imu", current)
        assert registry.load("imu")[1] == current
        for v in registry.versions("imu"):
            registry.verify("imu", v)  # no half-written version is listed
        assert registry.promotions("imu")[-1] == current  # a rollback goes where the log says
        # Where the kill landed, from what it left: a temp version dir, a temp pointer file, or neither.
        leftovers = {p.name for p in folder.iterdir()} - {"CURRENT", "HISTORY", *registry.versions("imu")}
        outcomes["mid-version" if any(n.startswith(".v") for n in leftovers) else
                 "mid-pointer" if leftovers else "between"] += 1  # fmt: skip
        for name in leftovers:  # remove them, so the next kill's are told apart
            path = folder / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        new = registry.publish("imu", make_projector(100 + kill), promote=True)
        assert new not in before and registry.current("imu") == new and registry.promotions("imu")[-1] == new
        registry.verify("imu", new)
    record_figures(
        "registry_writer_killed", kills=20, **outcomes, versions=len(registry.versions("imu")), broken=0
    )  # every assertion above held after each kill
    assert sum(outcomes.values()) == 20


STEP_WRITER = """
import os, signal, sys, torch
from modalink import registry
from modalink.projectors import ProjectorConfig, build_projector
root, step, op = sys.argv[1:4]
def kill_at(name):
    if name == step:
        print("killed at", name, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer or a node loss does: no cleanup runs
registry.STEP_HOOKS.append(kill_at)
reg = registry.AdapterRegistry(root)
if op == "publish":
    torch.manual_seed(len(reg.versions("imu")))
    reg.publish("imu", build_projector(ProjectorConfig(kind="linear", d_in=16, d_llm=8, n_tokens=2)), promote=True)
else:
    reg.rollback("imu")
print("finished", flush=True)
"""


def check_readable(registry: AdapterRegistry) -> None:
    """What every reader relies on, whatever a writer was doing when it died."""
    folder = registry.root / "imu"
    assert re.fullmatch(r"v\d+\n", (folder / "CURRENT").read_text())  # never empty or cut short
    current = registry.current("imu")
    assert current in registry.versions("imu")
    assert registry.load("imu")[1] == current  # checksum-verified
    for v in registry.versions("imu"):
        registry.verify("imu", v)  # no half-written version is listed
    assert registry.promotions("imu")[-1] == current  # the log agrees with CURRENT: a rollback goes where it says
    assert [v.version for v in registry.list("imu") if v.current] == [current]


# Where a kill at each step leaves the registry: (the new version is listed, HISTORY has the new entry, CURRENT
# names the target, the name a stray temp dir or file starts with)
AFTER_KILL = {"version-partial": (False, False, False, ".v"), "version-written": (False, False, False, ".v"),
              "version-renamed": (True, False, False, None), "HISTORY-temp": (True, False, False, ".HISTORY."),
              "HISTORY-replaced": (True, True, False, None), "CURRENT-temp": (True, True, False, ".CURRENT."),
              "CURRENT-replaced": (True, True, True, None)}  # fmt: skip


@pytest.mark.parametrize("op", ["publish", "rollback"])
def test_a_writer_killed_at_each_write_step_leaves_a_readable_registry(tmp_path, op):
    """A writer SIGKILLed at every named step of a publish + promote (or of a rollback), from inside the write
    (``registry.STEP_HOOKS``), not at a moment timing happens to pick: each kill lands where it is meant to, the
    registry reads as before the write or as after it (never in between), and the next publish and rollback work."""
    from modalink import registry as registry_module

    assert set(AFTER_KILL) == set(registry_module.WRITE_STEPS)
    registry = AdapterRegistry(tmp_path / "adapters")
    registry.publish("imu", make_projector(0), promote=True)
    registry.publish("imu", make_projector(1), promote=True)
    steps = registry_module.WRITE_STEPS if op == "publish" else registry_module.WRITE_STEPS[3:]
    folder = registry.root / "imu"
    for step in steps:
        before_versions, before_current = registry.versions("imu"), registry.current("imu")
        before_log = (folder / "HISTORY").read_text().splitlines()
        target = f"v{int(before_versions[-1][1:]) + 1}" if op == "publish" else registry.promotions("imu")[-2]
        proc = subprocess.run([sys.executable, "-c", STEP_WRITER, str(registry.root), step, op], capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert proc.returncode == -signal.SIGKILL and proc.stdout == f"killed at {step}\n", (step, proc)
        check_readable(registry)
        listed, logged, promoted, stray = AFTER_KILL[step]
        listed &= op == "publish"  # a rollback writes no version
        assert registry.versions("imu") == before_versions + ([target] if listed else []), step
        assert registry.current("imu") == (target if promoted else before_current), step
        log = (folder / "HISTORY").read_text().splitlines()
        assert log[: len(before_log)] == before_log and len(log) == len(before_log) + logged, step
        if logged:
            assert json.loads(log[-1])["version"] == target and json.loads(log[-1])["rollback"] == (op == "rollback")
        strays = {p.name for p in folder.iterdir()} - {"CURRENT", "HISTORY", *registry.versions("imu")}
        assert (not strays) if stray is None else len(strays) == 1 and strays.pop().startswith(stray), (step, strays)
        if step == "version-partial":  # the temp dir really is half a version: its weights, no metrics, no checksums
            half = sorted(p.name for p in next(folder.glob(".v*")).iterdir())
            assert half == ["config.json", "projector.safetensors"], half
        for path in folder.glob(".*"):  # remove them, so the next kill's leftovers are told apart
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        # Writable again: a publish, a promotion and a rollback on top of whatever the kill left.
        new = registry.publish("imu", make_projector(50 + len(registry.versions("imu"))), promote=True)
        assert registry.current("imu") == new and registry.promotions("imu")[-1] == new
        assert registry.rollback("imu") == registry.promotions("imu")[-1] == registry.current("imu") != new
        registry.promote("imu", new)
        check_readable(registry)
    record_figures(f"registry_writer_killed_at_each_step_{op}", kills=len(steps), steps=list(steps), broken=0)
