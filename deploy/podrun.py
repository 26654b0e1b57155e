"""Run a rendered Helm chart's pod specs as containers on one Docker engine with host networking only.

What a kubelet and the cluster network would do, emulated as closely as one machine without bridges allows:

- every replica of a Deployment or StatefulSet is a pod with its own loopback address (127.0.10.N) as its pod IP:
  the services bind it (``MODALINK_HOST``), so the chart's own ports do not collide and two replicas of one
  Deployment can run side by side; a Service name resolves (``--add-host``) to the addresses of the pods its
  selector picks, all of them, as a headless Service's DNS does;
- each container runs with the rendered command and args (``$(VAR)`` expanded), env and envFrom (ConfigMaps,
  Secrets, ``fieldRef``), ``securityContext`` (user and group, fsGroup, ``readOnlyRootFilesystem``, dropped
  capabilities, no privilege escalation), volumes (``emptyDir`` as tmpfs, a PVC or a volume claim template as a
  host folder owned by the fsGroup, ConfigMaps and Secrets as read-only files), resource limits (``--memory``,
  ``--cpus``, clamped to this machine's cores) and its termination grace period; init containers run first,
  in order, and must exit 0;
- the rendered startup, readiness and liveness probes (httpGet, grpc, tcpSocket, exec) run against the pod IP.

Not emulated: scheduling, requests, NetworkPolicies, HPAs, PDBs, RBAC (no API server), ClusterIP port mapping
(a Service's port must equal its target port, as the chart's are).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

LABEL = "modalink.podrun"
POD_NET = "127.0.10."


def quantity(value: str | int | float, cpu: bool = False) -> float:
    """A Kubernetes quantity as a number: cores for CPU ("250m" -> 0.25), bytes otherwise ("3Gi")."""
    s = str(value)
    if cpu:
        return float(s[:-1]) / 1000 if s.endswith("m") else float(s)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    for suffix, mult in units.items():
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * mult
    return float(s)


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined variables are replaced, others left as written; ``$$`` escapes."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)  # fmt: skip


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@dataclass
class Pod:
    """One replica of a workload: its name, emulated IP, labels and pod spec."""

    name: str
    ip: str
    labels: dict
    spec: dict
    workload: dict
    containers: list[str] = field(default_factory=list)  # docker container names, main containers only
    started: float = 0.0  # when its main containers were started (time.monotonic)


class Cluster:
    """The rendered objects of one release, run as containers named ``<prefix>-<pod>-<container>``."""

    def __init__(self, objects: list[dict], workdir: Path, prefix: str = "mlk", namespace: str = "modalink"):
        self.objects, self.workdir, self.prefix, self.namespace = objects, Path(workdir), prefix, namespace
        self.cpus = os.cpu_count() or 1
        self.pods: list[Pod] = []
        n = 10
        hpas = {o["spec"]["scaleTargetRef"]["name"]: o["spec"] for o in self.kind("HorizontalPodAutoscaler")}
        for w in self.kind("Deployment") + self.kind("StatefulSet"):
            name = w["metadata"]["name"]
            replicas = w["spec"].get("replicas", hpas.get(name, {}).get("minReplicas", 1))
            for i in range(replicas):
                pod = f"{name}-{i}"
                tmpl = w["spec"]["template"]
                self.pods.append(Pod(pod, f"{POD_NET}{n}", tmpl["metadata"].get("labels", {}), tmpl["spec"], w))
                n += 1

    # -- the rendered objects ----------------------------------------------------------------------------------
    def kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        for o in self.kind(kind):
            if o["metadata"]["name"] == name:
                return o
        raise KeyError(f"{kind}/{name} is not among the rendered objects")

    def data(self, kind: str, name: str) -> dict[str, str]:
        """A ConfigMap's or Secret's keys as strings (Secret ``data`` is base64, ``stringData`` plain)."""
        o = self.get(kind, name)
        out = {k: base64.b64decode(v).decode() for k, v in (o.get("data") or {}).items()} if kind == "Secret" else {}
        out.update(o.get("stringData" if kind == "Secret" else "data") or {})
        return {k: str(v) for k, v in out.items()}

    def hosts(self) -> list[tuple[str, str]]:
        """(name, pod IP) for every Service: its short and namespaced names, one entry per selected pod."""
        out = []
        for svc in self.kind("Service"):
            name, sel = svc["metadata"]["name"], svc["spec"].get("selector") or {}
            for pod in self.pods:
                if sel and matches(sel, pod.labels):
                    out += [(n, pod.ip) for n in (name, f"{name}.{self.namespace}", f"{name}.{self.namespace}.svc")]
        return out

    # -- one container -----------------------------------------------------------------------------------------
    def env(self, pod: Pod, c: dict) -> dict[str, str]:
        """The container's environment, in Kubernetes' order: envFrom, then env (with ``$(VAR)`` of earlier ones)."""
        env: dict[str, str] = {"HOSTNAME": pod.name, "MODALINK_HOST": pod.ip}
        for src in c.get("envFrom", []):
            ref = src.get("configMapRef") or src.get("secretRef")
            kind = "ConfigMap" if "configMapRef" in src else "Secret"
            try:
                env.update({src.get("prefix", "") + k: v for k, v in self.data(kind, ref["name"]).items()})
            except KeyError:
                if not ref.get("optional"):
                    raise
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = expand(str(e["value"]), env)
                continue
            vf = e["valueFrom"]
            if "secretKeyRef" in vf or "configMapKeyRef" in vf:
                ref = vf.get("secretKeyRef") or vf["configMapKeyRef"]
                env[e["name"]] = self.data("Secret" if "secretKeyRef" in vf else "ConfigMap", ref["name"])[ref["key"]]
            elif "fieldRef" in vf:
                path = vf["fieldRef"]["fieldPath"]
                fields = {"status.podIP": pod.ip, "metadata.name": pod.name, "metadata.namespace": self.namespace,
                          "spec.nodeName": socket.gethostname(), "status.hostIP": "127.0.0.1"}  # fmt: skip
                env[e["name"]] = fields[path]
            else:
                raise ValueError(f"{pod.name}/{c['name']}: env {e['name']}: unsupported valueFrom {sorted(vf)}")
        return env

    def volume_args(self, pod: Pod, c: dict, uid: int, gid: int) -> list[str]:
        args, volumes = [], {v["name"]: v for v in pod.spec.get("volumes", [])}
        for tmpl in pod.workload["spec"].get("volumeClaimTemplates", []):  # a StatefulSet's own claim per pod
            volumes[tmpl["metadata"]["name"]] = {
                "persistentVolumeClaim": {"claimName": f"{tmpl['metadata']['name']}-{pod.name}"}
            }
        for m in c.get("volumeMounts", []):
            v, ro = volumes[m["name"]], ":ro" if m.get("readOnly") else ""
            if "emptyDir" in v:
                args += ["--tmpfs", f"{m['mountPath']}:rw,exec,nosuid,size=1g,uid={uid},gid={gid},mode=1777"]
            elif "persistentVolumeClaim" in v:
                host = self.workdir / "volumes" / v["persistentVolumeClaim"]["claimName"]
                if not host.exists():  # a new volume, owned by the pod's fsGroup as the kubelet would set it
                    host.mkdir(parents=True)
                    if os.geteuid() == 0:
                        os.chown(host, 0, gid)
                    host.chmod(0o2775 if os.geteuid() == 0 else 0o777)
                args += ["-v", f"{host}:{m['mountPath']}{ro}"]
            elif "configMap" in v or "secret" in v:
                kind, ref = (
                    ("ConfigMap", v["configMap"]["name"]) if "configMap" in v else ("Secret", v["secret"]["secretName"])
                )
                host = self.workdir / "objects" / pod.name / m["name"]
                host.mkdir(parents=True, exist_ok=True)
                for key, value in self.data(kind, ref).items():
                    (host / key).write_text(value)
                    (host / key).chmod(0o644)
                args += ["-v", f"{host}:{m['mountPath']}:ro"]
            else:
                raise ValueError(f"{pod.name}: volume {m['name']}: unsupported source {sorted(v)}")
        return args

    def run_args(self, pod: Pod, c: dict, name: str) -> list[str]:
        """``docker run`` arguments for one container of ``pod`` (detached, host network, its pod's /etc/hosts)."""
        psc, sc = pod.spec.get("securityContext", {}), c.get("securityContext", {})
        uid, gid = sc.get("runAsUser", psc.get("runAsUser")), sc.get("runAsGroup", psc.get("runAsGroup"))
        args = ["--name", name, "--label", f"{LABEL}={self.prefix}", "--network", "host"]
        if uid is not None:
            args += ["--user", f"{uid}:{gid if gid is not None else uid}"]
        if psc.get("fsGroup") is not None:
            args += ["--group-add", str(psc["fsGroup"])]
        if sc.get("readOnlyRootFilesystem"):
            args.append("--read-only")
        for cap in sc.get("capabilities", {}).get("drop", []):
            args += ["--cap-drop", cap]
        for cap in sc.get("capabilities", {}).get("add", []):
            args += ["--cap-add", cap]
        if sc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        if sc.get("privileged"):
            raise ValueError(f"{pod.name}/{c['name']}: privileged containers are not run here")
        limits = c.get("resources", {}).get("limits", {})
        if "memory" in limits:
            args += ["--memory", str(int(quantity(limits["memory"])))]
        if "cpu" in limits:
            args += ["--cpus", f"{min(quantity(limits['cpu'], cpu=True), self.cpus):g}"]
        args += ["--stop-timeout", str(pod.spec.get("terminationGracePeriodSeconds", 30))]
        for host, ip in self.hosts():
            args += ["--add-host", f"{host}:{ip}"]
        env = self.env(pod, c)
        env_file = self.workdir / "env" / f"{name}.env"
        env_file.parent.mkdir(parents=True, exist_ok=True)
        env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items() if "\n" not in v))
        env_file.chmod(0o600)
        args += ["--env-file", str(env_file)]
        args += self.volume_args(pod, c, uid if uid is not None else 0, psc.get("fsGroup", gid or 0))
        command = [expand(a, env) for a in c.get("command", [])]
        rest = [expand(a, env) for a in c.get("args", [])]
        if command:
            args += ["--entrypoint", command[0]]
        return [*args, c["image"], *command[1:], *rest]

    # -- pods --------------------------------------------------------------------------------------------------
    def container_name(self, pod: Pod, c: dict) -> str:
        return f"{self.prefix}-{pod.name}-{c['name']}"

    def start(self, pod: Pod) -> None:
        """Init containers in order (each must exit 0), then the main containers, detached."""
        for c in pod.spec.get("initContainers", []):
            name = self.container_name(pod, c)
            r = docker("run", "--rm", *self.run_args(pod, c, name), check=False, timeout=300)
            if r.returncode != 0:
                raise RuntimeError(f"{pod.name}: init container {c['name']} exited {r.returncode}: {r.stderr[-2000:]}")
        pod.started = time.monotonic()
        for c in pod.spec["containers"]:
            name = self.container_name(pod, c)
            docker("run", "-d", *self.run_args(pod, c, name))
            pod.containers.append(name)

    def probe(self, pod: Pod, c: dict, probe: dict) -> tuple[bool, str]:
        """Run one probe once: (passed, what it saw)."""
        timeout = max(1, probe.get("timeoutSeconds", 1))
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}
        port_of = lambda p: ports[p] if isinstance(p, str) else int(p)  # noqa: E731
        try:
            if "httpGet" in probe:
                h = probe["httpGet"]
                url = f"{h.get('scheme', 'HTTP').lower()}://{pod.ip}:{port_of(h['port'])}{h.get('path', '/')}"
                with urllib.request.urlopen(url, timeout=timeout) as r:
                    return 200 <= r.status < 400, f"GET {url}: {r.status}"
            if "grpc" in probe:
                return grpc_health(f"{pod.ip}:{probe['grpc']['port']}", probe["grpc"].get("service", ""), timeout)
            if "tcpSocket" in probe:
                with socket.create_connection((pod.ip, port_of(probe["tcpSocket"]["port"])), timeout=timeout):
                    return True, "connected"
            if "exec" in probe:
                name = self.container_name(pod, c)
                r = docker("exec", name, *probe["exec"]["command"], check=False, timeout=timeout + 10)
                return r.returncode == 0, f"exec exit {r.returncode} {r.stdout[-200:]}{r.stderr[-200:]}"
        except (OSError, urllib.error.URLError, subprocess.TimeoutExpired) as e:
            return False, str(e)
        raise ValueError(f"{pod.name}/{c['name']}: unsupported probe {sorted(probe)}")

    def running(self, name: str) -> tuple[bool, str]:
        r = docker("inspect", "-f", "{{.State.Running}} {{.State.ExitCode}} {{.State.OOMKilled}}", name, check=False)
        state = r.stdout.strip()
        return state.startswith("true"), state

    def wait_ready(self, pod: Pod, deadline: float) -> float:
        """Seconds from the start of ``pod``'s containers until every one passed its startup and readiness probes
        (a container without probes is ready when running); then each liveness probe must pass once."""
        for c in pod.spec["containers"]:
            name = self.container_name(pod, c)
            for kind in ("startupProbe", "readinessProbe"):
                probe = c.get(kind)
                limit = deadline
                if kind == "startupProbe" and probe:  # the kubelet restarts the container after this many failures
                    limit = min(deadline, pod.started + probe.get("initialDelaySeconds", 0)
                                + probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3) + 5)  # fmt: skip
                seen = "no probe"
                while probe:
                    alive, state = self.running(name)
                    if not alive:
                        raise RuntimeError(f"{name} stopped before it was ready ({state}):\n{logs(name)}")
                    ok, seen = self.probe(pod, c, probe)
                    if ok:
                        break
                    if time.monotonic() > limit:
                        raise RuntimeError(f"{name}: {kind} did not pass in time (last: {seen}):\n{logs(name)}")
                    time.sleep(min(1.0, probe.get("periodSeconds", 10)))
            alive, state = self.running(name)
            if not alive:
                raise RuntimeError(f"{name} is not running ({state}):\n{logs(name)}")
        ready = time.monotonic() - pod.started
        for c in pod.spec["containers"]:
            if probe := c.get("livenessProbe"):  # the kubelet restarts a container after failureThreshold failures
                name, failures = self.container_name(pod, c), probe.get("failureThreshold", 3)
                for _ in range(failures):
                    ok, seen = self.probe(pod, c, probe)
                    if ok:
                        break
                    time.sleep(probe.get("periodSeconds", 10))
                else:
                    raise RuntimeError(f"{name}: livenessProbe failed {failures} times in a row, the kubelet would "
                                       f"restart it (last: {seen}):\n{logs(name)}")  # fmt: skip
        return ready

    def down(self) -> None:
        """Remove every container of this prefix (also those of an earlier, interrupted run)."""
        r = docker("ps", "-aq", "--filter", f"label={LABEL}={self.prefix}", check=False)
        ids = r.stdout.split()
        if ids:
            docker("rm", "-f", *ids, check=False, timeout=120)


def docker(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:3])} ... failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return r


def logs(name: str, lines: int = 40) -> str:
    r = docker("logs", "--tail", str(lines), name, check=False)
    return (r.stdout + r.stderr).strip()


def grpc_health(address: str, service: str, timeout: float) -> tuple[bool, str]:
    """The gRPC health protocol's Check, as the kubelet's grpc probe calls it."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        try:
            res = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            return False, f"{address}: {e.code().name}"
    return res.status == health_pb2.HealthCheckResponse.SERVING, f"{address}: {res.status}"


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="modalink-podrun-"))


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def inspect_json(name: str) -> dict:
    return json.loads(docker("inspect", name).stdout)[0]
