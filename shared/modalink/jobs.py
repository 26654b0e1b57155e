"""Offline captioning jobs: a manifest split per modality into batches, captioned through the services.

State lives in Redis: ``modalink:job:<id>`` (a hash: state, total, done, errors, results path, prompt) and
``modalink:job:<id>:results`` (item id -> result JSON, written with HSETNX), and ``modalink:caller:<id>:jobs``
(the ids of a caller's jobs, for the running-jobs quota). Writing a result only if its
id is new makes a re-delivered batch (a worker killed mid-batch, ``acks_late``) harmless: at-least-once
delivery, exactly-once results. The worker-side store steps retry while Redis restarts (it persists with an
append-only file). The Celery side is ``services/worker``.

A batch can also vanish: kombu's Redis transport pops a message, then notes it as unacknowledged, and a worker
killed between the two steps takes it along. So each job keeps its batches (``modalink:job:<id>:batches``) and
``modalink:jobs:running`` lists the running jobs: the sweeper (``queueing.sweep``) queues again the unfinished
batches of a job that has made no progress for a while and has no message left in the broker.

Files a job reads and writes (manifest, items, results) must lie inside ``MODALINK_MANIFEST_ROOTS`` (default:
the jobs dir), checked with symlinks resolved, so a gateway client cannot make the workers read ``/etc/passwd``.

A batch goes to its encoder service as one Triton request (one forward pass for all its items), then its
items' prompts go to the LLM service concurrently, where the dynamic batcher decodes them together.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from modalink_client import load_npy

from modalink import MODALITIES
from modalink.data import check_path, default_question
from modalink.embed_cache import input_digest
from modalink.engine import GenerationParams
from modalink.errors import InputError, NotFound, QuotaExceeded
from modalink.modality import get as get_modality
from modalink.pipeline import Turn
from modalink.prompt import Media

KEY = "modalink:job:{}"
CALLER_KEY = "modalink:caller:{}:jobs"
RUNNING_KEY = "modalink:jobs:running"  # the ids of running jobs, for the sweeper (``queueing.sweep``)
STATES = ("running", "done", "cancelled")
ANYWHERE = (Path("/"),)  # the roots of a trusted submitter (the CLI, which reaches the broker directly anyway)
log = logging.getLogger(__name__)


def manifest_roots(settings=None) -> list[Path]:
    """Where a job's manifest, items and results may be (``MODALINK_MANIFEST_ROOTS``, default: the jobs dir),
    resolved, so a gateway client cannot make the workers read or write any file they can reach."""
    from modalink.config import get_settings

    settings = settings or get_settings()
    named = [p.strip() for p in settings.manifest_roots.split(",") if p.strip()]
    return [Path(p).expanduser().resolve() for p in named or [settings.jobs_dir]]


REPEATS_PER_BATCH = 8


def batches(rows: Iterable[dict], size: int, repeats: bool = True) -> Iterator[tuple[str, list[dict]]]:
    """(modality, rows of it naming at most ``size`` distinct files); rows of an unknown modality come as their own
    batch ("unknown"). With ``repeats`` (a deterministic job: ``deterministic(params)``), rows naming the same
    file or URI are placed next to each other (a stable sort) and ride in one batch, where ``caption_batch``
    computes them once and holds one copy of their input: a job whose items repeat runs fewer, fuller batches. A
    batch holds at most ``REPEATS_PER_BATCH`` times ``size`` rows in all; without ``repeats``, ``size``."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.get("modality") if r.get("modality") in MODALITIES else "unknown", []).append(r)
    for modality, items in groups.items():
        items.sort(key=_file)
        batch: list[dict] = []
        names: set[str] = set()
        for r in items:
            name = (_file(r) if repeats else "") or f"id:{r.get('id')}"
            if name not in names and len(names) == size or len(batch) == REPEATS_PER_BATCH * size:
                yield modality, batch
                batch, names = [], set()
            names.add(name)
            batch.append(r)
        if batch:
            yield modality, batch


def deterministic(params: GenerationParams) -> bool:
    """Whether the same item always gets the same caption (greedy, or a fixed seed): repeats are then computed once."""
    return params.temperature == 0 or params.seed is not None


def _file(row: dict) -> str:
    """The file or URI a row names ("" for inline data)."""
    return str(row.get("path") or row.get("uri") or "")


# Store a result and count it in one atomic step (a Lua script), so a worker killed in between cannot leave a
# result stored but uncounted; HSETNX makes a second copy of the same item a no-op.
# It answers 0 (already there), 1 (new) or 2 (new, and the last item the job was waiting for).
RECORD = """
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return 0 end
local done = redis.call('HINCRBY', KEYS[1], 'done', 1)
if ARGV[3] == '1' then redis.call('HINCRBY', KEYS[1], 'errors', 1) end
if done >= tonumber(redis.call('HGET', KEYS[1], 'total')) then return 2 end
return 1
"""


