"""The assistant over the network: encoder services (Triton) + the LLM service (gRPC), as the gateway and the
worker call them. Same prompt assembly as the in-process ``Assistant``, so answers match it.

Each modality may have several encoder replicas: the pool picks them round robin per call (one gRPC
connection pins to one pod behind a Kubernetes Service, so balancing is done here) and retries the next
replica when one is unavailable. A request's media are encoded concurrently, one thread per item.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import torch

from modalink import MODALITIES, check_modality, embed_cache
from modalink.config import Settings, get_settings
from modalink.embedder import as_at_rest
from modalink.engine import GenerationParams, TokenEvent
from modalink.errors import (
    BackendCrashed,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ConfigError,
    InputError,
)
from modalink.metrics import ENCODER_CALLS
from modalink.modality import get as get_modality
from modalink.pipeline import Pipeline
from modalink.prompt import Media, Segment
from modalink.rpc import CHANNEL_OPTIONS, channel, upstream_error, upstream_timeout
from modalink.safety import SafetyFilter
from modalink.triton import INVALID_INPUT, model_name
from modalink.v1 import llm_pb2, llm_pb2_grpc
from modalink.wire import params_to_msg, segments_to_msg

log = logging.getLogger(__name__)
# gRPC's words for a call that never reached a replica (refused at connect): it can go to the next one freely
NOT_CONNECTED = "failed to connect"
# Triton's words (NOT_FOUND) for a model a replica has not loaded: a pod whose server is up and its model still
# loading, or whose load failed and is being retried. The request ran nowhere: the next replica is asked freely.
NOT_LOADED = "request for unknown model"


def parse_addresses(spec: str) -> dict[str, list[str]]:
    """``"image=h1:8001,image=h2:8001,audio=h3:8011"`` -> {"image": ["h1:8001", "h2:8001"], "audio": [...]}."""
    out: dict[str, list[str]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        modality, sep, addr = item.partition("=")
        if not sep or modality not in MODALITIES or not addr:
            raise ConfigError(f"encoder address {item!r}: expected <modality>=<host:port> with a modality in "
                              f"{', '.join(MODALITIES)}")  # fmt: skip
        out.setdefault(modality, []).append(addr)
    return out


def _triton_input(modality: str, raws: Sequence[Any]):
    """One Triton ``data`` input holding a batch of same-shaped items (see ``modalink.triton``)."""
    import tritonclient.grpc as tc

    if get_modality(modality).input == "tensor":
        arr = np.stack([np.asarray(raw, dtype=np.float32) for raw in raws])
        inp = tc.InferInput("data", list(arr.shape), "FP32")
    else:
        arr = np.array([[bytes(x) for x in (raw if isinstance(raw, list) else [raw])] for raw in raws], dtype=object)
        inp = tc.InferInput("data", list(arr.shape), "BYTES")
    inp.set_data_from_numpy(arr)
    return inp


def _shape_key(modality: str, raw: Any) -> tuple:
    """Items batch together when their ``data`` rows have one shape (IMU windows, video frame counts)."""
    if get_modality(modality).input == "tensor":
        return tuple(np.shape(raw))
    return (len(raw) if isinstance(raw, list) else 1,)


class EncoderPool:
    """tritonclient gRPC clients for every replica of every modality's encoder service."""

    def __init__(self, addresses: dict[str, list[str]], timeout_s: float | None = None, retries: int = 2,
                 max_batch: int = 32, settings: Settings | None = None):  # fmt: skip
        """``timeout_s``: the bound of a call made without one (default ``MODALINK_UPSTREAM_TIMEOUT_S``)."""
        import tritonclient.grpc as tc

        self.timeout_s = timeout_s if timeout_s is not None else upstream_timeout(settings)
        self.retries, self.max_batch = retries, max_batch
        # round_robin: an address that resolves to several pods (a headless Kubernetes Service, "dns:///name:8001")
        # spreads calls over all of them; tritonclient's own defaults are unlimited message sizes, kept here.
        args = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1),
                ("grpc.lb_policy_name", "round_robin"), *CHANNEL_OPTIONS[2:]]  # fmt: skip
        tls = {}
        if settings is not None and settings.tls_ca:  # mTLS: tritonclient takes the PEM files' paths
            tls = {"ssl": True, "root_certificates": str(settings.tls_ca),
                   "private_key": str(settings.tls_key) if settings.tls_key else None,
                   "certificate_chain": str(settings.tls_cert) if settings.tls_cert else None}  # fmt: skip
        self.replicas = {m: [(a, tc.InferenceServerClient(a, channel_args=args, **tls)) for a in addrs]
                         for m, addrs in addresses.items()}  # fmt: skip
        self._turn = {m: itertools.count() for m in addresses}
        self._down_until: dict[str, float] = {}  # address -> monotonic time before which it is skipped
        self._lock = threading.Lock()
        # the media embedding cache (issue 24): with settings (the gateway's, the workers'), as they configure it
        self.cache = embed_cache.EmbedCache.from_settings(settings) if settings is not None else None
        # embeddings passed on as the cache keeps them at rest (fp16-rounded by default), the cache on or off, so
        # that no answer depends on whether it is on, hit or missed
        self.at_rest = settings.embed_cache_dtype if settings is not None else "wire"

    def embed(self, modality: str, raw: Any, timeout_s: float | None = None,
              salt: str | None = None) -> tuple[torch.Tensor, str]:  # fmt: skip
        """(embeddings [n_tokens, d_llm], adapter version) of one item; a bad item raises ``InputError``."""
        (result,) = self.embed_batch(modality, [raw], timeout_s, salt)
        if isinstance(result, Exception):
            raise result
        return result

    def embed_batch(
        self, modality: str, raws: Sequence[Any], timeout_s: float | None = None, salt: str | None = None
    ) -> list[tuple[torch.Tensor, str] | InputError | BackendCrashed]:
        """Every item's (embeddings, adapter version), or the ``InputError`` that names what is wrong with it, or
        ``BackendCrashed`` for the items of a request that replicas died handling (each such item is an error of
        its own, as a bad one is: a job records it as that row's error instead of retrying the batch).

        Items go to the service as few requests as possible (one per shape group, ``max_batch`` items each),
        so the encoder runs them as one forward pass instead of N.

        With the embedding cache (``modalink.embed_cache``), items found under the registry's current adapter
        version (and ``salt``, default the request's ``embed_cache.SALT``) are not sent at all, repeated items of
        the batch are sent once, and what the encoder answers is stored under the version it answered with.
        """
        if self.cache is None or modality not in self.replicas:
            return self._rounded(self._embed_batch(modality, raws, timeout_s))
        cache = self.cache
        identity = cache.current(modality)
        if identity is None:  # no promoted version in the registry this process reads: nothing to key by
            return self._rounded(self._embed_batch(modality, raws, timeout_s))
        salt = (embed_cache.SALT.get() if salt is None else salt) if cache.config.salt else ""
        digests = [embed_cache.input_digest(modality, raw) for raw in raws]
        hits = cache.get_many([cache.key(identity, d, salt) for d in digests])
        version = json.loads(identity)["version"]
        out: list = [(embed_cache.as_wire(h[0]), version) if h is not None else None for h in hits]
        first: dict[bytes, int] = {}  # digest -> index of its first missing item: a repeat is sent once
        for i, d in enumerate(digests):
            if out[i] is None:
                first.setdefault(d, i)
        if not first:
            return out
        todo = list(first.values())
        t0 = time.perf_counter()
        results = self._embed_batch(modality, [raws[i] for i in todo], timeout_s)
        per_item = (time.perf_counter() - t0) / len(todo)
        fresh, store = {}, []
        for i, r in zip(todo, results, strict=True):
            if isinstance(r, tuple):
                emb, answered = r
                arr = cache.at_rest(emb)
                r = (embed_cache.as_wire(arr), answered)  # a miss answers what a hit will
                if (ident := cache.identity(modality, answered)) is not None:
                    store.append((cache.key(ident, digests[i], salt), arr, per_item))
            fresh[digests[i]] = r
        cache.put_many(store)
        for i, d in enumerate(digests):
            if out[i] is None:
                r = fresh[d]
                out[i] = (r[0].clone(), r[1]) if isinstance(r, tuple) and i != first[d] else r
        return out

    def _rounded(self, results: list) -> list:
        """Embeddings rounded as they would be at rest in the cache (``MODALINK_EMBED_CACHE_DTYPE``): a modalink
        encoder service already sends them so, another Triton model of the contract may not."""
        return [(as_at_rest(r[0], self.at_rest), r[1]) if isinstance(r, tuple) else r for r in results]

    def _embed_batch(
        self, modality: str, raws: Sequence[Any], timeout_s: float | None = None
    ) -> list[tuple[torch.Tensor, str] | InputError | BackendCrashed]:
        """``embed_batch`` without the cache."""
        if modality not in self.replicas:
            known = ", ".join(self.replicas) or "none"
            raise InputError(f"no encoder service for modality {modality!r} is configured (have: {known})")
        groups: dict[tuple, list[int]] = {}
        for i, raw in enumerate(raws):
            groups.setdefault(_shape_key(modality, raw), []).append(i)
        out: list = [None] * len(raws)
        for idx in groups.values():
            for s in range(0, len(idx), self.max_batch):
                chunk = idx[s : s + self.max_batch]
                try:
                    results = self._infer(modality, [raws[i] for i in chunk], timeout_s)
                except InputError as e:
                    if len(chunk) == 1:
                        results = [e]
                    else:  # every item of the request was bad: ask one by one for each one's own message
                        results = [self._embed_batch(modality, [raws[i]], timeout_s)[0] for i in chunk]
                except BackendCrashed as e:
                    results = [e] * len(chunk)
                for i, r in zip(chunk, results, strict=True):
                    out[i] = r
        return out

    def _order(self, modality: str) -> list[tuple[str, Any]]:
        """Replicas to try, round robin; those that recently failed go last (a killed pod costs no request a
        timeout or a backoff while the others are up)."""
        replicas = self.replicas[modality]
        with self._lock:
            start = next(self._turn[modality])
        ring = [replicas[(start + i) % len(replicas)] for i in range(len(replicas))]
        now = time.monotonic()
        return sorted(ring, key=lambda r: self._down_until.get(r[0], 0.0) > now)

    def _infer(
        self, modality: str, raws: list[Any], timeout_s: float | None
    ) -> list[tuple[torch.Tensor, str] | InputError]:
        """One request to the next replica. Encoding is idempotent, so a replica that is unavailable (or has not
        loaded the model) is marked down for a few seconds and the next one is asked; after a full round,
        ``retries`` more attempts with a short backoff. A replica that went away with the request in flight (it was
        sent, not refused at connect) may have been killed by the request itself: such a request is retried once,
        and if that replica goes away too (or none is left to retry on) it fails with ``BackendCrashed`` instead of
        taking down every replica in turn."""
        from tritonclient.utils import InferenceServerException

        order = self._order(modality)
        timeout = self.timeout_s if timeout_s is None else max(timeout_s, 0.001)
        crashes = 0
        for attempt in range(len(order) + self.retries):
            if attempt >= len(order):
                time.sleep(0.1 * 2 ** (attempt - len(order) + 1))
            address, client = order[attempt % len(order)]
            try:
                with ENCODER_CALLS.labels(modality).time():
                    res = client.infer(model_name(modality), [_triton_input(modality, raws)],
                                       client_timeout=timeout)  # fmt: skip
            except InferenceServerException as e:
                msg, status = (e.message() if callable(getattr(e, "message", None)) else str(e)) or "", str(e.status())
                if INVALID_INPUT in msg:
                    raise InputError(msg.split(INVALID_INPUT, 1)[1].split("\n")[0].strip()) from None
                if "DEADLINE_EXCEEDED" in status:  # the call's deadline is spent: another replica cannot help
                    raise BackendTimeout(f"the {modality} encoder service did not answer before the deadline") from None
                not_loaded = "NOT_FOUND" in status and NOT_LOADED in msg.lower()
                if "UNAVAILABLE" not in status and not not_loaded:
                    log.error("%s encoder at %s failed: %s %s", modality, address, status, msg)
                    raise BackendError(f"the {modality} encoder service failed; its log has the details") from None
                with self._lock:
                    self._down_until[address] = time.monotonic() + 5.0
                ran_nowhere = not_loaded or NOT_CONNECTED in msg.lower()  # no model there, or refused at connect
                if not ran_nowhere:  # it was sent: the replica went away while handling it
                    crashes += 1
                    log.error("%s encoder at %s went away with a request of %d item(s) in flight (%s)", modality,
                              address, len(raws), msg)  # fmt: skip
                    if crashes > 1:
                        raise BackendCrashed(f"{modality} encoder replicas went away twice while handling this "
                                             "request; it is not retried again") from None  # fmt: skip
                    continue
                log.warning("%s encoder at %s is unavailable (%s); trying the next replica", modality, address, msg)
                continue
            if address in self._down_until:
                with self._lock:
                    self._down_until.pop(address, None)
            embs, tokens, versions, errors = (res.as_numpy(k) for k in ("embeddings", "tokens", "adapter_version",
                                                                         "error"))  # fmt: skip
            return [
                InputError(_text(err)) if err else (torch.from_numpy(emb[:n].copy()), _text(ver))
                for emb, n, ver, err in zip(embs, tokens[:, 0], versions[:, 0], errors[:, 0], strict=True)
            ]
        if crashes:  # and no replica was reachable for its one retry: retrying later (a job's batch) would kill again
            raise BackendCrashed(f"an {modality} encoder replica went away while handling this request, and no "
                                 "replica was reachable for its one retry")  # fmt: skip
        raise BackendUnavailable(f"every {modality} encoder replica is unavailable")


