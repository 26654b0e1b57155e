"""Every input format the README lists beside PNG/WAV is accepted and read as its lossless original (issue 21):
BMP, GIF and animated GIF/WebP images (the first frame), GIF/WebP/WebM videos, FLAC and OGG (Vorbis, Opus) audio.
Each is made here from the packaged samples (Pillow, PyAV, soundfile, as the decoders in modalink.encoders read
them), then embedded in process (``Embedder.embed``) and through the gateway (``Embed``, real encoder services of
``hostile_stack``), and compared with the embeddings of the original.

Tolerances: lossless formats give the original's embeddings exactly in process; lossy ones (WebM VP8, OGG Vorbis,
Opus) must stay within cosine similarity ``LOSSY_COSINE`` of them per token (measured: see the table below). The
gateway hands embeddings on rounded to fp16 (its media cache), so through it every format is compared with the
in-process original at fp16 precision (``GATEWAY_ATOL``), lossy ones again by cosine."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.slow

GATEWAY_ATOL = 5e-3  # fp16 rounding of embeddings under 8 in magnitude (half an ulp: 0.002), plus batching noise


# --- making the inputs ---------------------------------------------------------------------------------------------


def sneaker(samples) -> Image.Image:
    return Image.open(samples["image"]).copy()  # 28 x 28 grayscale, a Fashion-MNIST test image


def clip_frames(samples) -> list[Image.Image]:
    """The sample clip's 8 frames of 250 ms (shirt x 4, bag x 4), as its GIF shows them over time (the GIF encoder
    merged the repeated frames into two of 1 s)."""
    from modalink.data import VIDEO_FRAME_MS

    gif, frames = Image.open(samples["video"]), []
    for i in range(gif.n_frames):
        gif.seek(i)
        frames += [gif.convert("L")] * (gif.info["duration"] // VIDEO_FRAME_MS)
    assert len(frames) == 8, len(frames)
    return frames


def save(img: Image.Image | list[Image.Image], fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    if isinstance(img, list):
        img[0].save(buf, format=fmt, save_all=True, append_images=img[1:], duration=250, loop=0, **kw)
    else:
        img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def webm(frames: list[Image.Image], fps: int = 4) -> bytes:
    """VP8 in WebM (PyAV's libvpx), at a high quality: lossy, 4:2:0 chroma."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="webm") as out:
        stream = out.add_stream("libvpx", rate=fps, options={"crf": "4", "b:v": "4M", "qmin": "0", "qmax": "10"})
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_image(f.convert("RGB"))):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def audio_file(samples, fmt: str, subtype: str | None = None) -> bytes:
    import soundfile as sf

    pcm, rate = sf.read(samples["audio"], dtype="float32")
    buf = io.BytesIO()
    sf.write(buf, pcm, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def image_inputs(samples) -> dict[str, bytes]:
    other = Image.open(samples["video"]).convert("L")  # the second frame of the animated ones: the shirt
    return {
        "BMP": save(sneaker(samples), "BMP"),
        "GIF": save(sneaker(samples), "GIF"),
        "animated GIF": save([sneaker(samples), other], "GIF"),
        "animated WebP": save([sneaker(samples), other], "WEBP", lossless=True),
    }


def video_inputs(samples) -> dict[str, bytes]:
    frames = clip_frames(samples)
    return {
        "animated GIF": Path(samples["video"]).read_bytes(),
        "animated WebP": save(frames, "WEBP", lossless=True),
        "WebM": webm(frames),
    }


def audio_inputs(samples) -> dict[str, bytes]:
    return {
        "FLAC": audio_file(samples, "FLAC"),
        "OGG Vorbis": audio_file(samples, "OGG", "VORBIS"),
        "OGG Opus": audio_file(samples, "OGG", "OPUS"),
    }


LOSSY = {"WebM", "OGG Vorbis", "OGG Opus"}
# A lossy copy must be close to its original, and much closer than another input of the modality is (the distance
# of each to the original, L2 over all tokens): measured here, WebM 0.05x, Opus 0.14x, Vorbis 0.22x of that distance,
# per-token cosine >= 0.997 (a decoder that read noise, silence or other frames is at 1x or more).
LOSSY_RATIO, LOSSY_COSINE = 0.35, 0.99
INPUTS = {"image": image_inputs, "video": video_inputs, "audio": audio_inputs}
CASES = [("image", f) for f in ("BMP", "GIF", "animated GIF", "animated WebP")] + [
    ("video", f) for f in ("animated GIF", "animated WebP", "WebM")
] + [("audio", f) for f in ("FLAC", "OGG Vorbis", "OGG Opus")]  # fmt: skip


def original(modality: str, samples):
    """The lossless original: the PNG, the WAV, the clip as a list of PNG frames."""
    if modality == "video":
        return [save(f, "PNG") for f in clip_frames(samples)]
    return Path(samples[modality]).read_bytes()


def another(modality: str, samples):
    """A different input of the modality: the shirt, the spoken "one", a clip of the sneaker."""
    from modalink.datasets import asterisk_wav

    if modality == "image":
        return save(clip_frames(samples)[0], "PNG")
    if modality == "audio":
        return asterisk_wav("digits/1").read_bytes()
    return [save(sneaker(samples), "PNG")] * 8


@pytest.fixture(scope="module")
def embedder():
    from modalink.config import Settings
    from modalink.embedder import Embedder

    return Embedder(Settings(device="cpu"))  # the shipped adapters, as the stack's encoder services serve them


@pytest.fixture(scope="module")
def references(embedder, samples) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per modality, the in-process embeddings of the original and of another input."""
    return {m: (embedder.embed(m, [original(m, samples)])[0][0], embedder.embed(m, [another(m, samples)])[0][0])
            for m in INPUTS}  # fmt: skip


def assert_close_to_original(got: torch.Tensor, modality: str, fmt: str, references, exact_atol: float) -> None:
    want, other = references[modality]
    assert got.shape == want.shape, (got.shape, want.shape)
    if fmt not in LOSSY:
        torch.testing.assert_close(got, want, rtol=0, atol=exact_atol)
        return
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=-1).min().item()
    ratio = ((got - want).norm() / (other - want).norm()).item()
    assert cosine >= LOSSY_COSINE and ratio <= LOSSY_RATIO, (fmt, cosine, ratio)


@pytest.mark.parametrize("modality, fmt", CASES)
def test_a_format_is_read_as_its_original_in_process(embedder, samples, references, modality, fmt):
    raw = INPUTS[modality](samples)[fmt]
    (got,), _ = embedder.embed(modality, [raw])
    assert_close_to_original(got, modality, fmt, references, exact_atol=0)  # lossless: the very same embeddings


def part(modality: str, raw):
    from modalink.wire import common_pb2

    if modality == "image":
        return common_pb2.Part(image=common_pb2.Image(data=raw))
    if modality == "audio":
        return common_pb2.Part(audio=common_pb2.Audio(data=raw))
    if isinstance(raw, list):
        return common_pb2.Part(video=common_pb2.Video(frames=[common_pb2.Image(data=f) for f in raw]))
    return common_pb2.Part(video=common_pb2.Video(data=raw))


@pytest.fixture(scope="module")
def gateway(hostile_stack):
    import grpc

    from modalink.v1 import assistant_pb2_grpc

    with grpc.insecure_channel(hostile_stack["gateway"]) as ch:
        yield assistant_pb2_grpc.AssistantStub(ch)


def gateway_embed(gateway, modality: str, raw) -> torch.Tensor:
    from modalink.wire import assistant_pb2, from_tensor_msg

    res = gateway.Embed(assistant_pb2.EmbedRequest(part=part(modality, raw)), timeout=120)
    assert res.modality == modality
    return torch.from_numpy(np.array(from_tensor_msg(res.embeddings), dtype=np.float32))


@pytest.mark.parametrize("modality, fmt", CASES)
def test_a_format_is_read_as_its_original_through_the_gateway(gateway, samples, references, modality, fmt):
    raw = INPUTS[modality](samples)[fmt]
    assert_close_to_original(gateway_embed(gateway, modality, raw), modality, fmt, references, GATEWAY_ATOL)


@pytest.mark.parametrize("modality", INPUTS)
def test_the_gateway_reads_the_originals_as_in_process(gateway, samples, references, modality):
    """The baseline of the test above: the PNG, the WAV, the PNG frames."""
    got = gateway_embed(gateway, modality, original(modality, samples))
    torch.testing.assert_close(got, references[modality][0], rtol=0, atol=GATEWAY_ATOL)
