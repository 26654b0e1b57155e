"""Frozen encoders and their decoders, on real inputs and the real embedded models (no mocks)."""

from __future__ import annotations

import io
import math
import struct
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from modalink import MODALITIES
from modalink.config import Settings
from modalink.encoders import load_encoder
from modalink.encoders.audio import SAMPLE_RATE, decode_audio
from modalink.encoders.image import decode_image, to_tensor
from modalink.encoders.imu import IMUCNN, IMUConfig, IMUEncoder, decode_imu, save_imu_encoder
from modalink.encoders.video import clip_tokens, decode_video, frames_to_gif, sample_indices
from modalink.errors import InputError
from modalink.modality import BUILTIN

# ---------------------------------------------------------------------------------------------------------
# Fixtures and input builders
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> Settings:
    return Settings(adapters_dir=tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def image_encoder(settings):
    return load_encoder("image", settings)


@pytest.fixture(scope="module")
def audio_encoder(settings):
    return load_encoder("audio", settings)


@pytest.fixture(scope="module")
def imu_encoder(settings):
    return load_encoder("imu", settings)


@pytest.fixture(scope="module")
def video_encoder(settings, image_encoder):
    return load_encoder("video", settings, image=image_encoder)


def encode_image(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient_rgb(w: int = 40, h: int = 30) -> Image.Image:
    """An RGB image whose three channels all vary, so a channel mix-up would show."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), 255 - x * 255 // (w - 1)], axis=-1)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def checkerboard(size: int = 224, cell: int = 28) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size]
    on = ((x // cell + y // cell) % 2).astype(bool)
    arr = np.zeros((size, size, 3), np.uint8)
    arr[on] = (255, 255, 255)
    arr[~on] = (200, 0, 0)
    return Image.fromarray(arr, "RGB")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` RGB pixels but whose data is a few bytes (not decodable)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )


def gif_declaring(width: int, height: int) -> bytes:
    """A GIF whose screen and one frame declare ``width x height`` but hold a couple of bytes of data."""
    screen = b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00"
    frame = b"," + struct.pack("<HHHH", 0, 0, width, height) + b"\x00" + b"\x02\x02\x44\x01\x00"
    return screen + frame + b";"


def gray_frames(n: int = 12, size: int = 64) -> list[np.ndarray]:
    """``n`` solid frames with distinct gray levels 10, 30, 50, ... so a decoded frame tells its index."""
    return [np.full((size, size, 3), 10 + 20 * i, np.uint8) for i in range(n)]


def gray_level(img: Image.Image) -> float:
    return float(np.asarray(img.convert("RGB"), dtype=np.float32).mean())


def sine(freq: float, seconds: float, rate: int, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def audio_bytes(pcm: np.ndarray, rate: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, pcm, rate, format=fmt)
    return buf.getvalue()


def peak_hz(audio: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(audio))
    return float(np.fft.rfftfreq(audio.size, 1 / rate)[spectrum.argmax()])


def npy_bytes(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def mp4_bytes(frames: list[np.ndarray], path: Path) -> bytes:
    """An MP4 (MPEG-4 Part 2, yuv420p) of the frames, written with PyAV."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=12)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "2"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path.read_bytes()


# ---------------------------------------------------------------------------------------------------------
# Image
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, lossless", [("PNG", True), ("WEBP", True), ("JPEG", False)])
def test_decode_image_formats_to_rgb(fmt, lossless):
    src = gradient_rgb()
    kw = {"lossless": True} if fmt == "WEBP" else {"quality": 95} if fmt == "JPEG" else {}
    img = decode_image(encode_image(src, fmt, **kw))
    assert img.mode == "RGB"
    assert img.size == (40, 30)
    diff = np.abs(np.asarray(img, np.int16) - np.asarray(src, np.int16))
    if lossless:
        assert diff.max() == 0
    else:
        assert diff.mean() < 6


def test_decode_image_grayscale_becomes_three_equal_channels():
    gray = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (8, 1))
    img = decode_image(encode_image(Image.fromarray(gray, "L"), "PNG"))
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.shape == (8, 25, 3)
    for c in range(3):
        np.testing.assert_array_equal(arr[..., c], gray)


def test_decode_image_rgba_drops_alpha_keeps_color():
    arr = np.zeros((10, 12, 4), np.uint8)
    arr[..., :3] = (30, 140, 220)
    arr[..., 3] = 255
    arr[:5, :, 3] = 0  # a transparent top half keeps its stored color
    img = decode_image(encode_image(Image.fromarray(arr, "RGBA"), "PNG"))
    assert img.mode == "RGB" and img.size == (12, 10)
    np.testing.assert_array_equal(np.asarray(img), arr[..., :3])


def test_decode_image_palette_maps_to_palette_colors():
    pal = Image.new("P", (6, 4))
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (768 - 9))
    pal.putdata([0, 1, 2, 0, 1, 2] * 4)
    raw = encode_image(pal, "PNG")
    assert Image.open(io.BytesIO(raw)).mode == "P"
    img = decode_image(raw)
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 0, 0)
    assert img.getpixel((1, 0)) == (0, 255, 0)
    assert img.getpixel((2, 3)) == (0, 0, 255)


