"""What every bench/ script shares: the ``--smoke`` and ``--results`` options, where results go, and stopping a
stack it started when it is told to stop. Not a benchmark itself (`make bench` and the smoke test skip ``_*.py``).

A smoke run (``--smoke``) is the benchmark at tiny sizes with one repetition: it checks that the script still
runs end to end and writes its result JSON, not how fast anything is. Its results go to ``build/bench-smoke/``
(never ``bench/results/`` nor ``docs/PERFORMANCE.md``), and a script that starts ``modalink up`` uses a run dir
of its own there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

RESULTS = Path("bench/results")
SMOKE = Path("build/bench-smoke")


ENGINES = ("transformers", "llamacpp", "auto")


def add_options(ap: argparse.ArgumentParser, stack: bool = False, engine: bool = False) -> None:
    """``--smoke`` and ``--results``; ``stack``: the benchmark starts ``modalink up`` (``--run-dir`` too); ``engine``:
    its LLM service runs the engine ``--engine`` names (``use_engine``)."""
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes, one repetition, no targets: checks that the benchmark still runs; results go "
                         f"to {SMOKE}/results/ (not {RESULTS}/)")  # fmt: skip
    ap.add_argument("--results", type=Path, default=None,
                    help=f"folder of the result JSON (default: {RESULTS}, with --smoke {SMOKE}/results)")  # fmt: skip
    if stack:
        ap.add_argument("--run-dir", type=Path, default=None,
                        help="run dir of the `modalink up` it starts and stops (state, logs, job files; default: "
                             f"build/bench-run, with --smoke {SMOKE}/run-<benchmark>); ports are the defaults, so "
                             "no other stack may be up")  # fmt: skip
    if engine:
        ap.add_argument("--engine", choices=ENGINES, default="transformers",
                        help="the LLM runtime (MODALINK_ENGINE) of the services it starts and of its in-process side: "
                             "transformers (default) is what `modalink up`, compose and the chart run; another's "
                             "results go to <benchmark>-<engine>.json (`make bench` runs llamacpp too)")  # fmt: skip


def use_engine(args: argparse.Namespace) -> str:
    """Sets ``MODALINK_ENGINE`` for everything the benchmark starts (``modalink up`` passes it on) and returns the
    runtime it resolves to here (``modalink.engines.choose`` for auto), for the result."""
    from modalink.config import Settings
    from modalink.engines import choose

    os.environ["MODALINK_ENGINE"] = args.engine
    return choose(Settings())[0] if args.engine == "auto" else args.engine


def results_dir(args: argparse.Namespace) -> Path:
    return args.results or (SMOKE / "results" if args.smoke else RESULTS)


def run_dir(args: argparse.Namespace, name: str) -> Path:
    """Where a benchmark's ``modalink up`` keeps its state and logs (a smoke run's own, so it never stops or
    reuses a real run's stack)."""
    return args.run_dir or (SMOKE / f"run-{name}" if args.smoke else Path("build/bench-run"))


def write_result(args: argparse.Namespace, name: str, result: dict) -> Path:
    engine = getattr(args, "engine", "transformers")
    out = results_dir(args) / (f"{name}.json" if engine == "transformers" else f"{name}-{engine}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, **({"smoke": True} if args.smoke else {})}, indent=2) + "\n")
    print(f"(result written to {out})")
    return out


_cleaning = False  # a stack is being stopped: SIGTERM waits until it is
_deferred = False  # a SIGTERM came meanwhile


def _on_sigterm(*_) -> None:
    global _deferred
    if _cleaning:
        _deferred = True
        return
    sys.exit(128 + signal.SIGTERM)


def stop_on_sigterm() -> None:
    """Turn SIGTERM (``timeout``, a test runner, ``kill``) into SystemExit, so the ``finally`` that stops the
    stack a benchmark started runs (by default SIGTERM ends Python without unwinding)."""
    signal.signal(signal.SIGTERM, _on_sigterm)


@contextlib.contextmanager
def cleaning() -> Iterator[None]:
    """Stopping what a benchmark started: a SIGTERM meanwhile must not cut that short (the services would be left
    running); it takes effect once the block is done."""
    global _cleaning
    _cleaning = True
    try:
        yield
    finally:
        _cleaning = False
        if _deferred:
            sys.exit(128 + signal.SIGTERM)


@contextlib.contextmanager
def stack(run: Path, **up_kwargs) -> Iterator[list]:
    """``modalink up`` in ``run`` (stopping first what a killed earlier run recorded there), stopped on the way
    out whatever happens in the block: an error, Ctrl-C, SIGTERM (with ``stop_on_sigterm``)."""
    from modalink import up

    def quiet(*_) -> None:
        pass

    with cleaning():
        up.down(run, echo=quiet)
    services = up.up(run, echo=quiet, **up_kwargs)  # stops what it started if it fails
    try:
        yield services
    finally:
        with cleaning():
            up.down(run, echo=quiet)


def distinct_picture(src: str, n: int) -> bytes:
    """The sample picture (PNG bytes) with an 8x8 corner patch of noise seeded by ``n``: what it shows is the same,
    but its embeddings differ from every other ``n``'s even after fp16 rounding (a flipped low bit does not survive
    it), so no cache (the gateway's media embeddings, the LLM's KV prefix, which matches media by content) holds it."""
    import io

    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(src).convert("RGB")).copy()
    img[-8:, -8:] = np.random.default_rng(n + 1_000_003).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(img).save(out, "PNG")
    return out.getvalue()


def confine_jobs(folder: Path) -> Path:
    """Make ``folder`` (resolved, created) the jobs dir and the only manifest root of this process and of the stack
    it starts (``modalink up`` passes its environment on): a benchmark then submits captioning jobs the way the
    gateway does, roots check on, with its items and results inside the roots the workers enforce."""
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["MODALINK_JOBS_DIR"] = str(folder)
    os.environ["MODALINK_MANIFEST_ROOTS"] = str(folder)
    return folder
