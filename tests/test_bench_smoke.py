"""Every benchmark still runs: each ``bench/*.py`` with ``--smoke`` (tiny sizes, one repetition, no targets) as a
subprocess, into a folder of the test's own; it must exit 0 and write its result JSON with the keys the committed
``bench/results/<name>.json`` has (what ``bench/report.py`` reads). ``report.py`` then renders both the committed
results and the smoke results into a temporary file. Nothing here writes ``bench/results/`` or
``docs/PERFORMANCE.md``.

The benchmarks that start ``modalink up`` (default ports) get a run dir of their own, are stopped with SIGTERM
(which they turn into their cleanup) if they overrun, and whatever their run dir still records is stopped after
them. While another stack holds the ports (someone else's ``modalink up`` or test), they wait and retry.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
COMMITTED = BENCH / "results"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name != "report.py" and not p.name.startswith("_"))
STACK = {"captioning.py", "serving.py"}  # start `modalink up` on the default ports
# the serving benchmarks `make bench` runs on the llama.cpp engine too (`--engine llamacpp`: <name>-llamacpp.json)
RUNS = SCRIPTS + [f"{s}@llamacpp" for s in ("captioning.py", "serving.py", "embed_cache.py")]
TIMEOUT_S = {"captioning.py": 420, "serving.py": 480, "llm_decode.py": 360, "train_step.py": 360}
PORTS_WAIT_S = 300  # how long a stack benchmark waits for another stack to go away
BUSY = ("ports in use", "already up", "address already in use")


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-smoke-results")


@pytest.fixture(scope="module", autouse=True)
def committed_files_untouched():
    """The smoke runs leave the committed results and docs/PERFORMANCE.md as they were."""
    paths = [*sorted(COMMITTED.glob("*.json")), REPO / "docs" / "PERFORMANCE.md"]

    def digests() -> dict[str, str]:
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.exists()}

    before = digests()
    yield
    assert digests() == before, "a smoke run wrote bench/results/ or docs/PERFORMANCE.md"


def key_paths(d: dict, depth: int = 2, prefix: str = "") -> set[str]:
    """The keys of a result, nested dicts down to ``depth`` levels ("ratios.prefix_vs_plain")."""
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict) and depth > 1:
            out |= key_paths(v, depth - 1, f"{prefix}{k}.")
    return out


def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the repository; past ``timeout`` SIGTERM (the benchmark's cleanup), then SIGKILL."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd[1:])} ran past {timeout:.0f} s; its output ends:\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


@pytest.mark.parametrize("run_name", RUNS)
def test_benchmark_smoke_run(run_name, smoke_results, tmp_path):
    script, _, engine = run_name.partition("@")
    name = script.removesuffix(".py") + (f"-{engine}" if engine else "")
    committed = COMMITTED / f"{name}.json"
    assert committed.exists(), f"bench/{run_name} has no committed bench/results/{name}.json to check its keys against"
    cmd = [sys.executable, str(BENCH / script), "--smoke", "--results", str(smoke_results)]
    cmd += ["--engine", engine] if engine else []
    run_dir = tmp_path / "run"
    if script in STACK:
        cmd += ["--run-dir", str(run_dir)]
    deadline = time.monotonic() + PORTS_WAIT_S
    t0, leftover = time.monotonic(), 0
    try:
        while True:
            res = run(cmd, TIMEOUT_S.get(script, 360))
            busy = script in STACK and res.returncode != 0 and any(b in res.stdout.lower() for b in BUSY)
            if not busy or time.monotonic() > deadline:
                break
            time.sleep(20)  # another stack (not ours) holds the default ports: wait for it, then retry
    finally:
        if script in STACK:  # a safety net: stop whatever our run dir still records (only what we started)
            from modalink import up

            leftover = up.down(run_dir, echo=lambda *_: None)
    print(f"bench/{script} --smoke: {time.monotonic() - t0:.0f} s")
    assert leftover == 0, f"bench/{script} left {leftover} service(s) of its stack running (stopped now)"
    assert res.returncode == 0, f"bench/{script} --smoke exited {res.returncode}; output ends:\n{res.stdout[-4000:]}"
    out = smoke_results / f"{name}.json"
    assert out.exists(), f"bench/{script} --smoke wrote no {out.name}:\n{res.stdout[-2000:]}"
    result = json.loads(out.read_text())
    assert result.get("smoke") is True
    missing = key_paths(json.loads(committed.read_text())) - key_paths(result)
    assert not missing, f"{out.name} lacks keys the committed results have (report.py reads them): {sorted(missing)}"


def test_report_renders(smoke_results, tmp_path):
    """report.py on the committed results and on this session's smoke results, into temporary files."""
    out = tmp_path / "PERFORMANCE.md"
    res = run([sys.executable, str(BENCH / "report.py"), "--results", str(COMMITTED), "--out", str(out)], 120)
    assert res.returncode == 0, res.stdout[-4000:]
    text = out.read_text()
    assert text.startswith("# Performance") and "Smoke run" not in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "python bench/" in line]
    for script in SCRIPTS:  # one row at least per benchmark
        assert any(f"python bench/{script}" in line for line in rows), f"no row of bench/{script}"
    if not all((smoke_results / f"{s.removesuffix('.py')}.json").exists() for s in SCRIPTS):
        pytest.skip("not every smoke run wrote its results (the committed ones rendered)")
    smoke_out = tmp_path / "smoke.md"
    res = run([sys.executable, str(BENCH / "report.py"), "--results", str(smoke_results), "--out", str(smoke_out)], 120)
    assert res.returncode == 0, res.stdout[-4000:]
    smoke_text = smoke_out.read_text()
    assert "**Smoke run**" in smoke_text and len(smoke_text.splitlines()) >= len(rows)
