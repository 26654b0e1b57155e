"""Optional safety filters, as AnyMAL describes them: the request's text, the answer's text and (a hook for) an
image classifier. Off by default (``MODALINK_SAFETY_*``); the in-process assistant and the gateway (gRPC and
HTTP) call the same ``SafetyFilter``.

A refusal is an answer, not an error: the text is ``MODALINK_SAFETY_REFUSAL`` with finish_reason
``content_filter`` (OpenAI's convention). Inputs are checked before any media is encoded or the LLM runs.

The blocklist holds regexes (one per line, ``#`` comments), matched case-insensitively as whole words (so
``bomb`` does not match "bombastic"); a space in a pattern matches any run of whitespace. Streamed output
is checked as it grows: text is held back only while its tail could still become a blocked phrase (a regex
partial match), so a client never receives the start of one. The cost is a little latency on those pieces
only, and only with the output filter on. A blocklist is a coarse filter (it knows no paraphrases, other
languages or spellings); a classifier plugs in through the media hook, or replaces the blocklist file.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, TypeVar

import regex
from prometheus_client import Counter

from modalink.errors import ConfigError

log = logging.getLogger(__name__)

CONTENT_FILTER = "content_filter"
REFUSALS = Counter("modalink_safety_refusals", "Answers replaced by the safety refusal, by stage.", ["stage"])

# Used when a filter is on and no MODALINK_SAFETY_BLOCKLIST is given: a few clearly harmful requests and
# payment card numbers (13-19 digits, optionally grouped by spaces or dashes).
DEFAULT_BLOCKLIST = r"""
how (do i|to|can i) (make|build) (a |an )?(bomb|pipe bomb|explosive device)s?
(make|build|assemble) (a |an )?(bomb|pipe bomb|explosive device)s?
(make|build|synthesize) (a |an )?(chemical|biological|nuclear) weapons?
(make|cook|synthesize) (meth|methamphetamine)
\d(?:[ -]?\d){12,18}
"""

MediaCheck = Callable[[str, Any], "str | None"]
_SPACE_OR_CLASS = regex.compile(r"\[(?:\\.|[^\]\\])*\]| +")


@dataclass(frozen=True)
class Refusal:
    stage: str  # input | media | output
    reason: str  # for the log; the client sees only the refusal text
    text: str


class Event(Protocol):
    """A token event: the engine's ``TokenEvent`` or the LLM service's ``Token``."""

    text: str
    finish_reason: Any


E = TypeVar("E", bound=Event)


def _compile(pattern: str, where: str) -> str:
    """The pattern with spaces as ``\\s+``, checked on its own so an error names its line."""
    pattern = _SPACE_OR_CLASS.sub(lambda m: m[0] if m[0].startswith("[") else r"\s+", pattern)
    try:
        compiled = regex.compile(f"(?:{pattern})", regex.IGNORECASE)
    except regex.error as e:
        raise ConfigError(f"{where}: bad pattern: {e}") from None
    if compiled.fullmatch(""):
        raise ConfigError(f"{where}: the pattern matches the empty string (it would block everything)")
    return pattern


def load_blocklist(text: str, source: str) -> list[str]:
    """The patterns of a blocklist file's text (blank lines and ``#`` comments skipped)."""
    lines = ((i, line.strip()) for i, line in enumerate(text.splitlines(), 1))
    return [_compile(line, f"{source}:{i}") for i, line in lines if line and not line.startswith("#")]


