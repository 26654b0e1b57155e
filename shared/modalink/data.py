"""Training and evaluation data, built reproducibly from packaged sources (``modalink data build``).

Every split of every modality is a JSONL manifest of ``{"id", "modality", "path", "label", "caption",
"split"}`` with its files beside it. Sources: Fashion-MNIST (Debian), speech synthesized with espeak-ng
(Debian) in many voices and conditions (recorded Asterisk speech is evaluation-only), BasicMotions IMU
windows (PyPI aeon), and video clips made of Fashion-MNIST items whose captions need time.
"""

from __future__ import annotations

import bisect
import itertools
import json
import random
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

from modalink.datasets import BASIC_MOTIONS_CLASSES, FASHION_CLASSES, asterisk_wav, basic_motions, fashion_mnist
from modalink.encoders.audio import resample
from modalink.encoders.video import frames_to_gif
from modalink.errors import InputError
from modalink.modality import get as get_modality
from modalink.modality import names as modality_names
from modalink.progress import progress

# Class words an answer must name (checked by modalink.evaluate): the datasets' classes in lower case ("T-shirt/top"
# is "t-shirt"), in the datasets' label order.
GARMENTS = tuple(c.split("/")[0].lower() for c in FASHION_CLASSES)
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WORDS = (
    "yes", "no", "stop", "go", "left", "right", "up", "down", "hello", "goodbye", "water", "music", "coffee",
    "house", "dog", "cat", "red", "blue", "green", "happy", "morning", "phone",
)  # fmt: skip
VOCABULARY = DIGITS + WORDS
ACTIVITIES = tuple(c.lower() for c in BASIC_MOTIONS_CLASSES)
ACTIVITY_TEXT = {
    "badminton": "playing badminton, swinging a racket",
    "running": "running at a steady pace",
    "standing": "standing still",
    "walking": "walking at a normal pace",
}

ESPEAK_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-029", "en-us-nyc")
# Voices are held out by variant: test and validation speakers never occur in training.
VARIANTS = {
    "train": ("m1", "m2", "m4", "m5", "m6", "m7", "f1", "f3", "f4", "klatt", "klatt2", "Alex", "Andy", "annie",
              "belinda", "boris", "david", "edward", "linda", "max", "michel", "paul", "steph", "john"),
    "val": ("m8", "f5", "klatt4", "robert", "grandpa"),
    "test": ("m3", "f2", "klatt3", "Annie", "aunty", "grandma", "norbert"),
}  # fmt: skip

QUESTIONS = {
    "image": ("What is shown in this picture?", "What kind of item is this?", "Describe the image briefly.",
              "What is this?", "Which garment or accessory do you see?"),
    "audio": ("What does the voice say?", "What word is spoken?", "Transcribe the audio.",
              "Describe the audio briefly.", "What is said in this recording?"),
    "imu": ("What activity is the person doing?", "What is the wearer doing?", "Describe the motion.",
            "Which activity do these motion sensors show?"),
    "video": ("What happens in this video?", "Describe the video in order.", "What appears first, and what next?"),
}  # fmt: skip
ANSWERS = {
    "image": ("It is a {label}.", "This is a photo of a {label}.", "A {label}.", "The picture shows a {label}."),
    "audio": ("The voice says the word {label}.", "A voice saying the word {label}.", "The word is {label}.",
              "Someone says \"{label}\"."),
    "imu": ("The person is {label}.", "The wearer is {label}.", "These motion signals show someone {label}."),
    "video": ("First a {a}, then a {b}.", "The video shows a {a}, and then a {b}.", "A {a} appears first, then a {b}."),
}  # fmt: skip
# A video's caption names its items in order, however many it shows (ANSWERS["video"]: two).
VIDEO_ANSWERS = {
    1: ("The video shows a {a}.", "A {a}, the whole time.", "Only a {a} appears."),
    2: ANSWERS["video"],
    3: ("First a {a}, then a {b}, then a {c}.", "The video shows a {a}, then a {b}, and then a {c}.",
        "A {a} appears first, then a {b}, and last a {c}."),
}  # fmt: skip
# Questions about one moment of a video, and their answers (training teaches order with them).
VIDEO_FIRST = (("What appears first?", "What is the first item in the video?", "What does the video start with?"),
               ("A {x}.", "First comes a {x}.", "The video starts with a {x}."))  # fmt: skip
