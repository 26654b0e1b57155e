// Adapters page: the registry's versions per modality with their evaluation metrics and a plot of the main
// one, the current version marked; Promote and Rollback (which need the API key).

import * as api from "./api.js";
import { $, el, kindChip } from "./dom.js";

export function initAdapters() {
  $("#adapters-refresh").addEventListener("click", () => {
    showAdaptersMessage("");
    loadAdapters();
  });
}

export async function loadAdapters() {
  try {
    renderAdapters(await api.adapters());
  } catch (err) {
    $("#adapters").replaceChildren();
    showAdaptersMessage(`Could not load the adapter registry: ${api.describeError(err)}`);
  }
}

function showAdaptersMessage(message, kind = "error") {
  const box = $("#adapters-message");
  box.hidden = !message;
  box.textContent = message || "";
  box.dataset.kind = kind;
  box.className = kind === "error" ? "error-box" : "ok-box";
}

/** Promote `version` of `modality`'s adapter, or roll it back (`action`: promote | rollback). */
async function adapterAction(modality, action, version) {
  showAdaptersMessage("");
  try {
    const registry = await api.changeAdapter(modality, action, version);
    renderAdapters(registry);
    const current = registry.modalities?.[modality]?.current;
    showAdaptersMessage(`${modality}: ${action === "promote" ? `promoted ${version}` : "rolled back"}; current is now ${current}.`, "ok");
  } catch (err) {
    showAdaptersMessage(`Could not ${action} ${modality}${version ? ` ${version}` : ""}: ${api.describeError(err)}`);
  }
}

const fmtMetric = (v) => (typeof v !== "number" ? String(v) : Number.isInteger(v) ? String(v) : Math.abs(v) < 10 ? v.toFixed(3) : v.toFixed(1));

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
          el("h3", {}, kindChip(m)),
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
