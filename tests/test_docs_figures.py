"""The docs quote benchmark figures from one source: ``bench/results/*.json``. ``bench/report.py`` writes
docs/PERFORMANCE.md and the figures README.md marks (``<!-- bench:NAME -->...<!-- /bench -->``) from it, and
``--check`` fails when either says something else (a figure copied by hand, or results rerun without the docs).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/report.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def test_the_docs_figures_are_the_committed_results():
    res = report("--check")
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_readme_quotes_the_captioning_figure_from_the_results():
    """The captioning speedup is in a marker (generated), and in the README nowhere else."""
    readme = (REPO / "README.md").read_text()
    cap = json.loads((REPO / "bench" / "results" / "captioning.json").read_text())
    marked = re.findall(r"<!-- bench:captioning -->(.*?)<!-- /bench -->", readme)
    assert len(marked) == 1 and f"**{cap['speedup']:.2f}x**" in marked[0], marked
    outside = re.sub(r"<!-- bench:[\w-]+ -->.*?<!-- /bench -->", "", readme)
    assert f"{cap['speedup']:.2f}x" not in outside


def test_the_check_fails_when_the_results_change(tmp_path):
    """Other results than the docs were written from: --check names the stale figures and writes nothing."""
    results = tmp_path / "results"
    shutil.copytree(REPO / "bench" / "results", results)
    cap = json.loads((results / "captioning.json").read_text())
    cap["speedup"], cap["items_per_s"]["job"] = 9.99, 17.0
    (results / "captioning.json").write_text(json.dumps(cap))
    before = {p: (REPO / p).read_text() for p in ("README.md", "docs/PERFORMANCE.md")}
    res = report("--check", "--results", str(results))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "**9.99x**" in res.stderr and "9.99x ✓" in res.stderr  # README's figure and PERFORMANCE.md's row
    assert {p: (REPO / p).read_text() for p in before} == before
