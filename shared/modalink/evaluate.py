"""Evaluation: does the free-text answer name the right thing? (class-word accuracy, order for video).

An answer is right when the class words it mentions are exactly the true one (a hedge naming two classes
is wrong); for a video, the two items must be named in the right order.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from modalink.data import DIGITS, class_words, default_question
from modalink.modality import get as get_modality

_NUMERALS = {str(i): w for i, w in enumerate(DIGITS)}
SYNONYMS = {
    "t-shirt": ("t-shirt", "t shirt", "tshirt", "tee"),
    "trouser": ("trouser", "trousers", "pants"),
    "sandal": ("sandal", "sandals"),
    "sneaker": ("sneaker", "sneakers"),
    "ankle boot": ("ankle boot", "ankle boots"),
    "bag": ("bag", "handbag"),
    "running": ("running", "run", "runs", "jogging"),
    "walking": ("walking", "walk", "walks"),
    "standing": ("standing", "stand", "stands", "standing still"),
    "badminton": ("badminton",),
}


def _forms(modality: str, word: str) -> tuple[str, ...]:
    """The forms an answer may name a class word by: the modality's own synonyms, the built-ins', or word(s)."""
    return get_modality(modality).synonyms.get(word) or SYNONYMS.get(word, (word, word + "s"))


def _pattern(modality: str) -> re.Pattern:
    forms = []
    for word in class_words(modality):
        forms += [(f, word) for f in _forms(modality, word)]
    if modality == "audio":
        forms += list(_NUMERALS.items())
    forms.sort(key=lambda fw: -len(fw[0]))  # longest first: "t-shirt" before "shirt"
    alternation = "|".join(re.escape(f) for f, _ in forms)
    return re.compile(rf"(?<![\w-])({alternation})(?![\w-])", re.IGNORECASE)


_PATTERNS: dict[str, re.Pattern] = {}


def mentioned(modality: str, text: str) -> list[str]:
    """Class words named in ``text``, in order of first appearance, normalized to their canonical form."""
    if modality not in _PATTERNS:
        _PATTERNS[modality] = _pattern(modality)
    lookup = {}
    for word in class_words(modality):
        for f in _forms(modality, word):
            lookup[f.lower()] = word
    lookup.update(_NUMERALS if modality == "audio" else {})
    found = [lookup[m.group(1).lower()] for m in _PATTERNS[modality].finditer(text)]
    return list(dict.fromkeys(found))


def sequence(modality: str, text: str) -> list[str]:
    """Class words named in ``text`` in order, a word named again right after itself counted once (a video's
    "a bag, then a shirt, then a bag" is three items; "a bag, the same bag" one)."""
    mentioned(modality, "")  # builds the pattern
    lookup = {f.lower(): w for w in class_words(modality) for f in _forms(modality, w)}
    lookup.update(_NUMERALS if modality == "audio" else {})
    found = [lookup[m.group(1).lower()] for m in _PATTERNS[modality].finditer(text)]
    return [w for i, w in enumerate(found) if not i or w != found[i - 1]]


def is_correct(modality: str, label: str, answer: str) -> bool:
    if modality == "video":  # every item, in order
        return sequence(modality, answer) == label.split("|")
    return mentioned(modality, answer) == [label]


# How a video answer is scored (``video_scores``): the answer to the describe question names...
VIDEO_METRICS = {
    "pair": "both items in order (clips of two items, 4 frames each)",
    "first": "the first item first (clips of two or three items)",
    "last": "the last item last (clips of two or three items)",
    "single": "the one item and nothing else (clips of one item)",
    "mixed": "every item in order (two or three items of varied lengths)",
}


def video_scores(rows: Sequence[dict], answers: Sequence[str]) -> dict[str, tuple[float, int]]:
    """{metric: (accuracy, n)} of ``VIDEO_METRICS`` over manifest rows (their ``kind``; rows without one are pairs)
    and the answers to their describe question; metrics without rows are left out."""
    hits: dict[str, list[bool]] = {k: [] for k in VIDEO_METRICS}
    for r, a in zip(rows, answers, strict=True):
        truth, said = r["label"].split("|"), sequence("video", a)
        kind = r.get("kind") or ("single" if len(truth) == 1 else "pair")
        hits["single" if len(truth) == 1 else kind].append(said == truth)
        if len(truth) > 1:
            hits["first"].append(bool(said) and said[0] == truth[0])
            hits["last"].append(bool(said) and said[-1] == truth[-1])
    return {k: (round(sum(v) / len(v), 4), len(v)) for k, v in hits.items() if v}


@dataclass
class Scored:
    id: str
    modality: str
    label: str
    answer: str
    correct: bool


def answer_media(
    engine, modality: str, media: Sequence[torch.Tensor], questions: Sequence[str], system_prompt: str | None,
    max_new_tokens: int = 24, adapter: str | None = None,
) -> list[str]:  # fmt: skip
    """Greedy answers to ``[question, <modality> embeddings]`` prompts, one batch, as the assistant builds them.

    ``adapter``: the LLM LoRA to answer with (stage-2 adapters), None for the bare LLM.
    """
    from modalink.engine import GenerationParams
    from modalink.prompt import Media, Message, build_prompt

    prompts = [
        build_prompt(engine.tokenizer, [Message("user", [q, Media(modality, m)])], system_prompt)
        for q, m in zip(questions, media, strict=True)
    ]
    params = GenerationParams(max_new_tokens=max_new_tokens)
    return [c.text for c in engine.generate(prompts, params, [adapter] * len(prompts) if adapter else None)]


def answer_rows(assistant, rows: Sequence[dict], batch_size: int = 16, max_new_tokens: int = 24) -> Iterator[Scored]:
    """Run the full assistant (files -> encoder -> projector -> LLM) on manifest rows, batched per modality."""
    for modality in dict.fromkeys(r["modality"] for r in rows):
        group = [r for r in rows if r["modality"] == modality]
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            media, _ = assistant.embed(modality, [r["path"] for r in chunk])
            questions = [r.get("question") or default_question(modality) for r in chunk]
            texts = answer_media(assistant.engine, modality, media, questions, assistant.settings.system_prompt,
                                 max_new_tokens, adapter=assistant.llm_adapter(modality))  # fmt: skip
            for r, text in zip(chunk, texts, strict=True):
                yield Scored(r["id"], modality, r["label"], text, is_correct(modality, r["label"], text))


def accuracy(scored: Sequence[Scored]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for s in scored:
        m = out.setdefault(s.modality, {"n": 0, "correct": 0})
        m["n"] += 1
        m["correct"] += s.correct
    for m in out.values():
        m["accuracy"] = round(m["correct"] / m["n"], 4) if m["n"] else 0.0
    return out


def blind_rows(assistant, rows: Sequence[dict], batch_size: int = 16, max_new_tokens: int = 24) -> Iterator[Scored]:
    """Baseline: the same questions to the LLM alone, without the modality input."""
    from modalink.engine import GenerationParams
    from modalink.prompt import Message, build_prompt

    tok = assistant.engine.tokenizer
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        prompts = [
            build_prompt(
                tok,
                [Message("user", [r.get("question") or default_question(r["modality"])])],
                assistant.settings.system_prompt,
            )  # fmt: skip
            for r in chunk
        ]
        outs = assistant.engine.generate(prompts, GenerationParams(max_new_tokens=max_new_tokens))
        for r, o in zip(chunk, outs, strict=True):
            yield Scored(r["id"], r["modality"], r["label"], o.text, is_correct(r["modality"], r["label"], o.text))


def linear_probe(train: Sequence[tuple[dict, torch.Tensor]], test: Sequence[tuple[dict, torch.Tensor]]) -> float:
    """Ceiling check: logistic regression on mean-pooled encoder features (what a projector could reach)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    def xy(items):
        return np.stack([f.float().mean(0).numpy() for _, f in items]), [r["label"] for r, _ in items]

    (xtr, ytr), (xte, yte) = xy(train), xy(test)
    scaler = StandardScaler().fit(xtr)
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(xtr), ytr)
    return float((clf.predict(scaler.transform(xte)) == np.array(yte)).mean())


