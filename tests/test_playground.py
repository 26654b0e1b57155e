"""The web playground (services/playground) in a real headless browser against the real stack.

`modalink up --modalities image,imu` starts the encoders, the LLM service, the gateway, a worker and the
playground; Debian's Chromium (driven by Playwright, no browser download) opens the page, uploads the packaged
samples, reads the streamed answers, runs a captioning job and looks at the adapter registry. The stack gets its
own copy of the adapter registry, its own jobs dir, its own run dir (Redis's append-only file included) and ports
of its own (``--port-offset``), so nothing here touches the repo or a developer's running stack.
Screenshots land in build/screenshots/; the README's (docs/img/, tracked) are refreshed only on request:
`make docs-images` (MODALINK_DOCS_IMAGES=1), so a test run never rewrites tracked files.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import expect, sync_playwright
from procs import free_port, modalink_up

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"  # Debian's package (the Makefile installs it); never `playwright install`
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 # a fake microphone (a beeping tone) that needs no permission prompt, for the recording test
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]  # fmt: skip
ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / ("docs/img" if os.environ.get("MODALINK_DOCS_IMAGES") == "1" else "build/screenshots")
REPO_ADAPTERS = ROOT / "adapters"
ANSWER_TIMEOUT_MS = 300_000  # 2 slow cores, one torch thread per service


def modalink(*args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modalink.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> dict:
    """The whole topology (image + IMU encoders) with the playground, on a copy of the adapter registry."""
    root = tmp_path_factory.mktemp("playground")
    adapters = root / "adapters"
    shutil.copytree(REPO_ADAPTERS, adapters)
    env = {**os.environ, "MODALINK_NUM_THREADS": "1", "MODALINK_ADAPTERS_DIR": str(adapters),
           "MODALINK_JOBS_DIR": str(root / "jobs")}  # fmt: skip
    run = str(root / "run")
    try:
        ports, started = modalink_up(run, "--modalities", "image,imu", env=env)
        assert started.returncode == 0, started.stdout + started.stderr
        assert "playground" in started.stdout, started.stdout
        yield {"adapters": adapters, "root": root, "url": f"http://localhost:{ports.playground}"}
    finally:
        stopped = modalink("down", "--run-dir", run, env=env)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


@pytest.fixture(scope="module")
def browser(stack):
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, stack):
    """A fresh 1280x800 page on the playground; fails the test on any uncaught error in the page's script."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(stack["url"])
    # the health poll found the gateway serving, so the red banner stays hidden
    expect(page.locator("#gateway-status")).to_have_attribute("data-state", "SERVING", timeout=30_000)
    expect(page.locator("#banner")).to_be_hidden()
    yield page
    context.close()
    assert not errors, errors


def screenshot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    page.screenshot(path=str(path))
    assert 10_000 < path.stat().st_size < 400_000, path.stat().st_size


def record_streaming(page) -> None:
    """Record the answer's text length at every change while it is streaming (window.__lengths)."""
    page.evaluate("""() => {
        window.__lengths = [];
        new MutationObserver(() => {
            const m = [...document.querySelectorAll('.message.assistant')].pop();
            if (m && m.dataset.state === 'streaming')
                window.__lengths.push(m.querySelector('.text').textContent.length);
        }).observe(document.querySelector('#messages'), {subtree: true, childList: true, characterData: true});
    }""")


def answer(page, n: int):
    """Wait until the n-th assistant message (1-based) stops streaming; (state, text, locator)."""
    page.wait_for_function(
        """n => { const m = document.querySelectorAll('.message.assistant')[n - 1];
                  return m && m.dataset.state !== 'streaming'; }""",
        arg=n,
        timeout=ANSWER_TIMEOUT_MS,
    )
    msg = page.locator(".message.assistant").nth(n - 1)
    return msg.get_attribute("data-state"), msg.locator(".text").inner_text(), msg


