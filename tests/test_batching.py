"""Continuous batching (modalink.batching + TransformersEngine.stream(join=...)): a lone request starts at once;
requests that arrive while a batch decodes join it between decode steps, answer as they would alone, and leave it
when done or cancelled; a model change (loading a LoRA) waits for the batch to end and stops requests from joining
it meanwhile."""

from __future__ import annotations

import threading
import time

from modalink.batching import DynamicBatcher
from modalink.engine import GenerationParams
from modalink.prompt import Message, build_prompt

LONG = GenerationParams(max_new_tokens=48)
SHORT = GenerationParams(max_new_tokens=4)


def chat(engine, text: str) -> list:
    return build_prompt(engine.tokenizer, [Message("user", [text])])


def alone(engine, prompt: list, params: GenerationParams) -> list[int]:
    [out] = engine.generate([prompt], params)
    return out.token_ids


class Arrivals:
    """The queue a running batch sees: ``later`` joins at the ``at``-th step boundary; ``cancel`` (an index)
    is reported cancelled from then on."""

    def __init__(self, later: list[tuple[list, GenerationParams]], at: int, cancel: int | None = None):
        self.later, self.at, self.cancel, self.calls = later, at, cancel, 0
        self.running: list[int] = []

    def more(self, running: int):
        self.calls += 1
        self.running.append(running)
        if self.calls == self.at:
            return [(p, params, None) for p, params in self.later]
        return []

    def cancelled(self, index: int) -> bool:
        return self.cancel == index and self.calls >= self.at


def test_requests_join_a_running_batch_and_answer_as_alone(engine):
    first = chat(engine, "Write a short story about a dragon.")
    joiners = [(chat(engine, "Name a color."), SHORT), (chat(engine, "Count from one to five."), LONG)]
    arrivals = Arrivals(joiners, at=3)
    tokens: dict[int, list[int]] = {}
    for ev in engine.stream([first], LONG, join=arrivals):
        tokens.setdefault(ev.index, []).append(ev.token_id)
    assert sorted(tokens) == [0, 1, 2]  # the joiners' indices continue the batch's
    assert tokens[0] == alone(engine, first, LONG)
    for i, (prompt, params) in enumerate(joiners, start=1):
        assert tokens[i] == alone(engine, prompt, params), i
    # one row, then three while the short joiner decodes, then two once it has left
    assert arrivals.running[:3] == [1, 1, 1] and 3 in arrivals.running and arrivals.running[-1] <= 2


def test_a_cancelled_row_leaves_the_batch_and_the_others_go_on(engine):
    prompts = [chat(engine, "Write a short story about a dragon."), chat(engine, "Count from one to ten.")]
    arrivals = Arrivals([], at=2, cancel=0)
    tokens: dict[int, list[int]] = {0: [], 1: []}
    for ev in engine.stream(prompts, [LONG, GenerationParams(max_new_tokens=12)], join=arrivals):
        tokens[ev.index].append(ev.token_id)
    assert len(tokens[0]) == 3  # up to the step whose boundary saw the cancel, then no more
    assert tokens[1] == alone(engine, prompts[1], GenerationParams(max_new_tokens=12))


def test_a_lone_request_starts_at_once(engine):
    """No waiting for company when nothing runs: a batcher that waited would sit on it for a minute."""
    batcher = DynamicBatcher(engine, max_wait_ms=60_000)
    try:
        req = batcher.submit(chat(engine, "Name a color."), SHORT)
        assert [ev.token_id for ev in batcher.events(req, timeout=30)] == alone(engine, chat(engine, "Name a color."),
                                                                                SHORT)  # fmt: skip
    finally:
        batcher.close()


def test_a_later_request_joins_the_running_batch_and_finishes_first(engine):
    """The short request submitted while the long one decodes joins its batch and is done before it, instead of
    waiting for the long one to end."""
    batcher = DynamicBatcher(engine)
    try:
        long = batcher.submit(chat(engine, "Write a short story about a dragon."), LONG)
        events = batcher.events(long, timeout=60)
        next(events)  # the long one is decoding
        short = batcher.submit(chat(engine, "Name a color."), SHORT)
        short_tokens = [ev.token_id for ev in batcher.events(short, timeout=60)]
        assert long.events.qsize() < LONG.max_new_tokens - 1  # the long one is not done
        rest = [ev.token_id for ev in events]
        assert short_tokens == alone(engine, chat(engine, "Name a color."), SHORT)
        assert len(rest) == LONG.max_new_tokens - 1
        assert batcher.stats.batches == 1 and batcher.stats.requests == 2
    finally:
        batcher.close()


