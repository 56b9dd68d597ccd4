// DOM helpers: every text goes through textContent (no innerHTML with data), so names are safe.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "style") Object.assign(el.style, v); // CSSOM, allowed by the CSP (attributes are not)
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== undefined && c !== null && c !== false) el.append(c instanceof Node ? c : String(c));
  return el;
}

export const shortId = (id) => (id ? id.slice(0, 8) : "");
export const num = (v, digits = 1) => (typeof v === "number" && Number.isFinite(v) ? v.toFixed(digits) : "—");

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

export function jobSeconds(job) {
  if (!job.started_at) return null;
  const end = job.finished_at ? Date.parse(job.finished_at) : Date.now();
  return (end - Date.parse(job.started_at)) / 1000;
}

export const jobAP = (job) => job.final_metrics?.AP ?? job.latest_metrics?.["eval/AP"];

export function bytes(n) {
  if (!Number.isFinite(n)) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function statusBadge(status) {
  return h("span", { class: `badge ${status}` }, status);
}

export function progressBar(job) {
  const p = job.progress || {};
  const frac = p.max_iters ? Math.min(1, (p.iteration || 0) / p.max_iters) : job.status === "succeeded" ? 1 : 0;
  return h("div", { class: "progress", title: `${p.iteration || 0} / ${p.max_iters ?? "?"}` },
    h("div", { class: "bar", style: { width: `${(frac * 100).toFixed(1)}%` } }),
    h("span", {}, `${p.iteration || 0} / ${p.max_iters ?? "?"}`));
}
