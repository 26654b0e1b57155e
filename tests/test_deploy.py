"""The Helm chart and docker-compose.yml, validated offline (there is no cluster or Docker engine here): rendered
by Helm's own engine, linted, every object checked against Kubernetes 1.30 and 1.33 in strict mode, the
Compose file against the Compose specification, and both wired like `modalink up`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from modalink.config import REPO_ROOT, Settings

sys.path.insert(0, str(REPO_ROOT / "charts"))
import validate  # noqa: E402

ENCODER_KINDS = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}


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
        ({"encoders": {"smell": {}}}, "smell"),
        ({"llm": {"engine": "tgi"}}, "transformers"),
        ({"redis": {"enabled": False}}, "externalUrl"),
        ({"workers": [{"name": "x", "queues": ["caption.smell"]}]}, "caption.smell"),
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
    assert find(objects, "ConfigMap", "modalink-config")["data"]["MODALINK_REDIS_URL"] == "redis://cache:6379/2"


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


def test_the_secret_holds_only_key_hashes_and_tls_reaches_every_service():
    from modalink.auth import KeyRing, hash_key

    objects = validate.render({"apiKeys": ["mlk_plain-key-1"], "apiKeyHashes": [hash_key("mlk_other-key-2")],
                               "tls": {"existingSecret": "modalink-mtls"}})  # fmt: skip
    assert validate.validate_objects(objects) == []
    secret = find(objects, "Secret", "modalink-api-keys")["stringData"]
    assert set(secret) == {"MODALINK_API_KEY_HASHES"} and "mlk_" not in secret["MODALINK_API_KEY_HASHES"]
    ring = KeyRing(hashes=secret["MODALINK_API_KEY_HASHES"].split(","))  # what the gateway reads
    assert ring.identify("mlk_plain-key-1") and ring.identify("mlk_other-key-2") and not ring.identify("mlk_nope")
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


def test_the_playground_is_a_client_of_the_gateway_service(default):
    deployment = find(default, "Deployment", "modalink-playground")
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:3] == ["modalink", "serve", "playground"]
    assert command[command.index("--gateway") + 1] == "modalink-gateway:50051"
    assert find(default, "Service", "modalink-playground")["spec"]["type"] == "ClusterIP"
    assert not any(o["metadata"]["name"] == "modalink-playground"
                   for o in validate.render({"playground": {"enabled": False}}))  # fmt: skip