def ask(page, question: str):
    """Type a question, send it with Enter; the /api/chat request the page made."""
    page.fill("#question", question)
    with page.expect_request(lambda r: r.url.endswith("/api/chat") and r.method == "POST") as request:
        page.press("#question", "Enter")
    return request.value


def current_version(stack, modality: str) -> str:
    return (stack["adapters"] / modality / "CURRENT").read_text().strip()


def test_chat_about_an_uploaded_image_streams_the_answer_and_keeps_history(page, stack, samples):
    page.fill("#max-tokens", "48")
    page.set_input_files("#file-input", samples["image"])
    expect(page.locator("[data-testid=attachment][data-kind=image] img")).to_be_visible()

    record_streaming(page)
    first = ask(page, "What is shown in this picture?")
    body = first.post_data_json
    assert body["history"] == [] and body["max_new_tokens"] == 48
    assert [p["type"] for p in body["parts"]] == ["text", "image"] and body["parts"][1]["name"] == "sneaker.png"
    assert page.locator("[data-testid=attachment]").count() == 0  # sent: the composer is empty again
    state, text, msg = answer(page, 1)
    assert state == "done", msg.inner_text()
    assert "sneaker" in text.lower(), text
    # it arrived in pieces: several growing prefixes were on screen before the answer was done
    lengths = page.evaluate("window.__lengths")
    partial = sorted({n for n in lengths if 0 < n < len(text)})
    assert len(partial) >= 2, (lengths, text)
    version = current_version(stack, "image")
    expect(msg.locator(".meta-versions .meta-value")).to_have_text(f"image {version}")
    expect(page.locator("#versions")).to_have_text(f"image {version}")
    assert re.fullmatch(r"\d+ ms|\d+\.\d\d s", page.locator("#ttft").inner_text()), page.locator("#ttft").inner_text()
    assert re.fullmatch(r"\d+ ms|\d+\.\d\d s", msg.locator(".meta-ttft .meta-value").inner_text())
    expect(msg.locator(".meta-finish .meta-value")).to_have_text(re.compile("^(stop|length)$"))

    second = ask(page, "What is it used for?")
    history = second.post_data_json["history"]
    assert [(t["role"], t["text"]) for t in history] == [("user", "What is shown in this picture?"),
                                                         ("assistant", text)]  # fmt: skip
    # the gateway keeps no conversation: the first turn's picture goes along again
    assert history[0]["media"] == [body["parts"][1]] and "media" not in history[1]
    state2, text2, msg2 = answer(page, 2)
    assert state2 == "done", msg2.inner_text()
    assert text2.strip()
    expect(msg2.locator(".meta-versions .meta-value")).to_have_text(f"image {version}")  # the picture was read
    # the first turn's picture is still shown in the history
    expect(page.locator(".message.user").first.locator("img.thumb")).to_be_visible()
    assert page.locator(".message.user").count() == 2
    screenshot(page, "playground-chat.png")


def test_imu_file_is_plotted_as_six_curves_and_answered(page, stack, samples):
    page.set_input_files("#file-input", samples["imu"])
    chip = page.locator("[data-testid=attachment][data-kind=imu]")
    canvas = chip.locator("canvas[data-testid=imu-plot]")
    expect(canvas).to_be_visible(timeout=30_000)
    expect(chip.locator(".imu-legend span")).to_have_text(["acc x", "acc y", "acc z", "gyro x", "gyro y", "gyro z"])
    # count the canvas pixels in each curve colour: all six curves were drawn
    colours = canvas.evaluate("""c => {
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const want = ['#e5484d', '#30a46c', '#0091ff', '#f76b15', '#8e4ec6', '#12a594']
            .map(h => [1, 3, 5].map(i => parseInt(h.slice(i, i + 2), 16)));
        const counts = want.map(() => 0);
        const near = (i, w) => Math.abs(d[i] - w[0]) + Math.abs(d[i + 1] - w[1]) + Math.abs(d[i + 2] - w[2]) < 30;
        for (let i = 0; i < d.length; i += 4) want.forEach((w, k) => { if (near(i, w)) counts[k]++; });
        return counts;
    }""")
    assert all(n > 50 for n in colours), colours

    ask(page, "What activity is the person doing?")
    state, text, msg = answer(page, 1)
    assert state == "done", msg.inner_text()
    assert "walk" in text.lower(), text
    expect(msg.locator(".meta-versions .meta-value")).to_have_text(f"imu {current_version(stack, 'imu')}")
    expect(page.locator(".message.user canvas[data-testid=imu-plot]")).to_be_visible()
    screenshot(page, "playground-imu.png")


