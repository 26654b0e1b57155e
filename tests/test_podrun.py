"""deploy/podrun.py without a Docker engine: the `docker run` arguments it derives from the rendered chart are
what a kubelet would apply (`make image-test` runs them for real on an engine)."""

from __future__ import annotations

import sys

import pytest
import yaml

from modalink.config import REPO_ROOT

sys.path[:0] = [str(REPO_ROOT / "deploy"), str(REPO_ROOT / "charts")]
import podrun  # noqa: E402
import validate  # noqa: E402

VALUES = REPO_ROOT / "deploy" / "image-test-values.yaml"


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return validate.render(yaml.safe_load(VALUES.read_text()), name="mlk", namespace="modalink")


@pytest.fixture()
def cluster(objects, tmp_path) -> podrun.Cluster:
    return podrun.Cluster(objects, tmp_path, prefix="t")


def pod(cluster: podrun.Cluster, component: str, i: int = 0) -> podrun.Pod:
    return [p for p in cluster.pods if p.labels.get("app.kubernetes.io/component") == component][i]


def flag_values(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag]


def test_quantities_and_variable_expansion_follow_kubernetes():
    assert podrun.quantity("250m", cpu=True) == 0.25 and podrun.quantity(2, cpu=True) == 2
    assert podrun.quantity("3Gi") == 3 * 2**30 and podrun.quantity("512Mi") == 512 * 2**20
    assert podrun.quantity("1G") == 10**9 and podrun.quantity("1000") == 1000
    env = {"REDIS_PASSWORD": "s3cret"}
    assert podrun.expand("redis://:$(REDIS_PASSWORD)@redis:6379/0", env) == "redis://:s3cret@redis:6379/0"
    assert podrun.expand("$(UNSET) $$(REDIS_PASSWORD)", env) == "$(UNSET) $(REDIS_PASSWORD)"


def test_every_replica_is_a_pod_with_its_own_address_and_services_resolve_to_all_their_pods(cluster):
    ips = [p.ip for p in cluster.pods]
    assert len(set(ips)) == len(ips) and all(ip.startswith(podrun.POD_NET) for ip in ips)
    encoders = [p.ip for p in cluster.pods if p.labels.get("app.kubernetes.io/component") == "image-encoder"]
    assert len(encoders) == 2  # the values file's replicas: 2
    hosts = cluster.hosts()
    headless = sorted(ip for name, ip in hosts if name == "mlk-modalink-image-encoder-headless")
    assert headless == sorted(encoders)
    assert ("mlk-modalink-redis.modalink.svc", pod(cluster, "redis").ip) in hosts


def test_the_gateway_runs_with_the_rendered_security_context_limits_volumes_and_env(cluster, objects):
    gw = pod(cluster, "gateway")
    c = gw.spec["containers"][0]
    args = cluster.run_args(gw, c, "t-gw")
    assert args[args.index("--network") + 1] == "host"
    assert flag_values(args, "--user") == ["10001:10001"] and flag_values(args, "--group-add") == ["10001"]
    assert "--read-only" in args and flag_values(args, "--cap-drop") == ["ALL"]
    assert "no-new-privileges" in flag_values(args, "--security-opt")
    assert flag_values(args, "--memory") == [str(int(podrun.quantity(c["resources"]["limits"]["memory"])))]
    tmpfs = {v.split(":")[0] for v in flag_values(args, "--tmpfs")}
    assert tmpfs == {"/tmp", "/cache/runs", "/cache/features"}  # the emptyDirs a read-only root needs
    shared = [v for v in flag_values(args, "-v") if v.endswith(":/shared")]
    assert len(shared) == 1 and (cluster.workdir / "volumes").exists()
    env = dict(line.split("=", 1) for line in (cluster.workdir / "env" / "t-gw.env").read_text().splitlines())
    assert env["MODALINK_HOST"] == gw.ip and env["HOSTNAME"] == gw.name
    password = cluster.data("Secret", "mlk-modalink-redis")["redis-password"]
    assert env["MODALINK_REDIS_URL"] == f"redis://:{password}@mlk-modalink-redis:6379/0"
    assert oct((cluster.workdir / "env" / "t-gw.env").stat().st_mode & 0o777) == "0o600"  # it holds secrets
    image = args.index(c["image"])  # then the rendered command's tail and args, as the entrypoint's arguments
    assert c["image"] == "modalink-base:latest" and args[image + 1 :] == [*c.get("command", [])[1:], *c.get("args", [])]
    if c.get("command"):
        assert flag_values(args, "--entrypoint") == [c["command"][0]]


def test_redis_gets_its_claim_template_and_a_read_only_root(cluster):
    redis = pod(cluster, "redis")
    args = cluster.run_args(redis, redis.spec["containers"][0], "t-redis")
    assert "--read-only" in args
    assert any(v.endswith(f"volumes/data-{redis.name}:/data") for v in flag_values(args, "-v"))


def test_unsupported_specs_are_refused_not_ignored(cluster):
    gw = pod(cluster, "gateway")
    c = dict(gw.spec["containers"][0], securityContext={"privileged": True})
    with pytest.raises(ValueError, match="privileged"):
        cluster.run_args(gw, c, "t-bad")
    c = dict(gw.spec["containers"][0], env=[{"name": "X", "valueFrom": {"resourceFieldRef": {"resource": "cpu"}}}])
    with pytest.raises(ValueError, match="unsupported valueFrom"):
        cluster.run_args(gw, c, "t-bad")
