"""The gateway's Python client as its own distribution (``clients/python``, ``modalink-client``): it installs into a
fresh venv without torch (grpcio, protobuf and numpy only), and from there gets the answers ``modalink.client``
gets; its stubs and the main package's coexist in one process and share their message classes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from procs import Procs, free_port, wait_grpc, wait_triton

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What is shown in this picture?"


def main_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("first", ["client", "main"])
def test_both_stubs_load_in_either_order_and_share_message_classes(first):
    imports = {
        "client": "from modalink_client.v1 import assistant_pb2 as ca, assistant_pb2_grpc, common_pb2 as cc",
        "main": "from modalink.v1 import assistant_pb2 as ma, assistant_pb2_grpc as mg, common_pb2 as mc",
    }
    order = [imports[first], imports["main" if first == "client" else "client"]]
    out = main_python("\n".join([*order, textwrap.dedent("""
        assert mc.Part is cc.Part and ma.GenerateRequest is ca.GenerateRequest and mc.DESCRIPTOR is cc.DESCRIPTOR
        from modalink import client
        from modalink.engine import GenerationParams
        from modalink_client.client import _request
        # a Part of the main package's stubs goes where the client expects parts, and params as before
        request = _request([mc.Part(text="hi"), client.image(b"png")], GenerationParams(max_new_tokens=7, seed=3),
                           history=[("user", "a", [mc.Part(text="x")]), ("assistant", "b")])
        assert isinstance(request, ma.GenerateRequest) and request.parts[0].text == "hi"
        assert request.params == mc.GenerationParams(max_new_tokens=7, top_p=1, repetition_penalty=1, seed=3)
        assert _request("hi", max_new_tokens=7, seed=3).params == request.params
        print("ok")
    """)]))  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_modalink_client_is_the_client_package():
    import modalink_client

    from modalink import client, rpc

    for name in ("Client", "AsyncClient", "image", "audio", "imu", "video", "job_dict", "adapters_dict", "Embedding",
                 "Turns", "PartLike"):  # fmt: skip
        assert getattr(client, name) is getattr(modalink_client, name), name
    assert rpc.CHANNEL_OPTIONS is modalink_client.CHANNEL_OPTIONS  # written once, in the client


def test_services_take_the_channel_options_without_the_client_stubs():
    """``modalink.rpc`` imports ``modalink_client.options`` only: the services register just their own stubs."""
    out = main_python("import sys, modalink.rpc; print([m for m in sys.modules if m.startswith('modalink_client.')])")
    assert out.returncode == 0 and out.stdout.strip() == "['modalink_client.options']", out.stdout + out.stderr


def test_the_playground_is_a_client_like_any_other():
    """``services/playground`` talks to the gateway through ``modalink_client`` only: besides it, fastapi, numpy,
    uvicorn and the standard library, it imports nothing (none of modalink, no grpc of its own)."""
    import ast

    tree = ast.parse((REPO / "services" / "playground" / "server.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    outside = {n.split(".")[0] for n in names} - set(sys.stdlib_module_names)
    assert outside == {"modalink_client", "fastapi", "numpy", "uvicorn"}, outside
    out = main_python(textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("playground", "{REPO / 'services' / 'playground' / 'server.py'}")
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        print(sorted({{m.split('.')[0] for m in sys.modules}}))
    """))  # fmt: skip
    assert out.returncode == 0 and "'modalink'" not in out.stdout and "'torch'" not in out.stdout, out.stdout


def test_health_and_imu_windows_as_the_gateway_reads_them():
    """``Client.health`` speaks grpc.health.v1 without its stubs; ``imu_array`` is the IMU encoder's own reader."""
    from concurrent import futures

    import grpc
    import numpy as np
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from modalink_client import Client, imu_array

    from modalink.encoders.imu import decode_imu
    from modalink.errors import InputError

    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}") as c:
            for status in ("SERVING", "NOT_SERVING"):
                servicer.set("", health_pb2.HealthCheckResponse.ServingStatus.Value(status))
                assert c.health() == status
    finally:
        server.stop(0)
    with Client(f"127.0.0.1:{free_port()}") as c:
        assert c.health(timeout=1) == "UNREACHABLE"
    window = np.arange(6 * 20, dtype=np.float32).reshape(20, 6)  # time-major, as CSV files keep it
    csv = "\n".join(",".join(map(str, row)) for row in window).encode()
    np.testing.assert_array_equal(imu_array(csv), window.T)
    np.testing.assert_array_equal(decode_imu(csv).numpy(), window.T)
    with pytest.raises(ValueError, match="must have 6 channels") as refused:
        imu_array(np.zeros((4, 100), np.float32))
    assert not isinstance(refused.value, InputError)  # the client's own error; the encoder's is an InputError
    with pytest.raises(InputError, match="must have 6 channels"):
        decode_imu(np.zeros((4, 100), np.float32))