def _retried(method: Callable) -> Callable:
    """Run a worker-side store step again while Redis is unreachable (restarting, or loading its append-only
    file), for up to the store's ``retry_s``: each such step is idempotent, so running it twice is harmless."""
    from redis.exceptions import ConnectionError as RedisConnectionError  # BusyLoadingError is one too
    from redis.exceptions import TimeoutError as RedisTimeoutError

    @functools.wraps(method)
    def wrapper(self: JobStore, *args, **kwargs):
        deadline, delay = time.monotonic() + self.retry_s, 0.1
        while True:
            try:
                return method(self, *args, **kwargs)
            except (RedisConnectionError, RedisTimeoutError) as e:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("job store unreachable (%s); %s again in %.1f s", e, method.__name__, delay)
                time.sleep(delay)
                delay = min(2 * delay, 2.0)

    return wrapper


class JobStore:
    """``retry_s``: how long the worker-side steps (``active``, ``done_ids``, ``record``,
    ``finish_if_complete``) retry while Redis is down; the gateway's calls fail at once (UNAVAILABLE)."""

    def __init__(self, redis, retry_s: float = 0.0, ttl_s: int = 0):
        """``ttl_s``: how long an ended job stays in Redis (0: kept)."""
        self.redis, self.retry_s, self.ttl_s = redis, retry_s, ttl_s
        self._record = redis.register_script(RECORD)

    def create(self, rows: list[dict], results_path: str, prompt: str = "", caller: str = "",
               max_running: int = 0) -> str:  # fmt: skip
        """A running job over ``rows``; ``results_path`` may contain ``{job_id}``. With a ``caller`` and
        ``max_running``, a caller who already has that many jobs running is refused (``QuotaExceeded``)."""
        job_id = uuid.uuid4().hex[:16]
        results_path = results_path.replace("{job_id}", job_id)
        counts: dict[str, int] = {}
        for r in rows:
            m = r.get("modality") if r.get("modality") in MODALITIES else "unknown"
            counts[m] = counts.get(m, 0) + 1
        self.redis.hset(KEY.format(job_id), mapping={"state": "running", "total": len(rows), "done": 0, "errors": 0,
                                                     "results": results_path, "created": time.time(), "prompt": prompt,
                                                     "items": json.dumps(counts)})  # fmt: skip
        if caller and max_running:
            self._admit(job_id, caller, max_running)
        self.redis.sadd(RUNNING_KEY, job_id)
        return job_id

    def keep_batches(self, job_id: str, payloads: list[dict]) -> None:
        """The job's batches as queued (the caption task's arguments), so the sweeper can queue one again."""
        key = KEY.format(job_id) + ":batches"
        self.redis.hset(key, mapping={str(i): json.dumps(p) for i, p in enumerate(payloads)})

    def running(self) -> list[str]:
        """The ids of the running jobs (an ended job leaves the set when it ends)."""
        return sorted(i.decode() for i in self.redis.smembers(RUNNING_KEY))

    def unfinished_batches(self, job_id: str) -> list[dict]:
        """The kept batches of a job that still have an item without a result."""
        key = KEY.format(job_id)
        done = self.done_ids.__wrapped__(self, job_id)  # not retried: a sweep skipped now runs again next turn
        kept = [json.loads(v) for v in self.redis.hvals(key + ":batches")]
        return [p for p in kept if any(r["id"] not in done for r in p["rows"])]

    def stalled(self, job_id: str, stall_s: float, now: float | None = None) -> bool:
        """Whether ``done`` has not moved for ``stall_s`` seconds, as successive sweeps saw it (each call notes
        what it saw; a stall is noted again, so the next one is ``stall_s`` later)."""
        now = time.time() if now is None else now
        key = KEY.format(job_id)
        done, seen = self.redis.hmget(key, "done", "swept")
        last_done, since = json.loads(seen) if seen else (None, now)
        if int(done or 0) != last_done:
            self.redis.hset(key, "swept", json.dumps([int(done or 0), now]))
            return False
        if now - since < stall_s:
            return False
        self.redis.hset(key, "swept", json.dumps([last_done, now]))
        return True

    def _admit(self, job_id: str, caller: str, max_running: int) -> None:
        """Count the caller's running jobs with this one (ended ones leave the caller's set here); over the quota,
        the new job is deleted again and refused. Two submits at the same moment may both be refused, never both
        let past the quota."""
        key = CALLER_KEY.format(caller)
        self.redis.sadd(key, job_id)
        if self.ttl_s:
            self.redis.expire(key, self.ttl_s)
        ids = [i.decode() for i in self.redis.smembers(key)]
        pipe = self.redis.pipeline(transaction=False)
        for i in ids:
            pipe.hget(KEY.format(i), "state")
        ended = [i for i, state in zip(ids, pipe.execute(), strict=True) if state != b"running"]
        if ended:
            self.redis.srem(key, *ended)
        if (running := len(ids) - len(ended)) > max_running:
            self.redis.srem(key, job_id)
            self.redis.delete(KEY.format(job_id))
            raise QuotaExceeded(f"this caller has {running - 1} captioning jobs running; the limit is {max_running} "
                                "(MODALINK_MAX_JOBS_PER_CALLER): wait for one to end, or cancel one")  # fmt: skip

    def get(self, job_id: str) -> dict:
        raw = self.redis.hgetall(KEY.format(job_id))
        if not raw:
            raise NotFound(f"unknown job {job_id!r}")
        job = {k.decode(): v.decode() for k, v in raw.items()}
        for k in ("total", "done", "errors"):
            job[k] = int(job[k])
        job["items"] = json.loads(job.get("items", "{}"))
        return job

    @_retried
    def active(self, job_id: str) -> bool:
        return (self.redis.hget(KEY.format(job_id), "state") or b"").decode() == "running"

    @_retried
    def done_ids(self, job_id: str) -> set[str]:
        return {k.decode() for k in self.redis.hkeys(KEY.format(job_id) + ":results")}

    @_retried
    def record(self, job_id: str, result: dict) -> bool:
        """Store one item's result unless it is already there; finish the job with its last item."""
        key = KEY.format(job_id)
        args = [result["id"], json.dumps(result), int("error" in result)]
        outcome = self._record(keys=[key, key + ":results"], args=args)
        if outcome == 2:
            self.finish_if_complete(job_id)
        return outcome != 0  # 0: a re-delivered batch, already counted

    @_retried
    def finish_if_complete(self, job_id: str) -> bool:
        """Every item has a result: write the results file, then say "done" (so a reader that sees "done"
        finds the file). Safe to call from any worker, any number of times."""
        job = self.get(job_id)
        if job["state"] != "running" or job["done"] < job["total"]:
            return False
        self._write_results(job_id)
        return self._transition(job_id, "done")

    def cancel(self, job_id: str) -> dict:
        """Stop a running job: queued batches are skipped; the results so far are written. Idempotent."""
        self.get(job_id)  # unknown id -> InputError
        if self._transition(job_id, "cancelled"):
            self._write_results(job_id)
        return self.get(job_id)

    def _transition(self, job_id: str, state: str) -> bool:
        """running -> ``state``, atomically (exactly one caller wins, e.g. two workers finishing at once)."""
        key = KEY.format(job_id)
        from redis.exceptions import WatchError

        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    if pipe.hget(key, "state") != b"running":
                        pipe.unwatch()
                        return False
                    pipe.multi()
                    pipe.hset(key, "state", state)
                    pipe.srem(RUNNING_KEY, job_id)
                    pipe.delete(key + ":batches")  # nothing is queued again for an ended job
                    if self.ttl_s:  # an ended job expires: finished jobs never pile up in Redis
                        pipe.expire(key, self.ttl_s)
                        pipe.expire(key + ":results", self.ttl_s)
                    pipe.execute()
                    return True
                except WatchError:  # someone else changed it meanwhile: look again
                    continue

    def _write_results(self, job_id: str) -> None:
        key = KEY.format(job_id)
        path = Path(self.redis.hget(key, "results").decode())
        rows = [json.loads(v) for v in self.redis.hvals(key + ":results")]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in sorted(rows, key=lambda r: r["id"])))
        tmp.replace(path)