def test_decode_image_from_path_str_and_path(tmp_path):
    p = tmp_path / "g.png"
    gradient_rgb().save(p)
    a, b = decode_image(p), decode_image(str(p))
    assert a.size == b.size == (40, 30)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(gradient_rgb()))


def test_to_tensor_shape_normalization_and_center_crop():
    # 448x224: the short side is already 224, so no resampling; the crop keeps columns 112..335.
    arr = np.zeros((224, 448, 3), np.uint8)
    arr[:, 224:] = 255
    x = to_tensor(Image.fromarray(arr), 224, (127.0,) * 3, (128.0,) * 3)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, :, :112], torch.full((3, 224, 112), -127 / 128))
    torch.testing.assert_close(x[:, :, 112:], torch.full((3, 224, 112), 1.0))


def test_to_tensor_small_and_tall_images_give_224_square():
    for size in [(17, 9), (100, 700), (224, 224)]:
        x = to_tensor(gradient_rgb(*size), 224, (0.0,) * 3, (1.0,) * 3)
        assert x.shape == (3, 224, 224)
        assert 0.0 <= float(x.min()) and float(x.max()) <= 255.0


def test_decode_image_corrupt_bytes():
    with pytest.raises(InputError, match="not a decodable image"):
        decode_image(b"this is not an image at all" * 10)


