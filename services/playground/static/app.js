// modalink playground: a plain ES module, no framework, no build step, nothing fetched from outside this server.
// Talks only to the playground's own /api (which calls the gateway over gRPC); see services/playground/server.py.

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k in node && typeof v !== "string") node[k] = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c);
  return node;
};

const KEY_STORAGE = "modalink.apiKey";
const SETTINGS_STORAGE = "modalink.settings";

// ---------------------------------------------------------------------------------------------------
// API helpers
// ---------------------------------------------------------------------------------------------------

function apiHeaders(json = true) {
  const headers = {};
  if (json) headers["content-type"] = "application/json";
  const key = $("#api-key").value.trim();
  if (key) headers["x-api-key"] = key;
  return headers;
}

class ApiError extends Error {
  constructor(message, status, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function errorFrom(response) {
  let message = `${response.status} ${response.statusText}`;
  let code = "";
  try {
    const body = await response.json();
    if (body && body.error) message = body.error;
    if (body && body.code) code = body.code;
  } catch {
    /* not JSON */
  }
  return new ApiError(message, response.status, code);
}

async function api(method, path, body) {
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: apiHeaders(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    throw new ApiError(`The playground server is not responding (${err.message}).`, 0, "UNREACHABLE");
  }
  if (!response.ok) throw await errorFrom(response);
  return response.json();
}

function describeError(err) {
  const code = err.code ? ` (${err.code})` : "";
  let hint = "";
  if (err.status === 401) hint = " Check the API key in the header.";
  else if (err.status === 403) hint = " The gateway has no API keys configured, so changes are disabled.";
  else if (err.status === 429) hint = " Rate limited: try again in a moment.";
  return `${err.message}${code}${hint}`;
}

function fileToBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

const fmtMs = (ms) => (ms === undefined || ms === null ? "–" : ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${Math.round(ms)} ms`);
const fmtVersions = (v) => {
  const entries = Object.entries(v || {});
  return entries.length ? entries.map(([m, ver]) => `${m} ${ver}`).join(" · ") : "none (text only)";
};
const fmtBytes = (n) => (n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} KB` : `${(n / 1048576).toFixed(1)} MB`);

// ---------------------------------------------------------------------------------------------------
// Tabs, API key, health banner
// ---------------------------------------------------------------------------------------------------

const pageLoaders = {};

function showPage(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.setAttribute("aria-selected", String(tab.dataset.page === name));
  for (const page of document.querySelectorAll(".page")) page.hidden = page.dataset.page !== name;
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  if (pageLoaders[name]) pageLoaders[name]();
}

function initTabs() {
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showPage(tab.dataset.page));
  const initial = location.hash.slice(1);
  showPage(["chat", "jobs", "adapters"].includes(initial) ? initial : "chat");
}

function initApiKey() {
  const input = $("#api-key");
  input.value = localStorage.getItem(KEY_STORAGE) || "";
  input.addEventListener("input", () => {
    const v = input.value.trim();
    if (v) localStorage.setItem(KEY_STORAGE, v);
    else localStorage.removeItem(KEY_STORAGE);
  });
}

let health = { gateway: "UNKNOWN", modalities: [] };

async function pollHealth() {
  const banner = $("#banner");
  const pill = $("#gateway-status");
  let state;
  let message = "";
  try {
    const response = await fetch("/api/health", { headers: apiHeaders(false), cache: "no-store" });
    if (!response.ok) throw await errorFrom(response);
    health = await response.json();
    state = health.gateway;
    const where = health.address ? ` at ${health.address}` : "";
    if (state === "NOT_SERVING") message = `The gateway${where} is not serving: the LLM service is down. Answers will fail until it is back.`;
    else if (state === "UNREACHABLE") message = `The gateway${where} is unreachable. Start the stack with \`modalink up\`.`;
    else if (state !== "SERVING") message = `The gateway${where} reports ${state}.`;
  } catch (err) {
    state = "UNREACHABLE";
    message = err instanceof ApiError && err.status ? `Health check failed: ${describeError(err)}` : "The playground server is not responding.";
  }
  banner.dataset.state = state;
  banner.textContent = message;
  banner.hidden = !message;
  pill.dataset.state = state;
  $(".status-text", pill).textContent = state === "SERVING" ? "gateway serving" : state.toLowerCase().replace("_", " ");
  renderModalities();
}

function renderModalities() {
  const box = $("#modalities");
  const mods = health.modalities || [];
  box.replaceChildren(...(mods.length ? mods.map((m) => el("span", { class: `chip chip-${m}`, text: m })) : [el("span", { class: "muted", text: "none" })]));
}

// ---------------------------------------------------------------------------------------------------
// Chat: attachments
// ---------------------------------------------------------------------------------------------------

const EXT_KIND = {
  png: "image", jpg: "image", jpeg: "image", bmp: "image",
  gif: "video", webp: "image",
  wav: "audio", flac: "audio", ogg: "audio", oga: "audio", mp3: "audio",
  npy: "imu", csv: "imu",
  mp4: "video", webm: "video", mov: "video", mkv: "video",
};

const extOf = (name) => (name.includes(".") ? name.split(".").pop().toLowerCase() : "");

/** Animated GIFs count as video; a single-frame GIF is an image (graphic control blocks before each frame). */
async function gifIsAnimated(file) {
  const bytes = new Uint8Array(await file.arrayBuffer());
  let frames = 0;
  for (let i = 0; i < bytes.length - 2; i++) {
    if (bytes[i] === 0x21 && bytes[i + 1] === 0xf9 && bytes[i + 2] === 0x04 && ++frames > 1) return true;
  }
  return false;
}

async function kindOf(file) {
  const ext = extOf(file.name);
  if (ext === "gif") return (await gifIsAnimated(file)) ? "video" : "image";
  if (EXT_KIND[ext]) return EXT_KIND[ext];
  const type = (file.type || "").split("/")[0];
  if (["image", "audio", "video"].includes(type)) return type;
  return null;
}

let attachments = []; // {id, name, kind, file, url, size, imu?: {channels, labels, steps}, error?}
let attachmentSeq = 0;

async function addFiles(files) {
  for (const file of files) {
    const kind = await kindOf(file);
    const item = { id: ++attachmentSeq, name: file.name, kind, file, size: file.size, url: URL.createObjectURL(file) };
    if (!kind) item.error = "unsupported file type";
    attachments.push(item);
    renderAttachments();
    if (kind === "imu") item.imuPromise = loadImuPreview(item);
  }
}

async function loadImuPreview(item) {
  item.imuState = "loading";
  renderAttachments();
  try {
    item.imu = await api("POST", "/api/imu/preview", { name: item.name, data: await fileToBase64(item.file) });
    item.imuState = "ok";
  } catch (err) {
    item.imuState = "error";
    item.error = describeError(err);
  }
  renderAttachments();
}

function removeAttachment(id) {
  attachments = attachments.filter((a) => a.id !== id);
  renderAttachments();
}

/** The preview of one attachment (used both in the composer and in the chat history). */
function previewOf(item) {
  if (item.kind === "image") return el("img", { class: "thumb", src: item.url, alt: item.name });
  if (item.kind === "video") {
    if (["gif", "webp"].includes(extOf(item.name))) return el("img", { class: "thumb", src: item.url, alt: item.name });
    return el("video", { class: "thumb", src: item.url, muted: true, loop: true, autoplay: true, playsInline: true });
  }
  if (item.kind === "audio") return el("audio", { class: "audio-player", src: item.url, controls: true, preload: "metadata" });
  if (item.kind === "imu") {
    if (item.imu) {
      const canvas = el("canvas", { class: "imu-plot", "data-testid": "imu-plot", width: 300, height: 140 });
      requestAnimationFrame(() => drawImu(canvas, item.imu));
      return el("div", { class: "imu-wrap" }, canvas, imuLegend(item.imu.labels));
    }
    return el("div", { class: "imu-placeholder", text: item.imuState === "error" ? "no preview" : "plotting…" });
  }
  return el("div", { class: "imu-placeholder", text: "?" });
}

function renderAttachments() {
  const box = $("#attachments");
  box.hidden = attachments.length === 0;
  box.replaceChildren(
    ...attachments.map((item) => {
      const kindLabel = ["gif", "webp"].includes(extOf(item.name))
        ? el(
            "select",
            {
              class: "kind-select",
              title: "Send as an image or as a video",
              onchange: (e) => {
                item.kind = e.target.value;
                renderAttachments();
              },
            },
            ...["image", "video"].map((k) => el("option", { value: k, text: k, selected: item.kind === k })),
          )
        : el("span", { class: `chip chip-${item.kind || "bad"}`, text: item.kind || "?" });
      const available = !item.kind || !health.modalities?.length || health.modalities.includes(item.kind);
      return el(
        "div",
        { class: `attachment${item.error ? " has-error" : ""}`, "data-kind": item.kind || "", "data-testid": "attachment" },
        previewOf(item),
        el(
          "div",
          { class: "attachment-info" },
          el("span", { class: "attachment-name", title: item.name, text: item.name }),
          el("span", { class: "attachment-meta" }, kindLabel, el("span", { class: "muted", text: fmtBytes(item.size) })),
          item.error ? el("span", { class: "attachment-error", text: item.error }) : null,
          available ? null : el("span", { class: "attachment-error", text: `no ${item.kind} encoder is running` }),
        ),
        el("button", { class: "remove", type: "button", title: "Remove", "aria-label": `Remove ${item.name}`, onclick: () => removeAttachment(item.id), text: "×" }),
      );
    }),
  );
}

// ---------------------------------------------------------------------------------------------------
// IMU plot: six curves on a canvas (accelerometer above, gyroscope below), no chart library
// ---------------------------------------------------------------------------------------------------

const CURVE_COLORS = ["#e5484d", "#30a46c", "#0091ff", "#f76b15", "#8e4ec6", "#12a594"];

function imuLegend(labels) {
  return el(
    "div",
    { class: "imu-legend" },
    (labels || []).map((label, i) => el("span", {}, el("i", { style: `background:${CURVE_COLORS[i % 6]}` }), label)),
  );
}

function drawImu(canvas, imu) {
  const channels = imu.channels || [];
  const dpr = window.devicePixelRatio || 1;
  const cssW = canvas.width;
  const cssH = canvas.height;
  canvas.style.width = `${cssW}px`;
  canvas.style.height = `${cssH}px`;
  canvas.width = cssW * dpr;
  canvas.height = cssH * dpr;
  const ctx = canvas.getContext("2d");
  ctx.scale(dpr, dpr);
  ctx.fillStyle = "#ffffff";
  ctx.fillRect(0, 0, cssW, cssH);
  const groups = channels.length === 6 ? [[0, 1, 2], [3, 4, 5]] : [channels.map((_, i) => i)];
  const names = channels.length === 6 ? ["acc", "gyro"] : [""];
  const panelH = cssH / groups.length;
  groups.forEach((group, g) => {
    const top = g * panelH + 4;
    const h = panelH - 8;
    let lo = Infinity;
    let hi = -Infinity;
    for (const c of group) for (const v of channels[c]) if (Number.isFinite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    if (!Number.isFinite(lo)) { lo = -1; hi = 1; }
    if (hi - lo < 1e-9) { hi += 0.5; lo -= 0.5; }
    // panel frame + zero line
    ctx.strokeStyle = "#e6e8ee";
    ctx.lineWidth = 1;
    ctx.strokeRect(0.5, top + 0.5, cssW - 1, h - 1);
    if (lo < 0 && hi > 0) {
      const y0 = top + h - ((0 - lo) / (hi - lo)) * h;
      ctx.setLineDash([3, 3]);
      ctx.beginPath(); ctx.moveTo(0, y0); ctx.lineTo(cssW, y0); ctx.stroke();
      ctx.setLineDash([]);
    }
    for (const c of group) {
      const data = channels[c];
      if (!data.length) continue;
      ctx.strokeStyle = CURVE_COLORS[c % 6];
      ctx.lineWidth = 1.4;
      ctx.beginPath();
      data.forEach((v, i) => {
        const x = data.length === 1 ? cssW / 2 : (i / (data.length - 1)) * (cssW - 2) + 1;
        const y = top + h - ((v - lo) / (hi - lo)) * (h - 4) - 2;
        if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
      });
      ctx.stroke();
    }
    if (names[g]) {
      ctx.font = "10px system-ui, sans-serif";
      ctx.fillStyle = "rgba(255,255,255,0.85)";
      ctx.fillRect(2, top + 2, ctx.measureText(names[g]).width + 6, 13);
      ctx.fillStyle = "#6b7185";
      ctx.fillText(names[g], 5, top + 12);
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// Microphone recording -> 16-bit PCM WAV (mono, 16 kHz), encoded here
// ---------------------------------------------------------------------------------------------------

const TARGET_RATE = 16000;
let recorder = null; // {stream, context, source, node, chunks, rate, started, timer}
let recordingSeq = 0;

/** Average-downsample Float32 samples from `rate` to TARGET_RATE. */
function resample(samples, rate) {
  if (rate === TARGET_RATE) return samples;
  const ratio = rate / TARGET_RATE;
  const out = new Float32Array(Math.floor(samples.length / ratio));
  for (let i = 0; i < out.length; i++) {
    const start = Math.floor(i * ratio);
    const end = Math.max(start + 1, Math.floor((i + 1) * ratio));
    let sum = 0;
    for (let j = start; j < end && j < samples.length; j++) sum += samples[j];
    out[i] = sum / (end - start);
  }
  return out;
}

/** A RIFF/WAVE file of 16-bit little-endian PCM, one channel. */
export function encodeWav(samples, rate) {
  const buffer = new ArrayBuffer(44 + samples.length * 2);
  const view = new DataView(buffer);
  const text = (offset, s) => { for (let i = 0; i < s.length; i++) view.setUint8(offset + i, s.charCodeAt(i)); };
  text(0, "RIFF");
  view.setUint32(4, 36 + samples.length * 2, true);
  text(8, "WAVE");
  text(12, "fmt ");
  view.setUint32(16, 16, true); // fmt chunk size
  view.setUint16(20, 1, true); // PCM
  view.setUint16(22, 1, true); // mono
  view.setUint32(24, rate, true);
  view.setUint32(28, rate * 2, true); // byte rate
  view.setUint16(32, 2, true); // block align
  view.setUint16(34, 16, true); // bits per sample
  text(36, "data");
  view.setUint32(40, samples.length * 2, true);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    view.setInt16(44 + i * 2, s < 0 ? s * 0x8000 : s * 0x7fff, true);
  }
  return new Blob([buffer], { type: "audio/wav" });
}

function setRecordStatus(text, isError = false) {
  const box = $("#record-status");
  box.hidden = !text;
  box.textContent = text;
  box.classList.toggle("is-error", isError);
}

async function startRecording() {
  if (!navigator.mediaDevices?.getUserMedia) {
    setRecordStatus("Recording needs a secure page (https or localhost) and a browser with microphone access.", true);
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true } });
  } catch (err) {
    setRecordStatus(`Microphone unavailable: ${err.message || err.name}`, true);
    return;
  }
  const context = new AudioContext();
  if (context.state === "suspended") await context.resume();
  const source = context.createMediaStreamSource(stream);
  const node = context.createScriptProcessor(4096, 1, 1);
  const chunks = [];
  node.onaudioprocess = (e) => chunks.push(new Float32Array(e.inputBuffer.getChannelData(0)));
  source.connect(node);
  node.connect(context.destination); // ScriptProcessor only runs when connected; it outputs silence
  const started = performance.now();
  recorder = { stream, context, source, node, chunks, rate: context.sampleRate, started };
  recorder.timer = setInterval(() => setRecordStatus(`● Recording… ${((performance.now() - started) / 1000).toFixed(1)} s — click the microphone again to stop`), 100);
  const btn = $("#record");
  btn.dataset.state = "recording";
  btn.title = "Stop recording";
  setRecordStatus("● Recording…");
}

async function stopRecording() {
  const r = recorder;
  recorder = null;
  clearInterval(r.timer);
  r.node.disconnect();
  r.source.disconnect();
  r.stream.getTracks().forEach((t) => t.stop());
  await r.context.close();
  const btn = $("#record");
  btn.dataset.state = "idle";
  btn.title = "Record audio from the microphone";
  const length = r.chunks.reduce((n, c) => n + c.length, 0);
  if (!length) {
    setRecordStatus("Nothing was recorded.", true);
    return;
  }
  const all = new Float32Array(length);
  let offset = 0;
  for (const c of r.chunks) { all.set(c, offset); offset += c.length; }
  const wav = encodeWav(resample(all, r.rate), TARGET_RATE);
  const file = new File([wav], `recording-${++recordingSeq}.wav`, { type: "audio/wav" });
  setRecordStatus("");
  await addFiles([file]);
}

// ---------------------------------------------------------------------------------------------------
// Chat: conversation and streaming
// ---------------------------------------------------------------------------------------------------

let turns = []; // completed turns sent as history: {role, text, media} (the gateway keeps no conversation state)
let streaming = null; // AbortController of the answer in flight
let preparing = false; // reading attachments before a send
let conversation = 0; // bumps on "New chat" so a late stream does not write into the new one

function scrollToBottom() {
  const box = $("#messages");
  box.scrollTop = box.scrollHeight;
}

function addUserMessage(text, items) {
  $("#empty-chat")?.remove();
  const media = items.length
    ? el("div", { class: "message-media" }, items.map((item) => el("figure", { class: "media-item", "data-kind": item.kind, title: item.name }, previewOf(item), el("figcaption", { text: item.name }))))
    : null;
  const node = el("div", { class: "message user", "data-testid": "user-message" }, el("div", { class: "bubble" }, media, text ? el("div", { class: "text", text }) : null));
  $("#messages").append(node);
  scrollToBottom();
}

function addAssistantMessage() {
  const text = el("div", { class: "text" });
  const meta = el("div", { class: "meta" });
  const node = el(
    "div",
    { class: "message assistant", "data-state": "streaming", "data-testid": "assistant-message" },
    el("div", { class: "avatar", "aria-hidden": "true", text: "m" }),
    el("div", { class: "bubble" }, text, el("span", { class: "cursor", "aria-hidden": "true" }), meta),
  );
  $("#messages").append(node);
  scrollToBottom();
  return { node, text, meta };
}

function metaItem(label, value, cls) {
  return el("span", { class: `meta-item ${cls}` }, el("span", { class: "meta-label", text: label }), el("span", { class: "meta-value", text: value }));
}

function finishAnswer(msg, info) {
  msg.node.dataset.state = "done";
  const versions = fmtVersions(info.adapter_versions);
  const usage = info.usage ? `${info.usage.prompt_tokens ?? "?"} in · ${info.usage.completion_tokens ?? "?"} out` : "–";
  msg.meta.replaceChildren(
    metaItem("adapters", versions, "meta-versions"),
    metaItem("TTFT", fmtMs(info.ttft_ms), "meta-ttft"),
    metaItem("total", fmtMs(info.total_ms), "meta-total"),
    metaItem("finish", info.finish_reason || "–", "meta-finish"),
  );
  $("#versions").textContent = versions;
  $("#ttft").textContent = fmtMs(info.ttft_ms);
  $("#total-time").textContent = fmtMs(info.total_ms);
  $("#finish-reason").textContent = info.finish_reason || "–";
  $("#usage").textContent = usage;
}

function failAnswer(msg, message) {
  msg.node.dataset.state = "error";
  msg.meta.replaceChildren(el("div", { class: "error-text", "data-testid": "chat-error", text: message }));
  scrollToBottom();
}

function setBusy(busy) {
  $("#send").disabled = busy;
  $("#stop").hidden = !busy;
}

/** Parse a text/event-stream body: yields the JSON of every `data:` line. */
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (value) buffer += decoder.decode(value, { stream: true });
    if (done) buffer += decoder.decode();
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (data) yield JSON.parse(data);
    }
    if (done) {
      const rest = buffer.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (rest.trim()) yield JSON.parse(rest);
      return;
    }
  }
}