def load_item(modality: str, row: dict, roots: Sequence[str | Path]) -> Any:
    """What the encoder service takes for a manifest row: file bytes (IMU: a [channels, time] array; a tensor
    plugin's: its ``.npy`` array).

    ``uri`` may be ``file:///abs/path`` or a ``data:`` URI (base64); the jobs fetch nothing from the network.
    A file must lie inside ``roots`` (checked here, when it is read, with symlinks resolved).
    """
    if modality not in MODALITIES:
        raise InputError(f"unknown modality {row.get('modality')!r}; expected one of {', '.join(MODALITIES)}")
    source: Any = row.get("path")
    if source:
        source = check_path(str(source), roots)
    else:
        uri = str(row["uri"])
        parsed = urllib.parse.urlparse(uri)
        if parsed.scheme == "file":
            if parsed.netloc not in ("", "localhost"):
                raise InputError(f"file: URI {uri[:80]!r} names a host; only local files (file:///...) are read")
            source = check_path(urllib.parse.unquote(parsed.path), roots)
        elif parsed.scheme == "data" and ";base64," in uri:
            try:
                source = base64.b64decode(uri.split(";base64,", 1)[1], validate=True)
            except ValueError:
                raise InputError("data: URI is not valid base64") from None
        else:
            raise InputError(f"unsupported uri {uri[:80]!r}: use a path, file:///... or a base64 data: URI")
    from modalink.encoders.base import read_bytes

    if modality == "imu":
        from modalink.encoders.imu import decode_imu

        return decode_imu(source).numpy()
    if (spec := get_modality(modality)).input == "tensor":  # a tensor plugin's .npy, header checked, never unpickled
        try:
            return load_npy(read_bytes(source, modality), f"{modality} item", spec.tensor_rank, "").astype(np.float32)
        except ValueError as e:
            raise InputError(str(e)) from None
    return read_bytes(source, modality)