def test_decode_image_truncated_png():
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    raw = encode_image(Image.fromarray(noise), "PNG")
    with pytest.raises(InputError, match="(?i)truncated|corrupt"):
        decode_image(raw[: len(raw) // 2])


def test_decode_image_empty_bytes_and_empty_file(tmp_path):
    with pytest.raises(InputError, match="empty"):
        decode_image(b"")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        decode_image(empty)


def test_decode_image_missing_file(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(InputError, match="not found") as e:
        decode_image(missing)
    assert "nope.png" in str(e.value)


def test_decode_image_unsupported_format_refused():
    with pytest.raises(InputError, match="unsupported image format PPM"):
        decode_image(encode_image(gradient_rgb(), "PPM"))


def test_decode_image_declared_size_over_limit_refused_before_decoding():
    # The pixel data is bogus: decoding would fail as "corrupt"; the size check must come first.
    with pytest.raises(InputError, match="8000x8000 exceed the limit of 40000000"):
        decode_image(png_declaring(8_000, 8_000), max_pixels=40_000_000)
    with pytest.raises(InputError, match="exceed the limit of 5000"):
        decode_image(png_declaring(100, 100), max_pixels=5_000)


def test_decode_image_real_image_over_lowered_limit():
    raw = encode_image(gradient_rgb(200, 150), "PNG")
    assert decode_image(raw, max_pixels=30_000).size == (200, 150)
    with pytest.raises(InputError, match="200x150"):
        decode_image(raw, max_pixels=29_999)


def test_decode_image_huge_declared_size_is_input_error():
    with pytest.raises(InputError):
        decode_image(png_declaring(30_000, 30_000))


@pytest.mark.slow
def test_image_encoder_shape_and_dtype(image_encoder):
    assert image_encoder.name == "efficientnet-lite0" and image_encoder.feature_dim == 1280
    x = image_encoder.decode(encode_image(checkerboard(), "PNG"))
    assert x.shape == (3, 224, 224)
    feats = image_encoder.encode([x])[0]
    assert feats.shape == (49, 1280) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and feats.abs().sum() > 0


@pytest.mark.slow
def test_image_encoder_features_distinguish_images(image_encoder):
    board = checkerboard()
    board_jpeg = encode_image(board, "JPEG", quality=85)
    blob = Image.fromarray(np.full((224, 224, 3), (20, 60, 230), np.uint8))
    a, a2, b = (image_encoder(x) for x in (encode_image(board, "PNG"), board_jpeg, blob))
    torch.testing.assert_close(image_encoder(board), a)  # deterministic, PIL input == its PNG
    assert not torch.allclose(a, b, atol=1e-2)
    assert (a - b).norm() / a.norm() > 0.2

    def cos(u, v):
        return float(torch.nn.functional.cosine_similarity(u.mean(0), v.mean(0), dim=0))

    # A re-encoded copy of the same picture is closer than a different picture.
    assert cos(a, a2) > 0.9
    assert cos(a, a2) > cos(a, b) + 0.05


@pytest.mark.slow
def test_image_encoder_batch_matches_single(image_encoder):
    xs = [image_encoder.decode(checkerboard()), image_encoder.decode(gradient_rgb())]
    batch = image_encoder.encode(xs)
    for x, f in zip(xs, batch, strict=True):
        torch.testing.assert_close(image_encoder.encode([x])[0], f, atol=1e-4, rtol=1e-4)


def test_the_encoder_folded_for_inference_computes_the_packages_efficientnet(image_encoder, settings):
    """The served encoder (BatchNorms and TF "same" pads folded into its convolutions, ReLU6 in place) gives
    the features of the package's own EfficientNet-Lite0 with the same weights, to float rounding."""
    from efficientnet_lite_pytorch import EfficientNet
    from safetensors.torch import load_file

    reference = EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(load_file(str(image_encoder._weights(settings.cache_dir))))
    reference.eval()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in image_encoder.model.modules())
    pixels = torch.stack([image_encoder.decode(checkerboard()), image_encoder.decode(gradient_rgb())])
    with torch.inference_mode():
        want = reference.extract_features(pixels).flatten(2).transpose(1, 2)
        got = image_encoder.forward(pixels)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------------------------


def test_decode_audio_wav_8k_is_resampled_to_16k():
    raw = audio_bytes(sine(440, 1.0, 8_000), 8_000, "WAV")
    audio = decode_audio(raw)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert audio.size == 16_000
    assert abs(peak_hz(audio) - 440) <= 2
    assert 0.4 < np.abs(audio[100:-100]).max() < 0.6


def test_decode_audio_stereo_flac_44k_to_mono_16k(tmp_path):
    left = sine(1000, 1.5, 44_100, amp=0.4)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)  # [samples, channels]
    raw = audio_bytes(stereo, 44_100, "FLAC")
    assert sf.info(io.BytesIO(raw)).channels == 2
    audio = decode_audio(raw)
    assert audio.ndim == 1
    assert abs(audio.size - 24_000) <= 3
    assert abs(peak_hz(audio) - 1000) <= 2
    # Mixed to mono: the mean of a 0.4 sine and silence peaks at 0.2.
    assert abs(np.abs(audio[200:-200]).max() - 0.2) < 0.02
    path = tmp_path / "clip.flac"
    path.write_bytes(raw)
    np.testing.assert_array_equal(decode_audio(path), audio)


def test_decode_audio_raw_pcm():
    pcm = sine(300, 0.5, SAMPLE_RATE)
    np.testing.assert_array_equal(decode_audio(pcm, sample_rate=SAMPLE_RATE), pcm)
    out = decode_audio(sine(300, 0.5, 48_000), sample_rate=48_000)
    assert out.size == 8_000 and abs(peak_hz(out) - 300) <= 3
    # [channels, samples] PCM is mixed to mono.
    stereo = np.stack([pcm, -pcm])
    np.testing.assert_allclose(decode_audio(stereo, sample_rate=SAMPLE_RATE), np.zeros_like(pcm), atol=1e-7)


@pytest.mark.parametrize("rate", [None, 0, -16_000])
def test_decode_audio_raw_pcm_needs_sample_rate(rate):
    with pytest.raises(InputError, match="sample_rate"):
        decode_audio(sine(300, 0.5, SAMPLE_RATE), sample_rate=rate)


def test_decode_audio_corrupt_and_empty():
    with pytest.raises(InputError, match="not a decodable audio file"):
        decode_audio(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk" * 4)
    with pytest.raises(InputError, match="empty"):
        decode_audio(b"")
    with pytest.raises(InputError, match="no samples"):
        decode_audio(np.zeros(0, np.float32), sample_rate=SAMPLE_RATE)


def test_decode_audio_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        decode_audio(tmp_path / "missing.wav")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_decode_audio_non_finite_pcm(bad):
    pcm = sine(300, 0.5, SAMPLE_RATE)
    pcm[1234] = bad
    with pytest.raises(InputError, match="NaN or Inf"):
        decode_audio(pcm, sample_rate=SAMPLE_RATE)


def test_decode_audio_too_long():
    pcm = sine(300, 2.0, 8_000)
    with pytest.raises(InputError, match=r"2\.0 s long; the limit is 1 s"):
        decode_audio(pcm, sample_rate=8_000, max_seconds=1.0)
    with pytest.raises(InputError, match="limit"):
        decode_audio(audio_bytes(pcm, 8_000, "WAV"), max_seconds=1.5)
    assert decode_audio(pcm, sample_rate=8_000, max_seconds=2.0).size == 32_000


def test_decode_audio_bad_pcm_shape():
    with pytest.raises(InputError, match="shape"):
        decode_audio(np.zeros((2, 2, 100), np.float32), sample_rate=SAMPLE_RATE)


@pytest.mark.slow
def test_whisper_encoder_2s_clip(audio_encoder):
    assert audio_encoder.feature_dim == 512
    raw = audio_bytes(sine(440, 2.0, 22_050, amp=0.3), 22_050, "WAV")
    feats = audio_encoder(raw)
    assert feats.shape == (100, 512) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()
    # Partial seconds are rounded up: 2.5 s -> 3 s -> 150 tokens.
    assert audio_encoder.encode([sine(440, 2.5, SAMPLE_RATE)])[0].shape == (150, 512)


@pytest.mark.slow
def test_whisper_encoder_chunks_long_clip(audio_encoder):
    rng = np.random.default_rng(0)
    audio = (0.05 * rng.standard_normal(31 * SAMPLE_RATE)).astype(np.float32)
    audio[30 * SAMPLE_RATE :] += sine(660, 1.0, SAMPLE_RATE, amp=0.3)
    feats = audio_encoder.encode([audio])[0]
    assert feats.shape == (1500 + 50, 512)
    assert torch.isfinite(feats).all()
    # The last 50 rows are the 1 s tail encoded as its own window.
    tail = audio_encoder.encode([audio[30 * SAMPLE_RATE :]])[0]
    torch.testing.assert_close(feats[1500:], tail, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_whisper_encoder_different_sounds_differ(audio_encoder):
    a = audio_encoder.encode([sine(300, 1.0, SAMPLE_RATE)])[0]
    b = audio_encoder.encode([(0.3 * np.random.default_rng(1).standard_normal(SAMPLE_RATE)).astype(np.float32)])[0]
    assert a.shape == b.shape == (50, 512)
    assert (a - b).norm() / a.norm() > 0.1


# ---------------------------------------------------------------------------------------------------------
# IMU
# ---------------------------------------------------------------------------------------------------------


def imu_window(t: int = 100, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((6, t))


def test_decode_imu_npy_bytes_and_path(tmp_path):
    arr = imu_window()
    x = decode_imu(npy_bytes(arr))
    assert x.shape == (6, 100) and x.dtype == torch.float32
    np.testing.assert_array_equal(x.numpy(), arr.astype(np.float32))
    p = tmp_path / "w.npy"
    np.save(p, arr)
    np.testing.assert_array_equal(decode_imu(p).numpy(), x.numpy())


def test_decode_imu_csv_time_major_is_transposed():
    arr = imu_window(50)
    buf = io.StringIO()
    np.savetxt(buf, arr.T, delimiter=",")  # [time, channels], as CSV files store it
    x = decode_imu(buf.getvalue().encode())
    assert x.shape == (6, 50)
    np.testing.assert_allclose(x.numpy(), arr.astype(np.float32))


def test_decode_imu_csv_path_and_non_numeric(tmp_path):
    arr = imu_window(20)
    p = tmp_path / "w.csv"
    np.savetxt(p, arr, delimiter=",")  # already [channels, time]
    np.testing.assert_allclose(decode_imu(p).numpy(), arr.astype(np.float32))
    with pytest.raises(InputError, match="numeric CSV"):
        decode_imu(b"ax,ay,az,gx,gy,gz\n" + b"1,2,3,4,5,6\n" * 20)


def test_decode_imu_corrupt_npy_path(tmp_path):
    p = tmp_path / "bad.npy"
    p.write_bytes(b"definitely not numpy")
    with pytest.raises(InputError, match="corrupt"):
        decode_imu(p)


def test_decode_imu_wrong_channel_count():
    with pytest.raises(InputError, match="6 channels") as e:
        decode_imu(np.zeros((5, 100), np.float32))
    assert "[5, 100]" in str(e.value)


def test_decode_imu_one_dimensional():
    with pytest.raises(InputError, match="2-D"):
        decode_imu(npy_bytes(np.zeros(600, np.float32)))


def test_decode_imu_nan_and_inf():
    for bad in (np.nan, -np.inf):
        arr = imu_window()
        arr[3, 40] = bad
        with pytest.raises(InputError, match="NaN or Inf"):
            decode_imu(arr)


def test_decode_imu_too_few_time_steps():
    with pytest.raises(InputError, match="time steps, got 10"):
        decode_imu(imu_window(10))
    assert decode_imu(imu_window(16)).shape == (6, 16)


class _Payload:
    """Unpickling this writes a marker file: proof that a loader executed pickle data."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "unpickled"))


def test_decode_imu_object_npy_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    obj = np.empty((6, 100), dtype=object)
    obj[:] = 0.0
    obj[0, 0] = _Payload(str(marker))
    raw = npy_bytes(obj, allow_pickle=True)
    with pytest.raises(InputError):
        decode_imu(raw)
    p = tmp_path / "evil.npy"
    p.write_bytes(raw)
    with pytest.raises(InputError):
        decode_imu(p)
    assert not marker.exists()
    # The payload is live: a pickle-enabled load would have run it.
    np.load(io.BytesIO(raw), allow_pickle=True)
    assert marker.read_text() == "unpickled"


def test_decode_imu_object_array_refused():
    with pytest.raises(InputError, match="numeric"):
        decode_imu(np.array([["a"] * 100] * 6, dtype=object))


def test_imu_encoder_untrained_shape(imu_encoder, settings):
    assert not (settings.adapters_dir / "encoders" / "imu-cnn" / "model.safetensors").exists()
    assert imu_encoder.trained is False
    assert imu_encoder.feature_dim == 256
    feats = imu_encoder(npy_bytes(imu_window()))
    assert feats.shape == (math.ceil(100 / 8), 256) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()
    torch.testing.assert_close(imu_encoder(imu_window()), feats)


def test_imu_encoder_mixed_lengths_batch(imu_encoder):
    a, b = decode_imu(imu_window(100)), decode_imu(imu_window(64, seed=1))
    fa, fb = imu_encoder.encode([a, b])
    assert fa.shape == (13, 256) and fb.shape == (8, 256)
    torch.testing.assert_close(fa, imu_encoder.encode([a])[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fa[:8], fb)


def test_imu_encoder_loads_trained_weights(tmp_path):
    torch.manual_seed(123)
    model = IMUCNN(IMUConfig(d_out=64, n_blocks=2)).eval()
    save_imu_encoder(model, tmp_path / "encoders" / "imu-cnn")
    enc = IMUEncoder(Settings(adapters_dir=tmp_path))
    assert enc.trained is True and enc.feature_dim == 64
    x = decode_imu(imu_window(40))
    with torch.no_grad():
        expected = model(x[None])[0]
    got = enc(x.numpy())
    assert got.shape == (10, 64)
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------------------------------------------------
# Video
# ---------------------------------------------------------------------------------------------------------

EXPECTED_8_OF_12 = [0, 2, 3, 5, 6, 8, 9, 11]


def test_sample_indices():
    assert sample_indices(12, 8) == EXPECTED_8_OF_12
    assert sample_indices(5, 8) == [0, 1, 2, 3, 4]
    assert sample_indices(100, 4) == [12, 37, 62, 87]
    assert sample_indices(8, 8) == list(range(8))


def assert_frames(frames, indices, tol=0.0):
    assert len(frames) == len(indices)
    for f, i in zip(frames, indices, strict=True):
        assert f.mode == "RGB"
        assert abs(gray_level(f) - (10 + 20 * i)) <= tol, (i, gray_level(f))


@pytest.fixture
def frame_dir(tmp_path) -> Path:
    d = tmp_path / "frames"
    d.mkdir()
    for i, f in enumerate(gray_frames()):
        Image.fromarray(f).save(d / f"frame_{i:03d}.png")
    (d / "notes.txt").write_text("not a frame")
    return d


def test_decode_video_frame_folder(frame_dir):
    assert_frames(decode_video(frame_dir, n_frames=8), EXPECTED_8_OF_12)
    assert_frames(decode_video(str(frame_dir), n_frames=20), list(range(12)))


def test_decode_video_list_of_frames(frame_dir):
    pil = [Image.fromarray(f) for f in gray_frames()]
    assert_frames(decode_video(pil, n_frames=4), [1, 4, 7, 10])
    paths = sorted(frame_dir.glob("*.png"))
    assert_frames(decode_video(paths, n_frames=8), EXPECTED_8_OF_12)
    assert_frames(decode_video([p.read_bytes() for p in paths], n_frames=3), [2, 6, 10])


def test_decode_video_animated_gif():
    gif = frames_to_gif(gray_frames())
    assert Image.open(io.BytesIO(gif)).n_frames == 12
    assert_frames(decode_video(gif, n_frames=8), EXPECTED_8_OF_12, tol=1.0)


def test_decode_video_mp4(tmp_path):
    raw = mp4_bytes(gray_frames(), tmp_path / "clip.mp4")
    with av.open(io.BytesIO(raw)) as c:
        assert c.streams.video[0].codec_context.name == "mpeg4"
    frames = decode_video(raw, n_frames=8)
    assert all(f.size == (64, 64) for f in frames)
    assert_frames(frames, EXPECTED_8_OF_12, tol=6.0)
    p = tmp_path / "clip.mp4"
    assert_frames(decode_video(p, n_frames=4), [1, 4, 7, 10], tol=6.0)


def test_decode_video_large_frames_are_shrunk():
    big = [np.full((600, 1000, 3), 10 + 20 * i, np.uint8) for i in range(3)]
    frames = decode_video(frames_to_gif(big), n_frames=8)
    assert len(frames) == 8  # an animated image is sampled in time: 3 equal-length frames fill 8 samples
    assert [np.asarray(f)[0, 0, 0] for f in frames] == [10, 10, 10, 30, 30, 50, 50, 50]
    assert all(min(f.size) == 448 and f.size[0] > f.size[1] for f in frames)


def test_decode_video_corrupt_bytes():
    with pytest.raises(InputError, match="not a decodable video"):
        decode_video(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)


def test_decode_video_empty_inputs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no frame images"):
        decode_video(empty)
    with pytest.raises(InputError, match="no frames"):
        decode_video([])
    with pytest.raises(InputError, match="empty"):
        decode_video(b"")
    with pytest.raises(InputError, match="not found"):
        decode_video(tmp_path / "missing.mp4")


def test_decode_video_frame_size_limit(tmp_path):
    gif = frames_to_gif(gray_frames(3))
    with pytest.raises(InputError, match="64x64 exceeds 4000 pixels"):
        decode_video(gif, max_pixels=4_000)
    mp4 = mp4_bytes(gray_frames(3), tmp_path / "c.mp4")
    with pytest.raises(InputError, match="64x64 exceeds 4000 pixels"):
        decode_video(mp4, max_pixels=4_000)
    with pytest.raises(InputError, match="64x64 exceed the limit of 4000"):
        decode_video([Image.fromarray(f) for f in gray_frames(3)], max_pixels=4_000)


def test_decode_video_huge_declared_gif_is_input_error():
    with pytest.raises(InputError):
        decode_video(gif_declaring(30_000, 30_000))


@pytest.mark.slow
def test_video_encoder_pooling_matches_image_encoder(video_encoder, image_encoder, frame_dir):
    assert video_encoder.image is image_encoder
    assert video_encoder.feature_dim == 1280 and video_encoder.n_frames == 8
    clip = video_encoder.decode(frame_dir)
    assert clip.shape == (8, 3, 224, 224)
    out = video_encoder.encode([clip])[0]
    assert out.dtype == torch.float32
    # The same frames through the image encoder one at a time.
    frames = decode_video(frame_dir, n_frames=8)
    per_frame = torch.stack([image_encoder(f) for f in frames])  # [T, 49, 1280]
    torch.testing.assert_close(out, clip_tokens(per_frame, video_encoder.tokens), atol=1e-4, rtol=1e-4)
    # 'frames': one token per frame, in time order; frames differ, so their tokens do too.
    tokens = clip_tokens(per_frame, "frames")
    assert tokens.shape == (8, 1280)
    torch.testing.assert_close(tokens, per_frame.mean(1))
    assert not torch.allclose(tokens[0], tokens[7], atol=1e-3)
    # 'st-pool': Video-ChatGPT's spatial + temporal pooling.
    st = clip_tokens(per_frame, "st-pool")
    assert st.shape == (49 + 8, 1280)
    torch.testing.assert_close(st[:49], per_frame.mean(0))
    torch.testing.assert_close(st[49:], per_frame.mean(1))


@pytest.mark.slow
def test_video_encoder_batch_of_clips_of_different_lengths(video_encoder):
    long_clip = video_encoder.decode(frames_to_gif(gray_frames()))
    short_clip = video_encoder.decode([Image.fromarray(f) for f in gray_frames(3)])
    assert long_clip.shape[0] == 8 and short_clip.shape[0] == 3
    a, b = video_encoder.encode([long_clip, short_clip])
    spatial = 49 if video_encoder.tokens == "st-pool" else 0
    assert a.shape == (spatial + 8, 1280) and b.shape == (spatial + 3, 1280)
    torch.testing.assert_close(b, video_encoder.encode([short_clip])[0], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# load_encoder
# ---------------------------------------------------------------------------------------------------------


def test_load_encoder_unknown_modality(settings):
    with pytest.raises(InputError, match="unknown modality 'smell'") as e:
        load_encoder("smell", settings)
    assert all(m in str(e.value) for m in MODALITIES)


def test_load_encoder_modalities(image_encoder, audio_encoder, imu_encoder, video_encoder):
    for modality, enc in zip(BUILTIN, (image_encoder, audio_encoder, imu_encoder, video_encoder), strict=True):
        assert enc.modality == modality
    assert video_encoder.name == f"efficientnet-lite0+{video_encoder.tokens}"


def test_decode_audio_int16_pcm_and_samples_by_channels_layout():
    t = np.arange(16_000) / 16_000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    as_int16 = (tone * 32767).astype(np.int16)
    out = decode_audio(as_int16, sample_rate=16_000)
    assert out.dtype == np.float32 and abs(np.abs(out).max() - 0.5) < 1e-3
    stereo_rows = np.stack([tone, np.zeros_like(tone)], axis=1)  # soundfile's [samples, channels]
    out = decode_audio(stereo_rows, sample_rate=16_000)
    assert out.shape == (16_000,) and abs(np.abs(out).max() - 0.25) < 1e-3


def test_gif_with_merged_duplicate_frames_is_sampled_by_duration():
    """GIF writers merge identical consecutive frames; a still item must still fill its share of the clip."""
    frames = [np.full((28, 28), 10, np.uint8)] * 6 + [np.full((28, 28), 200, np.uint8)] * 2
    out = decode_video(frames_to_gif(frames), n_frames=8)
    assert [int(np.asarray(f)[0, 0, 0]) for f in out] == [10] * 6 + [200] * 2