/** Reads the composer into a /api/chat request body, or null when there is nothing to send. */
async function prepareRequest() {
  await Promise.all(attachments.map((a) => a.imuPromise)); // plots first, so the sent message shows them
  const question = $("#question").value.trim();
  const items = attachments.filter((a) => a.kind && !(a.kind === "imu" && a.imuState === "error"));
  if (!question && !items.length) return null;
  const media = await Promise.all(items.map(async (a) => ({ type: a.kind, name: a.name, data: await fileToBase64(a.file) })));
  const body = {
    history: turns.slice(),
    parts: [...(question ? [{ type: "text", text: question }] : []), ...media],
    max_new_tokens: Math.max(1, parseInt($("#max-tokens").value, 10) || 128),
    temperature: Math.max(0, parseFloat($("#temperature").value) || 0),
  };
  return { question, items, body };
}

async function send() {
  if (streaming || preparing) return;
  preparing = true;
  let request;
  try {
    request = await prepareRequest();
  } catch (err) {
    setRecordStatus(`Could not read an attachment: ${err.message}`, true);
    return;
  } finally {
    preparing = false;
  }
  if (!request) {
    $("#question").focus();
    return;
  }
  const { question, items, body } = request;
  const myConversation = conversation;
  const rejected = attachments.filter((a) => !items.includes(a));

  addUserMessage(question, items);
  attachments = rejected;
  renderAttachments();
  $("#question").value = "";
  autoGrow();
  const msg = addAssistantMessage();
  const controller = new AbortController();
  streaming = controller;
  setBusy(true);
  let answer = "";
  let finished = false;
  try {
    const response = await fetch("/api/chat", { method: "POST", headers: apiHeaders(), body: JSON.stringify(body), signal: controller.signal });
    if (!response.ok) throw await errorFrom(response);
    for await (const event of sseEvents(response)) {
      if (myConversation !== conversation) return;
      if (event.error) {
        failAnswer(msg, `${event.error}${event.code ? ` (${event.code})` : ""}`);
        finished = true;
        break;
      }
      if (typeof event.delta === "string") {
        answer += event.delta;
        msg.text.textContent = answer;
        scrollToBottom();
      }
      if (event.done) {
        finishAnswer(msg, event);
        finished = true;
      }
    }
    if (!finished) failAnswer(msg, "The answer stream ended without finishing (the playground server or the gateway went away).");
  } catch (err) {
    if (myConversation !== conversation) return;
    if (err.name === "AbortError") {
      msg.node.dataset.state = "done";
      msg.meta.replaceChildren(metaItem("finish", "stopped", "meta-finish"));
      finished = true;
    } else if (err instanceof ApiError) {
      failAnswer(msg, describeError(err));
    } else {
      failAnswer(msg, `Could not reach the playground server: ${err.message}`);
    }
  } finally {
    if (myConversation === conversation) {
      streaming = null;
      setBusy(false);
      if (msg.node.dataset.state === "done") {
        const media = body.parts.filter((p) => p.type !== "text");
        turns.push({ role: "user", text: question, ...(media.length ? { media } : {}) }, { role: "assistant", text: answer });
      }
      scrollToBottom();
    }
  }
}