def video_frame_probe(
    images: Sequence[tuple[dict, torch.Tensor]], clips: Sequence[tuple[dict, torch.Tensor]]
) -> dict[str, tuple[float, int]]:
    """Ceiling check for video: logistic regression trained on single images (mean-pooled features, the train
    split), reading each clip's per-frame tokens [T, d] (``clip_tokens`` "frames"); a clip's answer is its frames'
    classes in order, a class repeated in a row counted once. Scored as ``video_scores``."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = np.stack([f.float().mean(0).numpy() for _, f in images])
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(x), [r["label"] for r, _ in images])
    answers = [", then ".join(clf.predict(scaler.transform(f.float().numpy()))) for _, f in clips]
    return video_scores([r for r, _ in clips], answers)


def grounding(scored: Sequence[Scored]) -> float:
    """Share of input pairs with different labels (same question) where both answers are correct, hence differ.

    Item i is paired with item i + n/2, so pairs mix classes whatever the manifest's order.
    """
    half = len(scored) // 2
    pairs = ok = 0
    for a, b in zip(scored[:half], scored[half : 2 * half], strict=True):
        if a.label != b.label:
            pairs += 1
            ok += a.correct and b.correct and a.answer != b.answer
    return ok / pairs if pairs else 0.0


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s-]", " ", text.lower()).split())


def caption_scores(scored: Sequence[Scored]) -> dict[str, float]:
    """BLEU-4, ROUGE-L and CIDEr (pycocoevalcap) of the answers against every answer template for the label."""
    import contextlib
    import io

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    from modalink.data import answer_templates, fill

    gts = {s.id: [_norm(fill(t, s.modality, s.label)) for t in answer_templates(s.modality, s.label)] for s in scored}
    res = {s.id: [_norm(s.answer) or "empty"] for s in scored}
    with contextlib.redirect_stdout(io.StringIO()):  # the BLEU scorer prints its internals
        bleu = Bleu(4).compute_score(gts, res)[0][3]
    return {"bleu4": bleu, "rougeL": Rouge().compute_score(gts, res)[0], "cider": Cider().compute_score(gts, res)[0]}


def write_report(path, data_dir, settings, baseline_limit: int = 100, command: str = "", modalities=None) -> dict:
    """Evaluate the current adapters and the three baselines on held-out data; write a markdown table (the rows
    of ``modalities``, default all)."""
    import datetime
    import platform
    import tempfile
    from pathlib import Path

    from modalink import MODALITIES
    from modalink.assistant import Assistant
    from modalink.data import read_manifest
    from modalink.encoders import load_encoder
    from modalink.train.features import features_for

    data_dir = Path(data_dir)
    assistant = Assistant(settings)
    untrained = Assistant(settings.model_copy(update={"adapters_dir": Path(tempfile.mkdtemp())}), assistant.engine)
    rows_out, examples = [], []
    for m in modalities or MODALITIES:
        test_path = data_dir / m / "test.jsonl"
        if not test_path.exists():
            continue
        test = read_manifest(test_path)
        scored = list(answer_rows(assistant, test))
        by_kind = None
        if m == "video":  # the main row: clips of two items, in order; more rows per kind of clip below
            by_kind = video_scores(test, [s.answer for s in scored])
            scored = [s for s, r in zip(scored, test, strict=True) if r.get("kind", "pair") == "pair"]
            test = [r for r in test if r.get("kind", "pair") == "pair"]
        acc = accuracy(scored)[m]
        few = test[:baseline_limit]
        blind = accuracy(list(blind_rows(assistant, few)))[m]
        rand = accuracy(list(answer_rows(untrained, few)))[m]
        probe = None
        if m != "video":
            enc = assistant.encoder(m)
            probe = linear_probe(features_for(m, "train", data_dir, settings, enc),
                                 features_for(m, "test", data_dir, settings, enc))  # fmt: skip
        _, version = assistant.projector(m)
        stage1 = None  # the same items through the stage-1 version a stage-2 adapter started from
        init = None
        if assistant.llm_adapter(m):
            init = next(v.metrics.get("init_from") for v in assistant.registry.list(m) if v.version == version)
        if init:
            stage1 = accuracy(list(answer_rows(Assistant(settings, assistant.engine, {m: init}), few)))[m]["accuracy"]
            version = f"{version} (stage 2, from {init})"
        caps = caption_scores(scored)
        rows_out.append({"modality": m, "split": "test", "n": acc["n"], "accuracy": acc["accuracy"], **caps,
                         "grounding": round(grounding(scored), 4), "blind": blind["accuracy"],
                         "untrained": rand["accuracy"], "baseline_n": len(few), "stage1": stage1,
                         "linear_probe": None if probe is None else round(probe, 4), "adapter": version})  # fmt: skip
        examples += [(m, s.label, s.answer, s.correct) for s in scored[:3]]
        if (classical := get_modality(m).baseline) is not None:  # the field's own classifier, same split
            name, cacc = classical(data_dir)
            rows_out.append({"modality": f"{m}: {name}", "split": "test", "n": acc["n"], "accuracy": cacc,
                             "adapter": "classical classifier", "linear_probe": None})  # fmt: skip
        if by_kind:
            enc = assistant.encoder("image")
            frame_settings = settings.model_copy(update={"video_tokens": "frames"})
            probe_kind = video_frame_probe(
                features_for("image", "train", data_dir, settings, enc),
                features_for("video", "test", data_dir, frame_settings, load_encoder("video", frame_settings, enc)),
            )
            rows_out[-1]["linear_probe"] = probe_kind["pair"][0]
            for kind, (kacc, n) in by_kind.items():
                if kind != "pair":
                    rows_out.append({"modality": f"video: {VIDEO_METRICS[kind].split(' (')[0]}", "split": "test",
                                     "n": n, "accuracy": kacc, "adapter": version,
                                     "linear_probe": probe_kind.get(kind, (None,))[0]})  # fmt: skip
        if m == "audio" and (data_dir / "audio" / "real.jsonl").exists():
            real = [r for r in read_manifest(data_dir / "audio" / "real.jsonl") if r["label"] in DIGITS]
            sr = list(answer_rows(assistant, real))
            racc = accuracy(sr)["audio"]
            rows_out.append({"modality": "audio (real recorded digits)", "split": "real", "n": racc["n"],
                             **caption_scores(sr),
                             "accuracy": racc["accuracy"], "grounding": round(grounding(sr), 4), "blind": None,
                             "untrained": None, "baseline_n": 0, "linear_probe": None, "adapter": version,
                             "stage1": None})  # fmt: skip
            examples += [("audio (real)", s.label, s.answer, s.correct) for s in sr]
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines = [
        "# Results: class-word accuracy of free-text answers on held-out data",
        "",
        f"Reproduce: `{command or 'modalink eval --report docs/RESULTS.md'}` (after `make adapters`).",
        f"Measured {datetime.date.today()} on {platform.machine()}, {len(__import__('os').sched_getaffinity(0))} "
        f"CPU cores, LLM `{settings.llm}` (frozen; stage-2 adapters add their LoRA), greedy decoding. "
        "An answer is right when the class words it names are exactly the true one (video: both items, in order).",
        "",
        "| modality | adapter | n | accuracy | grounding | blind LLM | untrained projector | stage 1 only "
        "| linear probe | BLEU-4 | ROUGE-L | CIDEr |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    num = lambda r, k, f: "–" if r.get(k) is None else f"{r[k]:.{f}f}"  # noqa: E731
    for r in rows_out:
        bn = f" (n={r['baseline_n']})" if r.get("baseline_n") else ""
        s1 = f"{pct(r['stage1'])}{bn}" if r.get("stage1") is not None else "–"
        base = f"{pct(r['blind'])}{bn} | {pct(r['untrained'])}{bn}" if r.get("blind") is not None else "– | –"
        lines.append(f"| {r['modality']} | {r['adapter']} | {r['n']} | **{pct(r['accuracy'])}** "
                     f"| {pct(r.get('grounding'))} | {base} | {s1} | {pct(r['linear_probe'])} "
                     f"| {num(r, 'bleu4', 3)} | {num(r, 'rougeL', 3)} | {num(r, 'cider', 2)} |")  # fmt: skip
    lines += [
        "",
        "- grounding: pairs of test items (i, i + n/2) with different labels where both answers are right "
        "and differ (the same question got two different, correct answers).",
        "- blind LLM: the same question without the input; untrained projector: a fixed-seed random "
        "projector; stage 1 only: the aligned projector a stage-2 (LoRA) adapter was trained from, without the "
        "LoRA; linear probe: logistic regression on mean-pooled encoder features (train split -> test).",
        "- video: the main row scores clips of two items, 4 frames each (both named, in order); the rows below "
        "score the same answers by what they name first and last (clips of two or three items), clips of one "
        "item, and clips of two or three items of varied lengths (every item, in order). Its linear probe reads "
        "the clip's per-frame features: logistic regression trained on single train images classifies each "
        "sampled frame, and the classes in order (a repeat in a row counted once) are the probe's answer.",
        "- A row naming a classical classifier (a modality plugin's `baseline`, e.g. power's ROCKET) is that "
        "classifier trained on the train split and scored on the same test items: the field's own baseline.",
        "- BLEU-4 / ROUGE-L / CIDEr (pycocoevalcap): the answer to the default question against every answer "
        "template for the true label, lower-cased, punctuation removed.",
        "",
        "## Sample answers",
        "",
        "| modality | truth | answer | right |",
        "|---|---|---|---|",
    ]
    lines += [f"| {m} | {t} | {a.strip()} | {'yes' if c else 'no'} |" for m, t, a, c in examples]
    kept = sections(Path(path).read_text()) if Path(path).exists() else {}
    lines += [line for title, body in kept.items() if title in OWN_SECTIONS for line in ["", *body]]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")
    return {"rows": rows_out}


METHODS_SECTION = "## Stage-2 methods"
MAGIC_SECTION = "## Training-free baseline: MAGIC (IMU)"
OWN_SECTIONS = (
    METHODS_SECTION,
    MAGIC_SECTION,
)  # written by other commands into the report; ``write_report`` keeps them


def sections(text: str) -> dict[str, list[str]]:
    """The report's ``## `` sections by heading line, each with its lines (heading included, trailing blanks cut)."""
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("## "):
            current = line
            out[current] = []
        if current is not None:
            out[current].append(line)
    return {k: v[: len(v) - next((i for i, x in enumerate(reversed(v)) if x.strip()), 0)] for k, v in out.items()}


