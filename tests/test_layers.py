"""The layers, enforced: core <- serving <- services. Every import in the code (a function's lazy ones too, they are
dependencies all the same) is read from the source, as ``test_no_unsafe_loading`` reads calls:

- the core library (encoders, projectors, prompt, engines, registry, training, evaluation, the turn pipeline) never
  imports a serving library (grpc, fastapi, celery, Redis, Triton clients) nor the serving layer nor a service;
- the serving layer (wire formats, rpc helpers, auth, metrics, batching, the remote encoder pool, the job store)
  never imports a service;
- no service imports another one;
- no two modules of modalink import each other, directly or through others.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "shared" / "modalink"

SERVING = {"modalink.wire", "modalink.rpc", "modalink.auth", "modalink.metrics", "modalink.batching",
           "modalink.remote", "modalink.jobs", "modalink.queueing", "modalink.triton", "modalink.aio",
           "modalink.client", "modalink.embed_cache"}  # fmt: skip
APP = {"modalink.cli", "modalink.up"}  # the command line: starts services, so it sits on top of them
# the services' installed name, and their folder's own name, which nothing may import by
SERVICES = ("modalink_services", "services")
SERVING_LIBRARIES = ("grpc", "grpc_health", "grpc_reflection", "fastapi", "starlette", "uvicorn", "celery", "kombu",
                     "redis", "tritonclient", "pytriton", "modalink.v1")  # fmt: skip


def module_name(path: Path) -> str:
    """The name it is imported by: ``modalink.x`` from shared/, ``modalink_services.x`` from services/."""
    root = REPO / "shared" if path.is_relative_to(PACKAGE) else REPO
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[0] == "services":
        parts[0] = "modalink_services"
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    files = [*PACKAGE.rglob("*.py"), *(REPO / "services").rglob("*.py")]
    return {module_name(p): p for p in files if "v1" not in p.relative_to(REPO).parts[:3]}


def imports(path: Path, name: str) -> set[str]:
    """Every module ``path`` imports, absolute names (``from x import y`` counts x, and x.y when y is a module)."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = sources()
    return {name: imports(path, name) for name, path in mods.items()}


def layer(module: str) -> str:
    if within(module, SERVICES):
        return "services"
    if module in APP:
        return "app"
    if module in SERVING:
        return "serving"
    return "core"


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_graph_is_read(graph):
    """The walk sees what it should (a broken walk would pass every rule below)."""
    assert {"modalink.pipeline", "modalink.remote", "modalink_services.gateway.server"} <= set(graph)
    assert "modalink.pipeline" in graph["modalink.remote"]
    assert "grpc" in graph["modalink.rpc"]


def test_core_imports_no_serving_library_nor_layer_above(graph):
    wrong = {
        m: sorted(i for i in deps if within(i, SERVING_LIBRARIES) or layer(i) in ("serving", "app", "services")
                  and (i.startswith("modalink") or within(i, SERVICES)))
        for m, deps in graph.items() if layer(m) == "core"
    }  # fmt: skip
    assert not {m: d for m, d in wrong.items() if d}, wrong


def test_serving_imports_no_service(graph):
    wrong = {m: sorted(i for i in deps if within(i, SERVICES)) for m, deps in graph.items()
             if layer(m) == "serving"}  # fmt: skip
    assert not {m: d for m, d in wrong.items() if d}


def test_no_service_imports_another(graph):
    def service(name: str) -> str:
        return ".".join(name.split(".")[:2])

    wrong = {m: sorted(i for i in deps if within(i, SERVICES) and service(i) not in (service(m), "modalink_services"))
             for m, deps in graph.items() if layer(m) == "services"}  # fmt: skip
    assert not {m: d for m, d in wrong.items() if d}, wrong


def test_no_import_cycles(graph):
    known = set(graph)
    edges = {m: {i for i in deps if i in known and i != m} for m, deps in graph.items()}
    for m in edges:  # a package's __init__ importing its own submodules is how packages are built
        edges[m] = {i for i in edges[m] if not i.startswith(m + ".")}
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_nothing_imports_the_folder_name_services(graph):
    """The services are installed as ``modalink_services``: an import of ``services`` would only work from the
    repository's root, and would load a second copy of a module that is also imported by its real name."""
    wrong = {m: sorted(i for i in deps if within(i, ["services"])) for m, deps in graph.items()}
    assert not {m: d for m, d in wrong.items() if d}


def test_every_package_is_installed():
    """pyproject.toml lists the packages (the services' folder is mapped to ``modalink_services``): a new
    subpackage that is not listed would be missing from an installed (non-editable) modalink."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    inits = [*PACKAGE.rglob("__init__.py"), *(REPO / "services").rglob("__init__.py")]
    assert listed == {module_name(p) for p in inits}