def _text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


class RemoteAssistant:
    """The turn pipeline (``modalink.pipeline``) across services: media on the encoder services (concurrently,
    ``media``), generation on the LLM service (``start``). The gateway and the captioning workers use it."""

    def __init__(self, encoders: EncoderPool, llm_address: str, tokenizer, system_prompt: str | None,
                 settings: Settings | None = None):  # fmt: skip
        settings = settings or get_settings()
        self.encoders, self.tokenizer = encoders, tokenizer
        self.address, self.channel = llm_address, channel(llm_address, settings)
        self.llm = llm_pb2_grpc.LLMStub(self.channel)
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="encode")
        self.pipeline = Pipeline(self, self, system_prompt, SafetyFilter.from_settings(settings),
                                 settings.max_text_bytes, settings.client_system_messages == "allow")  # fmt: skip

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> RemoteAssistant:
        """Encoder services from ``MODALINK_ENCODERS``, the LLM service at ``MODALINK_LLM_ADDRESS``."""
        from modalink.llm import load_tokenizer

        settings = settings or get_settings()
        pool = EncoderPool(parse_addresses(settings.encoders), settings=settings)
        return cls(pool, settings.llm_address, load_tokenizer(settings=settings), settings.system_prompt, settings)

    def media(self, inputs: Sequence[tuple[str, Any]], timeout_s: float | None = None):
        """Project every input on its encoder service, concurrently; (media in order, versions by modality)."""
        for modality, _ in inputs:
            check_modality(modality)
        salt = embed_cache.SALT.get()  # the request's (the encoding threads do not share its context)
        jobs = [self._pool.submit(self.encoders.embed, m, raw, timeout_s, salt) for m, raw in inputs]
        results = [j.result() for j in jobs]
        versions = {m: v for (m, _), (_, v) in zip(inputs, results, strict=True)}
        return [Media(m, e, v) for (m, _), (e, v) in zip(inputs, results, strict=True)], versions

    def start(self, prompt: list[Segment], params: GenerationParams, adapters: Sequence[str],
              timeout_s: float | None = None) -> LLMStream:  # fmt: skip
        """The ``pipeline.LLM`` interface: start the LLM service's call now (it runs in the background)."""
        request = llm_pb2.LLMRequest(segments=segments_to_msg(prompt), params=params_to_msg(params),
                                     adapters=list(adapters))  # fmt: skip
        return LLMStream(self.llm.Generate(request, timeout=timeout_s))


class LLMStream:
    """The LLM service's token stream as ``TokenEvent``s, its gRPC errors raised as modalink's
    (``rpc.upstream_error``): a caller gets a status it can act on and a message without addresses.
    ``prompt_tokens``: the service's count, from its last event. ``cancel()`` stops the generation."""

    def __init__(self, call):
        self.call, self.prompt_tokens = call, None

    def __iter__(self) -> Iterator[TokenEvent]:
        try:
            for tok in self.call:
                if tok.finish_reason and tok.HasField("usage"):
                    self.prompt_tokens = tok.usage.prompt_tokens
                yield TokenEvent(0, tok.id, tok.text, tok.finish_reason or None)
        except grpc.RpcError as e:
            raise upstream_error(e, "the LLM service") from None

    def cancel(self) -> None:
        self.call.cancel()