def test_a_model_change_waits_for_the_batch_and_nothing_joins_it_meanwhile(engine):
    batcher = DynamicBatcher(engine)
    order: list[str] = []
    try:
        long = batcher.submit(chat(engine, "Write a short story about a dragon."), LONG)
        events = batcher.events(long, timeout=60)
        next(events)
        changing = threading.Event()

        def change() -> None:
            with batcher.between_batches():
                order.append("model change")

        t = threading.Thread(target=change)
        t.start()
        while not batcher._changing:
            changing.wait(0.01)
        short = batcher.submit(chat(engine, "Name a color."), SHORT)
        for ev in events:
            if ev.finish_reason:
                order.append("long done")
        t.join(timeout=60)
        list(batcher.events(short, timeout=60))
        order.append("short done")
        assert order == ["long done", "model change", "short done"], order
        assert batcher.stats.batches == 2  # the short one ran in a batch of its own, after the change
    finally:
        batcher.close()


def test_a_cancelled_requests_event_stream_ends_queued_or_decoding(engine):
    """Whether a request is cancelled while it waits in the queue or while it decodes, its reader gets the end of
    its stream (a service thread reads each request's stream: one that never ended would hold that thread for
    good). ``timeout`` makes a stream that never ends fail here instead of waiting."""
    batcher = DynamicBatcher(engine)
    try:
        decoding = batcher.submit(chat(engine, "Write a short story about a dragon."), LONG)
        events = batcher.events(decoding, timeout=60)
        next(events)
        decoding.cancelled.set()  # the lone row of the running batch
        assert len(list(events)) < LONG.max_new_tokens - 1
        with batcher.between_batches():  # no batch runs meanwhile: what is submitted waits in the queue
            queued = [batcher.submit(chat(engine, f"Name {n} colors."), SHORT) for n in (2, 3)]
            queued[0].cancelled.set()
        assert list(batcher.events(queued[0], timeout=60)) == []
        assert list(batcher.events(queued[1], timeout=60))[-1].finish_reason  # the other one is answered
        rows = [batcher.submit(chat(engine, f"Write a short story about {n} dragons."), LONG) for n in (5, 6, 7)]
        middle = batcher.events(rows[1], timeout=60)
        next(middle)
        rows[1].cancelled.set()  # one row of a running batch: it leaves, its stream ends, the others go on
        assert len(list(middle)) < LONG.max_new_tokens - 1
        for r in (rows[0], rows[2]):
            assert list(batcher.events(r, timeout=60))[-1].finish_reason
    finally:
        batcher.close()


def test_clients_that_walk_away_do_not_tie_up_the_llm_services_threads(engine, settings):
    """A real gRPC LLM service with 4 worker threads: 8 clients cancel their calls, 4 of them while their requests
    wait in the batcher's queue; then a 9th request is answered in full (before the fix, the 4 threads waited for
    good on the cancelled requests' streams and the 9th never got one)."""
    import grpc
    from modalink_services.llm.server import SERVICE, LLMService

    from modalink.ports import free_port
    from modalink.registry import AdapterRegistry
    from modalink.rpc import make_server
    from modalink.v1 import llm_pb2, llm_pb2_grpc
    from modalink.wire import params_to_msg, segments_to_msg

    service = LLMService(engine, AdapterRegistry(settings.adapters_dir), "test")
    served = make_server(free_port(), [(llm_pb2_grpc.add_LLMServicer_to_server, service)], [SERVICE], "127.0.0.1",
                         workers=4)  # fmt: skip
    try:
        with grpc.insecure_channel(f"127.0.0.1:{served.port}") as ch:
            stub = llm_pb2_grpc.LLMStub(ch)

            def request(text: str, params: GenerationParams) -> llm_pb2.LLMRequest:
                return llm_pb2.LLMRequest(segments=segments_to_msg(chat(engine, text)), params=params_to_msg(params))

            with service.batcher.between_batches():  # nothing decodes: the requests wait in the batcher's queue
                calls = [stub.Generate(request(f"Write a story about {n} dragons.", LONG)) for n in range(8)]
                time.sleep(2)  # four threads have submitted theirs; the other four calls wait for a thread
                for call in calls:
                    call.cancel()
            tokens = list(stub.Generate(request("Name a color.", SHORT), timeout=120))
            assert tokens[-1].finish_reason and len(tokens) <= SHORT.max_new_tokens
    finally:
        served.server.stop(0)
        service.batcher.close()
