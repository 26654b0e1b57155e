"""make image-test: the images `make image` built, run from the Helm chart's own pod specs on the local engine.

Renders the chart with ``deploy/image-test-values.yaml`` (the local images, a Redis image built here, two image
encoder replicas, an API key) and runs every Deployment and StatefulSet through ``podrun`` (pod IPs on loopback,
the rendered security contexts, volumes, limits and probes), then, through the containerized gateway:

1. asks the ``make demo`` questions (image, audio, IMU, video) and checks the class words in the answers, and that
   the LLM pod serves them with llama.cpp (the values' ``llm.engine: auto``; compose runs the default engine);
2. runs a 5-item captioning job on the containerized workers (files on the shared volume, results back on it);
3. kills one of the two image encoder containers and asks again: the gateway routes around it.

Then it brings up ``docker-compose.host.yml`` (Compose v2 or Debian's docker-compose 1.29), waits for every
health check and asks the demo questions through that gateway on 127.0.0.1:50051 (the transformers engine).

Every container it started is removed at the end, also on failure or Ctrl-C (``--keep`` leaves the chart's
running and skips compose).

    python deploy/image_test.py [--values FILE] [--keep] [--no-compose]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
import modalink  # noqa: E402,F401  (before charts/ is on the path: its modalink/ folder would shadow the package)

sys.path += [str(ROOT / "deploy"), str(ROOT / "charts")]
import podrun  # noqa: E402
import validate  # noqa: E402

API_KEY = "image-test-key"  # the values file's apiKeys entry (the chart stores only its hash)
DEMO = {  # the `make demo` questions, and a word each answer must hold
    "image": ("sneaker.png", "What is shown in this picture?", "sneaker"),
    "audio": ("seven.wav", "What does the voice say?", "seven"),
    "imu": ("walking.npy", "What activity is the person doing?", "walking"),
    "video": ("shirt_then_bag.gif", "What happens in this video?", "shirt"),
}


def log(msg: str) -> None:
    print(f"[image-test {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


T0 = time.monotonic()
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def pods_named(cluster: podrun.Cluster, component: str) -> list[podrun.Pod]:
    return [p for p in cluster.pods if p.labels.get("app.kubernetes.io/component") == component]


def start(cluster: podrun.Cluster, timeout: float) -> dict[str, float]:
    """Start every pod (as a cluster would: all at once), then wait for each to be ready, concurrently."""
    for pod in cluster.pods:
        cluster.start(pod)
        log(f"started {pod.name} ({pod.ip}): {', '.join(pod.containers)}")
    deadline = time.monotonic() + timeout
    with ThreadPoolExecutor(len(cluster.pods)) as pool:
        futures = {pod.name: pool.submit(cluster.wait_ready, pod, deadline) for pod in cluster.pods}
        ready = {}
        for name, f in futures.items():
            ready[name] = f.result()
            pod = next(p for p in cluster.pods if p.name == name)
            kinds = sorted({k.removesuffix("Probe") for c in pod.spec["containers"] for k in PROBES if c.get(k)})
            log(
                f"ready {name}: {ready[name]:.1f}s after docker run "
                f"({' and '.join(kinds) + ' probes passed' if kinds else 'running; the chart gives it no probe'})"
            )
    return ready


def first_answer(client, samples: Path, timeout: float = 60) -> float:
    """Seconds until the gateway answers once: the pods are ready, but the gateway's channel to a just-started LLM
    may still be in its reconnect backoff (at most 3 s), so UNAVAILABLE is retried as a client honouring its
    ``retry-after`` would be."""
    import grpc

    from modalink.client import image

    t0 = time.monotonic()
    while True:
        try:
            client.ask([image(samples / "sneaker.png"), "What is shown in this picture?"], max_new_tokens=4)
            return time.monotonic() - t0
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() - t0 > timeout:
                raise
            log(f"not answering yet: {e.details()}")
            time.sleep(1)


def llm_engine(containers: list[str], expected: str) -> str:
    """The runtime the LLM service's log says it serves with: ``expected`` (the test values' ``MODALINK_ENGINE=auto``
    must resolve to llama.cpp in these CPU images, whose build installs llama-cpp-python; compose runs the default)."""
    text = "\n".join(podrun.logs(c, 400) for c in containers)
    found = re.findall(r"\(engine (\w+)\)", text)
    if found != [expected]:
        raise AssertionError(f"the LLM service runs {found or 'no engine it names'}, not {expected}:\n{text[-2000:]}")
    return found[0]


def ask_demo(client, samples: Path) -> dict[str, str]:
    from modalink.client import audio, image, imu, video

    build = {"image": image, "audio": audio, "imu": imu, "video": video}
    answers = {}
    for m, (file, question, word) in DEMO.items():
        answer = client.ask([build[m](samples / file), question], max_new_tokens=48)
        log(f"{m}: {question!r} -> {answer!r}")
        if word not in answer.lower():
            raise AssertionError(f"the {m} answer does not say {word!r}: {answer!r}")
        answers[m] = answer
    return answers


def caption_job(client, cluster: podrun.Cluster, samples: Path, claim: str) -> dict:
    """5 items written to the shared volume's jobs folder, captioned by the worker containers."""
    jobs = cluster.workdir / "volumes" / claim / "jobs"
    folder = jobs / "image-test"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for m, (file, _, _) in DEMO.items():
        shutil.copy(samples / file, folder / file)
        rows.append({"id": m, "modality": m, "path": f"image-test/{file}"})
    shutil.copy(samples / "sneaker.png", folder / "sneaker-2.png")
    rows.append({"id": "image-2", "modality": "image", "path": "image-test/sneaker-2.png"})
    job = client.submit_caption_job(manifest_jsonl="".join(json.dumps(r) + "\n" for r in rows), max_new_tokens=16)
    log(f"job {job['job_id']}: {job['total']} items queued")
    deadline = time.monotonic() + 600
    while job["state"] == "running" and time.monotonic() < deadline:
        time.sleep(2)
        job = client.job(job["job_id"])
    if job["state"] != "done" or job["done"] != len(rows) or job["errors"]:
        raise AssertionError(f"the captioning job did not finish cleanly: {job}")
    results = [json.loads(line) for line in (jobs / Path(job["results"]).name).read_text().splitlines()]
    if sorted(r["id"] for r in results) != sorted(r["id"] for r in rows) or not all(r.get("caption") for r in results):
        raise AssertionError(f"results are not one caption per item: {results}")
    for r in results:
        log(f"  caption {r['id']}: {r['caption']!r}")
    return job


