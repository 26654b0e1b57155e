"""Build hook of modalink-client: the gRPC stubs are generated from the protos at build time (never committed).

Everything else is declared in pyproject.toml. ``build_py`` runs for wheels and editable installs alike, so
``pip install ./clients/python`` and ``pip install -e ./clients/python`` both produce working stubs; an sdist
carries the protos themselves.
"""

import re
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_stubs  # noqa: E402


def _floor(requirements, name: str) -> tuple[int, ...]:
    for r in requirements:
        if re.match(rf"{name}\b", r) and (m := re.search(r">=\s*([\d.]+)", r)):
            return tuple(int(x) for x in m.group(1).split("."))
    raise RuntimeError(f"pyproject.toml declares no {name}>= requirement")


class BuildPyWithStubs(build_py):
    def run(self):
        needs = build_stubs.generate()
        # The generated code refuses an older runtime than it was made for (protobuf's gencode check, grpc's
        # GRPC_GENERATED_VERSION): the declared floors must cover it, or installs would fail at import time.
        for name, version in needs.items():
            if tuple(int(x) for x in version.split(".")) > _floor(self.distribution.install_requires, name):
                raise RuntimeError(f"the stubs need {name}>={version}: raise the floor in pyproject.toml, or pin "
                                   "an older grpcio-tools in [build-system] requires")  # fmt: skip
        super().run()


class SdistWithProtos(sdist):
    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        root = build_stubs.proto_root()
        for p in build_stubs.PROTOS:
            (Path(base_dir) / "protos" / p).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / p, Path(base_dir) / "protos" / p)


setup(cmdclass={"build_py": BuildPyWithStubs, "sdist": SdistWithProtos})
