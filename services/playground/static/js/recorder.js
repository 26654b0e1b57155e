// Audio recorder: the microphone button records a clip, encoded here as a 16-bit PCM WAV (mono, 16 kHz) and
// handed to the chat as a file. Also the composer's status line, which the chat uses for its own notes.

import { $ } from "./dom.js";

const TARGET_RATE = 16000;
let recorder = null; // {stream, context, source, node, chunks, rate, started, timer}
let recordingSeq = 0;

/** The microphone button: click to record, click again to stop; each recording goes to `onRecorded(file)`. */
export function initRecorder(onRecorded) {
  $("#record").addEventListener("click", () => (recorder ? stopRecording(onRecorded) : startRecording()));
}

/** The line above the composer (hidden when `text` is empty); red when `isError`. */
export function setRecordStatus(text, isError = false) {
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

async function stopRecording(onRecorded) {
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
  await onRecorded(file);
}

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