def _copy_client_source(dest: Path) -> Path:
    """clients/python and protos/ as a checkout has them (nothing built or generated), so the build runs here and
    leaves the repository's tree (and the main venv's editable client) alone."""
    skip = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", "*_pb2*")
    shutil.copytree(REPO / "clients" / "python", dest / "clients" / "python", ignore=skip)
    shutil.copytree(REPO / "protos", dest / "protos")
    return dest / "clients" / "python"


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory):
    """A fresh venv with only ``pip install clients/python`` in it, made while the services start (it is a Popen)."""
    root = tmp_path_factory.mktemp("client-venv")
    src = _copy_client_source(root / "src")
    venv = root / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"))}
    base = shutil.which("python3.11") or sys._base_executable  # a system Python, not this venv's
    script = f"{base} -m venv {venv} && {venv}/bin/pip install -q --disable-pip-version-check {src}"
    proc = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=root, env=env)  # fmt: skip

    def ready() -> tuple[Path, dict]:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
        return venv / "bin" / "python", env

    yield ready
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, client_venv):
    """An image encoder (Triton), the LLM service and a gateway on free ports."""
    logs = tmp_path_factory.mktemp("logs")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MODALINK_NUM_THREADS": "1", "MODALINK_QUANTIZE": "fp16-cpu"}
    procs = Procs(logs, env)
    modalink = [sys.executable, "-m", "modalink.cli"]
    try:
        http, grpc_port, metrics = free_port(), free_port(), free_port()
        encoder = procs.start("image", [*modalink, "serve", "encoder", "-m", "image", "--http-port", str(http),
                                        "--grpc-port", str(grpc_port), "--metrics-port", str(metrics)])  # fmt: skip
        llm_port, gw_port = free_port(), free_port()
        llm = procs.start("llm", [*modalink, "serve", "llm", "--port", str(llm_port), "--http-port",
                                  str(free_port()), "--max-wait-ms", "50"])  # fmt: skip
        gateway = procs.start("gateway", [*modalink, "serve", "gateway", "--port", str(gw_port), "--http-port",
                                          str(free_port())],
                              {"MODALINK_ENCODERS": f"image=127.0.0.1:{grpc_port}",
                               "MODALINK_LLM_ADDRESS": f"127.0.0.1:{llm_port}"})  # fmt: skip
        wait_triton(http, "image_encoder", *encoder)
        wait_grpc(f"127.0.0.1:{llm_port}", *llm)
        wait_grpc(f"127.0.0.1:{gw_port}", *gateway)
        yield f"127.0.0.1:{gw_port}"
    finally:
        procs.stop_all()


@pytest.mark.slow
def test_client_package_installs_without_torch_and_answers_as_modalink_client(client_venv, stack, samples, tmp_path):
    python, env = client_venv()

    def run(code: str, *args: str) -> subprocess.CompletedProcess:  # in the client's venv, outside the repository
        return subprocess.run([str(python), "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path, env=env)  # fmt: skip

    found = run("""
        import importlib.metadata as md, importlib.util as u, json
        import modalink_client
        print(json.dumps({"requires": md.requires("modalink-client"), "file": modalink_client.__file__,
                          "missing": [m for m in ("torch", "transformers", "modalink", "pydantic", "grpc_tools")
                                      if u.find_spec(m) is None]}))
    """)
    assert found.returncode == 0, found.stderr
    info = json.loads(found.stdout)
    names = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in info["requires"]}
    assert names == {"grpcio", "protobuf", "numpy"}, info
    assert info["missing"] == ["torch", "transformers", "modalink", "pydantic", "grpc_tools"], info
    assert Path(info["file"]).is_relative_to(python.parents[1]), info  # the installed copy, not the checkout's

    asked = run("""
        import json, sys
        from modalink_client import Client, image
        with Client(sys.argv[1]) as c:
            text = c.ask([sys.argv[3], image(sys.argv[2])], max_new_tokens=16)
            emb = c.embed(image(sys.argv[2]))
            print(json.dumps({"text": text, "versions": c.versions, "emb": list(emb.embeddings.shape)}))
    """, stack, samples["image"], QUESTION)  # fmt: skip
    assert asked.returncode == 0, asked.stderr
    remote = json.loads(asked.stdout)

    from modalink import client

    with client.Client(stack) as c:
        expected = c.ask([QUESTION, client.image(samples["image"])], max_new_tokens=16)
        versions, emb = c.versions, c.embed(client.image(samples["image"]))
    assert remote["text"] == expected  # greedy decoding: the same answer
    assert remote["versions"] == versions and remote["emb"] == list(emb.embeddings.shape) == [8, 576]
    assert "sneaker" in expected.lower()