def caption_batch(
    remote,
    modality: str,
    rows: list[dict],
    params: GenerationParams,
    prompt: str = "",
    timeout_s: float = 300.0,
    roots: Sequence[str | Path] | None = None,
) -> list[dict]:
    """Captions of one batch through the services: its items as one encoder request, then every item's turn
    through the pipeline (``remote.pipeline``: the same safety checks as chat, the same usage), all LLM calls
    started at once. A bad item (or one outside ``roots``, default ``manifest_roots()``) gets an ``error``
    instead of failing the batch; a refused one a ``finish_reason`` of ``content_filter``; so do the items of an
    encoder request that killed a replica and its one retry (``BackendCrashed``: retrying the batch would kill
    more). Other service failures raise (the task retries the batch)."""
    roots = manifest_roots() if roots is None else roots
    results: dict[str, dict] = {}
    loaded: list[tuple[dict, Any]] = []
    # Items with the same content (same bytes; an IMU window: same values) are computed once when the answer is
    # deterministic: the others get a copy of that result, with ``same_as`` naming it, and their input is dropped as
    # soon as it is read, so a batch holds one copy of each distinct input.
    copies: dict[str, str] = {}  # row id -> the id of the row whose result it copies
    first: dict[bytes, str] = {}  # content digest (as the media embedding cache keys it) -> the row computing it
    for row in rows:
        try:
            raw = load_item(modality, row, roots)
        except (InputError, OSError) as e:
            results[row["id"]] = {"id": row["id"], "error": str(e)}
            continue
        except Exception:  # noqa: BLE001  (anything a row makes the reader raise is that row's error: no job hangs)
            log.warning("job item %r could not be read", row.get("id"), exc_info=True)
            results[row["id"]] = {"id": row["id"], "error": "the item could not be read"}
            continue
        if deterministic(params):
            digest = input_digest(modality, raw)
            if digest in first:
                copies[row["id"]] = first[digest]
                continue
            first[digest] = row["id"]
        loaded.append((row, raw))
    embedded = remote.encoders.embed_batch(modality, [raw for _, raw in loaded], timeout_s) if loaded else []
    question = (prompt or default_question(modality)) if modality in MODALITIES else ""
    # Every turn is started first (an LLM call runs in the background), so the calls reach the LLM service within
    # its batching window and decode as one batch.
    started = []
    for (row, raw), out in zip(loaded, embedded, strict=True):
        if isinstance(out, Exception):  # a bad item, or one of a request that encoder replicas died handling
            results[row["id"]] = {"id": row["id"], "error": str(out)}
            continue
        turn = Turn(question, [(modality, raw)], params)
        try:
            started.append((row, remote.pipeline.start(turn, timeout_s, media=[Media(modality, out[0], out[1])])))
        except InputError as e:  # the turn itself is unusable (a prompt too long for the context, ...)
            results[row["id"]] = {"id": row["id"], "error": str(e)}
    for row, reply in started:
        try:
            answer = reply.answer()
        except InputError as e:  # the LLM refused this item's prompt
            results[row["id"]] = {"id": row["id"], "error": str(e)}
            continue
        except Exception:
            for _, other in started:
                other.cancel()
            raise  # the LLM service is down or failing: the task retries the batch
        results[row["id"]] = {"id": row["id"], "caption": answer.text.strip(), "finish_reason": answer.finish_reason,
                              "adapter_version": reply.versions.get(modality, ""), "usage": answer.usage}  # fmt: skip
    for row_id, original in copies.items():
        results[row_id] = {**results[original], "id": row_id, "same_as": original}
    return [results[r["id"]] for r in rows]