function newChat() {
  conversation++;
  if (streaming) streaming.abort();
  streaming = null;
  setBusy(false);
  turns = [];
  attachments = [];
  renderAttachments();
  setRecordStatus("");
  for (const id of ["#versions", "#ttft", "#total-time", "#finish-reason", "#usage"]) $(id).textContent = "–";
  $("#messages").replaceChildren(emptyChat.cloneNode(true));
  bindSuggestions();
  $("#question").value = "";
  $("#question").focus();
}

function autoGrow() {
  const q = $("#question");
  q.style.height = "auto";
  q.style.height = `${Math.min(q.scrollHeight, 200)}px`;
}

function bindSuggestions() {
  for (const s of document.querySelectorAll(".suggestion")) {
    s.addEventListener("click", () => {
      $("#question").value = s.textContent;
      autoGrow();
      $("#question").focus();
    });
  }
}

let emptyChat;

function loadSettings() {
  try {
    const s = JSON.parse(localStorage.getItem(SETTINGS_STORAGE) || "{}");
    if (s.max_new_tokens) $("#max-tokens").value = s.max_new_tokens;
    if (s.temperature !== undefined) $("#temperature").value = s.temperature;
  } catch {
    /* ignore */
  }
  const save = () => {
    $("#temperature-value").textContent = Number($("#temperature").value).toFixed(2);
    localStorage.setItem(SETTINGS_STORAGE, JSON.stringify({ max_new_tokens: $("#max-tokens").value, temperature: $("#temperature").value }));
  };
  $("#max-tokens").addEventListener("change", save);
  $("#temperature").addEventListener("input", save);
  $("#temperature-value").textContent = Number($("#temperature").value).toFixed(2);
}

