// Chat attachments: the files picked, dropped, pasted or recorded for the next question; their kind (image,
// audio, IMU, video or a plugin modality), their previews (also shown in the sent messages) and the list above
// the composer.

import * as api from "./api.js";
import { $, el, fmtBytes, kindChip } from "./dom.js";
import { encoderRunning, healthChecked, pluginFileTypes } from "./health.js";
import { imuPlot } from "./imu-plot.js";

// The modalities the built-ins take each extension as, the default first; plugin modalities add theirs after
// (/api/health). An extension with several is the user's choice (a select in the attachment list).
const EXT_KINDS = {
  png: ["image"], jpg: ["image"], jpeg: ["image"], bmp: ["image"],
  gif: ["video", "image"], webp: ["image", "video"],
  wav: ["audio"], flac: ["audio"], ogg: ["audio"], oga: ["audio"], mp3: ["audio"],
  npy: ["imu"], csv: ["imu"],
  mp4: ["video"], webm: ["video"], mov: ["video"], mkv: ["video"],
};
const IMAGE_VIDEO = ["gif", "webp"]; // animated images: an <img> shows them as a video too

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

/** Every modality `file` may be sent as, the likeliest first (none: an unsupported file). */
async function kindsOf(file) {
  await healthChecked(); // the plugins' file types
  const ext = extOf(file.name);
  let kinds = EXT_KINDS[ext] || [];
  if (ext === "gif" && !(await gifIsAnimated(file))) kinds = ["image", "video"];
  const type = (file.type || "").split("/")[0];
  if (!kinds.length && ["image", "audio", "video"].includes(type)) kinds = [type];
  const plugins = Object.entries(pluginFileTypes()).filter(([, types]) => types.includes(`.${ext}`));
  return [...new Set([...kinds, ...plugins.map(([m]) => m)])];
}

let attachments = []; // {name, kinds, kind, file, url, size, imu?: {channels, labels, steps}, imuState?, imuPromise?, imuError?, error?}

export async function addFiles(files) {
  for (const file of files) {
    const kinds = await kindsOf(file);
    const item = { name: file.name, kinds, kind: null, file, size: file.size, url: URL.createObjectURL(file) };
    if (!kinds.length) item.error = "unsupported file type";
    attachments.push(item);
    setKind(item, kinds.find(encoderRunning) ?? kinds[0] ?? null); // the likeliest that can be answered
  }
}

/** Send `item` as `kind`; an IMU file is plotted the first time it is taken as one. */
function setKind(item, kind) {
  item.kind = kind;
  renderAttachments();
  if (kind === "imu" && !item.imuState) item.imuPromise = loadImuPreview(item);
}

async function loadImuPreview(item) {
  item.imuState = "loading";
  renderAttachments();
  try {
    item.imu = await api.imuPreview(item.name, await api.fileToBase64(item.file));
    item.imuState = "ok";
  } catch (err) {
    item.imuState = "error";
    item.imuError = api.describeError(err);
  }
  renderAttachments();
}

/** The attachments to send, once every IMU plot is in (so that the sent message shows it): those of a known
 * kind, less IMU files that could not be read. */
export async function sendableAttachments() {
  await Promise.all(attachments.map((a) => a.imuPromise));
  return attachments.filter((a) => a.kind && !(a.kind === "imu" && a.imuState === "error"));
}

export function removeAttachments(items) {
  attachments = attachments.filter((a) => !items.includes(a));
  renderAttachments();
}

export function clearAttachments() {
  attachments = [];
  renderAttachments();
}

/** The preview of one attachment (used both in the composer and in the chat history). */
export function previewOf(item) {
  if (item.kind === "image") return el("img", { class: "thumb", src: item.url, alt: item.name });
  if (item.kind === "video") {
    if (IMAGE_VIDEO.includes(extOf(item.name))) return el("img", { class: "thumb", src: item.url, alt: item.name });
    return el("video", { class: "thumb", src: item.url, muted: true, loop: true, autoplay: true, playsInline: true });
  }
  if (item.kind === "audio") return el("audio", { class: "audio-player", src: item.url, controls: true, preload: "metadata" });
  if (item.kind === "imu") {
    if (item.imu) return imuPlot(item.imu);
    return el("div", { class: "imu-placeholder", text: item.imuState === "error" ? "no preview" : "plotting…" });
  }
  if (item.kind) return fileChip(item); // a plugin modality's: no preview of its own
  return el("div", { class: "imu-placeholder", text: "?" });
}

/** A plugin modality's file: its modality, name and size. */
function fileChip(item) {
  return el(
    "div",
    { class: "file-chip", "data-testid": "file-chip", title: item.name },
    kindChip(item.kind),
    el("span", { class: "file-chip-name", text: item.name }),
    el("span", { class: "muted", text: fmtBytes(item.size) }),
  );
}

/** The kind of an attachment: a select when its file may be sent as several, else a chip. */
function kindLabel(item) {
  if (item.kinds.length < 2) return kindChip(item.kind);
  return el(
    "select",
    { class: "kind-select", title: `Send as ${item.kinds.join(" or ")}`, "aria-label": `Send ${item.name} as`, onchange: (e) => setKind(item, e.target.value) },
    ...item.kinds.map((k) => el("option", { value: k, text: k, selected: item.kind === k })),
  );
}

function renderAttachments() {
  const box = $("#attachments");
  box.hidden = attachments.length === 0;
  box.replaceChildren(
    ...attachments.map((item) => {
      const error = item.error || (item.kind === "imu" && item.imuError);
      const available = !item.kind || encoderRunning(item.kind);
      return el(
        "div",
        { class: `attachment${error ? " has-error" : ""}`, "data-kind": item.kind || "", "data-testid": "attachment" },
        previewOf(item),
        el(
          "div",
          { class: "attachment-info" },
          el("span", { class: "attachment-name", title: item.name, text: item.name }),
          el("span", { class: "attachment-meta" }, kindLabel(item), el("span", { class: "muted", text: fmtBytes(item.size) })),
          error ? el("span", { class: "attachment-error", text: error }) : null,
          available ? null : el("span", { class: "attachment-error", text: `no ${item.kind} encoder is running` }),
        ),
        el("button", { class: "remove", type: "button", title: "Remove", "aria-label": `Remove ${item.name}`, onclick: () => removeAttachments([item]), text: "×" }),
      );
    }),
  );
}
