// Captioning jobs page: upload files and/or a manifest, submit, follow the job's progress, show and download
// its results.

import * as api from "./api.js";
import { $, el, fmtBytes } from "./dom.js";

let job = null; // the job shown
let jobTimer = null;

export function initJobs() {
  $("#job-files").addEventListener("change", describeSelection);
  $("#job-manifest").addEventListener("change", describeSelection);
  $("#job-submit").addEventListener("click", submitJob);
  $("#job-cancel").addEventListener("click", cancelJob);
  $("#job-download").addEventListener("click", downloadResults);
}

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
      files: await Promise.all(files.map(async (f) => ({ name: f.name, data: await api.fileToBase64(f) }))),
      manifest: manifestFile ? await manifestFile.text() : "",
      batch_size: Math.max(1, parseInt($("#job-batch-size").value, 10) || 16),
      prompt: $("#job-prompt").value.trim(),
    };
    const created = await api.submitJob(body);
    showJob(created);
    pollJob();
  } catch (err) {
    showJobError(`Could not submit the job: ${api.describeError(err)}`);
  } finally {
    submit.disabled = false;
    submit.textContent = "Submit job";
  }
}

/** Show `j` (the gateway's job status): progress bar, state, counts, and the download link once done. */
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
  download.href = api.resultsUrl(j.job_id);
  download.setAttribute("download", `${j.job_id}.jsonl`);
}

/** Every half second while the job runs, read its status again; once it is done, load its results. */
function pollJob() {
  clearTimeout(jobTimer);
  if (!job || job.state !== "running") {
    if (job && job.state === "done") loadResults(job.job_id);
    return;
  }
  jobTimer = setTimeout(async () => {
    const id = job.job_id;
    try {
      const j = await api.job(id);
      if (job && job.job_id === id) {
        showJob(j);
        showJobError("");
      }
    } catch (err) {
      showJobError(`Could not read the job's progress: ${api.describeError(err)} (retrying)`);
    }
    pollJob();
  }, 500);
}

async function loadResults(id) {
  const box = $("#job-results");
  try {
    const text = await api.results(id);
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
    box.replaceChildren(el("div", { class: "error-box", text: `Could not load the results: ${api.describeError(err)}` }));
  }
}

async function downloadResults(e) {
  // A plain link cannot send the API key header: fetch with it, then save the blob.
  e.preventDefault();
  if (!job) return;
  try {
    const text = await api.results(job.job_id);
    const url = URL.createObjectURL(new Blob([text], { type: "application/jsonl" }));
    const a = el("a", { href: url, download: `${job.job_id}.jsonl` });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (err) {
    showJobError(`Could not download the results: ${api.describeError(err)}`);
  }
}

async function cancelJob() {
  if (!job) return;
  try {
    showJob(await api.cancelJob(job.job_id));
  } catch (err) {
    showJobError(`Could not cancel the job: ${api.describeError(err)}`);
  }
}