VIDEO_LAST = (("What appears last?", "What is the last item in the video?", "What does the video end with?"),
              ("A {x}.", "Last comes a {x}.", "The video ends with a {x}."))  # fmt: skip
VIDEO_APPEARS = ("Does a {x} appear in the video?", "Is there a {x} in this video?")


def answer_templates(modality: str, label: str) -> tuple[str, ...]:
    """The answer templates for a label (a video's depend on how many items it shows)."""
    return VIDEO_ANSWERS[len(label.split("|"))] if modality == "video" else get_modality(modality).answers


def fill(template: str, modality: str, label: str) -> str:
    """An answer template filled for a label (video labels name the items in order, "first|second"; a modality's
    ``describe`` turns a label into its phrase: IMU's names an activity)."""
    if modality == "video":
        return template.format(**dict(zip("abc", label.split("|"), strict=False)))
    return template.format(label=get_modality(modality).phrase(label))


def caption(modality: str, label: str, rng: random.Random) -> str:
    return fill(rng.choice(answer_templates(modality, label)), modality, label)


# Stage-2 instructions beyond "what is it": yes/no checks against a named class (the true one or another),
# answered "Yes." / "No." plus the true description, so following the instruction needs the input.
CHECKS = {
    "image": ("Is this a {x}?", "Is the item in the picture a {x}?", "Do you see a {x} here?"),
    "audio": ('Does the voice say "{x}"?', "Is the spoken word {x}?", "Is the word in this recording {x}?"),
    "imu": ("Is the person {x}?", "Is the wearer {x}?"),
    "video": ("Does a {x} appear first?", "Is the first item a {x}?"),
}


def questions(modality: str) -> tuple[str, ...]:
    """The describe questions of a modality (training draws from them)."""
    return get_modality(modality).questions


def default_question(modality: str) -> str:
    """The question asked when none is given (captions, evaluation, captioning jobs)."""
    return questions(modality)[0]


CLASS_WORDS = {"image": GARMENTS, "audio": VOCABULARY, "imu": ACTIVITIES, "video": GARMENTS}


def class_words(modality: str) -> tuple[str, ...]:
    """The classes of a modality's data, as the words an answer names them by (a video names two garments)."""
    return get_modality(modality).words


def _check_phrase(modality: str, label: str) -> str:
    """A label as a yes/no check names it: its phrase up to the first comma (IMU: "walking", not the whole
    description)."""
    return get_modality(modality).phrase(label).split(",")[0]


def video_order_question(label: str, rng: random.Random) -> tuple[str, str]:
    """(question, answer) about one moment of a clip: what comes first, what comes last, or whether an item
    appears at all (answered "Yes." / "No." plus the whole description)."""
    items = label.split("|")
    kind = rng.randrange(3)
    if kind < 2:
        questions, answers = VIDEO_FIRST if kind == 0 else VIDEO_LAST
        x = items[0] if kind == 0 else items[-1]
        return rng.choice(questions), rng.choice(answers).format(x=x)
    asked = rng.choice(items) if rng.random() < 0.5 else rng.choice([x for x in GARMENTS if x not in items])
    question = rng.choice(VIDEO_APPEARS).format(x=asked)
    return question, f"{'Yes' if asked in items else 'No'}. {caption('video', label, rng)}"


def instruction(
    modality: str, label: str, rng: random.Random, checks: float = 0.0, order: float = 0.0
) -> tuple[str, str]:
    """(question, answer) for training: with probability ``checks`` a yes/no check, else a describe question;
    for a video, with probability ``order`` first a question about what comes first, last or at all."""
    if modality == "video" and order and rng.random() < order:
        return video_order_question(label, rng)
    answer = caption(modality, label, rng)
    templates = get_modality(modality).checks
    if rng.random() >= checks or not templates:
        return rng.choice(questions(modality)), answer
    truth = label.split("|")[0] if modality == "video" else label
    asked = truth if rng.random() < 0.5 else rng.choice([x for x in class_words(modality) if x != truth])
    question = rng.choice(templates).format(x=_check_phrase(modality, asked))
    return question, f"{'Yes' if asked == truth else 'No'}. {answer}"