function initChat() {
  emptyChat = $("#empty-chat").cloneNode(true);
  bindSuggestions();
  loadSettings();
  $("#file-input").addEventListener("change", async (e) => {
    await addFiles([...e.target.files]);
    e.target.value = "";
  });
  $("#composer").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  $("#question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $("#question").addEventListener("input", autoGrow);
  $("#question").addEventListener("paste", (e) => {
    const files = [...(e.clipboardData?.files || [])];
    if (files.length) {
      e.preventDefault();
      addFiles(files);
    }
  });
  $("#stop").addEventListener("click", () => streaming?.abort());
  $("#new-chat").addEventListener("click", newChat);
  $("#record").addEventListener("click", () => (recorder ? stopRecording() : startRecording()));

  // drag and drop anywhere on the chat column
  const chat = $(".chat");
  let depth = 0;
  chat.addEventListener("dragenter", (e) => {
    if (![...(e.dataTransfer?.types || [])].includes("Files")) return;
    e.preventDefault();
    depth++;
    chat.classList.add("dragging");
    $("#drop-hint").hidden = false;
  });
  chat.addEventListener("dragover", (e) => e.preventDefault());
  chat.addEventListener("dragleave", () => {
    if (--depth <= 0) {
      depth = 0;
      chat.classList.remove("dragging");
      $("#drop-hint").hidden = true;
    }
  });
  chat.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    chat.classList.remove("dragging");
    $("#drop-hint").hidden = true;
    if (e.dataTransfer?.files?.length) addFiles([...e.dataTransfer.files]);
  });
}

