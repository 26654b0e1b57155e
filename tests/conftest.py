"""Shared fixtures: real models, loaded once per session (no mocks)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from modalink.config import Settings  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def settings(tmp_path_factory) -> Settings:
    """Default models, but an empty adapter registry of the test's own."""
    return Settings(adapters_dir=tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="session")
def engine(settings):
    from modalink.engines.transformers import TransformersEngine

    return TransformersEngine.load(settings=settings)


@pytest.fixture(scope="session")
def tokenizer(engine):
    return engine.tokenizer


@pytest.fixture(scope="session")
def assistant(settings, engine):
    from modalink.assistant import Assistant

    return Assistant(settings, engine=engine)


@pytest.fixture(scope="session")
def samples(tmp_path_factory) -> dict[str, str]:
    from modalink.samples import write_samples

    return {m: s["path"] for m, s in write_samples(tmp_path_factory.mktemp("samples")).items()}


@pytest.fixture(scope="session")
def hostile_stack(tmp_path_factory):
    """One stack of real services for every hostile-input test file (started once: it is the slow part)."""
    from hostile import start_stack

    yield from start_stack(tmp_path_factory)
