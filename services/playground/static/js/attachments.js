// Chat attachments: the files picked, dropped, pasted or recorded for the next question; their kind (image,
// audio, IMU, video), their previews (also shown in the sent messages) and the list above the composer.

import * as api from "./api.js";
import { $, el, fmtBytes } from "./dom.js";
import { encoderRunning } from "./health.js";
import { imuPlot } from "./imu-plot.js";

const EXT_KIND = {
  png: "image", jpg: "image", jpeg: "image", bmp: "image",
  gif: "video", webp: "image",
  wav: "audio", flac: "audio", ogg: "audio", oga: "audio", mp3: "audio",
  npy: "imu", csv: "imu",
  mp4: "video", webm: "video", mov: "video", mkv: "video",
};

const extOf = (name) => (name.includes(".") ? name.split(".").pop().toLowerCase() : "");
const eitherImageOrVideo = (item) => ["gif", "webp"].includes(extOf(item.name)); // the user picks which

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

let attachments = []; // {name, kind, file, url, size, imu?: {channels, labels, steps}, imuState?, imuPromise?, error?}

export async function addFiles(files) {
  for (const file of files) {
    const kind = await kindOf(file);
    const item = { name: file.name, kind, file, size: file.size, url: URL.createObjectURL(file) };
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
    item.imu = await api.imuPreview(item.name, await api.fileToBase64(item.file));
    item.imuState = "ok";
  } catch (err) {
    item.imuState = "error";
    item.error = api.describeError(err);
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
    if (eitherImageOrVideo(item)) return el("img", { class: "thumb", src: item.url, alt: item.name });
    return el("video", { class: "thumb", src: item.url, muted: true, loop: true, autoplay: true, playsInline: true });
  }
  if (item.kind === "audio") return el("audio", { class: "audio-player", src: item.url, controls: true, preload: "metadata" });
  if (item.kind === "imu") {
    if (item.imu) return imuPlot(item.imu);
    return el("div", { class: "imu-placeholder", text: item.imuState === "error" ? "no preview" : "plotting…" });
  }
  return el("div", { class: "imu-placeholder", text: "?" });
}

function renderAttachments() {
  const box = $("#attachments");
  box.hidden = attachments.length === 0;
  box.replaceChildren(
    ...attachments.map((item) => {
      const kindLabel = eitherImageOrVideo(item)
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
      const available = !item.kind || encoderRunning(item.kind);
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
        el("button", { class: "remove", type: "button", title: "Remove", "aria-label": `Remove ${item.name}`, onclick: () => removeAttachments([item]), text: "×" }),
      );
    }),
  );
}
