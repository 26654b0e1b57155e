"""Gateway: the public gRPC API ``modalink.v1.Assistant`` (with health checking and reflection).

    modalink serve gateway [--port 50051]

It sends each media part to its modality's encoder service (Triton, round robin over replicas,
concurrently), assembles the prompt with the LLM's chat template, and streams the LLM service's answer
back. Deadlines propagate to both hops; a client that cancels cancels the LLM generation.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading

import grpc

from modalink import MODALITIES, check_modality, data, jobs, ports, queueing
from modalink.auth import KeyRing, key_from_headers
from modalink.config import Settings, get_settings
from modalink.data import default_question
from modalink.embed_cache import salted
from modalink.errors import InputError
from modalink.metrics import track
from modalink.pipeline import Turn
from modalink.registry import AdapterRegistry
from modalink.remote import RemoteAssistant
from modalink.rpc import Served, abort_on_input_error, caller_of, make_server, time_left
from modalink.v1 import assistant_pb2, assistant_pb2_grpc
from modalink.wire import params_from_msg, part_input, to_tensor_msg, turn_from_msg, usage_to_msg

log = logging.getLogger("modalink.gateway")
SERVICE = "modalink.v1.Assistant"


def tracked(method):
    """A unary gRPC method, counted and timed in the gateway's metrics, its errors mapped to statuses."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        with track("grpc", method.__name__, context):
            try:
                return method(self, request, context)
            except Exception as e:  # noqa: BLE001
                abort_on_input_error(context, e)

    return wrapper


def media_part(part, method: str):
    modality, raw = part_input(part)
    if modality == "text":
        raise InputError(f"{method} takes a media part (image, audio, imu, video), not text")
    return modality, raw


class AssistantService(assistant_pb2_grpc.AssistantServicer):
    def __init__(self, remote: RemoteAssistant, settings: Settings | None = None):
        self.remote, self.settings = remote, settings or get_settings()
        self.registry = AdapterRegistry(self.settings.adapters_dir)
        self.keys = KeyRing.from_settings(self.settings)  # who a caller is, for the running-jobs quota
        self.admins = KeyRing.admins_from_settings(self.settings)

    def salt(self, context: grpc.ServicerContext) -> str:
        """The embedding cache's salt for this caller: its API key's id when keys are configured (issue 24)."""
        return caller_of(context, self.keys) if self.keys and self.settings.embed_cache_salt else ""

    def Generate(self, request: assistant_pb2.GenerateRequest, context: grpc.ServicerContext):
        with track("grpc", "Generate", context):
            try:
                with salted(self.salt(context)):
                    reply = self.remote.pipeline.start(turn_from_msg(request), time_left(context, self.settings))
                context.add_callback(reply.cancel)  # the client went away: stop the generation
                for i, ev in enumerate(reply):
                    yield assistant_pb2.GenerateResponse(
                        text=ev.text, finish_reason=ev.finish_reason, usage=usage_to_msg(ev.usage),
                        adapter_versions=reply.versions if i == 0 else None,
                    )  # fmt: skip
            except Exception as e:  # noqa: BLE001
                abort_on_input_error(context, e)

    @tracked
    def Embed(self, request: assistant_pb2.EmbedRequest, context: grpc.ServicerContext):
        modality, raw = media_part(request.part, "Embed")
        with salted(self.salt(context)):
            (media,), versions = self.remote.media([(modality, raw)], time_left(context, self.settings))
        return assistant_pb2.EmbedResponse(embeddings=to_tensor_msg(media.embeddings),
                                           adapter_version=versions[modality], modality=modality)  # fmt: skip

    @tracked
    def Caption(self, request: assistant_pb2.CaptionRequest, context: grpc.ServicerContext):
        modality, raw = media_part(request.part, "Caption")
        turn = Turn(default_question(modality), [(modality, raw)], params_from_msg(request.params, 48))
        with salted(self.salt(context)):
            reply = self.remote.pipeline.start(turn, time_left(context, self.settings))
        context.add_callback(reply.cancel)
        answer = reply.answer()
        return assistant_pb2.CaptionResponse(caption=answer.text.strip(), adapter_version=reply.versions.get(modality),
                                             modality=modality, finish_reason=answer.finish_reason,
                                             usage=usage_to_msg(reply.usage))  # fmt: skip

    # -- offline captioning jobs (the Celery workers do the work; Redis holds the state) -------------
    @tracked
    def SubmitCaptionJob(self, request: assistant_pb2.SubmitCaptionJobRequest, context: grpc.ServicerContext):
        jobs_dir = self.settings.jobs_dir
        which = request.WhichOneof("manifest")
        if which == "manifest_jsonl":
            rows = data.parse_manifest(request.manifest_jsonl, jobs_dir, "manifest_jsonl")
        elif which == "manifest_path":
            rows = data.read_manifest(jobs_dir / request.manifest_path, jobs.manifest_roots())
        else:
            raise InputError("set manifest_jsonl (JSONL rows) or manifest_path (a file the workers can read)")
        params = params_from_msg(request.params, default_max_new_tokens=48)
        # relative to the jobs dir, as manifest_path is (the workers' working directory is not the gateway's)
        results = str(jobs_dir / (request.results_path or "{job_id}.captions.jsonl"))
        with redis_errors():
            job_id = queueing.submit(rows, results, request.batch_size or 16, params, request.prompt,
                                     caller=caller_of(context, self.keys), salt=self.salt(context))  # fmt: skip
            return job_msg(job_id, queueing.store().get(job_id))

    @tracked
    def GetJob(self, request: assistant_pb2.JobRequest, context: grpc.ServicerContext):
        with redis_errors():
            return job_msg(request.job_id, queueing.store().get(request.job_id))

    @tracked
    def CancelJob(self, request: assistant_pb2.JobRequest, context: grpc.ServicerContext):
        with redis_errors():
            return job_msg(request.job_id, queueing.store().cancel(request.job_id))

    # -- the adapter registry (the encoders follow CURRENT; the LLM service loads a LoRA on first use) --------
    @tracked
    def ListAdapters(self, request: assistant_pb2.ListAdaptersRequest, context: grpc.ServicerContext):
        return adapter_list(self.registry, [request.modality] if request.modality else MODALITIES)

    @tracked
    def PromoteAdapter(self, request: assistant_pb2.PromoteAdapterRequest, context: grpc.ServicerContext):
        admin = self.check_admin(context)
        modality = check_modality(request.modality)
        try:
            if request.rollback:
                version = self.registry.rollback(modality)
            elif not request.version:
                raise InputError("set version (or rollback)")
            else:
                version = request.version
                self.registry.promote(modality, version)
        except (ValueError, RuntimeError) as e:  # unknown version, nothing to roll back to, checksum mismatch
            raise InputError(str(e)) from None
        log.info("adapter %s/%s promoted%s by admin key %s", modality, version,
                 " (rollback)" if request.rollback else "", admin)  # fmt: skip
        return adapter_list(self.registry, [modality])

    def check_admin(self, context: grpc.ServicerContext) -> str:
        """The calling admin key's id. Promoting changes what every caller is served: only an admin key may (the
        auth interceptor has let in any accepted key); without admin keys nobody may, on an open gateway too."""
        if not self.admins:
            raise PermissionError("promoting adapters needs an admin API key: this gateway has none configured "
                                  "(MODALINK_ADMIN_API_KEYS / MODALINK_ADMIN_API_KEY_HASHES)")  # fmt: skip
        metadata = {k.lower(): v for k, v in context.invocation_metadata() if isinstance(v, str)}
        if (admin := self.admins.identify(key_from_headers(metadata))) is None:
            raise PermissionError("promoting adapters needs an admin API key (MODALINK_ADMIN_API_KEY_HASHES); "
                                  "this key may call everything else but not PromoteAdapter")  # fmt: skip
        return admin


