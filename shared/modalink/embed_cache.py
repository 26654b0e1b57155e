"""Media embedding cache (issue 24): projected embeddings by content hash, so a later turn (or a captioning job's
repeated item) that sends the same media again is not encoded again.

``EncoderPool.embed_batch`` (``modalink.remote``) asks it first, so the gateway's gRPC and OpenAI APIs and the
captioning workers all use it. Two tiers:

- a byte-bounded LRU in each process (``MODALINK_EMBED_CACHE_MB``, 0 = off);
- a shared Redis tier (``MODALINK_REDIS_URL``, keys ``modalink:emb:<hex>``) bounded by a per-entry size cap and a
  TTL, so gateway replicas and workers share hits (``MODALINK_EMBED_CACHE_REDIS``). Redis unreachable is a miss,
  never an error: short socket timeouts, and after a failure the tier is skipped for a few seconds.

The key is a BLAKE2b-256 hash of: the modality; the raw input bytes (each video frame length-prefixed; an IMU
window as its float32 array, shape included, as the encoder reads it); the encoder's identity (the service's
encoder name, and the encoder and encoder weights the adapter was trained on: the encoder refuses an adapter on
other weights); the adapter version and the SHA-256 of its ``checksums.json`` (which covers its projector,
config and LoRA); the preprocessing settings that change the result (video frames and token kind, IMU
channels); and a salt (the caller's API key id when keys are configured, ``MODALINK_EMBED_CACHE_SALT``), so one
tenant cannot learn by timing that another sent the same bytes.

Lookups use the registry's ``CURRENT`` version (the gateway shares ``MODALINK_ADAPTERS_DIR`` with the encoders);
entries are stored under the version the encoder answered with. A promotion or rollback therefore changes the
key of every lookup: an entry made by another adapter version is never served.

Values are the embeddings in fp16 at rest (``MODALINK_EMBED_CACHE_DTYPE=float16``; ``wire`` keeps the encoder's
float32); every path that embeds rounds to it (``embedder.as_at_rest``: the encoder services, the in-process
assistant, ``modalink eval``, and the gateway's ``EncoderPool`` for what comes back), so answers depend neither on
hit or miss, nor on the cache being on, nor on in process vs through the services.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modalink.metrics import (
    EMBED_CACHE_BYTES,
    EMBED_CACHE_ERRORS,
    EMBED_CACHE_EVICTIONS,
    EMBED_CACHE_HITS,
    EMBED_CACHE_MISSES,
    EMBED_CACHE_SAVED,
)
from modalink.modality import get as get_modality

log = logging.getLogger(__name__)
KEY_PREFIX = "modalink:emb:"
_FORMAT = b"modalink-emb/1"
# The salt of the current request (the caller's key id); the gateway sets it around a request's pipeline call
# (``salted``), ``RemoteAssistant.media`` carries it into its encoding threads.
SALT: contextvars.ContextVar[str] = contextvars.ContextVar("modalink_embed_salt", default="")


@contextmanager
def salted(salt: str) -> Iterator[None]:
    token = SALT.set(salt)
    try:
        yield
    finally:
        SALT.reset(token)


@dataclass(frozen=True)
class CacheConfig:
    local_bytes: int = 256 << 20
    redis_url: str | None = None
    ttl_s: int = 3600
    max_entry_bytes: int = 1 << 20
    fp16: bool = True
    salt: bool = True

    @classmethod
    def from_settings(cls, settings) -> CacheConfig:
        return cls(
            local_bytes=settings.embed_cache_mb << 20,
            redis_url=settings.redis_url if settings.embed_cache_redis else None,
            ttl_s=settings.embed_cache_ttl_s,
            max_entry_bytes=settings.embed_cache_max_entry_kb << 10,
            fp16=settings.embed_cache_dtype == "float16",
            salt=settings.embed_cache_salt,
        )

    @property
    def enabled(self) -> bool:
        return self.local_bytes > 0 or self.redis_url is not None


def input_digest(modality: str, raw: Any) -> bytes:
    """The input as the encoder reads it: bytes (a video's frames each length-prefixed) or, for a tensor modality
    (IMU), the float32 array with its shape (``remote._triton_input`` sends exactly that)."""
    h = hashlib.blake2b(digest_size=32)
    if isinstance(raw, (np.ndarray, torch.Tensor)) or get_modality(modality).input == "tensor":
        arr = np.ascontiguousarray(np.asarray(raw, dtype=np.float32))
        h.update(b"f32" + struct.pack(f"<{arr.ndim + 1}q", arr.ndim, *arr.shape))
        h.update(arr.tobytes())
    else:
        items = raw if isinstance(raw, list) else [raw]
        h.update(struct.pack("<bq", isinstance(raw, list), len(items)))
        for item in items:
            b = bytes(item)
            h.update(struct.pack("<q", len(b)))
            h.update(b)
    return h.digest()


def _preprocessing(settings, modality: str) -> dict:
    """The settings of the encoder services that change a modality's embeddings for the same bytes (its plugin's
    ``preprocessing``)."""
    pre = get_modality(modality).preprocessing
    return pre(settings) if pre else {}


def _pack(arr: np.ndarray, encode_s: float) -> bytes:
    header = json.dumps({"dtype": arr.dtype.str, "shape": list(arr.shape), "s": encode_s}).encode()
    return struct.pack("<I", len(header)) + header + arr.tobytes()


def _unpack(blob: bytes) -> tuple[np.ndarray, float]:
    (n,) = struct.unpack_from("<I", blob)
    header = json.loads(blob[4 : 4 + n])
    arr = np.frombuffer(blob, dtype=np.dtype(header["dtype"]), offset=4 + n).reshape(header["shape"])
    return arr, float(header["s"])


class LRU:
    """Byte-bounded LRU of (array at rest, encode seconds) by key, thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: OrderedDict[str, tuple[np.ndarray, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> tuple[np.ndarray, float] | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: str, arr: np.ndarray, encode_s: float) -> None:
        size = arr.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old[0].nbytes
            self._items[key] = (arr, encode_s)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (gone, _) = self._items.popitem(last=False)
                self.bytes -= gone.nbytes
                EMBED_CACHE_EVICTIONS.labels("local").inc()
            EMBED_CACHE_BYTES.labels("local").set(self.bytes)

    def __len__(self) -> int:
        return len(self._items)


class RedisTier:
    """The shared tier. Every failure is a miss (or a dropped write), logged once per outage; after one, the tier
    is skipped for ``backoff_s`` so an unreachable Redis costs a request at most one short timeout."""

    def __init__(self, url: str, ttl_s: int, max_entry_bytes: int, timeout_s: float = 0.25, backoff_s: float = 5.0):
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                           retry_on_timeout=False, health_check_interval=0)  # fmt: skip
        self.ttl_s, self.max_entry_bytes, self.backoff_s = ttl_s, max_entry_bytes, backoff_s
        self._down_until = 0.0

    def _failed(self, e: Exception) -> None:
        if time.monotonic() >= self._down_until:
            log.warning("embedding cache: Redis unreachable (%s); its tier is a miss for %g s", e, self.backoff_s)
        self._down_until = time.monotonic() + self.backoff_s
        EMBED_CACHE_ERRORS.labels("redis").inc()

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys or time.monotonic() < self._down_until:
            return [None] * len(keys)
        try:
            return list(self.client.mget([KEY_PREFIX + k for k in keys]))
        except Exception as e:  # noqa: BLE001  (any Redis failure is a miss)
            self._failed(e)
            return [None] * len(keys)

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        items = [(k, v) for k, v in items if len(v) <= self.max_entry_bytes]
        if not items or time.monotonic() < self._down_until:
            return
        try:
            pipe = self.client.pipeline(transaction=False)
            for k, v in items:
                pipe.set(KEY_PREFIX + k, v, ex=self.ttl_s)
            pipe.execute()
        except Exception as e:  # noqa: BLE001
            self._failed(e)


