"""Dynamic batching in front of an engine: concurrent requests decode together, not one after another.

A scheduler thread takes the requests that arrived while the previous batch ran (waiting up to
``max_wait_ms`` after each arrival for more, at most ten times that in all), generates them as one batch
with ``Engine.stream`` and routes each token event to its request's queue. Each request is checked alone
before it joins a batch (``Engine.check``), so a bad one fails by itself. A cancelled request stops receiving events; a
batch whose requests are all cancelled stops decoding.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from modalink.engine import Engine, GenerationParams, TokenEvent
from modalink.prompt import Segment

log = logging.getLogger(__name__)

_END = object()


@dataclass
class Request:
    prompt: list[Segment]
    params: GenerationParams
    adapter: str | None
    prompt_tokens: int
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class BatchStats:
    """Counters for /metrics: how many batches ran and how many requests they held."""

    batches: int = 0
    requests: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # batch size -> count
    generated_tokens: int = 0


class DynamicBatcher:
    def __init__(self, engine: Engine, max_batch: int = 32, max_wait_ms: float = 10.0):
        self.engine, self.max_batch, self.max_wait = engine, max_batch, max_wait_ms / 1000
        self.stats = BatchStats()
        self.lock = threading.Lock()  # held while a batch runs; take it to change the model (load a LoRA)
        self._pending: queue.Queue[Request] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dynamic-batcher", daemon=True)
        self._thread.start()

    def submit(self, prompt: list[Segment], params: GenerationParams, adapter: str | None = None) -> Request:
        """Queue one request (InputError here if it is bad); read its events with ``events(request)``."""
        req = Request(prompt, params, adapter, self.engine.check(prompt, params, adapter))
        self._pending.put(req)
        return req

    def events(self, req: Request, timeout: float | None = None) -> Iterator[TokenEvent]:
        """The request's token events until its last one; an engine failure is re-raised here."""
        while True:
            ev = req.events.get(timeout=timeout)
            if ev is _END:
                return
            if isinstance(ev, BaseException):
                raise ev
            yield ev

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _take(self) -> list[Request]:
        try:
            first = self._pending.get(timeout=0.1)
        except queue.Empty:
            return []
        # Wait for company up to max_wait after the latest arrival, so a burst (a captioning batch's prompts)
        # joins one batch while a lone request waits only max_wait; never longer than 10 * max_wait in all.
        batch, cap = [first], time.monotonic() + 10 * self.max_wait
        while len(batch) < self.max_batch:
            wait = min(self.max_wait, cap - time.monotonic())
            if wait <= 0:
                break
            try:
                batch.append(self._pending.get(timeout=wait))
            except queue.Empty:
                break
        return [r for r in batch if not r.cancelled.is_set()]

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._take()
            if batch:
                with self.lock:
                    self._run(batch)

    def _run(self, batch: list[Request]) -> None:
        st = self.stats
        st.batches += 1
        st.requests += len(batch)
        st.sizes[len(batch)] = st.sizes.get(len(batch), 0) + 1
        open_ = set(range(len(batch)))
        try:
            events = self.engine.stream(
                [r.prompt for r in batch], [r.params for r in batch], [r.adapter for r in batch]
            )
            for ev in events:
                req = batch[ev.index]
                if req.cancelled.is_set():
                    open_.discard(ev.index)
                    if not open_:
                        break  # nobody listens: stop decoding
                    continue
                st.generated_tokens += 1
                req.events.put(ev)
                if ev.finish_reason:
                    req.events.put(_END)
                    open_.discard(ev.index)
        except Exception as e:  # noqa: BLE001  (every waiting request learns of it)
            log.exception("batch of %d failed", len(batch))
            for i in open_:
                batch[i].events.put(e)
            return
        for i in open_:  # cancelled ones, and any the engine ended without a finish event
            batch[i].events.put(_END)
