// IMU plot: the six curves of an IMU recording on a canvas (accelerometer above, gyroscope below) with a
// legend, drawn here with no chart library.

import { el } from "./dom.js";

const CURVE_COLORS = ["#e5484d", "#30a46c", "#0091ff", "#f76b15", "#8e4ec6", "#12a594"];

/** The plot of `imu` (`{channels, labels}` from the IMU preview): a 300x140 canvas, drawn on the next frame, and its legend. */
export function imuPlot(imu) {
  const canvas = el("canvas", { class: "imu-plot", "data-testid": "imu-plot", width: 300, height: 140 });
  requestAnimationFrame(() => drawImu(canvas, imu));
  return el("div", { class: "imu-wrap" }, canvas, imuLegend(imu.labels));
}

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
