"""The ``power`` modality, a plugin (``plugins/modalink-power``) that no service, gateway, worker or chart template
names: end to end through ``modalink up`` (ask over gRPC, the CLI and the OpenAI route, Embed, a captioning job,
bad input), and its encoder's contract."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import urllib.request

import grpc
import numpy as np
import pytest
from procs import caption_job_cli, modalink_up

from modalink.evaluate import is_correct

pytestmark = pytest.mark.slow
ENV = {**os.environ, "MODALINK_NUM_THREADS": "1"}


def modalink(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modalink.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or ENV)  # fmt: skip


def lying_npy() -> bytes:
    """A .npy whose header claims [1, 10^12] float32 (4 TB) over 100 values: refused before anything is allocated."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (1, 10**12)})
    return buf.getvalue() + np.zeros(100, np.float32).tobytes()


def test_the_plugin_is_registered_and_its_encoder_keeps_the_contract(samples):
    from modalink import MODALITIES
    from modalink.embedder import Embedder
    from modalink.errors import InputError
    from modalink.modality import get, ports

    assert "power" in MODALITIES and ports()["power"] == 8040 and get("power").input == "tensor"
    embedder = Embedder()
    x = np.load(samples["power"])
    (emb,), version = embedder.embed("power", [x])
    assert emb.shape == (1, embedder.d_llm) and version.startswith("v")
    for bad, message in ((np.ones((2, 500)), "one channel"), (np.ones((1, 10)), "64 to 20000"),
                         (np.full((1, 500), np.nan), "NaN"), (b"\x93NUMPY junk", "not a .npy array"),
                         (lying_npy(), "does not match its 400 data bytes")):  # fmt: skip
        with pytest.raises(InputError, match=message):
            embedder.embed("power", [bad])


def test_power_end_to_end_through_modalink_up(tmp_path, samples):
    from modalink.client import Client, media

    run = str(tmp_path / "run")
    x = np.load(samples["power"])
    ports, started = modalink_up(run, "--modalities", "power", env=ENV)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert "power-encoder" in started.stdout
        address = f"localhost:{ports.gateway}"
        with Client(address) as c:
            answer = c.ask(["Which appliance is this?", media("power", x)], max_new_tokens=24)
            emb = c.embed(media("power", samples["power"]))  # the .npy path, read as an array
            with pytest.raises(grpc.RpcError) as bad:
                c.ask(["Which appliance is this?", media("power", np.ones((2, 300), np.float32))])
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "one channel" in bad.value.details()
            with pytest.raises(grpc.RpcError) as huge:  # 4 MB of well-formed samples: refused before any kernel runs
                c.ask(["Which appliance is this?", media("power", np.ones((1, 1_000_000), np.float32))])
            assert huge.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "1000000 samples; 64 to 20000 are accepted" in huge.value.details()
            with pytest.raises(grpc.RpcError) as unknown:
                c.ask(["What is this?", media("radar", np.ones((1, 300), np.float32))])
            assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "unknown modality 'radar'" in unknown.value.details()
            again = c.ask(["Which appliance is this?", media("power", x)], max_new_tokens=24)  # still serving
        assert is_correct("power", "television", answer), answer  # the demo's sample, with the shipped adapter
        assert again == answer
        assert emb.modality == "power" and emb.embeddings.shape == (1, 576) and emb.adapter_version.startswith("v")
        cli = modalink("ask", "--remote", address, "--media", f"power={samples['power']}", "-n", "24",
                       "Which appliance is this?")  # fmt: skip
        assert cli.returncode == 0 and cli.stdout.strip() == answer.strip(), cli.stderr
        npy = io.BytesIO()
        np.save(npy, x)
        part = {"modality": "power", "data": base64.b64encode(npy.getvalue()).decode()}
        content = [{"type": "text", "text": "Which appliance is this?"}, {"type": "input_media", "input_media": part}]
        body = {"model": "modalink", "max_tokens": 24, "messages": [{"role": "user", "content": content}]}
        req = urllib.request.Request(f"http://localhost:{ports.gateway_http}/v1/chat/completions",
                                     json.dumps(body).encode(), {"content-type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=120) as res:
            assert res.status == 200
            assert json.loads(res.read())["choices"][0]["message"]["content"].strip() == answer.strip()
        captions = caption_job_cli(tmp_path, "power", samples["power"], 3, ports.redis, ENV)
        assert all(is_correct("power", "television", c["caption"]) for c in captions), captions
    finally:
        stopped = modalink("down", "--run-dir", run)
    assert stopped.returncode == 0


def test_an_adapter_trained_on_another_encoder_is_refused_not_misread(tmp_path):
    """Power's features changed from raw to standardized ROCKET (same width): an adapter records the encoder it was
    trained on by name, and one trained on raw features is refused, not served as if they were the same."""
    from modalink.assistant import Assistant
    from modalink.config import Settings
    from modalink.projectors import ProjectorConfig, build_projector
    from modalink.registry import AdapterRegistry

    proj = build_projector(ProjectorConfig(kind="mlp", d_in=2000, d_llm=576, n_tokens=1))
    registry = AdapterRegistry(tmp_path)
    registry.publish("power", proj, extra={"encoder": "rocket-1000-s0"}, promote=True)
    with pytest.raises(RuntimeError, match="trained on encoder 'rocket-1000-s0' but this process encodes with "
                                           "'rocket-1000-s0-std'"):  # fmt: skip
        Assistant(Settings(adapters_dir=tmp_path)).projector("power")
    registry.publish("power", proj, extra={"encoder": "rocket-1000-s0-std"}, promote=True)
    assert Assistant(Settings(adapters_dir=tmp_path)).projector("power")[1] == "v2"