// ---------------------------------------------------------------------------------------------------
// Captioning jobs
// ---------------------------------------------------------------------------------------------------

let job = null; // the job shown
let jobTimer = null;

function describeSelection() {
  const files = [...$("#job-files").files];
  const manifest = $("#job-manifest").files[0];
  const parts = [];
  if (files.length) parts.push(`${files.length} file${files.length > 1 ? "s" : ""} (${fmtBytes(files.reduce((n, f) => n + f.size, 0))})`);
  if (manifest) parts.push(`manifest ${manifest.name}`);
  $("#job-selection").textContent = parts.length ? `Selected: ${parts.join(", ")}` : "";
}

function showJobError(message) {
  const box = $("#job-error");
  box.hidden = !message;
  box.textContent = message || "";
}

async function submitJob() {
  showJobError("");
  const files = [...$("#job-files").files];
  const manifestFile = $("#job-manifest").files[0];
  if (!files.length && !manifestFile) {
    showJobError("Choose some files or a manifest first.");
    return;
  }
  const submit = $("#job-submit");
  submit.disabled = true;
  submit.textContent = "Uploading…";
  try {
    const body = {
      files: await Promise.all(files.map(async (f) => ({ name: f.name, data: await fileToBase64(f) }))),
      manifest: manifestFile ? await manifestFile.text() : "",
      batch_size: Math.max(1, parseInt($("#job-batch-size").value, 10) || 16),
      prompt: $("#job-prompt").value.trim(),
    };
    const created = await api("POST", "/api/jobs", body);
    showJob(created);
    pollJob();
  } catch (err) {
    showJobError(`Could not submit the job: ${describeError(err)}`);
  } finally {
    submit.disabled = false;
    submit.textContent = "Submit job";
  }
}

