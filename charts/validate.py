"""Offline validation of the deployment files (no cluster, no Docker engine here):

- the Helm chart, rendered with Helm's own engine (``helm-python-sdk`` embeds Helm; no binary), linted, and every
  rendered object checked against the Kubernetes 1.30 and 1.33 OpenAPI schemas in strict mode
  (``kubernetes-validate``: unknown fields fail), including the fine-tune Job template the chart ships;
- ``docker-compose.yml`` and ``docker-compose.host.yml`` against the Compose specification's JSON schema
  (vendored by ``check-jsonschema``).

    python charts/validate.py            # what `make chart` runs
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "modalink"
KUBE_VERSIONS = ("1.30", "1.33")
VALUES_FILES = (None, CHART / "values-production-gpu.yaml")


def render(values: dict | None = None, name: str = "modalink", namespace: str = "modalink") -> list[dict]:
    """Every object the chart renders for ``values`` (merged over values.yaml; schema-checked by Helm)."""
    import helm_python as helm

    chart = helm.Chart.load(str(CHART))
    out = chart.render(values or {}, name=name, namespace=namespace)
    return [doc for path, text in sorted(out.items()) if path.endswith((".yaml", ".yml"))
            for doc in yaml.safe_load_all(text) if doc]  # fmt: skip


def finetune_job(objects: list[dict]) -> dict:
    """The Job template the chart ships (as the worker loads it), with a name as ``job_manifest`` gives one."""
    cm = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-finetune-job"))
    job = yaml.safe_load(cm["data"]["finetune-job.yaml"])
    job["metadata"]["name"] = "modalink-finetune-image-0"
    return job


def validate_objects(objects: list[dict]) -> list[str]:
    """Problems (empty = valid) of each object under each Kubernetes version, strict."""
    import kubernetes_validate

    problems = []
    for obj in [*objects, finetune_job(objects)]:
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                problems.append(f"{obj['kind']}/{obj['metadata'].get('name')} on {version}: {e.message}")
    return problems


def lint(values: dict | None = None) -> list[str]:
    """``helm lint --strict`` findings at warning level and above."""
    import helm_python as helm

    report = helm.lint(str(CHART), values, strict=True, kube_version="v1.30.0")
    return [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2] + report["errors"]


COMPOSE_FILES = (ROOT / "docker-compose.yml", ROOT / "docker-compose.host.yml")  # the second: host networking


def compose_problems(path: Path = ROOT / "docker-compose.yml") -> list[str]:
    import importlib.resources

    import jsonschema

    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    validator = jsonschema.Draft202012Validator(json.loads(schema_file.read_text()))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(load_compose(path))]


def load_compose(path: Path = ROOT / "docker-compose.yml") -> dict:
    return yaml.safe_load(Path(path).read_text())


def main() -> int:
    failed = False
    for values_file in VALUES_FILES:
        values = yaml.safe_load(values_file.read_text()) if values_file else None
        label = values_file.name if values_file else "values.yaml"
        objects = render(values)
        problems = lint(values) + validate_objects(objects)
        kinds = sorted({o["kind"] for o in objects})
        verdict = "ok" if not problems else f"{len(problems)} problems"
        print(f"chart with {label}: {len(objects)} objects ({', '.join(kinds)}), Kubernetes "
              f"{' and '.join(KUBE_VERSIONS)} strict: {verdict}")  # fmt: skip
        for p in problems:
            print("  " + p)
        failed |= bool(problems)
    for compose_file in COMPOSE_FILES:
        problems = compose_problems(compose_file)
        print(f"{compose_file.name} against the Compose specification: {'ok' if not problems else 'invalid'}")
        for p in problems:
            print("  " + p)
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