@dataclass
class BuildConfig:
    seed: int = 0
    image_train: int = 6000
    image_val: int = 500
    image_test: int = 1000
    audio_train_per_word: int = 60
    audio_val_per_word: int = 8
    audio_test_per_word: int = 10
    video_train: int = 2000  # clips of two different items, 4 frames each (per split)
    video_val: int = 100
    video_test: int = 200
    video_train_mixed: int = 2000  # clips of one, two or three items of varied lengths
    video_val_single: int = 50  # held out: clips of one item
    video_test_single: int = 100
    video_val_mixed: int = 50  # held out: two or three items of varied lengths
    video_test_mixed: int = 100


def _write_manifest(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def check_path(path: str | Path, roots: Sequence[str | Path], what: str = "path") -> Path:
    """``path`` with symlinks and ``..`` resolved, if that lies inside one of ``roots``; else InputError."""
    resolved = Path(path).resolve()
    real = [Path(r).resolve() for r in roots]
    if not any(resolved.is_relative_to(r) for r in real):
        shown = f"{path}" if str(path) == str(resolved) else f"{path} (resolves to {resolved})"
        raise InputError(f"{what} {shown} is outside the allowed manifest roots "
                         f"({', '.join(map(str, real))}; MODALINK_MANIFEST_ROOTS)")  # fmt: skip
    return resolved


def read_manifest(path: str | Path, roots: Sequence[str | Path] | None = None) -> list[dict]:
    """The rows of a JSONL manifest file (``parse_manifest``: relative paths are relative to its folder).

    ``roots``: where the file may be (``check_path``, symlinks resolved), for manifests named by someone less
    trusted than this process (captioning jobs: ``modalink.jobs.manifest_roots()``); None: anywhere.
    """
    if roots is not None:
        path = check_path(path, roots, "manifest")
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise InputError(f"cannot read manifest {path}: {e.strerror}") from None
    return parse_manifest(text, Path(path).parent, str(path))


def parse_manifest(text: str, base: Path, source: str = "manifest") -> list[dict]:
    """Rows of JSONL ``text``, each an object with a unique string ``id`` and a ``path`` or ``uri``; a relative
    ``path`` is resolved against ``base``. InputError names ``source`` and the line or item."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{source}:{n}: not JSON: {e}") from None
        if isinstance(row, dict) and isinstance(row.get("path"), str):
            try:
                row["path"] = str((Path(base) / row["path"]).resolve())
            except ValueError as e:  # a NUL byte in the path
                raise InputError(str(e)) from None
        rows.append(row)
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise InputError(f"{source}: item {n}: every line must be a JSON object")
        if not row.get("id") or not isinstance(row["id"], str) or not (row.get("path") or row.get("uri")):
            raise InputError(f"{source}: item {n} needs a string id and a path or uri")
    if len({r["id"] for r in rows}) != len(rows):
        raise InputError(f"{source}: item ids must be unique")
    return rows


def _balanced(labels: np.ndarray, n: int, rng: np.random.Generator, exclude: set[int] = frozenset()) -> list[int]:
    per = n // len(FASHION_CLASSES)
    out = []
    for c in range(len(FASHION_CLASSES)):
        idx = [i for i in np.flatnonzero(labels == c) if i not in exclude]
        out += rng.choice(idx, per, replace=False).tolist()
    return sorted(out)


def build_image(out: Path, cfg: BuildConfig) -> dict[str, int]:
    rng, prng = np.random.default_rng(cfg.seed), random.Random(cfg.seed)
    train_x, train_y = fashion_mnist("train")
    test_x, test_y = fashion_mnist("t10k")
    val_idx = _balanced(train_y, cfg.image_val, rng)
    train_idx = _balanced(train_y, cfg.image_train, rng, exclude=set(val_idx))
    splits = {
        "train": (train_x, train_y, train_idx, "train"),
        "val": (train_x, train_y, val_idx, "train"),
        "test": (test_x, test_y, _balanced(test_y, cfg.image_test, rng), "t10k"),
    }
    counts = {}
    for split, (x, y, idx, src) in splits.items():
        rows = []
        for i in progress(idx, desc=f"image {split}", leave=False):
            rel = f"images/{src}-{i:05d}.png"
            if not (out / "image" / rel).exists():
                (out / "image" / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(x[i]).save(out / "image" / rel)
            label = GARMENTS[int(y[i])]
            rows.append({"id": f"fmnist-{src}-{i}", "modality": "image", "path": rel, "label": label,
                         "caption": caption("image", label, prng), "split": split})  # fmt: skip
        _write_manifest(out / "image" / f"{split}.jsonl", rows)
        counts[split] = len(rows)
    return counts


def _speak(text: str, voice: str, rng: random.Random, tmp: Path) -> tuple[np.ndarray, int]:
    wav = tmp / "say.wav"
    cmd = ["espeak-ng", "-v", voice, "-s", str(rng.randint(110, 210)), "-p", str(rng.randint(15, 85)),
           "-a", str(rng.randint(70, 180)), "-g", str(rng.randint(0, 6)), "-w", str(wav), text]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    audio, rate = sf.read(wav, dtype="float32")
    return audio, rate


def degrade(audio: np.ndarray, rate: int, rng: random.Random) -> tuple[np.ndarray, int]:
    """Recording conditions: padding, gain, telephone band (8 kHz), noise; so real phone speech is in range."""
    pad = lambda s: np.zeros(int(rng.uniform(0.0, s) * rate), np.float32)  # noqa: E731
    audio = np.concatenate([pad(0.4), audio, pad(0.6)])
    if rng.random() < 0.6:  # telephone quality, like the 8 kHz evaluation recordings
        audio, rate = resample(audio, rate, 8000), 8000
    else:
        audio, rate = resample(audio, rate, 16000), 16000
    peak = float(np.abs(audio).max()) or 1.0
    audio = audio / peak * rng.uniform(0.1, 0.9)
    if rng.random() < 0.7:
        snr_db = rng.uniform(10, 40)
        noise = np.random.default_rng(rng.getrandbits(32)).standard_normal(audio.size).astype(np.float32)
        if rng.random() < 0.5:  # brown-ish noise (hum, room)
            noise = np.cumsum(noise)
            noise -= noise.mean()
        signal_power = float(np.mean(audio**2)) + 1e-12
        noise *= np.sqrt(signal_power / (10 ** (snr_db / 10)) / (float(np.mean(noise**2)) + 1e-12))
        audio = audio + noise
    return np.clip(audio, -1, 1).astype(np.float32), rate


def build_audio(out: Path, cfg: BuildConfig) -> dict[str, int]:
    rng = random.Random(cfg.seed)
    per_word = {"train": cfg.audio_train_per_word, "val": cfg.audio_val_per_word, "test": cfg.audio_test_per_word}
    counts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for split, n in per_word.items():
            rows = []
            jobs = [(w, k) for w in VOCABULARY for k in range(n)]
            for word, k in progress(jobs, desc=f"audio {split}", leave=False):
                voice = f"{rng.choice(ESPEAK_VOICES)}+{rng.choice(VARIANTS[split])}"
                rel = f"{split}/{word}-{k:03d}.wav"
                audio, rate = degrade(*_speak(word, voice, rng, Path(tmp)), rng)
                (out / "audio" / rel).parent.mkdir(parents=True, exist_ok=True)
                sf.write(out / "audio" / rel, audio, rate, subtype="PCM_16")
                rows.append({"id": f"espeak-{split}-{word}-{k}", "modality": "audio", "path": rel, "label": word,
                             "caption": caption("audio", word, rng), "split": split, "voice": voice})  # fmt: skip
            _write_manifest(out / "audio" / f"{split}.jsonl", rows)
            counts[split] = len(rows)
    # Real recorded speech: evaluation only, never trained on.
    rows = []
    for d, word in enumerate(DIGITS):
        rows.append({"id": f"asterisk-digit-{d}", "modality": "audio", "path": str(asterisk_wav(f"digits/{d}")),
                     "label": word, "caption": f"A voice saying the word {word}.", "split": "real"})  # fmt: skip
    for word in ("hello", "goodbye"):
        try:
            rows.append({"id": f"asterisk-{word}", "modality": "audio", "path": str(asterisk_wav(word)),
                         "label": word, "caption": f"A voice saying the word {word}.", "split": "real"})  # fmt: skip
        except FileNotFoundError:
            pass
    _write_manifest(out / "audio" / "real.jsonl", rows)
    counts["real"] = len(rows)
    return counts


def build_imu(out: Path, cfg: BuildConfig) -> dict[str, int]:
    rng = random.Random(cfg.seed)
    train_x, train_y = basic_motions("TRAIN")
    test_x, test_y = basic_motions("TEST")
    order = list(range(len(train_y)))
    rng.shuffle(order)
    val = sorted(order[:8])  # 2 per class on average; the official TEST split is the final table
    splits = {"train": [i for i in range(len(train_y)) if i not in val], "val": val}
    counts = {}
    for split, idx in {**splits, "test": list(range(len(test_y)))}.items():
        x, y = (test_x, test_y) if split == "test" else (train_x, train_y)
        rows = []
        for i in idx:
            label = y[i].lower()
            rel = f"windows/{'TEST' if split == 'test' else 'TRAIN'}-{i:02d}.npy"
            (out / "imu" / rel).parent.mkdir(parents=True, exist_ok=True)
            np.save(out / "imu" / rel, x[i])
            rows.append({"id": f"basicmotions-{rel[8:-4]}", "modality": "imu", "path": rel, "label": label,
                         "caption": caption("imu", label, rng), "split": split})  # fmt: skip
        _write_manifest(out / "imu" / f"{split}.jsonl", rows)
        counts[split] = len(rows)
    return counts


VIDEO_FRAME_MS = 250  # each frame of a built clip (frames_to_gif's default)


def clip_sampled_items(frames: Sequence[int], k: int) -> list[int]:
    """Which item each of the ``k`` frames the video decoder samples from a built clip shows, the clip holding
    item i for ``frames[i]`` frames of equal duration.

    A GIF writer merges identical consecutive frames, so a clip is one GIF frame per item, each lasting its
    frames; the decoder samples by time (``encoders.video``), and a clip of one item is a still image: one frame.
    """
    if len(frames) == 1:
        return [0]
    ends = list(itertools.accumulate(frames))
    return [min(len(frames) - 1, bisect.bisect_right(ends, (j + 0.5) * ends[-1] / k)) for j in range(k)]


def _mixed_clip(pool: list[dict], rng: random.Random, n_items: int, k: int = 8) -> tuple[list[dict], list[int]]:
    """``n_items`` items (neighbours of different classes; a three-item clip may show one class twice, first and
    last) and their lengths in frames, each item seen by at least one of ``k`` sampled frames."""
    while True:
        items, repeat = [rng.choice(pool)], n_items == 3 and rng.random() < 0.25  # a b a: a quarter of them
        while len(items) < n_items:
            nxt = rng.choice(pool)
            third_repeats = len(items) == 2 and nxt["label"] == items[0]["label"]
            if nxt["label"] != items[-1]["label"] and third_repeats == (repeat and len(items) == 2):
                items.append(nxt)
        frames = [rng.randint(2, 12)] if n_items == 1 else [rng.randint(1, 6) for _ in range(n_items)]
        if len(set(clip_sampled_items(frames, k))) == n_items:
            return items, frames


def _mixed_size(split: str, rng: random.Random) -> int:
    """Items in a mixed clip: for training one (a quarter), two (three tenths) or three; held out, two or three."""
    if split == "train":
        return 1 if rng.random() < 0.25 else rng.choice((2, 2, 3, 3, 3))
    return rng.choice((2, 3))


def build_video(out: Path, cfg: BuildConfig) -> dict[str, int]:
    """Clips of Fashion-MNIST items shown one after another: the caption names them in order.

    Each split starts with clips of two different items, 4 frames each (the same clips for a seed as before
    clips of other kinds were added), then the mixed clips: for training one, two or three items (a quarter,
    three tenths, the rest), neighbours of different classes, 1-6 frames each (2-12 for one item); held out, clips of
    one item and clips of two or three. Rows name their ``items`` (image ids) and each one's ``frames``.
    """
    rng, mrng = random.Random(cfg.seed + 1), random.Random(cfg.seed + 2)
    train_x, train_y = fashion_mnist("train")
    test_x, test_y = fashion_mnist("t10k")
    image_rows = {s: read_manifest(out / "image" / f"{s}.jsonl") for s in ("train", "val", "test")}
    mixed = {"train": (0, cfg.video_train_mixed), "val": (cfg.video_val_single, cfg.video_val_mixed),
             "test": (cfg.video_test_single, cfg.video_test_mixed)}  # fmt: skip
    counts = {}
    for split, n in (("train", cfg.video_train), ("val", cfg.video_val), ("test", cfg.video_test)):
        # Items come from the image split of the same role (val clips reuse held-out image val items).
        src = "test" if split == "test" else "train"
        pool = image_rows["val" if split == "val" else src]
        x = test_x if split == "test" else train_x
        clips = []  # (kind, items, frames of each, caption)
        for _ in range(n):
            a, b = rng.sample(pool, 2)
            while a["label"] == b["label"]:
                b = rng.choice(pool)
            clips.append(("pair", [a, b], [4, 4], caption("video", f"{a['label']}|{b['label']}", rng)))
        singles, n_mixed = mixed[split]
        sizes = [1] * singles + [_mixed_size(split, mrng) for _ in range(n_mixed)]
        for i, n_items in enumerate(sizes):
            items, frames = _mixed_clip(pool, mrng, n_items)
            label = "|".join(it["label"] for it in items)
            clips.append(("single" if i < singles else "mixed", items, frames, caption("video", label, mrng)))
        rows = []
        for k, (kind, items, frames, text) in enumerate(clips):
            pixels = [x[int(it["id"].rsplit("-", 1)[1])] for it, f in zip(items, frames, strict=True) for _ in range(f)]
            rel = f"{split}/{k:05d}.gif"
            (out / "video" / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / "video" / rel).write_bytes(frames_to_gif(pixels, VIDEO_FRAME_MS))
            rows.append({"id": f"clip-{split}-{k}", "modality": "video", "path": rel,
                         "label": "|".join(it["label"] for it in items), "caption": text, "split": split,
                         "kind": kind, "items": [it["id"] for it in items], "frames": frames})  # fmt: skip
        _write_manifest(out / "video" / f"{split}.jsonl", rows)
        counts[split] = len(rows)
    return counts


BUILDERS: dict[str, Callable[[Path, BuildConfig], dict[str, int]]] = {
    "image": build_image, "audio": build_audio, "imu": build_imu, "video": build_video,
}  # fmt: skip


def build(out: Path, modalities: Sequence[str] | None = None, cfg: BuildConfig | None = None):
    """Every registered modality's data (or ``modalities``'), each by its plugin's ``build_data``."""
    cfg = cfg or BuildConfig()
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for m in modalities or modality_names():
        if m == "video" and not (out / "image" / "train.jsonl").exists():
            counts["image"] = build_image(out, cfg)
        builder = get_modality(m).build_data
        if builder is None:
            raise InputError(f"modality {m!r} has no data builder (its plugin's build_data)")
        counts[m] = builder(out, cfg)
    (out / "build.json").write_text(json.dumps({"config": cfg.__dict__, "counts": counts}, indent=2) + "\n")
    return counts
