"""The classic model repository (services/encoder/model_repository) on a stock tritonserver binary: the one
PyTriton bundles, run as a user of the official image would run theirs (python backend, our model.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from procs import ONE_FP16_STEP, free_port, wait_triton

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1] / "services" / "encoder" / "model_repository"


def test_stock_tritonserver_serves_the_model_repository(tmp_path, samples):
    import pytriton
    import tritonclient.grpc as tg

    from modalink.assistant import Assistant
    from modalink.config import Settings

    bundled = Path(pytriton.__file__).parent / "tritonserver"
    server = tmp_path / "tritonserver"
    shutil.copytree(bundled, server)
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    shutil.copy(server / "python_backend_stubs" / py / "triton_python_backend_stub", server / "backends" / "python")
    models = tmp_path / "models"
    shutil.copytree(REPO / "image_encoder", models / "image_encoder")
    shutil.copytree(REPO / "imu_encoder", models / "imu_encoder")
    site = Path(sysconfig.get_paths()["purelib"])
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "LD_LIBRARY_PATH": f"{site / 'nvidia_pytriton.libs'}:{sysconfig.get_config_var('LIBDIR')}",
           "MODALINK_NUM_THREADS": "1"}  # fmt: skip
    http, grpc_port, metrics = free_port(), free_port(), free_port()
    log = tmp_path / "tritonserver.log"
    proc = subprocess.Popen(
        [str(server / "bin" / "tritonserver"), "--model-repository", str(models), "--backend-directory",
         str(server / "backends"), "--cache-directory", str(server / "caches"), "--http-port", str(http),
         "--grpc-port", str(grpc_port), "--metrics-port", str(metrics), "--allow-gpu-metrics", "false"],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_triton(http, "image_encoder", proc, log, timeout=240)
        wait_triton(http, "imu_encoder", proc, log, timeout=240)
        client = tg.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        local = Assistant(Settings())
        raw = Path(samples["image"]).read_bytes()
        inp = tg.InferInput("data", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[raw]], dtype=object))
        res = client.infer("image_encoder", [inp])
        expected, version = local.embed("image", [raw])
        np.testing.assert_allclose(res.as_numpy("embeddings")[0], expected[0].numpy(), **ONE_FP16_STEP)
        assert res.as_numpy("adapter_version")[0, 0].decode() == version
        x = np.load(samples["imu"]).astype(np.float32)
        inp = tg.InferInput("data", [1, *x.shape], "FP32")
        inp.set_data_from_numpy(x[None])
        res = client.infer("imu_encoder", [inp])
        expected = local.embed("imu", [x])[0][0].numpy()
        np.testing.assert_allclose(res.as_numpy("embeddings")[0], expected, **ONE_FP16_STEP)
        bad = tg.InferInput("data", [1, 1], "BYTES")
        bad.set_data_from_numpy(np.array([[b"not an image"]], dtype=object))
        with pytest.raises(Exception, match="invalid input: not a decodable image"):
            client.infer("image_encoder", [bad])
        assert client.is_model_ready("image_encoder")  # still serving
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