def kill_one_encoder(client, cluster: podrun.Cluster, samples: Path) -> str:
    from modalink.client import image

    replicas = pods_named(cluster, "image-encoder")
    if len(replicas) < 2:
        raise AssertionError("the values file must give the image encoder two replicas")
    victim = replicas[0].containers[0]
    podrun.docker("kill", victim)
    log(f"killed {victim}; asking about the image 6 times")
    for i in range(6):
        answer = client.ask([image(samples / "sneaker.png"), "What is shown in this picture?"], max_new_tokens=16)
        if "sneaker" not in answer.lower():
            raise AssertionError(f"after the kill, answer {i} does not say sneaker: {answer!r}")
    return victim


COMPOSE_PROJECT = "mlk-it-compose"


def compose(*args: str, timeout: float = 300) -> str:
    """``docker compose`` (v2) where the plugin is installed, else ``docker-compose`` (v1.29, deploy/engine.sh)."""
    v2 = podrun.docker("compose", "version", check=False).returncode == 0
    cmd = ["docker", "compose"] if v2 else ["docker-compose"]
    if not v2 and not shutil.which("docker-compose"):
        raise RuntimeError("neither `docker compose` nor `docker-compose` is here (bash deploy/engine.sh installs one)")
    r = subprocess.run([*cmd, "-p", COMPOSE_PROJECT, "-f", str(ROOT / "docker-compose.host.yml"), *args],
                       capture_output=True, text=True, timeout=timeout)  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return r.stdout


def compose_test(samples: Path, timeout: float = 600) -> float:
    """docker-compose.host.yml up; seconds until every container with a health check is healthy (and the seed
    service has exited 0); then the demo questions through its gateway."""
    compose("down", "-v")
    t0 = time.monotonic()
    compose("up", "-d", timeout=600)
    while True:
        ids = podrun.docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={COMPOSE_PROJECT}").stdout
        states = {}
        for c in (podrun.inspect_json(i) for i in ids.split()):
            st = c["State"]
            states[c["Name"].lstrip("/")] = st.get("Health", {}).get("Status") or st["Status"] + f"/{st['ExitCode']}"
        if states and all(v in ("healthy", "running/0", "exited/0") for v in states.values()):
            break
        bad = {k: v for k, v in states.items() if v.startswith(("exited", "dead")) and v != "exited/0"}
        if bad or time.monotonic() - t0 > timeout:
            raise RuntimeError(
                f"compose services not healthy: {states}\n"
                + "\n".join(
                    f"--- {k}:\n{podrun.logs(k, 25)}" for k, v in states.items() if v not in ("healthy", "exited/0")
                )
            )
        time.sleep(2)
    healthy = time.monotonic() - t0
    log(f"compose: {len(states)} containers up, health checks passing {healthy:.1f}s after `up -d`")
    from modalink.client import Client

    with Client("127.0.0.1:50051", timeout=300) as client:
        log(f"compose: first answer {first_answer(client, samples):.1f}s after that")
        llm = [k for k in states if re.search(r"[-_]llm[-_]\d+$", k)]
        log(f"compose: the llm service serves with the {llm_engine(llm, 'transformers')} engine (the default)")
        ask_demo(client, samples)
    return healthy