def test_an_extension_two_modalities_take_is_the_users_choice(page, stack, samples):
    """The power plugin is registered (its encoder not started): a .npy is IMU's by default, power's by choice, shown
    as a file chip with its modality."""
    health = json.loads(urllib.request.urlopen(f"{stack['url']}/api/health", timeout=10).read())
    if ".npy" not in health["file_types"].get("power", []):
        pytest.skip("the power plugin is not installed")
    page.set_input_files("#file-input", samples["imu"])
    chip = page.locator("[data-testid=attachment]")
    select = chip.locator("select.kind-select")
    expect(select.locator("option")).to_have_text(["imu", "power"])
    expect(chip).to_have_attribute("data-kind", "imu")
    expect(chip.locator("canvas[data-testid=imu-plot]")).to_be_visible(timeout=30_000)
    select.select_option("power")
    expect(chip).to_have_attribute("data-kind", "power")
    expect(chip.locator("[data-testid=file-chip] .chip")).to_have_text("power")
    expect(chip.locator(".attachment-error")).to_have_text("no power encoder is running")
    request = ask(page, "Which appliance is this?")
    assert [p["type"] for p in request.post_data_json["parts"]] == ["text", "power"]
    state, _, msg = answer(page, 1)
    assert state == "error"
    error = msg.locator("[data-testid=chat-error]").inner_text()
    assert "power" in error and "INVALID_ARGUMENT" in error, error
    expect(page.locator(".message.user [data-kind=power] [data-testid=file-chip]")).to_be_visible()


def test_recorded_audio_is_a_wav_and_a_missing_encoder_is_a_clear_error(page):
    page.click("#record")
    expect(page.locator("#record")).to_have_attribute("data-state", "recording")
    page.wait_for_timeout(1500)
    page.click("#record")
    chip = page.locator("[data-testid=attachment][data-kind=audio]")
    expect(chip).to_have_count(1)
    expect(chip.locator(".attachment-name")).to_have_text("recording-1.wav")
    header = chip.locator("audio").evaluate("""async a => {
        const b = await (await fetch(a.src)).arrayBuffer(); const v = new DataView(b);
        const s = (o, n) => String.fromCharCode(...new Uint8Array(b, o, n));
        let peak = 0; for (let i = 44; i < b.byteLength; i += 2) peak = Math.max(peak, Math.abs(v.getInt16(i, true)));
        return {riff: s(0, 4), wave: s(8, 4), format: v.getUint16(20, true), channels: v.getUint16(22, true),
                rate: v.getUint32(24, true), bits: v.getUint16(34, true), data: s(36, 4), bytes: v.getUint32(40, true),
                size: b.byteLength, peak};
    }""")
    assert header["riff"] == "RIFF" and header["wave"] == "WAVE" and header["data"] == "data", header
    assert (header["format"], header["channels"], header["rate"], header["bits"]) == (1, 1, 16000, 16), header
    assert header["bytes"] == header["size"] - 44 and header["bytes"] > 16000 * 2 * 0.8, header  # about 1.5 s
    assert header["peak"] > 1000, header  # the fake microphone's beep, not silence
    # only image and IMU encoders run: the page says so, and the gateway's refusal shows in the chat
    expect(chip.locator(".attachment-error")).to_have_text("no audio encoder is running")
    ask(page, "What does the voice say?")
    state, _, msg = answer(page, 1)
    assert state == "error"
    error = msg.locator("[data-testid=chat-error]").inner_text()
    assert "audio" in error and "INVALID_ARGUMENT" in error, error


