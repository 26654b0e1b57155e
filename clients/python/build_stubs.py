"""Generate the client's gRPC stubs into ``modalink_client/v1/`` from the gateway's protos.

protoc writes imports from the proto path (``from modalink.v1 import common_pb2``), which would reach for the
main ``modalink`` package; they are rewritten to ``modalink_client.v1``. The proto file names stay
``modalink/v1/*.proto``, so the descriptors registered in protobuf's default pool are byte-for-byte those of
the main package's stubs (``make stubs``): a process may import both, and they share the message classes.

Run by the build (``setup.py``) and by ``make stubs`` (``python clients/python/build_stubs.py``).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = ("modalink/v1/common.proto", "modalink/v1/assistant.proto")  # the gateway's contract (not llm.proto)
OUT = HERE / "modalink_client" / "v1"
IMPORT = re.compile(r"^from modalink\.v1 import ", re.MULTILINE)


def proto_root() -> Path:
    """``protos/`` next to this file (an sdist), or the repository's (``clients/python/../../protos``)."""
    for root in (HERE / "protos", HERE.parent.parent / "protos"):
        if all((root / p).is_file() for p in PROTOS):
            return root
    raise FileNotFoundError(f"{', '.join(PROTOS)} not found under {HERE / 'protos'} or {HERE.parent.parent / 'protos'}")


def generate(out: Path = OUT) -> dict[str, str]:
    """Write ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` into ``out`` (each file replaced atomically, so a
    process importing them meanwhile never sees half a file); returns the versions the code needs at run time:
    {"protobuf": gencode version, "grpcio": GRPC_GENERATED_VERSION}."""
    from grpc_tools import protoc  # a build requirement (pyproject.toml), or the main venv's for `make stubs`

    root = proto_root()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{root}", f"-I{Path(protoc.__file__).parent / '_proto'}", f"--python_out={tmp}",
                f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *(str(root / p) for p in PROTOS)]  # fmt: skip
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {', '.join(PROTOS)} (from {root})")
        versions = {}
        for src in sorted((Path(tmp) / "modalink" / "v1").glob("*_pb2*")):
            text = IMPORT.sub("from modalink_client.v1 import ", src.read_text())
            if m := re.search(r"^# Protobuf Python Version: (\S+)", text, re.MULTILINE):
                versions["protobuf"] = m.group(1)
            if m := re.search(r"^GRPC_GENERATED_VERSION = '(\S+)'", text, re.MULTILINE):
                versions["grpcio"] = m.group(1)
            dest = out / src.name
            if dest.is_file() and dest.read_text() == text:
                continue
            fd, part = tempfile.mkstemp(dir=out, prefix=f".{src.name}.")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(part, 0o644)
            os.replace(part, dest)
    return versions


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    print(f"modalink_client stubs in {out} (needs {generate(out)})")
