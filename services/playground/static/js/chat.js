// Chat: the conversation page. The composer (question, attachments, drag and drop, paste), the generation
// settings, sending a question with the earlier turns as history, the answer streaming in, its stats.

import * as api from "./api.js";
import { addFiles, clearAttachments, previewOf, removeAttachments, sendableAttachments } from "./attachments.js";
import { $, el } from "./dom.js";
import { setRecordStatus } from "./recorder.js";

const SETTINGS_STORAGE = "modalink.settings";

let turns = []; // completed turns sent as history: {role, text, media} (the gateway keeps no conversation state)
let streaming = null; // AbortController of the answer in flight
let preparing = false; // reading attachments before a send
let conversation = 0; // bumps on "New chat" so a late stream does not write into the new one
let emptyChat; // the empty chat's welcome (with its suggestions), put back by "New chat"

const fmtMs = (ms) => (ms === undefined || ms === null ? "–" : ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${Math.round(ms)} ms`);
const fmtVersions = (v) => {
  const entries = Object.entries(v || {});
  return entries.length ? entries.map(([m, ver]) => `${m} ${ver}`).join(" · ") : "none (text only)";
};

export function initChat() {
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
  initDragAndDrop();
}

/** Drag and drop files anywhere on the chat column. */
function initDragAndDrop() {
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

/** Max new tokens and temperature, remembered in localStorage. */
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

function bindSuggestions() {
  for (const s of document.querySelectorAll(".suggestion")) {
    s.addEventListener("click", () => {
      $("#question").value = s.textContent;
      autoGrow();
      $("#question").focus();
    });
  }
}

function autoGrow() {
  const q = $("#question");
  q.style.height = "auto";
  q.style.height = `${Math.min(q.scrollHeight, 200)}px`;
}

/** Reads the composer into a /api/chat request body, or null when there is nothing to send. */
async function prepareRequest() {
  const items = await sendableAttachments();
  const question = $("#question").value.trim();
  if (!question && !items.length) return null;
  const media = await Promise.all(items.map(async (a) => ({ type: a.kind, name: a.name, data: await api.fileToBase64(a.file) })));
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

  addUserMessage(question, items);
  removeAttachments(items); // sent; those that could not be sent stay
  $("#question").value = "";
  autoGrow();
  const msg = addAssistantMessage();
  const controller = new AbortController();
  streaming = controller;
  setBusy(true);
  let answer = "";
  let finished = false;
  try {
    for await (const event of api.chat(body, controller.signal)) {
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
    } else if (err instanceof api.ApiError) {
      failAnswer(msg, api.describeError(err));
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
  clearAttachments();
  setRecordStatus("");
  for (const id of ["#versions", "#ttft", "#total-time", "#finish-reason", "#usage"]) $(id).textContent = "–";
  $("#messages").replaceChildren(emptyChat.cloneNode(true));
  bindSuggestions();
  $("#question").value = "";
  $("#question").focus();
}

function setBusy(busy) {
  $("#send").disabled = busy;
  $("#stop").hidden = !busy;
}

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

/** An empty assistant message, streaming: `{node, text, meta}`. */
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

/** The answer is done: its stats under it and in the sidebar's "Last answer". */
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
