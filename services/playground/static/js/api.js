// The playground backend's /api (services/playground/server.py, itself a gRPC client of the gateway): every
// fetch the page makes, the answer's server-sent events, the API key it sends, and its errors in words.

import { $ } from "./dom.js";

const KEY_STORAGE = "modalink.apiKey";

/** The API key field in the header, remembered in localStorage; it goes along as `x-api-key`. */
export function initApiKey() {
  const input = $("#api-key");
  input.value = localStorage.getItem(KEY_STORAGE) || "";
  input.addEventListener("input", () => {
    const v = input.value.trim();
    if (v) localStorage.setItem(KEY_STORAGE, v);
    else localStorage.removeItem(KEY_STORAGE);
  });
}

function apiHeaders(json = true) {
  const headers = {};
  if (json) headers["content-type"] = "application/json";
  const key = $("#api-key").value.trim();
  if (key) headers["x-api-key"] = key;
  return headers;
}

/** A refused call: the HTTP status (0: the server did not answer) and the gateway's status code. */
export class ApiError extends Error {
  constructor(message, status, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** The ApiError of a response that is not ok: the server's `{error, code}` when the body is that JSON. */
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

/** An error for people: the message, its code and what to do about the usual refusals. */
export function describeError(err) {
  const code = err.code ? ` (${err.code})` : "";
  let hint = "";
  if (err.status === 401) hint = " Check the API key in the header.";
  else if (err.status === 403) hint = " The gateway has no API keys configured, so changes are disabled.";
  else if (err.status === 429) hint = " Rate limited: try again in a moment.";
  return `${err.message}${code}${hint}`;
}

/** A file's bytes as base64, the way request bodies carry files. */
export function fileToBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

/** fetch, with every failure an ApiError: no answer at all, or an answer that is not ok. */
async function request(path, init) {
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new ApiError(`The playground server is not responding (${err.message}).`, 0, "UNREACHABLE");
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

/** A JSON call: `body` (if any) goes as JSON, the answer's JSON comes back. */
async function call(method, path, body) {
  const init = { method, headers: apiHeaders(body !== undefined), body: body === undefined ? undefined : JSON.stringify(body) };
  return (await request(path, init)).json();
}

const jobPath = (id) => `/api/jobs/${encodeURIComponent(id)}`;

/** `{gateway: SERVING | NOT_SERVING | UNREACHABLE | ..., address, modalities}`: the encoders running. */
export const health = async () => (await request("/api/health", { headers: apiHeaders(false), cache: "no-store" })).json();

/** The six curves of an IMU file (`data`: base64), thinned for plotting: `{channels, labels, steps}`. */
export const imuPreview = (name, data) => call("POST", "/api/imu/preview", { name, data });

export const submitJob = (body) => call("POST", "/api/jobs", body);
export const job = (id) => call("GET", jobPath(id));
export const cancelJob = (id) => call("POST", `${jobPath(id)}/cancel`);
/** Where a finished job's results (JSONL) are downloaded from. */
export const resultsUrl = (id) => `${jobPath(id)}/results`;
export const results = async (id) => (await request(resultsUrl(id), { headers: apiHeaders(false) })).text();

/** The adapter registry: `{modalities: {m: {current, versions, main_metric}}}`. */
export const adapters = () => call("GET", "/api/adapters");
/** Promote `version` of a modality's adapter, or roll it back (`action`: promote | rollback); the new registry. */
export const changeAdapter = (modality, action, version) =>
  call("POST", `/api/adapters/${encodeURIComponent(modality)}/${action}`, action === "promote" ? { version } : {});

/**
 * Ask: the events of the streamed answer, `{delta}` ..., then `{done, finish_reason, adapter_versions, ttft_ms,
 * total_ms, usage}` or `{error, code}`. A refused request is an ApiError; a failed fetch (the server away, or
 * `signal` aborted: an AbortError) is thrown as it is, so that the caller can tell a Stop from a lost server.
 */
export async function* chat(body, signal) {
  const response = await fetch("/api/chat", { method: "POST", headers: apiHeaders(), body: JSON.stringify(body), signal });
  if (!response.ok) throw await errorFrom(response);
  yield* sseEvents(response);
}

/** The JSON of every `data:` line of a text/event-stream body. */
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const dataOf = (event) => event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n");
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (value) buffer += decoder.decode(value, { stream: true });
    if (done) buffer += decoder.decode();
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const data = dataOf(buffer.slice(0, cut));
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      if (data) yield JSON.parse(data);
    }
    if (done) {
      const rest = dataOf(buffer);
      if (rest.trim()) yield JSON.parse(rest);
      return;
    }
  }
}