function showJob(j) {
  job = j;
  $("#job-panel").hidden = false;
  $("#job-id").textContent = j.job_id;
  const total = j.total || 0;
  const done = j.done || 0;
  const pct = Math.round(100 * (j.progress ?? (total ? done / total : 0)));
  $("#job-progress").setAttribute("aria-valuenow", String(pct));
  $("#job-progress").dataset.state = j.state;
  $("#job-progress-fill").style.width = `${pct}%`;
  const state = $("#job-state");
  state.dataset.state = j.state;
  state.textContent = `${j.state} · ${done}/${total}`;
  $("#job-counts").textContent = `${done} / ${total} done (${pct}%)`;
  $("#job-errors").textContent = `${j.errors || 0} error${j.errors === 1 ? "" : "s"}`;
  $("#job-errors").classList.toggle("has-errors", (j.errors || 0) > 0);
  $("#job-items").textContent = Object.entries(j.items || {}).map(([m, n]) => `${n} ${m}`).join(", ");
  const running = j.state === "running";
  $("#job-cancel").hidden = !running;
  const download = $("#job-download");
  download.hidden = j.state !== "done";
  download.href = `/api/jobs/${encodeURIComponent(j.job_id)}/results`;
  download.setAttribute("download", `${j.job_id}.jsonl`);
}

function pollJob() {
  clearTimeout(jobTimer);
  if (!job || job.state !== "running") {
    if (job && job.state === "done") loadResults(job.job_id);
    return;
  }
  jobTimer = setTimeout(async () => {
    const id = job.job_id;
    try {
      const j = await api("GET", `/api/jobs/${encodeURIComponent(id)}`);
      if (job && job.job_id === id) {
        showJob(j);
        showJobError("");
      }
    } catch (err) {
      showJobError(`Could not read the job's progress: ${describeError(err)} (retrying)`);
    }
    pollJob();
  }, 500);
}

