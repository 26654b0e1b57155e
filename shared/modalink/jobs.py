"""Offline captioning jobs: a manifest split per modality into batches, captioned through the services.

State lives in Redis: ``modalink:job:<id>`` (a hash: state, total, done, errors, results path) and
``modalink:job:<id>:results`` (item id -> result JSON, written with HSETNX). Writing a result only if its
id is new makes a re-delivered batch (a worker killed mid-batch, ``acks_late``) harmless: at-least-once
delivery, exactly-once results. The Celery side is ``services/worker``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from modalink import MODALITIES, data
from modalink.data import default_question
from modalink.engine import GenerationParams
from modalink.errors import InputError

KEY = "modalink:job:{}"


def read_manifest(path: Path) -> list[dict]:
    """Rows ``{"id", "modality", "path"}``; relative paths are resolved against the manifest's folder."""
    try:
        rows = data.read_manifest(path)
    except ValueError as e:  # not JSON (the message names the line)
        raise InputError(str(e)) from None
    except TypeError:
        raise InputError(f"{path}: every line must be a JSON object") from None
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not row.get("id") or not row.get("path"):
            raise InputError(f"{path}: item {n} needs an id and a path")
    if len({r["id"] for r in rows}) != len(rows):
        raise InputError(f"{path}: item ids must be unique")
    return rows


def batches(rows: Iterable[dict], size: int) -> Iterator[tuple[str, list[dict]]]:
    """(modality, up to ``size`` rows of it); rows of an unknown modality come as their own batch ("unknown")."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.get("modality") if r.get("modality") in MODALITIES else "unknown", []).append(r)
    for modality, items in groups.items():
        for i in range(0, len(items), size):
            yield modality, items[i : i + size]


class JobStore:
    def __init__(self, redis):
        self.redis = redis

    def create(self, total: int, results_path: str) -> str:
        job_id = uuid.uuid4().hex[:16]
        self.redis.hset(KEY.format(job_id), mapping={"state": "running", "total": total, "done": 0, "errors": 0,
                                                     "results": results_path, "created": time.time()})  # fmt: skip
        return job_id

    def get(self, job_id: str) -> dict:
        raw = self.redis.hgetall(KEY.format(job_id))
        if not raw:
            raise InputError(f"unknown job {job_id!r}")
        job = {k.decode(): v.decode() for k, v in raw.items()}
        for k in ("total", "done", "errors"):
            job[k] = int(job[k])
        return job

    def done_ids(self, job_id: str) -> set[str]:
        return {k.decode() for k in self.redis.hkeys(KEY.format(job_id) + ":results")}

    def record(self, job_id: str, result: dict) -> bool:
        """Store one item's result unless it is already there; finish the job with its last item."""
        key = KEY.format(job_id)
        if not self.redis.hsetnx(key + ":results", result["id"], json.dumps(result)):
            return False  # a re-delivered batch: already counted
        pipe = self.redis.pipeline()
        pipe.hincrby(key, "done", 1)
        if "error" in result:
            pipe.hincrby(key, "errors", 1)
        done = pipe.execute()[0]
        if done == int(self.redis.hget(key, "total")):
            self._finish(job_id)
        return True

    def _finish(self, job_id: str) -> None:
        key = KEY.format(job_id)
        path = Path(self.redis.hget(key, "results").decode())
        rows = [json.loads(v) for v in self.redis.hvals(key + ":results")]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in sorted(rows, key=lambda r: r["id"])))
        tmp.replace(path)
        self.redis.hset(key, "state", "done")


def caption_batch(remote, modality: str, rows: list[dict], params: GenerationParams) -> list[dict]:
    """Captions of one batch through the services: all items at once (the encoder and LLM services batch
    concurrent requests); a bad item gets an ``error`` instead of failing the batch."""

    def one(row: dict) -> dict:
        try:
            if modality not in MODALITIES:
                raise InputError(f"unknown modality {row.get('modality')!r}; expected one of {', '.join(MODALITIES)}")
            raw = Path(row["path"]).read_bytes() if modality != "imu" else _imu(row["path"])
            stream, versions = remote.stream(default_question(modality), [(modality, raw)], params)
            return {"id": row["id"], "caption": "".join(t.text for t in stream).strip(),
                    "adapter_version": versions[modality]}  # fmt: skip
        except (InputError, OSError) as e:
            return {"id": row["id"], "error": str(e)}

    with ThreadPoolExecutor(max_workers=len(rows) or 1) as pool:
        return list(pool.map(one, rows))


def _imu(path: str):
    from modalink.encoders.imu import decode_imu

    return decode_imu(path).numpy()
