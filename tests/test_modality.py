"""Modalities as plugins (``modalink.modality``): the contract, and plugins refused when they break it.

Each case installs a plugin the way a package does (a ``*.dist-info`` with an ``entry_points.txt`` on the path)
and runs a fresh interpreter, so the registry is discovered as in production and nothing leaks between cases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from modalink import MODALITIES
from modalink.modality import BUILTIN, Modality, PluginError, get, ports, registry

ENCODER = """
import torch
from modalink.encoders.base import Encoder
from modalink.errors import InputError

class Meter(Encoder):
    modality = "meter"
    name = "meter-mean"
    feature_dim = 4

    def decode(self, data):
        arr = torch.as_tensor(data, dtype=torch.float32)
        if arr.ndim != 2:
            raise InputError("meter input must be [channels, time]")
        return arr

    def encode(self, inputs):
        return [{encode} for x in inputs]
"""

SPEC = """
from modalink.modality import Modality
MODALITY = Modality(name="{name}", load_encoder=lambda s: Meter(), questions=("What does the meter show?",),
                    answers=("The meter shows {{label}}.",), words=("high", "low"), input="tensor",
                    file_types=(".npy",), projector={{"kind": "linear", "n_tokens": 2}})
"""


def install(site: Path, dist: str, entry_points: dict[str, str], module: str | None = None, source: str = "") -> None:
    """A package as pip leaves it: its module and a dist-info naming its entry points."""
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[modalink.modalities]\n{lines}")
    if module:
        (site / f"{module}.py").write_text(textwrap.dedent(source))


def run(site: Path, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=120, cwd=site)  # fmt: skip


def meter(encode: str = "x.mean().expand(3, 4).contiguous()", name: str = "meter") -> str:
    return ENCODER.format(encode=encode) + SPEC.format(name=name)


def test_builtins_are_registered_as_plugins():
    """The built-ins come first, in their order and on their ports, then the installed plugins (power)."""
    assert MODALITIES[:4] == BUILTIN and MODALITIES == tuple(registry())
    assert list(ports().items())[:4] == [("image", 8000), ("audio", 8010), ("imu", 8020), ("video", 8030)]
    assert all(isinstance(get(m), Modality) for m in BUILTIN)
    assert get("imu").input == "tensor" and get("image").input == "file"


def test_a_plugin_is_found_and_everything_reads_it(tmp_path):
    """A valid plugin: registered after the built-ins with the next free port, its captions and questions come from
    its spec, a generic Media part carries its tensor, and its encoder's features pass the contract check."""
    install(tmp_path, "meter_plugin", {"meter": "meter_mod:MODALITY"}, "meter_mod", meter())
    out = run(
        tmp_path,
        """
        import json, random
        import numpy as np
        from modalink import MODALITIES, check_modality, data
        from modalink.modality import get, ports
        from modalink.encoders import load_encoder
        from modalink.wire import part_input
        from modalink_client import media, to_tensor_msg
        check_modality("meter")
        enc = load_encoder("meter")
        x = np.ones((2, 10), np.float32)
        feats = get("meter").check_features(enc, enc.encode([enc.decode(x)]))
        name, raw = part_input(media("meter", x))
        print(json.dumps({"names": MODALITIES, "ports": ports(), "q": data.default_question("meter"),
                          "caption": data.caption("meter", "high", random.Random(0)), "part": name,
                          "shape": list(raw.shape), "feats": list(feats[0].shape)}))
    """,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    plugins = sorted({*MODALITIES[len(BUILTIN) :], "meter"})  # the installed ones (power) and this one, by name
    assert got["names"] == [*BUILTIN, *plugins] and got["ports"]["meter"] == 8040 + 10 * plugins.index("meter")
    assert got["q"] == "What does the meter show?" and got["caption"] == "The meter shows high."
    assert got["part"] == "meter" and got["shape"] == [2, 10] and got["feats"] == [3, 4]


@pytest.mark.parametrize(
    ("entry_points", "source", "message"),
    [
        ({"Bad-Name": "meter_mod:MODALITY"}, meter(), "must be a lower-case identifier"),
        ({"image": "meter_mod:MODALITY"}, meter(), "'image' is registered twice"),
        ({"meter": "meter_mod:MODALITY"}, "MODALITY = {'name': 'meter'}\n", "is a dict, not a modalink.modality"),
        ({"meter": "meter_mod:MODALITY"}, meter(name="other"), "registered as 'meter' names itself 'other'"),
        ({"meter": "meter_mod:MODALITY"}, "import no_such_module\n", "failed to import: No module named"),
        (
            {"meter": "meter_mod:MODALITY"},
            meter().replace('answers=("The meter shows {label}.",)', 'answers=("x",)'),
            "every answer template must contain {label}",
        ),
    ],
    ids=["unsafe-name", "duplicate", "not-a-spec", "wrong-name", "import-error", "bad-template"],
)
def test_a_plugin_that_breaks_the_contract_is_refused_at_start(tmp_path, entry_points, source, message):
    install(tmp_path, "bad_plugin", entry_points, "meter_mod", source)
    out = run(tmp_path, "from modalink.modality import registry; registry()")
    assert out.returncode != 0 and "PluginError" in out.stderr and message in out.stderr, out.stderr[-2000:]


def test_features_of_the_wrong_shape_are_refused(tmp_path):
    """An encoder that returns [d] (not [n, d]) per item is refused with a message naming the plugin and the shape,
    where every embedding is made (``Embedder.embed``: in process, in the encoder service, in the workers)."""
    install(tmp_path, "meter_plugin", {"meter": "meter_mod:MODALITY"}, "meter_mod", meter(encode="x.mean(0)"))
    out = run(
        tmp_path,
        """
        import numpy as np
        from modalink.embedder import Embedder
        Embedder().embed("meter", [np.ones((2, 4), np.float32)])
    """,
    )
    assert out.returncode != 0 and "PluginError" in out.stderr, out.stderr[-2000:]
    assert "modality plugin 'meter': its encoder returned features of shape (4,)" in out.stderr


def test_unknown_names_are_input_errors():
    from modalink.errors import InputError
    from modalink.v1 import common_pb2
    from modalink.wire import part_input

    with pytest.raises(InputError, match="unknown modality 'radar'"):
        part_input(common_pb2.Part(media=common_pb2.Media(modality="radar", data=b"x")))
    with pytest.raises(InputError, match="is a tensor: set media.tensor"):
        part_input(common_pb2.Part(media=common_pb2.Media(modality="imu", data=b"x")))
    with pytest.raises(InputError, match="is an encoded file: set media.data"):
        part_input(common_pb2.Part(media=common_pb2.Media(modality="image")))
    from modalink_client import media

    name, raw = part_input(media("imu", np.ones((6, 20), np.float32)))
    assert name == "imu" and raw.shape == (6, 20)
    with pytest.raises(PluginError):
        Modality(name="Bad", load_encoder=print, questions=("q",), answers=("{label}",), words=("w",)).validate()


def test_no_service_library_or_chart_code_names_a_plugin_modality():
    """What makes a modality a plugin: no service, gateway, worker, library or chart template code names it.
    Python is read as code (identifiers and string constants, not comments or docstrings, where an example may
    name one); the chart's templates and compose's services as text."""
    import ast

    root = Path(__file__).resolve().parents[1]
    plugins = set(MODALITIES) - set(BUILTIN)
    assert plugins, "no plugin installed (make install installs plugins/*/)"
    found = []
    for path in [*(root / "services").rglob("*.py"), *(root / "shared" / "modalink").rglob("*.py")]:
        tree = ast.parse(path.read_text(), str(path))
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
                      and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}  # fmt: skip
        for node in ast.walk(tree):
            words = ()
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                words = (node.value,)
            elif isinstance(node, (ast.Name, ast.Attribute, ast.arg, ast.keyword)):
                words = (getattr(node, "id", None) or getattr(node, "attr", None) or getattr(node, "arg", None),)
            found += [f"{path.relative_to(root)}:{node.lineno}: {w!r}" for w in words if w in plugins]
    templates = [*(root / "charts" / "modalink" / "templates").iterdir()]
    for path in templates:
        found += [f"{path.relative_to(root)}: {p}" for p in plugins if p in path.read_text().lower()]
    compose = yaml_services(root / "docker-compose.yml")
    found += [f"docker-compose.yml: service {s}" for s in compose if any(p in s for p in plugins)]
    assert found == []


def yaml_services(path: Path) -> list[str]:
    import yaml

    return list(yaml.safe_load(path.read_text())["services"])
