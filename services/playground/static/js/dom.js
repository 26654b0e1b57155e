// DOM helpers shared by every part of the page: element lookup, element building, modality chips, byte sizes
// for people.

/** The first element matching `sel` (under `root`, the document by default). */
export const $ = (sel, root = document) => root.querySelector(sel);

/**
 * A new element: `attrs` sets the class (`class`), the text (`text`), listeners (`onclick`, ...), properties
 * (non-string values of known properties) and attributes (everything else; `true` is an empty attribute;
 * undefined, null and false are left out); the children are appended, arrays flattened, null left out.
 */
export const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k in node && typeof v !== "string") node[k] = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c);
  return node;
};

const BUILTIN_KINDS = ["image", "audio", "imu", "video"];

/** A modality's chip: the built-ins in their own colours, plugin modalities in a shared one, none (null) in red. */
export const kindChip = (kind) =>
  el("span", { class: `chip chip-${!kind ? "bad" : BUILTIN_KINDS.includes(kind) ? kind : "plugin"}`, text: kind || "?" });

export const fmtBytes = (n) => (n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} KB` : `${(n / 1048576).toFixed(1)} MB`);