def test_captioning_job_runs_to_completion_and_downloads(page, tmp_path, samples):
    names = [f"shoe-{i}.png" for i in range(1, 6)]
    for name in names:
        shutil.copy(samples["image"], tmp_path / name)
    page.click("#tab-jobs")
    page.set_input_files("#job-files", [str(tmp_path / n) for n in names])
    expect(page.locator("#job-selection")).to_contain_text("5 files")
    page.fill("#job-batch-size", "4")
    page.click("#job-submit")
    expect(page.locator("#job-id")).not_to_be_empty(timeout=60_000)
    expect(page.locator("#job-state")).to_have_attribute("data-state", "done", timeout=ANSWER_TIMEOUT_MS)
    expect(page.locator("#job-state")).to_have_text("done · 5/5")
    expect(page.locator("#job-errors")).to_have_text("0 errors")
    expect(page.locator("#job-progress")).to_have_attribute("aria-valuenow", "100")
    expect(page.locator("[data-testid=job-results] tbody tr")).to_have_count(5, timeout=30_000)
    expect(page.locator("#job-cancel")).to_be_hidden()
    with page.expect_download() as download:
        page.click("#job-download")
    rows = [json.loads(line) for line in Path(download.value.path()).read_text().splitlines() if line.strip()]
    assert sorted(r["id"] for r in rows) == names, rows
    assert all(r.get("caption", "").strip() and r.get("adapter_version") and "error" not in r for r in rows), rows
    screenshot(page, "playground-jobs.png")


def test_adapters_page_lists_versions_and_refuses_promote_without_keys(page, stack):
    page.click("#tab-adapters")
    card = page.locator("[data-testid=adapters-image]")
    expect(card).to_be_visible(timeout=30_000)
    current = current_version(stack, "image")
    versions = sorted(p.name for p in (stack["adapters"] / "image").iterdir() if re.fullmatch(r"v\d+", p.name))
    rows = card.locator("tr[data-version]")
    expect(rows).to_have_count(len(versions))
    assert sorted(rows.evaluate_all("rs => rs.map(r => r.dataset.version)")) == versions
    expect(card.locator("tr[data-current=true]")).to_have_count(1)
    expect(card.locator("tr[data-current=true]")).to_have_attribute("data-version", current)
    expect(card.locator("tr[data-current=true] [data-testid=current-badge]")).to_be_visible()
    expect(card.locator("svg[data-testid=metric-plot] circle")).not_to_have_count(0)
    expect(page.locator("[data-testid=adapters-imu]")).to_be_visible()
    screenshot(page, "playground-adapters.png")

    other = next(v for v in versions if v != current)
    card.locator(f"[data-testid=promote-image-{other}]").click()
    message = page.locator("#adapters-message")
    expect(message).to_be_visible()
    expect(message).to_contain_text(f"Could not promote image {other}")
    expect(message).to_contain_text("PERMISSION_DENIED")
    assert current_version(stack, "image") == current  # nothing changed
    page.click("#adapters-refresh")
    expect(card.locator("tr[data-current=true]")).to_have_attribute("data-version", current)


