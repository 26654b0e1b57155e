"""LLM decode speed, all in one process and interleaved, so the ratios hold on a noisy machine:

1. decode tokens/s with a modality prefix (8 projected embeddings) vs a plain text prompt of the same length
   (target >= 0.95x: prefix embeddings must cost nothing once the prompt is in the KV cache);
2. aggregate tokens/s of 8 requests decoded as one batch vs 1 (batching must pay);
3. batch-1 decode tokens/s against the memory-bandwidth bound: decode reads every weight once per token, so
   the bound is (read bandwidth measured here, now) / (bytes of the fp32 weights) (target >= 0.6 of it).

Each is measured for the fp32 model and for the layout the LLM service runs on a CPU (``fp16-cpu``: fp16
weights in fbgemm's packed GEMM, fp32 compute), interleaved; a torch.profiler table of each engine's batch-1
decode says what bounds it.

    python bench/llm_decode.py [--tokens 48] [--reps 5] [--results bench/results]
    python bench/llm_decode.py --smoke   # 4 tokens, 1 rep, a small bandwidth probe: does it still run?
                                         # (result in build/bench-smoke/results/)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _common import add_options, write_result  # noqa: E402

from modalink.config import Settings  # noqa: E402
from modalink.engine import GenerationParams  # noqa: E402
from modalink.engines.transformers import TransformersEngine  # noqa: E402
from modalink.llm import PackedFp16Linear  # noqa: E402


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


def decode_bytes(engine: TransformersEngine) -> int:
    """Weight bytes one decode step reads: every linear (packed fp16 ones at 2 bytes a weight), norms, and the
    input embedding only where the output head shares it (one looked-up row is otherwise all it reads)."""
    model = engine.model
    head = model.get_output_embeddings()
    skip = set() if getattr(head, "weight", None) is engine.embedding.weight else {id(engine.embedding.weight)}
    params = {id(p): p for p in model.parameters() if id(p) not in skip}
    packed = sum(m.in_features * m.out_features * 2 for m in model.modules() if isinstance(m, PackedFp16Linear))
    return packed + sum(p.numel() * p.element_size() for p in params.values())


def profile_step(engine: TransformersEngine, prompt: list, tokens: int = 16) -> list[dict]:
    """Where a batch-1 decode spends its time: the operators' share of self CPU time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decode_rate(engine, [prompt], tokens)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in events[:8]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per request")
    ap.add_argument("--reps", type=int, default=5)
    add_options(ap)
    args = ap.parse_args()
    probe_gib, profile_tokens = 1.0, 16
    if args.smoke:
        args.tokens, args.reps, probe_gib, profile_tokens = 4, 1, 0.125, 4
    settings = Settings()
    settings.apply_threads()
    engines = {
        "fp32": TransformersEngine.load(settings=settings.model_copy(update={"quantize": "none"})),
        "fp16-cpu": TransformersEngine.load(settings=settings.model_copy(update={"quantize": "fp16-cpu"})),
    }
    engine = engines["fp16-cpu"]  # what the LLM service runs on a CPU (`modalink up`, compose, the chart)
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
    cases = {"prefix": [with_prefix], "plain": plain, "batch8": [with_prefix] * 8, "batch1": [with_prefix]}
    runs: dict[str, dict[str, list[float]]] = {e: {c: [] for c in cases} for e in engines}
    for e in engines.values():
        decode_rate(e, [with_prefix], 4)  # warm up
    for rep in range(args.reps):
        order = [(e, c) for e in engines for c in cases]
        for e, c in order if rep % 2 else order[::-1]:
            runs[e][c].append(decode_rate(engines[e], cases[c], args.tokens))
    bandwidth = read_bandwidth(probe_gib, 5 if not args.smoke else 2)
    med = {e: {c: statistics.median(v) for c, v in r.items()} for e, r in runs.items()}
    read = {e: decode_bytes(engines[e]) for e in engines}
    bound = {e: bandwidth / read[e] for e in engines}
    served, fp32 = med["fp16-cpu"], med["fp32"]
    result = {
        "machine": f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, no GPU",
        "model": settings.llm, "served": "fp16-cpu", "bytes_per_token": read,
        "prompt_tokens": {"prefix": n_prefix, "plain": engine.prompt_length(plain)},
        "tokens_per_s": {e: {c: round(v, 2) for c, v in m.items()} for e, m in med.items()}, "runs": runs,
        "read_bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "bound_tokens_per_s": {e: round(b, 2) for e, b in bound.items()},
        "ratios": {
            "prefix_vs_plain": round(served["prefix"] / served["plain"], 3),
            "batch8_vs_batch1": round(served["batch8"] / served["batch1"], 3),
            "batch1_vs_fp32_bound": round(served["batch1"] / bound["fp32"], 3),
            "batch1_vs_own_bound": round(served["batch1"] / bound["fp16-cpu"], 3),
            "fp32_batch1_vs_fp32_bound": round(fp32["batch1"] / bound["fp32"], 3),
            "fp16_vs_fp32_batch1": round(served["batch1"] / fp32["batch1"], 3),
            "fp16_vs_fp32_batch8": round(served["batch8"] / fp32["batch8"], 3),
        },
        "targets": {"prefix_vs_plain": 0.95, "batch8_vs_batch1": 1.0, "batch1_vs_fp32_bound": 0.6},
        "profile": {e: profile_step(engines[e], with_prefix, profile_tokens) for e in engines},
    }  # fmt: skip
    write_result(args, "llm_decode", result)
    r = result["ratios"]
    print(f"LLM decode ({settings.llm}, {args.tokens} tokens, median of {args.reps}; served layout fp16-cpu):")
    print(f"  prefix embeddings vs plain text of equal length: {served['prefix']:.1f} vs {served['plain']:.1f} tok/s "
          f"-> {r['prefix_vs_plain']:.2f}x (target >= 0.95)")  # fmt: skip
    print(f"  8 requests in one batch vs 1: {served['batch8']:.1f} vs {served['batch1']:.1f} tok/s -> "
          f"{r['batch8_vs_batch1']:.2f}x")  # fmt: skip
    print(f"  batch 1 vs the fp32 weights' bandwidth bound ({bandwidth / 1e9:.1f} GB/s / {read['fp32'] / 1e6:.0f} MB "
          f"= {bound['fp32']:.1f} tok/s): fp16-cpu {r['batch1_vs_fp32_bound']:.2f} (target >= 0.6), "
          f"fp32 {r['fp32_batch1_vs_fp32_bound']:.2f}")  # fmt: skip
    print(f"  fp16-cpu vs its own bound ({read['fp16-cpu'] / 1e6:.0f} MB read per token = "
          f"{bound['fp16-cpu']:.1f} tok/s): {r['batch1_vs_own_bound']:.2f}; vs fp32: batch 1 "
          f"{r['fp16_vs_fp32_batch1']:.2f}x, batch 8 {r['fp16_vs_fp32_batch8']:.2f}x")  # fmt: skip
    for e, ops in result["profile"].items():
        print(f"  profile {e}, batch-1 decode: " + ", ".join(f"{o['op']} {o['share']:.0%}" for o in ops[:4]))


if __name__ == "__main__":
    main()
