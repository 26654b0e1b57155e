"""LLM decode speed, all in one process and interleaved, so the ratios hold on a noisy machine:

1. decode tokens/s with a modality prefix (8 projected embeddings) vs a plain text prompt of the same length
   (target >= 0.95x: prefix embeddings must cost nothing once the prompt is in the KV cache);
2. aggregate tokens/s of 8 requests decoded as one batch vs 1 (batching must pay);
3. batch-1 decode tokens/s against the memory-bandwidth bound: decode reads every weight once per token, so
   the bound is (read bandwidth measured here, now) / (bytes of weights) (target >= 0.6 of it).

    python bench/llm_decode.py [--tokens 48] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from modalink.config import Settings  # noqa: E402
from modalink.engine import GenerationParams, TransformersEngine  # noqa: E402


def decode_rate(engine: TransformersEngine, prompts: list, tokens: int) -> float:
    """Generated tokens per second after each row's first token (prefill excluded), all rows together."""
    params = GenerationParams(max_new_tokens=tokens)
    first: float | None = None
    count = 0
    for _ in engine.stream(prompts, params):
        count += 1
        if first is None:
            first, count = time.perf_counter(), 0
    return count / (time.perf_counter() - first)


def read_bandwidth(gib: float = 1.0, reps: int = 5) -> float:
    """Bytes/s of a streaming read (a sum over a buffer far larger than the caches), best of ``reps``."""
    buf = torch.ones(int(gib * 2**30) // 4)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per request")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    settings = Settings()
    settings.apply_threads()
    engine = TransformersEngine.load(settings=settings)
    head = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    tail = "\nDescribe this in detail.<|im_end|>\n<|im_start|>assistant\n"
    media = torch.randn(8, engine.hidden_size) * 0.02
    with_prefix = [head + "<image>", media, "</image>" + tail]
    n_prefix = engine.prompt_length(with_prefix)
    # the same prompt with words where the 8 embeddings were, as many tokens in all
    plain = next(
        [head + "<image>" + "item " * k + "</image>" + tail]
        for k in range(1, 64)
        if engine.prompt_length([head + "<image>" + "item " * k + "</image>" + tail]) >= n_prefix
    )
    runs: dict[str, list[float]] = {"prefix": [], "plain": [], "batch8": [], "batch1": []}
    decode_rate(engine, [with_prefix], 4)  # warm up
    for rep in range(args.reps):
        order = [("prefix", [with_prefix]), ("plain", plain), ("batch8", [with_prefix] * 8), ("batch1", [with_prefix])]
        for name, prompts in order if rep % 2 else order[::-1]:
            runs[name].append(decode_rate(engine, prompts, args.tokens))
    bandwidth = read_bandwidth()
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    med = {k: statistics.median(v) for k, v in runs.items()}
    bound = bandwidth / weight_bytes
    result = {
        "machine": f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, no GPU",
        "model": settings.llm, "dtype": str(engine.dtype), "weight_bytes": weight_bytes,
        "prompt_tokens": {"prefix": n_prefix, "plain": engine.prompt_length(plain)},
        "tokens_per_s": {k: round(v, 2) for k, v in med.items()}, "runs": runs,
        "read_bandwidth_gb_s": round(bandwidth / 1e9, 2), "bound_tokens_per_s": round(bound, 2),
        "ratios": {
            "prefix_vs_plain": round(med["prefix"] / med["plain"], 3),
            "batch8_vs_batch1": round(med["batch8"] / med["batch1"], 3),
            "batch1_vs_bound": round(med["batch1"] / bound, 3),
        },
        "targets": {"prefix_vs_plain": 0.95, "batch8_vs_batch1": 1.0, "batch1_vs_bound": 0.6},
    }  # fmt: skip
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    Path("bench/results/llm_decode.json").write_text(json.dumps(result, indent=2) + "\n")
    r = result["ratios"]
    print(f"LLM decode ({settings.llm}, {engine.dtype}, {args.tokens} tokens, median of {args.reps}):")
    print(f"  prefix embeddings vs plain text of equal length: {med['prefix']:.1f} vs {med['plain']:.1f} tok/s "
          f"-> {r['prefix_vs_plain']:.2f}x (target >= 0.95)")  # fmt: skip
    print(f"  8 requests in one batch vs 1: {med['batch8']:.1f} vs {med['batch1']:.1f} tok/s -> "
          f"{r['batch8_vs_batch1']:.2f}x")  # fmt: skip
    print(f"  batch 1 vs the bandwidth bound ({bandwidth / 1e9:.1f} GB/s / {weight_bytes / 1e6:.0f} MB = "
          f"{bound:.1f} tok/s): {r['batch1_vs_bound']:.2f} (target >= 0.6)")  # fmt: skip


if __name__ == "__main__":
    main()
