// The playground's entry module (index.html loads it; no framework, no build step, nothing fetched from outside
// this server): the page tabs, and the wiring of the parts, each in its own module. The page talks only to the
// playground's own /api (api.js), which calls the gateway over gRPC; see services/playground/server.py.

import { initAdapters, loadAdapters } from "./adapters.js";
import { initApiKey } from "./api.js";
import { addFiles } from "./attachments.js";
import { initChat } from "./chat.js";
import { pollHealth } from "./health.js";
import { initJobs } from "./jobs.js";
import { initRecorder } from "./recorder.js";

const PAGES = ["chat", "jobs", "adapters"];
const pageLoaders = { adapters: loadAdapters }; // run each time their page is shown

function showPage(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.setAttribute("aria-selected", String(tab.dataset.page === name));
  for (const page of document.querySelectorAll(".page")) page.hidden = page.dataset.page !== name;
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  if (pageLoaders[name]) pageLoaders[name]();
}

function initTabs() {
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showPage(tab.dataset.page));
  const initial = location.hash.slice(1);
  showPage(PAGES.includes(initial) ? initial : "chat");
}

initApiKey();
initChat();
initRecorder((file) => addFiles([file])); // a recording is attached like a picked file
initJobs();
initAdapters();
initTabs();
pollHealth();
setInterval(pollHealth, 3000);