async function fetchResults(id) {
  let response;
  try {
    response = await fetch(`/api/jobs/${encodeURIComponent(id)}/results`, { headers: apiHeaders(false) });
  } catch (err) {
    throw new ApiError(`The playground server is not responding (${err.message}).`, 0, "UNREACHABLE");
  }
  if (!response.ok) throw await errorFrom(response);
  return response.text();
}

async function loadResults(id) {
  const box = $("#job-results");
  try {
    const text = await fetchResults(id);
    const rows = text.split("\n").filter((l) => l.trim()).map((l) => JSON.parse(l));
    rows.sort((a, b) => String(a.id).localeCompare(String(b.id), undefined, { numeric: true }));
    box.hidden = false;
    box.replaceChildren(
      el(
        "table",
        { class: "table", "data-testid": "job-results" },
        el("thead", {}, el("tr", {}, el("th", { text: "id" }), el("th", { text: "caption" }), el("th", { text: "adapter" }))),
        el(
          "tbody",
          {},
          rows.map((r) =>
            el(
              "tr",
              { class: r.error ? "row-error" : "" },
              el("td", { class: "mono", text: r.id }),
              el("td", { text: r.error ? `error: ${r.error}` : r.caption }),
              el("td", { class: "mono", text: r.adapter_version ? `${r.modality ? `${r.modality} ` : ""}${r.adapter_version}` : "–" }),
            ),
          ),
        ),
      ),
    );
  } catch (err) {
    box.hidden = false;
    box.replaceChildren(el("div", { class: "error-box", text: `Could not load the results: ${describeError(err)}` }));
  }
}

