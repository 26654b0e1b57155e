"""Captioning throughput: a job on the Celery workers (batched per modality queue) vs a naive per-item loop.

Both run on one live topology (`modalink up` with the image and IMU encoders, the LLM service, the gateway,
Redis and a worker), over the same items, interleaved, several times; the printed ratio is of medians.
The naive loop is what a client without jobs would write: one gateway ``Caption`` call per item, in order.
The job sends each batch to the encoder service as one Triton request and its prompts to the LLM
service together, where the dynamic batcher decodes them as one batch.

The stack runs with its jobs dir and manifest roots set to ``<run dir>/jobs`` (``MODALINK_JOBS_DIR``,
``MODALINK_MANIFEST_ROOTS``), and the jobs are submitted as the gateway submits them (roots check on), with their
items and results in a folder there: the measured path is the deployed one.

    python bench/captioning.py [--items 48] [--reps 3] [--tokens 16] [--results bench/results]
    python bench/captioning.py --smoke   # 4 items, 1 rep, 4 tokens: does it still run? (build/bench-smoke/)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import add_options, confine_jobs, run_dir, stack, stop_on_sigterm, use_engine, write_result  # noqa: E402


def items(folder: Path, n: int, repeat: bool = False) -> list[dict]:
    """Half images, half IMU windows, each one different (an image with a few pixels changed, a window with noise),
    from the packaged samples. ``repeat``: the same number of rows, every second one naming the file of the row
    before it (a manifest where half the items repeat)."""
    import numpy as np
    from PIL import Image

    from modalink.samples import write_samples

    samples = {m: s["path"] for m, s in write_samples(folder).items()}
    x = np.load(samples["imu"]).astype(np.float32)
    pixels = np.asarray(Image.open(samples["image"]).convert("RGB"))
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        if repeat and i % 2:
            rows.append({**rows[-1], "id": f"{rows[-1]['id']}-again"})
            continue
        if (i // 2 if repeat else i) % 2:
            path = folder / f"imu-{i}.npy"
            np.save(path, x + rng.normal(0, 0.01, x.shape).astype(np.float32))
            rows.append({"id": f"imu-{i}", "modality": "imu", "path": str(path)})
        else:
            path = folder / f"image-{i}.png"
            img = pixels.copy()
            img[i % img.shape[0], :8] = rng.integers(0, 256, (8, 3))  # 8 pixels of one row: other bytes, same picture
            Image.fromarray(img).save(path)
            rows.append({"id": f"image-{i}", "modality": "image", "path": str(path)})
    return rows


def naive(rows: list[dict], tokens: int) -> float:
    from modalink.client import Client, image, imu

    t0 = time.perf_counter()
    with Client("localhost:50051") as client:
        for r in rows:
            part = image(r["path"]) if r["modality"] == "image" else imu(r["path"])
            client.caption(part, max_new_tokens=tokens)
    return time.perf_counter() - t0


def job(rows: list[dict], tokens: int, out: Path, batch_size: int, timeout_s: float = 900) -> float:
    from modalink.engine import GenerationParams
    from modalink.queueing import store, submit

    t0 = time.perf_counter()
    job_id = submit(rows, str(out), batch_size, GenerationParams(max_new_tokens=tokens))
    while store().get(job_id)["state"] == "running":
        if time.perf_counter() - t0 > timeout_s:  # a worker that never finishes fails the benchmark, not hangs it
            raise TimeoutError(f"job {job_id} still running after {timeout_s:.0f} s: {store().get(job_id)}")
        time.sleep(0.05)
    elapsed = time.perf_counter() - t0
    job = store().get(job_id)
    assert job["done"] == len(rows) and job["errors"] == 0, job
    assert len(out.read_text().splitlines()) == len(rows), f"{out}: not one result line per item"
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=48)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=16, help="max_new_tokens of every caption")
    ap.add_argument("--batch-size", type=int, default=16, help="items per job task")
    add_options(ap, stack=True, engine=True)
    args = ap.parse_args()
    if args.smoke:
        args.items, args.reps, args.tokens, args.batch_size = 4, 1, 4, 2
    stop_on_sigterm()
    engine = use_engine(args)
    run = run_dir(args, "captioning")
    jobs_dir = confine_jobs(run / "jobs")  # before anything reads the settings or starts the stack

    with stack(run, modalities=["image", "imu"]), tempfile.TemporaryDirectory(dir=jobs_dir, prefix="bench-") as tmp:
        rows = items(Path(tmp), args.items)
        if not args.smoke:
            naive(rows[:2], args.tokens)  # warm both paths up (first calls load lazily)
            job(rows[:4], args.tokens, Path(tmp) / "warm.jsonl", args.batch_size)
        # the same number of rows, half of them repeating the row before (other files than `rows`: no cache hits)
        repeated = items(Path(tmp) / "repeated", args.items, repeat=True)
        times: dict[str, list[float]] = {"naive": [], "job": [], "job_half_repeated": []}
        # every run gets its items with new bytes (the same pictures and windows): it measures computing, never
        # hits the media embedding caches left by the run before
        for rep in range(args.reps):
            times["naive"].append(naive(fresh(rows), args.tokens))
            times["job"].append(job(fresh(rows), args.tokens, Path(tmp) / f"job-{rep}.jsonl", args.batch_size))
            out = Path(tmp) / f"repeated-{rep}.jsonl"
            times["job_half_repeated"].append(job(fresh(repeated), args.tokens, out, args.batch_size))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["naive"] / med["job"]
    repeat_ratio = med["job"] / med["job_half_repeated"]
    result = {
        "items": args.items, "max_new_tokens": args.tokens, "batch_size": args.batch_size, "reps": args.reps,
        "seconds": times, "items_per_s": {k: round(args.items / v, 2) for k, v in med.items()},
        "speedup": round(ratio, 2), "target": 3.0,
        "half_repeated_speedup": round(repeat_ratio, 2), "half_repeated_target": 1.6,
        "machine": f"{os.cpu_count()} CPU cores, no GPU", "engine": engine,
    }  # fmt: skip
    write_result(args, "captioning", result)
    print(f"captioning {args.items} items (image + IMU, {args.tokens} tokens), median of {args.reps}:")
    print(f"  naive per-item loop (gateway Caption): {result['items_per_s']['naive']:6.2f} items/s")
    print(f"  Celery job, batches of {args.batch_size}:          {result['items_per_s']['job']:6.2f} items/s")
    print(f"  speedup {ratio:.2f}x (target >= 3x)")
    print(f"  the job with half its items repeated:  {result['items_per_s']['job_half_repeated']:6.2f} items/s, "
          f"{repeat_ratio:.2f}x the all-distinct job (target >= 1.6x)")  # fmt: skip


COUNTER = iter(range(1, 1 << 30))


def fresh(rows: list[dict]) -> list[dict]:
    """``rows`` after changing one value of each file they name (not what it shows), so no item is in a cache."""
    import numpy as np
    from PIL import Image

    for path in sorted({Path(r["path"]) for r in rows}):
        n = next(COUNTER)
        if path.suffix == ".npy":
            x = np.load(path)
            x[0, n % x.shape[1]] += 1e-3
            np.save(path, x)
        else:
            img = np.asarray(Image.open(path).convert("RGB")).copy()
            img[-1, n % img.shape[1]] ^= 1
            Image.fromarray(img).save(path)
    return rows


if __name__ == "__main__":
    main()
