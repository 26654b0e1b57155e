"""Who may call the gateway, and how often: API keys kept only as hashes, and a token bucket per key.

Keys come from ``MODALINK_API_KEYS`` (plain, e.g. for local use; hashed as soon as they are read) and
``MODALINK_API_KEY_HASHES`` (``sha256:<hex>``, what the Helm chart's Secret stores, so the cluster never holds a
usable key). Clients send a key as gRPC metadata ``x-api-key`` or ``authorization: Bearer <key>``, or as the
same HTTP headers. ``modalink keys new`` makes a key and prints its hash.

Admin keys (``MODALINK_ADMIN_API_KEYS`` / ``MODALINK_ADMIN_API_KEY_HASHES``, ``modalink keys new --admin``) are
accepted for every call and are the only ones that may change what every caller is served: promoting or rolling
back an adapter. A gateway without admin keys lets nobody promote (open or not).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping

from modalink.errors import ConfigError

PREFIX = "sha256:"


def hash_key(key: str) -> str:
    """The at-rest form of a key. Keys are random 256-bit tokens, so a plain SHA-256 is enough (no password
    stretching needed: there is nothing to brute-force)."""
    return PREFIX + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "mlk_" + secrets.token_urlsafe(32)


def key_from_headers(headers: Mapping[str, str]) -> str | None:
    """The presented key: ``x-api-key``, else ``authorization: Bearer <key>`` (header names lower case)."""
    if key := headers.get("x-api-key"):
        return key
    auth = headers.get("authorization", "")
    return auth[7:].strip() or None if auth[:7].lower() == "bearer " else None


def _split(value: str) -> list[str]:
    return [x.strip() for x in value.split(",") if x.strip()]


class KeyRing:
    """Hashes of the accepted keys; ``identify`` compares in constant time and names a key by its hash prefix."""

    def __init__(self, keys: Iterable[str] = (), hashes: Iterable[str] = ()):
        self.hashes: list[str] = [hash_key(k) for k in keys]
        for h in hashes:
            hex_part = h.removeprefix(PREFIX)
            if len(hex_part) != 64 or any(c not in "0123456789abcdef" for c in hex_part):
                raise ConfigError(f"API key hash {h[:20]!r}...: expected sha256:<64 lower-case hex digits> "
                                  "(make one with `modalink keys new` or `modalink keys hash`)")  # fmt: skip
            self.hashes.append(PREFIX + hex_part)

    @classmethod
    def from_settings(cls, settings) -> KeyRing:
        """Every key the gateway accepts: the ordinary ones and the admin ones."""
        return cls([*_split(settings.api_keys), *_split(settings.admin_api_keys)],
                   [*_split(settings.api_key_hashes), *_split(settings.admin_api_key_hashes)])  # fmt: skip

    @classmethod
    def admins_from_settings(cls, settings) -> KeyRing:
        """The admin keys only (they may promote adapters)."""
        return cls(_split(settings.admin_api_keys), _split(settings.admin_api_key_hashes))

    def __bool__(self) -> bool:
        return bool(self.hashes)

    def identify(self, key: str | None) -> str | None:
        """A short id of the key (for rate limits and logs; never the key), or None if it is not accepted."""
        if not key:
            return None
        presented = hash_key(key)
        found = None
        for h in self.hashes:  # no early exit: the time taken does not depend on which key matched
            if hmac.compare_digest(presented, h):
                found = h
        return found[len(PREFIX) : len(PREFIX) + 12] if found else None


class RateLimiter:
    """A token bucket per caller: ``rate`` requests per second on average, bursts of up to ``burst``."""

    def __init__(self, rate: float, burst: int, max_callers: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.max_callers, self.clock = rate, max(1, burst), max_callers, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, time of last update)
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return self.rate > 0

    def acquire(self, caller: str) -> float:
        """0 if the request may go ahead (and is counted), else the seconds until it would be allowed."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        with self._lock:
            if len(self._buckets) >= self.max_callers and caller not in self._buckets:
                self._buckets.clear()  # bounded memory: callers that come back start with a full bucket
            tokens, last = self._buckets.get(caller, (float(self.burst), now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1:
                self._buckets[caller] = (tokens - 1, now)
                return 0.0
            self._buckets[caller] = (tokens, now)
            return (1 - tokens) / self.rate
