"""No code path deserializes with pickle (or anything that runs code while loading): weights are safetensors,
arrays are loaded with ``allow_pickle=False``, YAML with the safe loader, Celery messages are JSON.

An AST walk over every .py file under shared/, services/, bench/ and clients/ (not a regex, so comments, strings and
aliases are told apart from calls); each finding names file:line. The checker is tested on code that must be
caught, so this test can fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from modalink.config import REPO_ROOT

SCANNED = ("shared", "services", "bench", "clients")
# Modules whose loading runs code from the data: never imported.
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "jsonpickle"}
# Calls that unpickle (or import code) whatever their arguments: "module.function" after resolving imports.
UNSAFE_CALLS = {"torch.jit.load", "pandas.read_pickle", "yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all",
                "yaml.full_load_all", "numpy.lib.format.read_array"}  # fmt: skip
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}
# (file, finding) -> why it is safe. Only a torch.load with weights_only=True (PyTorch's restricted unpickler:
# tensors and plain containers, no code) can be allowed; a torch.load without it never is.
ALLOWED: dict[tuple[str, str], str] = {
    ("shared/modalink/encoders/image.py", "torch.load(weights_only=True)"):
        "converts, once, the EfficientNet-Lite0 .pth shipped inside a pinned pip package (not user data) to "
        "safetensors; everything else then loads the safetensors copy",
}  # fmt: skip


def _falsy_constant(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and not node.value


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


class Checker(ast.NodeVisitor):
    """Findings ``(line, what)`` in one module; names bound by ``import x as y`` / ``from x import y`` resolve."""

    def __init__(self) -> None:
        self.aliases: dict[str, str] = {}
        self.findings: list[tuple[int, str]] = []

    def _flag(self, node: ast.AST, what: str) -> None:
        self.findings.append((node.lineno, what))

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self.aliases[(a.asname or a.name).split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            if a.name.split(".")[0] in UNSAFE_MODULES:
                self._flag(node, f"import {a.name}")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if module.split(".")[0] in UNSAFE_MODULES:
            self._flag(node, f"from {module} import ...")
        for a in node.names:
            self.aliases[a.asname or a.name] = f"{module}.{a.name}"

    def _dotted(self, node: ast.AST) -> str | None:
        """``np.load`` -> ``numpy.load`` (through the module's imports); None for anything not a dotted name."""
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        parts.append(self.aliases.get(node.id, node.id))
        return ".".join(reversed(parts))

    def visit_Call(self, node: ast.Call) -> None:
        name = self._dotted(node.func) or ""
        if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
            self._flag(node, f"{name}()")
        elif name == "torch.load":
            weights_only = _keyword(node, "weights_only")
            safe = isinstance(weights_only, ast.Constant) and weights_only.value is True
            self._flag(node, "torch.load(weights_only=True)" if safe else "torch.load() without weights_only=True")
        elif name in UNSAFE_CALLS or name.split(".")[0] in UNSAFE_MODULES:
            self._flag(node, f"{name}()")
        elif name == "numpy.load" and not _falsy_constant(_keyword(node, "allow_pickle") or ast.Constant(False)):
            self._flag(node, "numpy.load(allow_pickle=...) other than False")
        elif name in ("yaml.load", "yaml.load_all"):
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if (self._dotted(loader) or "").rsplit(".", 1)[-1] not in SAFE_YAML_LOADERS:
                self._flag(node, f"{name}() without a safe Loader")
        remote_code, safetensors = _keyword(node, "trust_remote_code"), _keyword(node, "use_safetensors")
        if remote_code is not None and not _falsy_constant(remote_code):  # code from a model repo, run on load
            self._flag(node, f"{name}(trust_remote_code=...) other than False")
        if safetensors is not None and _falsy_constant(safetensors):
            self._flag(node, f"{name}(use_safetensors=False)")
        self.generic_visit(node)


def check_source(source: str, filename: str = "<string>") -> list[tuple[int, str]]:
    checker = Checker()
    checker.visit(ast.parse(source, filename))
    return sorted(checker.findings)


def scan(root: Path = REPO_ROOT) -> list[str]:
    """``file:line: what`` for every finding outside ALLOWED."""
    found = []
    for folder in SCANNED:
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root)
            if "v1" in rel.parts[:4] and rel.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue  # generated gRPC stubs
            for line, what in check_source(path.read_text(), str(rel)):
                if (str(rel), what) not in ALLOWED:
                    found.append(f"{rel}:{line}: {what}")
    return found