def put_section(path, body: list[str]) -> None:
    """Write ``body`` (its first line the ``## `` heading) into the report at ``path``, replacing that section."""
    from pathlib import Path

    path = Path(path)
    text = path.read_text() if path.exists() else "# Results\n"
    kept = sections(text)
    head = text.split("\n## ", 1)[0].rstrip("\n").splitlines() if not text.startswith("## ") else []
    kept[body[0]] = body
    lines = head + [line for b in kept.values() for line in ["", *b]]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def methods_section(results: dict[str, dict[str, dict]], command: str) -> list[str]:
    """The stage-2 method comparison (``train.compare``) as a markdown section, each method next to LoRA."""
    import datetime
    import os
    import platform

    lines = [
        METHODS_SECTION,
        "",
        f"Reproduce: `{command}`. Measured {datetime.date.today()} on {platform.machine()}, "
        f"{len(os.sched_getaffinity(0))} CPU cores. Every method starts from the same stage-1 projector and trains "
        "it together with its LLM adapter on the same instructions, steps, batch and seed, at its own default "
        "learning rate; accuracy on the held-out test split through the in-process assistant; decode tokens/s at "
        "batch 1 on the same media prompt, prefill excluded, all methods measured in one run (medians of 3).",
        "",
        "| modality | method | adapter lr | trainable LLM params | train s/step | val accuracy | test accuracy "
        "| vs LoRA | decode tok/s | vs LoRA |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, res in results.items():
        lora = res.get("lora", {})
        for method, r in res.items():
            speed = f"{r['decode_tok_s'] / lora['decode_tok_s']:.2f}x" if lora else "–"
            if "val_accuracy" not in r:  # the bare LLM's decode speed, for reference
                lines.append(f"| {m} | {r['method']} | – | 0 | – | – | – | – | {r['decode_tok_s']:.1f} | {speed} |")
                continue
            dacc = f"{100 * (r['test_accuracy'] - lora['test_accuracy']):+.1f} pt" if lora else "–"
            lines.append(f"| {m} | `{method}` | {r['lr']:g} | {r['trainable_llm']:,} | {r['step_seconds']:.2f} "
                         f"| {100 * r['val_accuracy']:.1f}% (n={r['val_n']}) "
                         f"| **{100 * r['test_accuracy']:.1f}%** (n={r['test_n']}) | {dacc} "
                         f"| {r['decode_tok_s']:.1f} | {speed} |")  # fmt: skip
    scored = [r for res in results.values() for r in res.values() if "test_accuracy" in r]
    if scored:  # how far apart two test accuracies must be to mean anything at this n (normal approximation)
        half = max(1.96 * (r["test_accuracy"] * (1 - r["test_accuracy"]) / r["test_n"]) ** 0.5 for r in scored)
        lines += ["", f"At these test sizes a test accuracy's 95% interval is up to ±{100 * half:.1f} pt: methods "
                  "closer than that are not told apart by this run."]  # fmt: skip
    return lines


def magic_section(result: dict, trained: float | None, command: str) -> list[str]:
    """MAGIC's IMU result (``magic.evaluate_magic``) as a markdown section, beside the trained IMU adapter."""
    import datetime

    pct = lambda v: "–" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    c = result["cfg"]
    n = result["test_n"]
    lines = [
        MAGIC_SECTION,
        "",
        f"Reproduce: `{command}`. Measured {datetime.date.today()}. MAGIC (Su et al. 2022) trains nothing beyond the "
        "IMU encoder's own contrastive training: the frozen LLM gets only a question (no input), and each decoding "
        "step keeps the candidate whose text lies closest to the IMU window in all-MiniLM-L6-v2's sentence space, "
        "where the IMU encoder was trained to point. The question names the four activities, as a zero-shot "
        f"classifier's label set does (the trained adapter's question does not): \"{result['question']}\" "
        f"(k={c['k']}, alpha={c['alpha']}, tau={c['tau']}; beta={result['beta']} chosen on the "
        f"{result['val_n']} validation windows: {result['val']}). It applies to IMU only: the image, video and "
        "audio encoders were never trained against text, so without a trained projector there is no space in "
        "which a sentence and their features can be compared (`shared/modalink/magic.py`).",
        "",
        "| IMU, test split | n | accuracy |",
        "|---|---|---|",
        f"| MAGIC, no training | {n} | **{pct(result['test_accuracy'])}** |",
        f"| the same decoding without the input (beta 0) | {n} | {pct(result['blind_accuracy'])} |",
        f"| the encoder's zero-shot nearest activity description (a classifier, not an answer) | {n} "
        f"| {pct(result['zero_shot_accuracy'])} |",
        f"| the trained IMU adapter (projector, table above) | {n} | {pct(trained)} |",
        "",
        "| truth | MAGIC's answer |",
        "|---|---|",
        *[f"| {label} | {answer} |" for label, answer in result["examples"]],
    ]
    return lines
