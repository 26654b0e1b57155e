// Gateway health, polled by the page: the status pill, the banner when the gateway is unreachable or not
// serving, and the encoders that run (chips in the chat sidebar; attachments warn when theirs does not).

import * as api from "./api.js";
import { $, el } from "./dom.js";

let health = { gateway: "UNKNOWN", modalities: [] }; // the last answer of /api/health

/** False when the health check lists the encoders that run and `modality`'s is not among them. */
export const encoderRunning = (modality) => !health.modalities?.length || health.modalities.includes(modality);

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
}

function renderModalities() {
  const box = $("#modalities");
  const mods = health.modalities || [];
  box.replaceChildren(...(mods.length ? mods.map((m) => el("span", { class: `chip chip-${m}`, text: m })) : [el("span", { class: "muted", text: "none" })]));
}