def test_no_unsafe_deserialization_in_the_code():
    found = scan()
    assert not found, "unsafe loading (use safetensors / json / allow_pickle=False / yaml.safe_load):\n" + "\n".join(
        found
    )


@pytest.mark.parametrize(
    "source, what",
    [
        ("import torch\nw = torch.load(path)", "torch.load() without weights_only=True"),
        ("from torch import load\nw = load(path, weights_only=False)", "torch.load() without weights_only=True"),
        ("import torch as t\nw = t.load(path, weights_only=True)", "torch.load(weights_only=True)"),
        ("import pickle\nx = pickle.loads(b)", "import pickle"),
        ("from pickle import loads", "from pickle import ..."),
        ("import cloudpickle", "import cloudpickle"),
        ("import dill", "import dill"),
        ("import joblib\nm = joblib.load(p)", "import joblib"),
        ("import numpy as np\na = np.load(p, allow_pickle=True)", "numpy.load(allow_pickle=...) other than False"),
        ("import numpy\na = numpy.load(p, allow_pickle=flag)", "numpy.load(allow_pickle=...) other than False"),
        ("import yaml\nd = yaml.load(text)", "yaml.load() without a safe Loader"),
        ("import yaml\nd = yaml.load(text, Loader=yaml.Loader)", "yaml.load() without a safe Loader"),
        ("import yaml\nd = yaml.unsafe_load(text)", "yaml.unsafe_load()"),
        ("x = eval(line)", "eval()"),
        ("exec(code)", "exec()"),
        ("import pandas as pd\ndf = pd.read_pickle(p)", "pandas.read_pickle()"),
        ("m = AutoModel.from_pretrained(p, trust_remote_code=True)", "trust_remote_code"),
        ("m = AutoModel.from_pretrained(p, use_safetensors=False)", "use_safetensors=False"),
    ],
)
def test_the_checker_catches_unsafe_loading(source, what):
    found = check_source(source)
    assert found and any(what in w for _, w in found), found


def test_the_checker_passes_safe_loading():
    safe = """
import numpy as np, yaml, json
from safetensors.torch import load_file
a = np.load(p)
b = np.load(p, allow_pickle=False)
c = yaml.safe_load(text)
d = yaml.load(text, Loader=yaml.SafeLoader)
e = json.loads(s)
f = load_file(p)
g = model.eval()  # a method called eval, not the builtin
m = AutoModel.from_pretrained(p, trust_remote_code=False)
"""
    assert check_source(safe) == []


def test_the_scan_reports_file_and_line(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "bad.py").write_text("import torch\n\n\nw = torch.load('x.pt')\n")
    assert scan(tmp_path) == ["shared/bad.py:4: torch.load() without weights_only=True"]
    # An allowed (file, finding) pair is that file's only: the same call elsewhere is reported.
    allowed = tmp_path / "shared" / "modalink" / "encoders" / "image.py"
    allowed.parent.mkdir(parents=True)
    for path in (allowed, tmp_path / "shared" / "other.py"):
        path.write_text("import torch\ntorch.load(p, weights_only=True)\n")
    assert scan(tmp_path) == ["shared/bad.py:4: torch.load() without weights_only=True",
                              "shared/other.py:2: torch.load(weights_only=True)"]  # fmt: skip


def test_celery_messages_are_json_only():
    """A Celery message is data from Redis: pickle there would run code on the workers."""
    from modalink_services.worker.app import create_app

    conf = create_app().conf
    assert conf.task_serializer == "json" and conf.result_serializer == "json" and conf.event_serializer == "json"
    assert list(conf.accept_content) == ["json"]
    assert conf.result_accept_content is None or list(conf.result_accept_content) == ["json"]