class EmbedCache:
    """Both tiers and the key. ``current``/``key`` for lookups, ``get_many``/``put`` for values."""

    def __init__(self, config: CacheConfig, settings):
        from modalink.registry import AdapterRegistry

        self.config, self.settings = config, settings
        self.registry = AdapterRegistry(settings.adapters_dir)
        self.local = LRU(config.local_bytes) if config.local_bytes > 0 else None
        self.redis = RedisTier(config.redis_url, config.ttl_s, config.max_entry_bytes) if config.redis_url else None
        self._identities: dict[tuple[str, str], bytes | None] = {}

    @classmethod
    def from_settings(cls, settings) -> EmbedCache | None:
        config = CacheConfig.from_settings(settings)
        return cls(config, settings) if config.enabled else None

    def identity(self, modality: str, version: str | None) -> bytes | None:
        """What besides the bytes fixes an adapter version's embeddings; None when the registry does not hold that
        version (nothing is cached for it). Versions are immutable, so this is remembered."""
        if not version:
            return None
        memo = (modality, version)
        if memo not in self._identities:
            d = Path(self.registry.root) / modality / version
            try:
                sums = hashlib.sha256((d / "checksums.json").read_bytes()).hexdigest()
                meta = json.loads((d / "config.json").read_text())
            except (OSError, ValueError):
                return None  # not (yet) a complete version: not cached, not remembered
            ident = {"modality": modality, "version": version, "checksums": sums,
                     "trained_on": [meta.get("encoder"), meta.get("encoder_weights")],
                     "pre": _preprocessing(self.settings, modality)}  # fmt: skip
            self._identities[memo] = json.dumps(ident, sort_keys=True).encode()
        return self._identities[memo]

    def current(self, modality: str) -> bytes | None:
        """The identity of the registry's CURRENT version of ``modality`` (read on every lookup)."""
        try:
            return self.identity(modality, self.registry.current(modality))
        except OSError:
            return None

    @staticmethod
    def key(identity: bytes, digest: bytes, salt: str) -> str:
        h = hashlib.blake2b(digest_size=32)
        for part in (_FORMAT, identity, salt.encode(), digest):
            h.update(struct.pack("<q", len(part)))
            h.update(part)
        return h.hexdigest()

    def get_many(self, keys: Sequence[str]) -> list[tuple[np.ndarray, float] | None]:
        out: list[tuple[np.ndarray, float] | None] = [None] * len(keys)
        missing = []
        for i, k in enumerate(keys):
            if self.local is not None:
                out[i] = self.local.get(k)
                (EMBED_CACHE_HITS if out[i] is not None else EMBED_CACHE_MISSES).labels("local").inc()
            if out[i] is None:
                missing.append(i)
        if self.redis is not None and missing:
            for i, blob in zip(missing, self.redis.get_many([keys[i] for i in missing]), strict=True):
                if blob is None:
                    EMBED_CACHE_MISSES.labels("redis").inc()
                    continue
                try:
                    out[i] = _unpack(blob)
                except (ValueError, struct.error, KeyError):
                    EMBED_CACHE_ERRORS.labels("redis").inc()
                    continue
                EMBED_CACHE_HITS.labels("redis").inc()
                if self.local is not None:
                    self.local.put(keys[i], *out[i])
        for hit in out:
            if hit is not None:
                EMBED_CACHE_SAVED.inc(hit[1])
        return out

    def at_rest(self, emb: torch.Tensor) -> np.ndarray:
        arr = emb.detach().cpu().numpy()
        return arr.astype(np.float16) if self.config.fp16 and arr.dtype != np.float16 else arr

    def put_many(self, items: Sequence[tuple[str, np.ndarray, float]]) -> None:
        if self.local is not None:
            for k, arr, s in items:
                self.local.put(k, arr, s)
        if self.redis is not None:
            self.redis.put_many([(k, _pack(arr, s)) for k, arr, s in items])


def as_wire(arr: np.ndarray) -> torch.Tensor:
    """An entry's embeddings as the pipeline uses them (float32, a copy the caller may keep)."""
    return torch.from_numpy(arr.astype(np.float32))
