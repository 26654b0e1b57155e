"""Writes docs/PERFORMANCE.md from bench/results/*.json (what the other bench/ scripts measured); `make bench`
runs it last. Each row is a ratio measured side by side in one run; absolute figures are labelled with the
machine they came from.

    python bench/report.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path("bench/results")
OUT = Path("docs/PERFORMANCE.md")


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def mark(value: float, target: float | None) -> str:
    return "" if target is None else (" ✓" if value >= target else " ✗")


def rows() -> list[tuple[str, str, str, str, str]]:
    """(row, measured ratio, target, absolute figures, command)."""
    out = []
    if cap := load("captioning"):
        out.append(("Captioning throughput: Celery job with batching vs a per-item gateway loop",
                    f"{cap['speedup']:.2f}x{mark(cap['speedup'], cap['target'])}", f">= {cap['target']}x",
                    f"{cap['items_per_s']['job']} vs {cap['items_per_s']['naive']} items/s ({cap['machine']})",
                    "python bench/captioning.py"))  # fmt: skip
    if llm := load("llm_decode"):
        r, t, s = llm["ratios"], llm["targets"], llm["tokens_per_s"]
        out += [
            ("LLM decode with a modality prefix vs plain text of equal length",
             f"{r['prefix_vs_plain']:.2f}x{mark(r['prefix_vs_plain'], t['prefix_vs_plain'])}",
             f">= {t['prefix_vs_plain']}x", f"{s['prefix']} vs {s['plain']} tok/s", "python bench/llm_decode.py"),
            ("LLM aggregate decode, 8 requests in one batch vs 1",
             f"{r['batch8_vs_batch1']:.2f}x{mark(r['batch8_vs_batch1'], t['batch8_vs_batch1'])}",
             f"> {t['batch8_vs_batch1']}x", f"{s['batch8']} vs {s['batch1']} tok/s", "python bench/llm_decode.py"),
            ("LLM batch-1 decode vs the memory-bandwidth bound",
             f"{r['batch1_vs_bound']:.2f}{mark(r['batch1_vs_bound'], t['batch1_vs_bound'])}",
             f">= {t['batch1_vs_bound']}",
             f"{s['batch1']} of {llm['bound_tokens_per_s']} tok/s ({llm['read_bandwidth_gb_s']} GB/s / "
             f"{llm['weight_bytes'] / 1e6:.0f} MB; {llm['machine']})", "python bench/llm_decode.py"),
        ]  # fmt: skip
    if train := load("train_step"):
        for stage in (1, 2):
            st = train[f"stage{stage}"]
            out.append((f"Training step, stage {stage}: shared prompt heads vs plain", f"{st['speedup']:.2f}x", "-",
                        f"{st['shared_s_per_step']} vs {st['plain_s_per_step']} s/step, batch {train['batch']}",
                        "python bench/train_step.py"))  # fmt: skip
    return out


def main() -> None:
    table = ["| row | ratio | target | absolute (this machine) | reproduce |", "|---|---|---|---|---|"]
    table += [f"| {' | '.join(row)} |" for row in rows()]
    OUT.write_text(
        "# Performance\n\nWritten by `python bench/report.py` from `bench/results/*.json`; `make bench` reruns every "
        "benchmark and this table. Ratios are measured side by side in one run (medians of repetitions); the "
        "machine is noisy, so absolute figures are for orientation only.\n\n" + "\n".join(table) + "\n"
    )
    print("\n".join(table))
    print(f"(written to {OUT})")


if __name__ == "__main__":
    main()
