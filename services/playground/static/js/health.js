// Gateway health, polled by the page: the status pill, the banner when the gateway is unreachable or not
// serving, and the encoders that run (chips in the chat sidebar; attachments warn when theirs does not); the plugin
// modalities' file types (the file pickers accept them, attachments.js maps them to their modality).

import * as api from "./api.js";
import { $, el, kindChip } from "./dom.js";

let health = { gateway: "UNKNOWN", modalities: [], file_types: {} }; // the last answer of /api/health
let firstAnswer;
const answered = new Promise((resolve) => (firstAnswer = resolve));

/** False when the health check lists the encoders that run and `modality`'s is not among them. */
export const encoderRunning = (modality) => !health.modalities?.length || health.modalities.includes(modality);

/** The plugin modalities' file suffixes, `{power: [".npy"]}` (the built-ins' are the page's own). */
export const pluginFileTypes = () => health.file_types || {};

/** Resolves once the first health check is over (at most `ms` later): files attached before it are not taken for
 * unsupported when they are a plugin's. */
export const healthChecked = (ms = 5000) => Promise.race([answered, new Promise((resolve) => setTimeout(resolve, ms))]);

export async function pollHealth() {
  const banner = $("#banner");
  const pill = $("#gateway-status");
  let state;
  let message = "";
  try {
    health = await api.health();
    state = health.gateway;
    const where = health.address ? ` at ${health.address}` : "";
    if (state === "NOT_SERVING") message = `The gateway${where} is not serving: the LLM service is down. Answers will fail until it is back.`;
    else if (state === "UNREACHABLE") message = `The gateway${where} is unreachable. Start the stack with \`modalink up\`.`;
    else if (state !== "SERVING") message = `The gateway${where} reports ${state}.`;
  } catch (err) {
    state = "UNREACHABLE";
    message = err instanceof api.ApiError && err.status ? `Health check failed: ${api.describeError(err)}` : "The playground server is not responding.";
  }
  banner.dataset.state = state;
  banner.textContent = message;
  banner.hidden = !message;
  pill.dataset.state = state;
  $(".status-text", pill).textContent = state === "SERVING" ? "gateway serving" : state.toLowerCase().replace("_", " ");
  renderModalities();
  acceptPluginFiles();
  firstAnswer();
}

function renderModalities() {
  const box = $("#modalities");
  const mods = health.modalities || [];
  box.replaceChildren(...(mods.length ? mods.map((m) => kindChip(m)) : [el("span", { class: "muted", text: "none" })]));
}

/** The file pickers (chat and jobs) offer the plugin modalities' files too. */
function acceptPluginFiles() {
  const extra = [...new Set(Object.values(pluginFileTypes()).flat())];
  for (const input of document.querySelectorAll("#file-input, #job-files")) {
    input.dataset.accept ??= input.accept; // the built-ins', from index.html
    input.accept = [input.dataset.accept, ...extra].filter(Boolean).join(",");
  }
}
