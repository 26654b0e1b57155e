"""An encoder service drains on SIGTERM (README: "Services stop on SIGTERM by draining: health turns
`NOT_SERVING`, new calls are refused, calls in flight get `MODALINK_SHUTDOWN_GRACE_S` to finish";
docs/RELIABILITY.md: "Triton finishes its requests in flight for the same grace").

A real ``modalink serve encoder -m image`` gets SIGTERM (to its own process, as the kubelet sends it) while
several large requests from stock tritonclient gRPC clients are queued and running on its one model instance:
every one must come back with the right embeddings, row by row, after the signal; the model turns not ready
and a new call is refused; the process exits 0 within the grace plus Triton's own shutdown."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from procs import ONE_FP16_STEP, free_port, record_figures, wait_triton

pytestmark = pytest.mark.slow

GRACE_S = 40  # MODALINK_SHUTDOWN_GRACE_S here: the queued work below takes 10-30 s on 2 busy cores
SHUTDOWN_S = 30  # Triton's unload and PyTriton's cleanup after the last call (about 9 s on 2 busy cores)
IMAGES, PER_CALL, CALLS = 8, 32, 3  # a call of max_batch_size (32) holds the one model instance alone


def pngs() -> list[bytes]:
    """Distinct images, so a row answered for the wrong item shows."""
    from PIL import Image

    rng = np.random.default_rng(21)
    out = []
    for i in range(IMAGES):
        pixels = (rng.random((96, 96, 3)) * 255 * (i + 1) / IMAGES).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def infer(port: int, items: list[bytes], timeout: float = 300) -> np.ndarray:
    import tritonclient.grpc as tg

    inp = tg.InferInput("data", [len(items), 1], "BYTES")
    inp.set_data_from_numpy(np.array([[x] for x in items], dtype=object))
    res = tg.InferenceServerClient(f"127.0.0.1:{port}").infer("image_encoder", [inp], client_timeout=timeout)
    assert not any(e[0] for e in res.as_numpy("error")), res.as_numpy("error")
    return res.as_numpy("embeddings")


def test_sigterm_lets_every_call_in_flight_finish_refuses_new_ones_and_exits_0(tmp_path):
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    http, grpc_port, metrics = free_port(), free_port(), free_port()
    log = tmp_path / "image-encoder.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MODALINK_NUM_THREADS": "1", "MODALINK_SHUTDOWN_GRACE_S": str(GRACE_S)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "modalink.cli", "serve", "encoder", "-m", "image", "--http-port", str(http),
         "--grpc-port", str(grpc_port), "--metrics-port", str(metrics), "--host", "127.0.0.1"],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_triton(http, "image_encoder", proc, log)
        images = pngs()
        reference = infer(grpc_port, images)  # each image's embeddings, before any signal
        assert reference.shape[0] == IMAGES and not np.allclose(reference[0], reference[1])

        rng = np.random.default_rng(0)
        orders = [rng.integers(0, IMAGES, PER_CALL) for _ in range(CALLS)]
        results: dict[int, tuple] = {}
        sent = threading.Barrier(CALLS + 1)

        def call(i: int) -> None:
            sent.wait()
            try:
                results[i] = ("ok", infer(grpc_port, [images[k] for k in orders[i]]), time.monotonic())
            except Exception as e:  # noqa: BLE001  (reported below)
                results[i] = ("error", e, time.monotonic())

        threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(CALLS)]
        for t in threads:
            t.start()
        sent.wait()
        time.sleep(0.5)  # the calls are on the server: one runs, the others wait for the model instance
        sigterm = time.monotonic()
        assert not results, "a call finished before SIGTERM: nothing was in flight"
        proc.send_signal(signal.SIGTERM)

        # new calls are refused (Triton unloads the model: not ready, then NOT_FOUND or no connection)
        client = tg.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if not client.is_model_ready("image_encoder"):
                    break
            except Exception:  # noqa: BLE001  (no longer listening: refused too)
                break
            time.sleep(0.1)
        else:
            pytest.fail("image_encoder still ready 10 s after SIGTERM")
        refused_after = time.monotonic() - sigterm
        with pytest.raises(InferenceServerException) as refused:
            infer(grpc_port, images[:1], timeout=30)
        assert "unknown model" in str(refused.value) or "UNAVAILABLE" in str(refused.value), refused.value

        for t in threads:
            t.join(timeout=max(0.0, sigterm + GRACE_S + SHUTDOWN_S - time.monotonic()))
        assert sorted(results) == list(range(CALLS)), "a call in flight never returned"
        for i, (outcome, value, done) in sorted(results.items()):
            assert outcome == "ok", f"call {i} in flight at SIGTERM failed: {value}\n{log.read_text()[-3000:]}"
            assert done > sigterm
            assert value.shape == (PER_CALL, *reference.shape[1:])
            for row, k in zip(value, orders[i], strict=True):
                np.testing.assert_allclose(row, reference[k], **ONE_FP16_STEP)
        last_done = max(done for _, _, done in results.values()) - sigterm

        code = proc.wait(timeout=GRACE_S + SHUTDOWN_S)
        exited = time.monotonic() - sigterm
        assert code == 0, log.read_text()[-3000:]
        assert exited < GRACE_S + SHUTDOWN_S
        record_figures("encoder_sigterm", calls_in_flight=CALLS, images_per_call=PER_CALL,
                       calls_completed=sum(r[0] == "ok" for r in results.values()),
                       last_call_done_after_s=round(last_done, 2), new_call_refused_after_s=round(refused_after, 2),
                       exit_code=code, exited_after_s=round(exited, 2), grace_s=GRACE_S)  # fmt: skip
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