def test_an_unreachable_gateway_shows_a_banner_and_a_clear_chat_error(browser):
    """A second playground process pointed at a port where no gateway listens."""
    port, dead = free_port(), free_port()  # nothing listens on `dead`
    proc = subprocess.Popen([sys.executable, "-m", "modalink.cli", "serve", "playground", "--port", str(port),
                             "--gateway", f"127.0.0.1:{dead}", "--host", "127.0.0.1"])  # fmt: skip
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "the playground did not start"
                time.sleep(0.5)
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{port}")
        banner = page.locator("#banner")
        expect(banner).to_be_visible(timeout=30_000)
        expect(banner).to_have_text(
            f"The gateway at 127.0.0.1:{dead} is unreachable. Start the stack with `modalink up`."
        )
        expect(page.locator("#gateway-status")).to_have_attribute("data-state", "UNREACHABLE")
        ask(page, "Hello?")
        state, _, msg = answer(page, 1)
        assert state == "error"
        expect(msg.locator("[data-testid=chat-error]")).to_have_text("the gateway is unreachable (UNAVAILABLE)")
    finally:
        context.close()
        proc.terminate()
        proc.wait(timeout=30)


# Plugin modalities on the server side: no stack and no browser (the app's functions, its routes over ASGI).

PLUGINS = {"power": {"file_types": [".npy"], "input": "tensor", "tensor_rank": 2},
           "smell": {"file_types": [".smell", ".NPY"], "input": "file", "mime": "application/x-smell"}}  # fmt: skip


def npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def asgi(app, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """One request through the app's ASGI interface (no HTTP client needed): (status, JSON answer)."""
    raw = json.dumps(body).encode() if body is not None else b""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
             "server": ("testserver", 80), "client": ("127.0.0.1", 1)}  # fmt: skip
    messages, sent = [], [{"type": "http.request", "body": raw, "more_body": False}]

    async def receive():
        return sent.pop(0) if sent else {"type": "http.disconnect"}

    async def send(message):
        messages.append(message)

    with ThreadPoolExecutor(1) as pool:  # its own thread: Playwright's sync API may hold this one's event loop
        pool.submit(asyncio.run, app(scope, receive, send)).result()
    status = next(m["status"] for m in messages if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body"))


def test_plugin_modalities_go_to_the_gateway_as_generic_media():
    from modalink_client import from_tensor_msg
    from modalink_services.playground.server import check_plugins, parse_chat

    plugins = check_plugins(PLUGINS)
    series = np.linspace(0, 1, 300, dtype=np.float64)[None]
    smell = b"\x00sniff\xff"
    body = {"parts": [{"type": "text", "text": "Which appliance is this?"},
                      {"type": "power", "name": "fridge.npy", "data": b64(npy(series))},
                      {"type": "smell", "name": "x.smell", "data": b64(smell)}],
            "history": [{"role": "user", "text": "and this?", "media": [{"type": "power", "data": b64(npy(series))}]},
                        {"role": "assistant", "text": "A fridge."}]}  # fmt: skip
    parts, history, _ = parse_chat(body, plugins=plugins)
    text, power, sniff = parts
    assert text == "Which appliance is this?"
    assert power.WhichOneof("kind") == "media" and power.media.modality == "power" and not power.media.data
    sent = from_tensor_msg(power.media.tensor, "power")
    assert sent.dtype == np.float32 and sent.shape == (1, 300) and np.allclose(sent, series)
    assert sniff.media.modality == "smell" and sniff.media.data == smell and sniff.media.mime == "application/x-smell"
    assert not sniff.media.HasField("tensor")
    assert history[0][2][0].media.modality == "power"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"1,2,3\n", "fridge.npy (power) .npy header is corrupt"),
        (npy(np.ones((1, 300), bool)), "fridge.npy (power) .npy must hold numbers, got dtype bool"),
        (npy(np.array([{"a": 1}], dtype=object)), "must hold numbers, got dtype object"),
        (npy(np.ones(300, np.float32)), "fridge.npy (power) data must be 2-D (2 axes), got shape [300]"),
        (npy(np.ones((1, 1, 300), np.float32)), "shape [1, 1, 300]"),
        (npy(np.ones((1, 0), np.float32)), "the array is empty"),
        (npy(np.array([[1.0, np.nan]])), "NaN or infinite"),
        (npy(np.array([[1.0, 1e300]])), "NaN or infinite values (in float32)"),  # finite in float64 only
        (npy(np.ones((1, 4), np.float32))[:-3], "does not match its 13 data bytes"),
    ],
)
def test_a_bad_npy_for_a_tensor_plugin_is_a_clear_bad_request(raw, message):
    from modalink_services.playground.server import BadRequest, media_part

    with pytest.raises(BadRequest) as refused:
        media_part("power", "fridge.npy", raw, plugins=PLUGINS)
    assert message in str(refused.value)


