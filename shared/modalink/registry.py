"""Adapter registry: ``<root>/<modality>/<version>/{projector.safetensors, config.json, metrics.json}``.

A stage-2 version also holds the LLM adapter it was trained with, in peft's folder layout: ``lora/`` for a LoRA,
``llm-adapter/`` for the other stage-2 methods (see methods/).

Versions are immutable and checksummed (``checksums.json``); a version is written into a temp dir and
renamed into place, and ``CURRENT`` (the promoted version's name) is replaced atomically (write temp,
fsync, rename, fsync the folder), so a reader never sees half a version or a pointer to one, even after
the writer is killed at any point (a killed writer may leave a dot-named temp dir or file behind, which
is not a version). ``WRITE_STEPS`` names the points between those steps; the crash-safety tests kill a
writer at each of them (``STEP_HOOKS``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from modalink.cache import atomic_dir
from modalink.projectors import load_projector, save_projector

_VERSION_RE = re.compile(r"^v(\d+)$")

# The points of a publish + promote, in order: the version's first file written into its temp dir, the temp dir
# complete, the temp dir renamed into place; then for HISTORY and CURRENT each, the temp file written and fsynced,
# then renamed over the old one. A rollback passes the last four.
WRITE_STEPS = ("version-partial", "version-written", "version-renamed", "HISTORY-temp", "HISTORY-replaced",
               "CURRENT-temp", "CURRENT-replaced")  # fmt: skip
# Called with each step's name as a writer reaches it: tests/test_registry.py and tests/test_training.py kill
# their writer process at one step (SIGKILL from inside the hook). Empty, and so free, everywhere else.
STEP_HOOKS: list[Callable[[str], None]] = []


def _step(name: str) -> None:
    for hook in STEP_HOOKS:
        hook(name)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (a crash of the machine, not only of the process, keeps it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.fchmod(fd, 0o644)  # mkstemp makes it private; services read it as other users
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    _step(f"{path.name}-temp")
    os.replace(tmp, path)
    _step(f"{path.name}-replaced")
    _fsync_dir(path.parent)


def _replay(entries: list[dict]) -> list[str]:
    """The promotions in effect after the log ``entries`` (a rollback pops the newest)."""
    stack: list[str] = []
    for entry in entries:
        if entry.get("rollback"):
            stack = stack[:-1]
        else:
            stack.append(entry["version"])
    return stack


@dataclass
class AdapterVersion:
    modality: str
    version: str
    path: Path
    metrics: dict
    current: bool


class AdapterRegistry:
    def __init__(self, root: Path):
        self.root = Path(root)

    def versions(self, modality: str) -> list[str]:
        d = self.root / modality
        if not d.is_dir():
            return []
        found = [p.name for p in d.iterdir() if p.is_dir() and _VERSION_RE.match(p.name)]
        return sorted(found, key=lambda v: int(v[1:]))

    def current(self, modality: str) -> str | None:
        f = self.root / modality / "CURRENT"
        return f.read_text().strip() if f.exists() else None

    def list(self, modality: str) -> list[AdapterVersion]:
        cur = self.current(modality)
        out = []
        for v in self.versions(modality):
            p = self.root / modality / v
            m = json.loads((p / "metrics.json").read_text()) if (p / "metrics.json").exists() else {}
            out.append(AdapterVersion(modality, v, p, m, v == cur))
        return out

    def verify(self, modality: str, version: str) -> None:
        d = self.root / modality / version
        if not (d / "checksums.json").is_file():
            raise RuntimeError(f"adapter {modality}/{version}: no checksums.json (incomplete or foreign version)")
        sums = json.loads((d / "checksums.json").read_text())
        for name, digest in sums.items():
            if not (d / name).is_file():
                raise RuntimeError(f"adapter {modality}/{version}: {name} is missing")
            if _sha256(d / name) != digest:
                raise RuntimeError(f"adapter {modality}/{version}: checksum mismatch in {name}")

    def publish(
        self,
        modality: str,
        projector: nn.Module,
        metrics: dict | None = None,
        extra: dict | None = None,
        promote: bool = False,
        llm_adapter: tuple[dict[str, torch.Tensor], dict] | None = None,
    ) -> str:
        """Write a new immutable version (next ``vN``); optionally make it current.

        Two concurrent publishers never share a number: the loser of the rename race takes the next one.
        """
        for _ in range(100):
            existing = self.versions(modality)
            version = f"v{int(existing[-1][1:]) + 1 if existing else 1}"
            try:
                with atomic_dir(self.root / modality / version, exist_ok=False) as tmp:
                    meta = {"modality": modality, "version": version, **(extra or {})}
                    save_projector(projector, tmp, meta, half=True)  # fp16 at rest: adapters live in the repo
                    _step("version-partial")
                    (tmp / "metrics.json").write_text(json.dumps(metrics or {}, indent=2, sort_keys=True) + "\n")
                    names = ["projector.safetensors", "config.json", "metrics.json"]
                    if llm_adapter is not None:
                        from modalink import methods

                        folder = "lora" if methods.method_of(llm_adapter[1]) == "lora" else "llm-adapter"
                        names += [f"{folder}/{n}" for n in methods.save(tmp / folder, *llm_adapter, half=True)]
                    sums = {n: _sha256(tmp / n) for n in names}
                    (tmp / "checksums.json").write_text(json.dumps(sums, indent=2, sort_keys=True) + "\n")
                    _step("version-written")  # then atomic_dir fsyncs the files and renames the folder
                break
            except FileExistsError:
                continue
        else:
            raise RuntimeError(f"could not allocate a new {modality} adapter version")
        _step("version-renamed")
        _fsync_dir(self.root / modality)  # the version's rename, before CURRENT may name it
        if promote:
            self.promote(modality, version)
        return version

    def promote(self, modality: str, version: str, _rollback: bool = False) -> None:
        if version not in self.versions(modality):
            raise ValueError(f"no adapter version {modality}/{version}")
        self.verify(modality, version)
        previous = self.current(modality)
        if previous != version:
            # The promotion log (newest last) is written first, whole and atomically; a writer killed before the
            # CURRENT write below leaves a last entry that never took effect, which _log drops.
            entry = {"version": version, "previous": previous, "time": time.time(), "rollback": _rollback}
            entries = [*self._log(modality), entry]
            _write_atomic(self.root / modality / "HISTORY", "".join(json.dumps(e) + "\n" for e in entries))
        _write_atomic(self.root / modality / "CURRENT", version + "\n")

    def _log(self, modality: str) -> list[dict]:
        """The promotion log's entries that took effect: without a last one CURRENT does not reflect."""
        path = self.root / modality / "HISTORY"
        entries = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        current = self.current(modality)
        if entries and _replay(entries)[-1:] != [current] and _replay(entries[:-1])[-1:] == [current]:
            entries.pop()
        return entries

    def promotions(self, modality: str) -> list[str]:
        """The stack of promotions still in effect (rollbacks pop), oldest first."""
        return _replay(self._log(modality))

    def rollback(self, modality: str) -> str:
        """Undo the last promotion still in effect: the version current before it becomes current again."""
        stack = self.promotions(modality)
        if len(stack) < 2:
            raise ValueError(
                f"{modality}: no earlier promoted version to roll back to (current: {self.current(modality)})"
            )
        self.promote(modality, stack[-2], _rollback=True)
        return stack[-2]

    def load(
        self, modality: str, version: str | None = None, device: torch.device | str = "cpu"
    ) -> tuple[nn.Module, str, dict] | None:
        """The projector of ``version`` (default: current), checksum-verified; None if there is none."""
        version = version or self.current(modality)
        if version is None:
            return None
        self.verify(modality, version)
        module, meta = load_projector(self.root / modality / version, device)
        return module, version, meta

    def llm_adapter_path(self, modality: str, version: str) -> Path | None:
        """The LLM adapter folder a stage-2 version was trained with (None for stage-1 versions)."""
        for folder in ("lora", "llm-adapter"):
            d = self.root / modality / version / folder
            if (d / "adapter_config.json").is_file():
                return d
        return None