def load_media_check(spec: str) -> MediaCheck:
    """``module:function`` -> the callable; anything wrong is a ConfigError at startup, not at the first image."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ConfigError(f"MODALINK_SAFETY_MEDIA_CHECK={spec!r}: expected 'module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"MODALINK_SAFETY_MEDIA_CHECK={spec!r}: {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise ConfigError(f"MODALINK_SAFETY_MEDIA_CHECK={spec!r}: not callable")
    return fn


class SafetyFilter:
    """Checks a request before any work (``check_input``) and an answer as it streams (``filter_output``)."""

    def __init__(self, patterns: Sequence[str] = (), *, input: bool = False, output: bool = False,
                 media_check: MediaCheck | None = None, refusal: str = "I can't help with that request."):  # fmt: skip
        self.input, self.output, self.media_check, self.refusal = input, output, media_check, refusal
        self.patterns = list(patterns)
        joined = "|".join(f"(?:{p})" for p in self.patterns)
        self._re = regex.compile(rf"(?<!\w)(?:{joined})(?!\w)", regex.IGNORECASE) if self.patterns else None

    @classmethod
    def from_settings(cls, settings) -> SafetyFilter:
        """One filter per configuration, loaded once (blocklist file, hook import)."""
        return _build(settings.safety_input, settings.safety_output, settings.safety_blocklist,
                      settings.safety_media_check, settings.safety_refusal)  # fmt: skip

    def match(self, text: str) -> str | None:
        """The blocked phrase in ``text``, or None."""
        m = self._re.search(text) if self._re else None
        return m[0] if m else None

    def _pattern_of(self, phrase: str) -> str:
        """Which pattern blocked a phrase (for the log: the operator's pattern, not the user's words)."""
        return next((p for p in self.patterns if regex.fullmatch(p, phrase, regex.IGNORECASE)), "?")

    def _refuse(self, stage: str, reason: str) -> Refusal:
        REFUSALS.labels(stage).inc()
        log.warning("refused (%s): %s", stage, reason)
        return Refusal(stage, reason, self.refusal)

    def check_input(self, text: str, inputs: Sequence[tuple[str, Any]] = (), history: Iterable = ()) -> Refusal | None:
        """A refusal for a blocked request, else None. ``history``: earlier ``Message``s, which a stateless API's
        client writes itself, so they are checked too. File paths are read to bytes for the media hook."""
        if self.input and self._re:
            for t in [*(p for m in history for p in m.content if isinstance(p, str)), text]:
                if phrase := self.match(t):
                    return self._refuse("input", f"request matches blocklist pattern {self._pattern_of(phrase)}")
        if self.media_check:
            from modalink.encoders.base import read_bytes

            for modality, raw in inputs:
                data = read_bytes(raw, modality) if isinstance(raw, (str, Path)) else raw
                if reason := self.media_check(modality, data):
                    return self._refuse("media", f"{modality}: {reason}")
        return None

    def filter_output(self, events: Iterable[E]) -> Iterator[tuple[E, str, Any]]:
        """(event, text to send, finish_reason) for each token event: the same events, with text held back while
        it could start a blocked phrase; on a match, the refusal text with finish_reason ``content_filter``, and
        the generation is stopped (``cancel()`` of a gRPC stream, ``close()`` of a generator)."""
        if not (self.output and self._re):
            yield from ((ev, ev.text, ev.finish_reason) for ev in events)
            return
        text, sent, last = "", 0, None
        for ev in events:
            last, text = ev, text + ev.text
            final = bool(ev.finish_reason)
            hold = self._hold(text, sent, final)
            if hold is None:
                self._refuse("output", "answer matches the blocklist")
                stop = getattr(events, "cancel", None) or getattr(events, "close", None)
                if stop:
                    stop()
                yield ev, self.refusal, CONTENT_FILTER
                return
            yield ev, text[sent:hold], ev.finish_reason
            sent = hold
        if last is not None and sent < len(text):  # the stream ended without a final event: check what is left
            if self._hold(text, sent, True) is None:
                self._refuse("output", "answer matches the blocklist")
                yield last, self.refusal, CONTENT_FILTER
            else:
                yield last, text[sent:], last.finish_reason

    def _hold(self, text: str, sent: int, final: bool) -> int | None:
        """How far ``text`` may be sent (everything before the first place a blocked phrase could start), or None
        when it holds one. Text before ``sent`` could start none, so the search begins there (lookbehind sees
        it). A match that ends at the end of unfinished text is not confirmed yet ("bomb" may become
        "bombastic"), so it is held, not refused."""
        for m in self._re.finditer(text, sent, overlapped=True):
            if final or m.end() < len(text):
                return None
        if final:
            return len(text)
        m = self._re.search(text, sent, partial=True)
        return m.start() if m else len(text)


def final_text(pieces: Sequence[str], finish_reason: str | None) -> str:
    """A whole (non-streamed) answer from its pieces: only the refusal when the output filter stopped it."""
    return pieces[-1] if finish_reason == CONTENT_FILTER else "".join(pieces)


@lru_cache(maxsize=8)
def _build(input: bool, output: bool, blocklist: Path | None, media_check: str, refusal: str) -> SafetyFilter:
    patterns: list[str] = []
    if input or output:
        if blocklist is not None:
            try:
                source = Path(blocklist).read_text()
            except OSError as e:
                raise ConfigError(f"MODALINK_SAFETY_BLOCKLIST: cannot read {blocklist}: {e.strerror}") from None
            patterns = load_blocklist(source, str(blocklist))
        else:
            patterns = load_blocklist(DEFAULT_BLOCKLIST, "built-in blocklist")
    hook = load_media_check(media_check) if media_check else None
    return SafetyFilter(patterns, input=input, output=output, media_check=hook, refusal=refusal)