def test_a_huge_npy_header_is_refused_unallocated():
    from modalink_services.playground.server import BadRequest, media_part

    buf = io.BytesIO()  # a header that asks for 40 TB, over 16 bytes of data
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (100000, 100000000)})
    raw = buf.getvalue() + bytes(16)
    with pytest.raises(BadRequest, match=r"shape \[100000, 100000000\] of float32, which does not match its 16 data"):
        media_part("power", "fridge.npy", raw, plugins=PLUGINS)


def test_unknown_kinds_and_file_types_still_name_what_is_expected():
    from modalink_services.playground.server import BadRequest, check_plugins, media_part, modality_of

    with pytest.raises(BadRequest, match="unknown part type 'sound'; expected one of text, image, audio, imu, video, "
                                         "power, smell"):  # fmt: skip
        media_part("sound", "x.wav", b"RIFF", plugins=PLUGINS)
    with pytest.raises(BadRequest, match="unknown part type 'power'; expected one of text, image, audio, imu, video$"):
        media_part("power", "x.npy", npy(np.ones((1, 300))))  # no plugins
    plugins = check_plugins(PLUGINS)
    with pytest.raises(BadRequest, match=r"x\.bin: unknown file type \.bin; expected one of .*\.npy, \.csv.*\.smell$"):
        modality_of("x.bin", plugins)
    # a suffix several modalities take: the first whose encoder runs (IMU before plugins), else the first
    assert modality_of("a.npy", plugins) == "imu" and modality_of("a.NPY", plugins, ["image", "imu"]) == "imu"
    assert modality_of("a.npy", plugins, ["power"]) == "power" and modality_of("a.smell", plugins) == "smell"
    for bad, message in (({"Power": {}}, "lower-case identifier"), ({"imu": {}}, "built-in"),
                         ({"p": {"file_types": ["npy"]}}, "suffixes"), ({"p": {"input": "array"}}, "file or tensor"),
                         ({"p": {"tensor_rank": 0}}, "tensor_rank")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            check_plugins(bad)


def test_health_lists_the_plugins_file_types_and_chat_refuses_a_bad_npy(tmp_path):
    from modalink_services.playground.server import build_app

    app = build_app(f"127.0.0.1:{free_port()}", tmp_path, ["image", "power"], plugins=PLUGINS)
    status, health = asgi(app, "GET", "/api/health")
    assert status == 200 and health["gateway"] == "UNREACHABLE", health
    assert health["modalities"] == ["image", "power"]
    assert health["file_types"] == {"power": [".npy"], "smell": [".smell", ".npy"]}
    default = asgi(build_app("127.0.0.1:1", tmp_path, plugins=PLUGINS), "GET", "/api/health")[1]
    assert default["modalities"] == ["image", "audio", "imu", "video", "power", "smell"]
    assert asgi(build_app("127.0.0.1:1", tmp_path), "GET", "/api/health")[1]["file_types"] == {}

    bad = {"parts": [{"type": "power", "name": "fridge.npy", "data": b64(npy(np.ones((2, 2, 2))))}]}
    status, error = asgi(app, "POST", "/api/chat", bad)
    assert status == 400 and error["code"] == "INVALID_ARGUMENT", error
    assert error["error"] == "fridge.npy (power) data must be 2-D (2 axes), got shape [2, 2, 2]"
