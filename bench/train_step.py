"""Stage-1 and stage-2 training steps: prompt heads shared through a KV cache vs each row computing its own.

Both variants run on the same batches in one process, interleaved, so the printed ratio holds on a noisy
machine where absolute times do not. Features are random (the step cost does not depend on them).

    python bench/train_step.py [--steps 6] [--batch 16] [--results bench/results]
    python bench/train_step.py --smoke   # 1 step of batch 2 per stage: does it still run?
                                         # (result in build/bench-smoke/results/)
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _common import add_options, write_result  # noqa: E402

from modalink.config import Settings  # noqa: E402
from modalink.data import GARMENTS, caption  # noqa: E402
from modalink.data import questions as describe_questions  # noqa: E402
from modalink.engines.transformers import TransformersEngine  # noqa: E402
from modalink.projectors import pad_features  # noqa: E402
from modalink.train.align import AlignConfig, AlignTrainer, answer_loss, plain_answer_loss  # noqa: E402


def bench(stage: int, steps: int, batch_size: int) -> tuple[float, float]:
    settings = Settings()
    engine = TransformersEngine.load(settings=settings)
    rng = random.Random(0)
    items = [({"label": rng.choice(GARMENTS)}, torch.randn(49, 1280)) for _ in range(64)]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = AlignConfig("image", stage=stage, batch_size=batch_size)
        trainer = AlignTrainer(cfg, engine, 1280, items, items, tmp, settings.system_prompt)
        times = {"shared": 0.0, "plain": 0.0}
        for step in range(steps + 1):  # step 0 warms up both
            batch_items = rng.sample(items, batch_size)
            questions = [rng.choice(describe_questions("image")) for _ in batch_items]
            answers = [caption("image", row["label"], rng) for row, _ in batch_items]
            for name, loss_fn in (("shared", answer_loss), ("plain", None))[:: 1 if step % 2 else -1]:
                t0 = time.perf_counter()
                media = trainer.projector(*pad_features([f for _, f in batch_items]))
                batch = trainer.batcher.build(media, "image", questions, answers)
                loss = loss_fn(engine, trainer.heads, batch) if loss_fn else plain_answer_loss(engine, batch)
                trainer.opt.zero_grad()
                loss.backward()
                if step:
                    times[name] += time.perf_counter() - t0
    return times["shared"] / steps, times["plain"] / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant (after one warm-up)")
    ap.add_argument("--batch", type=int, default=16, help="rows per step (the training default)")
    add_options(ap)
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.batch = 1, 2
    print(f"training step, batch {args.batch}, image rows (8 media tokens), {torch.get_num_threads()} threads")
    result = {"machine": f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, no GPU",
              "batch": args.batch, "steps": args.steps}  # fmt: skip
    for stage in (1, 2):
        shared, plain = bench(stage, args.steps, args.batch)
        result[f"stage{stage}"] = {"shared_s_per_step": round(shared, 3), "plain_s_per_step": round(plain, 3),
                                   "speedup": round(plain / shared, 3)}  # fmt: skip
        print(f"  stage {stage}: shared heads {shared:.2f} s/step, plain {plain:.2f} s/step -> "
              f"{plain / shared:.2f}x faster")  # fmt: skip
    write_result(args, "train_step", result)


if __name__ == "__main__":
    main()