def adapter_list(registry: AdapterRegistry, modalities) -> assistant_pb2.AdapterList:
    out = assistant_pb2.AdapterList()
    for m in map(check_modality, modalities):
        entry = out.modalities[m]
        entry.current = registry.current(m) or ""
        for v in registry.list(m):
            numbers = {
                k: float(x) for k, x in v.metrics.items() if isinstance(x, (int, float)) and not isinstance(x, bool)
            }
            entry.versions.add(version=v.version, current=v.current, metrics=numbers)
    return out


@contextlib.contextmanager
def redis_errors():
    """Redis (the job store and broker) unreachable -> ConnectionError, which the gateway maps to UNAVAILABLE."""
    from kombu.exceptions import OperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OperationalError) as e:
        raise ConnectionError(f"job store unreachable: {e}") from None


def job_msg(job_id: str, job: dict) -> assistant_pb2.Job:
    return assistant_pb2.Job(job_id=job_id, state=job["state"], total=job["total"], done=job["done"],
                             errors=job["errors"], progress=job["done"] / max(1, job["total"]), results=job["results"],
                             items=job["items"])  # fmt: skip


def watch_llm(remote: RemoteAssistant, served: Served, interval_s: float) -> threading.Event:
    """The gateway is only as healthy as the LLM service behind it: check it every ``interval_s`` and turn the
    gateway's health NOT_SERVING while it is down (probes and load balancers then send traffic elsewhere), and
    SERVING again when it is back. Returns the event that stops the watch."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stop, stub = threading.Event(), health_pb2_grpc.HealthStub(remote.channel)

    def run() -> None:
        up = True
        while not stop.wait(interval_s):
            try:
                ok = stub.Check(health_pb2.HealthCheckRequest(), timeout=max(0.5, interval_s)).status == 1
            except grpc.RpcError:
                ok = False
            if ok != up:
                log.warning("LLM service at %s is %s", remote.address, "back: serving" if ok else "down: NOT_SERVING")
                served.set_serving(ok)
                up = ok

    threading.Thread(target=run, name="watch-llm", daemon=True).start()
    return stop


def serve(settings: Settings | None = None, port: int = ports.GATEWAY_GRPC, host: str = "[::]",
          http_port: int = ports.GATEWAY_HTTP,
          http_host: str = "0.0.0.0") -> None:  # fmt: skip
    """gRPC on ``port`` and the OpenAI-compatible HTTP API on ``http_port`` (0 = off), until SIGTERM/SIGINT;
    then calls in flight are drained (``MODALINK_SHUTDOWN_GRACE_S``)."""
    from modalink_services.gateway.openai_http import build_app

    settings = settings or get_settings()
    remote = RemoteAssistant.from_settings(settings)  # a bad MODALINK_SAFETY_* fails here, not at the first request
    servicer = AssistantService(remote, settings)
    served = make_server(port, [(assistant_pb2_grpc.add_AssistantServicer_to_server, servicer)], [SERVICE], host,
                         settings=settings, public=True)  # fmt: skip
    stop_watch = watch_llm(remote, served, settings.health_interval_s)
    log.info("%s ready on %s:%d", SERVICE, host, served.port)
    app = build_app(remote, settings=settings) if http_port else None
    if app is not None:
        log.info("OpenAI-compatible HTTP on %s:%d", http_host, http_port)
    served.serve_until_signal(settings.shutdown_grace_s, app, http_host, http_port)
    stop_watch.set()