async function downloadResults(e) {
  // A plain link cannot send the API key header: fetch with it, then save the blob.
  e.preventDefault();
  if (!job) return;
  try {
    const text = await fetchResults(job.job_id);
    const url = URL.createObjectURL(new Blob([text], { type: "application/jsonl" }));
    const a = el("a", { href: url, download: `${job.job_id}.jsonl` });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (err) {
    showJobError(`Could not download the results: ${describeError(err)}`);
  }
}

async function cancelJob() {
  if (!job) return;
  try {
    showJob(await api("POST", `/api/jobs/${encodeURIComponent(job.job_id)}/cancel`));
  } catch (err) {
    showJobError(`Could not cancel the job: ${describeError(err)}`);
  }
}

function initJobs() {
  $("#job-files").addEventListener("change", describeSelection);
  $("#job-manifest").addEventListener("change", describeSelection);
  $("#job-submit").addEventListener("click", submitJob);
  $("#job-cancel").addEventListener("click", cancelJob);
  $("#job-download").addEventListener("click", downloadResults);
}

// ---------------------------------------------------------------------------------------------------
// Adapters
// ---------------------------------------------------------------------------------------------------

function showAdaptersMessage(message, kind = "error") {
  const box = $("#adapters-message");
  box.hidden = !message;
  box.textContent = message || "";
  box.dataset.kind = kind;
  box.className = kind === "error" ? "error-box" : "ok-box";
}

async function loadAdapters() {
  try {
    renderAdapters(await api("GET", "/api/adapters"));
  } catch (err) {
    $("#adapters").replaceChildren();
    showAdaptersMessage(`Could not load the adapter registry: ${describeError(err)}`);
  }
}

async function adapterAction(modality, action, version) {
  showAdaptersMessage("");
  try {
    const body = action === "promote" ? { version } : {};
    const registry = await api("POST", `/api/adapters/${encodeURIComponent(modality)}/${action}`, body);
    renderAdapters(registry);
    const current = registry.modalities?.[modality]?.current;
    showAdaptersMessage(`${modality}: ${action === "promote" ? `promoted ${version}` : "rolled back"}; current is now ${current}.`, "ok");
  } catch (err) {
    showAdaptersMessage(`Could not ${action} ${modality}${version ? ` ${version}` : ""}: ${describeError(err)}`);
  }
}

const fmtMetric = (v) => (typeof v !== "number" ? String(v) : Number.isInteger(v) ? String(v) : Math.abs(v) < 10 ? v.toFixed(3) : v.toFixed(1));

/** A small inline SVG line plot of the main metric across versions. */
function metricPlot(info) {
  const name = info.main_metric;
  const points = (info.versions || []).filter((v) => typeof v.metrics?.[name] === "number").map((v) => ({ version: v.version, value: v.metrics[name], current: v.current }));
  const NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  const W = 500;
  const H = 112;
  const pad = { l: 40, r: 12, t: 14, b: 22 };
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("class", "metric-plot");
  svg.setAttribute("data-testid", "metric-plot");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `${name} across versions`);
  const add = (tag, attrs, text) => {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    svg.append(n);
    return n;
  };
  if (!points.length) {
    add("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "plot-empty" }, name ? `no ${name} recorded` : "no metrics");
    return svg;
  }
  let lo = Math.min(...points.map((p) => p.value));
  let hi = Math.max(...points.map((p) => p.value));
  if (hi - lo < 1e-9) { lo -= Math.abs(lo) * 0.05 || 0.5; hi += Math.abs(hi) * 0.05 || 0.5; }
  const span = hi - lo;
  lo -= span * 0.15;
  hi += span * 0.15;
  const x = (i) => (points.length === 1 ? (pad.l + W - pad.r) / 2 : pad.l + (i / (points.length - 1)) * (W - pad.l - pad.r));
  const y = (v) => pad.t + (1 - (v - lo) / (hi - lo)) * (H - pad.t - pad.b);
  for (const v of [lo + (hi - lo) * 0.1, (lo + hi) / 2, hi - (hi - lo) * 0.1]) {
    add("line", { x1: pad.l, x2: W - pad.r, y1: y(v), y2: y(v), class: "plot-grid" });
    add("text", { x: pad.l - 5, y: y(v) + 3, "text-anchor": "end", class: "plot-axis" }, fmtMetric(v));
  }
  add("polyline", { points: points.map((p, i) => `${x(i)},${y(p.value)}`).join(" "), class: "plot-line" });
  points.forEach((p, i) => {
    const c = add("circle", { cx: x(i), cy: y(p.value), r: p.current ? 5 : 3.5, class: p.current ? "plot-dot current" : "plot-dot" });
    const t = document.createElementNS(NS, "title");
    t.textContent = `${p.version}: ${name} = ${fmtMetric(p.value)}`;
    c.append(t);
    add("text", { x: x(i), y: H - 6, "text-anchor": "middle", class: "plot-axis" }, p.version);
  });
  return svg;
}

function renderAdapters(registry) {
  const mods = registry.modalities || {};
  const names = Object.keys(mods);
  const box = $("#adapters");
  if (!names.length) {
    box.replaceChildren(el("p", { class: "muted", text: "The registry has no adapters yet." }));
    return;
  }
  box.replaceChildren(
    ...names.map((m) => {
      const info = mods[m];
      const versions = info.versions || [];
      const main = info.main_metric;
      const others = (v) => Object.entries(v.metrics || {}).filter(([n]) => n !== main);
      return el(
        "section",
        { class: "card adapter-card", "data-modality": m, "data-testid": `adapters-${m}` },
        el(
          "div",
          { class: "adapter-head" },
          el("h3", {}, el("span", { class: `chip chip-${m}`, text: m })),
          el("span", { class: "muted", text: info.current ? `current ${info.current} · ${versions.length} version${versions.length === 1 ? "" : "s"}` : "no current version" }),
          el("button", {
            class: "btn btn-secondary small rollback",
            type: "button",
            "data-testid": `rollback-${m}`,
            disabled: versions.length < 2,
            text: "Rollback",
            title: "Go back to the previously current version",
            onclick: () => adapterAction(m, "rollback"),
          }),
        ),
        el("div", { class: "plot-title muted small", text: main ? `${main} across versions` : "" }),
        metricPlot(info),
        versions.length
          ? el(
              "table",
              { class: "table versions-table" },
              el("thead", {}, el("tr", {}, el("th", { text: "version" }), el("th", { class: "main num", text: main || "metric" }), el("th", { text: "other metrics" }), el("th", { text: "" }))),
              el(
                "tbody",
                {},
                [...versions].reverse().map((v) =>
                  el(
                    "tr",
                    { class: v.current ? "current" : "", "data-version": v.version, "data-current": String(!!v.current) },
                    el("td", { class: "mono version-cell" }, v.version, v.current ? el("span", { class: "badge current-badge", "data-testid": "current-badge", text: "current" }) : null),
                    el("td", { class: "num main", text: v.metrics?.[main] === undefined ? "–" : fmtMetric(v.metrics[main]) }),
                    el("td", {}, el("div", { class: "metric-chips" }, others(v).map(([n, x]) => el("span", { class: "metric" }, el("span", { class: "metric-name", text: n }), " ", fmtMetric(x))))),
                    el(
                      "td",
                      { class: "actions-cell" },
                      el("button", {
                        class: "btn btn-secondary small promote",
                        type: "button",
                        "data-testid": `promote-${m}-${v.version}`,
                        disabled: !!v.current,
                        text: v.current ? "Current" : "Promote",
                        onclick: () => adapterAction(m, "promote", v.version),
                      }),
                    ),
                  ),
                ),
              ),
            )
          : el("p", { class: "muted", text: "no versions" }),
      );
    }),
  );
}

function initAdapters() {
  $("#adapters-refresh").addEventListener("click", () => {
    showAdaptersMessage("");
    loadAdapters();
  });
  pageLoaders.adapters = loadAdapters;
}

// ---------------------------------------------------------------------------------------------------

initApiKey();
initChat();
initJobs();
initAdapters();
initTabs();
pollHealth();
setInterval(pollHealth, 3000);