def image_sizes() -> dict[str, str]:
    out = podrun.docker("image", "ls", "--format", "{{.Repository}}:{{.Tag}}\t{{.Size}}").stdout
    return dict(line.split("\t") for line in out.splitlines() if line.startswith("modalink-"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--values", type=Path, default=ROOT / "deploy" / "image-test-values.yaml")
    ap.add_argument("--keep", action="store_true", help="leave the containers running (remove: --down)")
    ap.add_argument("--down", action="store_true", help="only remove the containers of an earlier --keep run")
    ap.add_argument("--timeout", type=float, default=900, help="seconds for every pod to become ready")
    ap.add_argument("--no-compose", action="store_true", help="skip the docker-compose.host.yml stage")
    a = ap.parse_args()

    values = yaml.safe_load(a.values.read_text())
    objects = validate.render(values, name="mlk", namespace="modalink")
    workdir = Path("/tmp/modalink-image-test")
    cluster = podrun.Cluster(objects, workdir, prefix="mlk-it")
    cluster.down()
    if a.down:
        return 0
    for image in {c["image"] for p in cluster.pods for c in p.spec["containers"]}:
        if podrun.docker("image", "inspect", image, check=False).returncode != 0:
            print(f"image-test: image {image} is not on this engine: run `make image` first", file=sys.stderr)
            return 1
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # cleanup below runs on SIGTERM too
    from modalink.client import Client
    from modalink.samples import write_samples

    samples = workdir / "samples"
    write_samples(samples)
    claim = next(o for o in objects if o["kind"] == "PersistentVolumeClaim")["metadata"]["name"]
    ok, failure = False, ""
    try:
        log(f"{len(cluster.pods)} pods from the chart: {', '.join(p.name for p in cluster.pods)}")
        ready = start(cluster, a.timeout)
        gateway = pods_named(cluster, "gateway")[0]
        with Client(f"{gateway.ip}:{values.get('gateway', {}).get('service', {}).get('grpcPort', 50051)}",
                    api_key=API_KEY, timeout=300) as client:  # fmt: skip
            log(f"first answer {first_answer(client, samples):.1f}s after every pod was ready")
            (llm,) = pods_named(cluster, "llm")
            log(f"the LLM pod serves with the {llm_engine(llm.containers, 'llamacpp')} engine (MODALINK_ENGINE=auto)")
            ask_demo(client, samples)
            job = caption_job(client, cluster, samples, claim)
            victim = kill_one_encoder(client, cluster, samples)
        compose_s = None
        if not a.keep and not a.no_compose:
            cluster.down()  # one stack at a time on 2 cores
            compose_s = compose_test(samples)
        ok = True
        print("\nimage-test: passed")
        print(f"  ready after docker run (s): {json.dumps({k: round(v, 1) for k, v in ready.items()})}")
        print(f"  captioning job: {job['done']} items, {job['errors']} errors; killed {victim}, answers went on")
        if compose_s is not None:
            print(f"  docker-compose.host.yml: healthy {compose_s:.1f}s after up -d, the demo questions answered")
        print(f"  images: {json.dumps(image_sizes())}")
    except KeyboardInterrupt:
        print("image-test: interrupted", file=sys.stderr)
    except Exception as e:  # noqa: BLE001  (the report, then the cleanup)
        failure = f"image-test: FAILED: {type(e).__name__}: {e}"
        print(failure, file=sys.stderr)
        for name in (n for p in cluster.pods for n in p.containers):
            print(f"--- the last lines of {name}'s log:\n{podrun.logs(name, 25)}", file=sys.stderr)
    finally:
        if a.keep:
            log(f"--keep: containers left running (python deploy/image_test.py --down removes them); {workdir}")
        else:
            cluster.down()
            if not a.no_compose:
                try:
                    compose("down", "-v")
                except RuntimeError as e:
                    print(f"image-test: {e}", file=sys.stderr)
            shutil.rmtree(workdir, ignore_errors=True)
            log("removed every container it started")
        if failure:  # again, last: the containers' logs above push it out of a CI log's tail
            print(failure, file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
