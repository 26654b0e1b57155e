"""Dynamic batching in front of an engine: concurrent requests decode together, not one after another.

A scheduler thread takes the requests that are waiting, generates them as one batch with ``Engine.stream`` and
routes each token event to its request's queue. With an engine that takes joins (``Engine.joins``: continuous
batching), a lone request starts at once and requests that arrive while a batch decodes join it between two
decode steps, a burst together (once no request came for ``max_wait_ms``); finished and cancelled ones leave it.
With one that does not, the scheduler waits up to ``max_wait_ms`` after each arrival for more (at most ten times
that in all) and the batch runs to its end. Each request is checked alone before it joins a batch
(``Engine.check``), so a bad one fails by itself. A cancelled request stops receiving events; a batch whose
requests are all cancelled stops decoding. Every request's event stream ends, a cancelled one's too (whether it
was cancelled while queued or while decoding): the service thread that reads it is then free again, so clients
that walk away cannot tie up the service's threads one by one.
"""

from __future__ import annotations

import contextlib
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
    arrived: float = field(default_factory=time.monotonic)
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
        self.lock = threading.Lock()  # held while a batch runs; take it with ``between_batches``
        self._count = threading.Lock()
        self._changing = 0  # model changes waiting for the running batch to end: nothing joins it meanwhile
        self._pending: queue.Queue[Request] = queue.Queue()
        self._last_arrival = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dynamic-batcher", daemon=True)
        self._thread.start()

    def submit(self, prompt: list[Segment], params: GenerationParams, adapter: str | None = None) -> Request:
        """Queue one request (InputError here if it is bad); read its events with ``events(request)``."""
        req = Request(prompt, params, adapter, self.engine.check(prompt, params, adapter))
        self._last_arrival = req.arrived
        self._pending.put(req)
        return req

    @contextlib.contextmanager
    def between_batches(self) -> Iterator[None]:
        """Hold the model still (to load a LoRA): waits for the running batch to end, and no request joins that
        batch meanwhile, so a busy service cannot keep one batch running forever."""
        with self._count:
            self._changing += 1
        try:
            with self.lock:
                yield
        finally:
            with self._count:
                self._changing -= 1

    def events(self, req: Request, timeout: float | None = None) -> Iterator[TokenEvent]:
        """The request's token events until its last one (or its cancellation); an engine failure is re-raised
        here. ``timeout``: the longest wait for one event (``queue.Empty`` after it)."""
        while True:
            try:
                ev = req.events.get(timeout=1.0 if timeout is None else timeout)
            except queue.Empty:
                if timeout is None and not req.cancelled.is_set():
                    continue
                if timeout is None:  # cancelled, and its end has not come: nothing more will
                    return
                raise
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
        if self.engine.joins:  # whoever is waiting now; later arrivals join between decode steps
            return _live([first, *self._waiting(self.max_batch - 1)])
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
        return _live(batch)

    def _waiting(self, room: int) -> list[Request]:
        """Requests already queued, at most ``room``, without waiting."""
        out = []
        while len(out) < room:
            try:
                out.append(self._pending.get_nowait())
            except queue.Empty:
                break
        return out

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
        open_ = set(range(len(batch)))
        try:
            join = {"join": _Join(self, batch, open_)} if self.engine.joins else {}
            events = self.engine.stream([r.prompt for r in batch], [r.params for r in batch],
                                        [r.adapter for r in batch], **join)  # fmt: skip
            for ev in events:
                req = batch[ev.index]
                if req.cancelled.is_set():
                    if ev.index in open_:
                        open_.discard(ev.index)
                        req.events.put(_END)  # its reader stops waiting
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
        finally:
            st.sizes[len(batch)] = st.sizes.get(len(batch), 0) + 1  # joined requests included
        for i in open_:  # cancelled ones, and any the engine ended without a finish event
            batch[i].events.put(_END)


def _live(requests: list[Request]) -> list[Request]:
    """The requests not cancelled; a cancelled one's event stream ends here (nothing will be generated for it)."""
    live = []
    for r in requests:
        if r.cancelled.is_set():
            r.events.put(_END)
        else:
            live.append(r)
    return live


class _Join:
    """The running batch's view of the queue (``Engine.Join``): waiting requests join it while there is room and
    no model change waits."""

    def __init__(self, batcher: DynamicBatcher, batch: list[Request], open_: set[int]):
        self.batcher, self.batch, self.open = batcher, batch, open_

    def more(self, running: int):
        b = self.batcher
        if b._changing or b._stop.is_set() or b._pending.empty():
            return []
        if running and self._settling():
            return []
        new = _live(b._waiting(b.max_batch - running))
        self.open.update(range(len(self.batch), len(self.batch) + len(new)))
        self.batch.extend(new)
        b.stats.requests += len(new)
        return [(r.prompt, r.params, r.adapter) for r in new]

    def _settling(self) -> bool:
        """Whether a burst is still arriving: joining costs one prefill forward whatever the number of joiners, so
        a burst joins a running batch together, once no request came for ``max_wait`` (or the oldest has waited
        ten times that). An idle service starts a request at once; this only paces joins."""
        b, now = self.batcher, time.monotonic()
        try:
            oldest = b._pending.queue[0].arrived
        except IndexError:
            return False
        return now - b._last_arrival < b.max_wait and now - oldest < 10 * b.max_wait

    def cancelled(self, index: int) -> bool:
        """Asked by the engine at each step: a cancelled row leaves the batch, and its event stream ends now (not
        when the batch, which others may keep joining, ends)."""
        req = self.batch[index]
        if not req.cancelled.is_set():
            return False
        if index in self.open:
            self.open.discard(index)
            req.events.put(_END)
        return True
