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


def under(value: float, limit: float) -> str:
    return " ✓" if value <= limit else " ✗"


def rows() -> list[tuple[str, str, str, str, str]]:
    """(row, measured ratio, target, absolute figures, command)."""
    out = []
    if cap := load("captioning"):
        out.append(("Captioning throughput: Celery job with batching vs a per-item gateway loop",
                    f"{cap['speedup']:.2f}x{mark(cap['speedup'], cap['target'])}", f">= {cap['target']}x",
                    f"{cap['items_per_s']['job']} vs {cap['items_per_s']['naive']} items/s ({cap['machine']})",
                    "python bench/captioning.py"))  # fmt: skip
    if svc := load("services"):
        r, t, o, e = svc["ratios"], svc["targets"], svc["overhead_s"], svc["encoder_items_per_s"]
        cmd = "python bench/services.py"
        out += [
            (
                "Service overhead: time to first token, gateway (encoder + LLM services) vs in-process",
                f"{r['ttft_gateway_vs_in_process']:.2f}x{under(r['ttft_gateway_vs_in_process'], 1.15)}",
                "<= 1.15x",
                f"{o['gateway']['ttft']} vs {o['in_process']['ttft']} s (image + question, greedy)",
                cmd,
            ),
            (
                f"Service overhead: total latency, {svc['tokens']} new tokens, gateway vs in-process",
                f"{r['latency_gateway_vs_in_process']:.2f}x{under(r['latency_gateway_vs_in_process'], 1.15)}",
                "<= 1.15x",
                f"{o['gateway']['total']} vs {o['in_process']['total']} s",
                cmd,
            ),
            (
                f"Image encoder service, {svc['clients']} tritonclient gRPC clients vs best in-process batch",
                f"{r['encoder_service_vs_in_process']:.2f}x{mark(r['encoder_service_vs_in_process'], 0.85)}",
                f">= {t['encoder_service_vs_in_process']}x",
                f"{e['one']} vs {e['in_process_best']} items/s (batch {e['in_process_best_batch']})",
                cmd,
            ),
            (
                "Image encoder service, dynamic batching on vs off",
                f"{r['dynamic_batching_on_vs_off']:.2f}x{mark(r['dynamic_batching_on_vs_off'], 2.0)}",
                f">= {t['dynamic_batching_on_vs_off']}x",
                f"{e['one']} vs {e['off']} items/s",
                cmd,
            ),
            (
                "Two image-encoder replicas vs one, same 16-client load",
                f"{r['two_replicas_vs_one']:.2f}x",
                "-",
                f"{e['two']} vs {e['one']} items/s ({svc['machine']})",
                cmd,
            ),
        ]
        for name, m in svc["rss_mib"].items():
            out.append(
                (f"Peak RSS, {name} (process tree)", "-", "-", f"idle {m['idle']} MiB, under load {m['peak']} MiB", cmd)
            )
    if llm := load("llm_decode"):
        r, t, s, b = llm["ratios"], llm["targets"], llm["tokens_per_s"], llm["bound_tokens_per_s"]
        served, fp32, cmd = s["fp16-cpu"], s["fp32"], "python bench/llm_decode.py"
        out += [
            ("LLM decode with a modality prefix vs plain text of equal length",
             f"{r['prefix_vs_plain']:.2f}x{mark(r['prefix_vs_plain'], t['prefix_vs_plain'])}",
             f">= {t['prefix_vs_plain']}x", f"{served['prefix']} vs {served['plain']} tok/s (fp16-cpu)", cmd),
            ("LLM aggregate decode, 8 requests in one batch vs 1",
             f"{r['batch8_vs_batch1']:.2f}x{mark(r['batch8_vs_batch1'], t['batch8_vs_batch1'])}",
             f"> {t['batch8_vs_batch1']}x", f"{served['batch8']} vs {served['batch1']} tok/s (fp16-cpu)", cmd),
            ("LLM batch-1 decode (served fp16-cpu layout) vs the fp32 weights' bandwidth bound",
             f"{r['batch1_vs_fp32_bound']:.2f}{mark(r['batch1_vs_fp32_bound'], t['batch1_vs_fp32_bound'])}",
             f">= {t['batch1_vs_fp32_bound']}",
             f"{served['batch1']} of {b['fp32']} tok/s ({llm['read_bandwidth_gb_s']} GB/s / "
             f"{llm['bytes_per_token']['fp32'] / 1e6:.0f} MB; {llm['machine']})", cmd),
            ("LLM batch-1 decode, plain fp32 weights vs the same bound",
             f"{r['fp32_batch1_vs_fp32_bound']:.2f}", "-", f"{fp32['batch1']} of {b['fp32']} tok/s", cmd),
            ("LLM fp16-cpu vs fp32 decode, batch 1 / batch 8", f"{r['fp16_vs_fp32_batch1']:.2f}x / "
             f"{r['fp16_vs_fp32_batch8']:.2f}x", "-", f"{served['batch8']} vs {fp32['batch8']} tok/s at batch 8", cmd),
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
