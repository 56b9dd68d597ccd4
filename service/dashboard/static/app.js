// The dashboard: hash routes (#/jobs, #/jobs/ID, #/jobs/ID/instances, #/compare/ID,ID, #/models,
// #/datasets). The token lives in sessionStorage only (api.js), never in a URL.

import { api, AuthError, session, watch, followEvents, saveBlob, POLL_MS } from "./api.js";
import { lineChart } from "./charts.js";
import { h, shortId, num, duration, jobSeconds, jobAP, bytes, statusBadge, progressBar } from "./dom.js";
import { renderInstances } from "./instances.js";

const main = document.getElementById("main");
let stopWatching = () => {};
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

function show(...children) {
  main.replaceChildren(...children);
}

function showError(e) {
  if (e instanceof AuthError) return renderSignIn(e.message);
  let box = main.querySelector(".error-box");
  if (!box) {
    box = h("p", { class: "error error-box" });
    main.prepend(box);
  }
  box.textContent = e.message;
}

// ------------------------------------------------------------------ sign in

function renderSignIn(message = "") {
  document.getElementById("nav").hidden = true;
  const form = document.getElementById("sign-in-template").content.firstElementChild.cloneNode(true);
  form.querySelector("#sign-in-error").textContent = message;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = form.querySelector("#token").value.trim();
    if (!(await api.check(token))) {
      form.querySelector("#sign-in-error").textContent = "That token was not accepted.";
      return;
    }
    session.signIn(token);
    if (!location.hash || location.hash === "#/") location.hash = "#/jobs";
    else route();
  });
  show(form);
}

// ------------------------------------------------------------------ jobs list

function renderJobs() {
  const statusSel = h("select", { id: "filter-status" }, ["", "queued", "running", "succeeded", "failed", "cancelled"].map((s) => h("option", { value: s }, s || "any status")));
  const kindSel = h("select", { id: "filter-kind" }, ["", "train", "distill"].map((k) => h("option", { value: k }, k || "any kind")));
  const tagInput = h("input", { id: "filter-tag", type: "search", placeholder: "tags (space-separated)", "aria-label": "filter by tags" });
  const compareBtn = h("button", { id: "compare-selected", type: "button", disabled: true }, "Compare selected");
  const tbody = h("tbody");
  const selected = new Set();
  compareBtn.addEventListener("click", () => { location.hash = `#/compare/${[...selected].join(",")}`; });
  const filterTag = (tag) => { tagInput.value = tag; restart(); };
  const load = async () => {
    // every filter server-side: GET /v1/jobs?status=&kind=&tag=a&tag=b (jobs with every tag)
    const tag = tagInput.value.split(/[\s,]+/).filter(Boolean);
    const page = await api.jobs({ status: statusSel.value, kind: kindSel.value, tag });
    tbody.replaceChildren(...page.items.map((j) => jobRow(j, selected, () => { compareBtn.disabled = selected.size < 2; }, filterTag)));
    if (!page.items.length) tbody.append(h("tr", {}, h("td", { colspan: 10, class: "muted" }, "no jobs")));
  };
  let restart = () => { stopWatching(); stopWatching = watch(load, showError); };
  statusSel.addEventListener("change", restart);
  kindSel.addEventListener("change", restart);
  tagInput.addEventListener("change", restart);
  show(h("section", {},
    h("div", { class: "toolbar" }, h("h1", {}, "Jobs"), statusSel, kindSel, tagInput, compareBtn),
    h("table", { id: "jobs" },
      h("thead", {}, h("tr", {}, ["", "job", "kind", "status", "progress", "ETA", "attempts", "AP", "duration", "created"].map((c) => h("th", {}, c)))),
      tbody)));
  restart();
}

function jobRow(job, selected, onSelect, onTag) {
  const box = h("input", { type: "checkbox", class: "select", checked: selected.has(job.id), "aria-label": `select ${job.id}` });
  box.addEventListener("change", () => { box.checked ? selected.add(job.id) : selected.delete(job.id); onSelect(); });
  return h("tr", { dataset: { jobId: job.id, status: job.status } },
    h("td", {}, box),
    h("td", {}, h("a", { href: `#/jobs/${job.id}` }, job.name || shortId(job.id)), h("div", { class: "muted mono" }, shortId(job.id)),
      (job.tags || []).map((t) => h("button", { type: "button", class: "chip tag", title: `only jobs tagged ${t}`, onclick: () => onTag(t) }, t))),
    h("td", {}, job.kind),
    h("td", {}, statusBadge(job.status), job.cancel_requested && !TERMINAL.has(job.status) ? " (cancelling)" : ""),
    h("td", {}, progressBar(job)),
    h("td", {}, job.status === "running" ? duration(job.progress?.eta_seconds) : "—"),
    h("td", {}, String(job.attempts)),
    h("td", { class: "ap" }, num(jobAP(job))),
    h("td", {}, duration(jobSeconds(job))),
    h("td", { class: "muted" }, new Date(job.created_at).toLocaleString()));
}

// ------------------------------------------------------------------ one job

// Metric series grouped into charts: losses (GT terms, GID terms, total), learning rate, AP, GI stats.
export function groupSeries(series) {
  const groups = { losses: [], lr: [], ap: [], gi: [] };
  for (const [name, s] of Object.entries(series).sort(([a], [b]) => a.localeCompare(b))) {
    const entry = { name, steps: s.steps, values: s.values };
    if (name === "lr") groups.lr.push(entry);
    else if (name.startsWith("eval/AP")) groups.ap.push({ ...entry, name: name.slice(5) });
    else if (name.startsWith("gi/")) groups.gi.push(entry);
    else if (!/^(eval\/|images_per_second|data_time|step_time|iteration)/.test(name)) groups.losses.push(entry);
  }
  return groups;
}

// Metric points of one step (a "metric" event, or the "final" evaluation) appended to the series
// loaded from /metrics; steps it already has are skipped (the event stream replays from the start).
export function addPoints(series, step, values) {
  for (const [name, value] of Object.entries(values)) {
    if (typeof value !== "number") continue;
    const s = (series[name] ??= { steps: [], values: [] });
    if (s.steps.length && step <= s.steps.at(-1)) continue;
    s.steps.push(step);
    s.values.push(value);
  }
}

// The job page: a snapshot from the REST API, then live from the job's events (SSE); polling
// everything every POLL_MS where the stream cannot be had. The section's data-live says which
// ("connecting", "sse", "polling") and data-events counts the events applied.
function renderJob(id) {
  const head = h("div", { class: "job-head" });
  const live = h("p", { id: "live", class: "muted" }, "connecting…");
  const charts = h("div", { class: "charts", id: "charts" });
  const logPre = h("pre", { id: "log", class: "log" }, "…");
  const artifacts = h("ul", { id: "artifacts" });
  const configPre = h("pre", { id: "config", class: "config" });
  const page = h("section", { id: "job-page", dataset: { live: "connecting", events: "0" } }, head, live, charts,
    h("div", { class: "columns" },
      h("div", { class: "card" }, h("h2", {}, "Log tail"), logPre),
      h("div", { class: "card" }, h("h2", {}, "Artifacts"), artifacts, h("h2", {}, "Config"), configPre)));
  show(page);
  const state = { job: null, series: {} };
  let lastArtifacts = "";
  const setMode = (mode, text) => { page.dataset.live = mode; live.textContent = text; };

  const drawCharts = () => {
    const g = groupSeries(state.series);
    charts.replaceChildren(
      h("div", { class: "card", id: "chart-losses" }, lineChart("losses (GT and GID terms)", g.losses)),
      h("div", { class: "card", id: "chart-lr" }, lineChart("learning rate", g.lr)),
      h("div", { class: "card", id: "chart-ap" }, lineChart("AP (validation, %)", g.ap)),
      ...(g.gi.length ? [h("div", { class: "card", id: "chart-gi" }, lineChart("general instances", g.gi))] : []));
  };
  const loadLog = async () => {
    const log = await api.logTail(id, 200);
    logPre.textContent = log ?? "(this server does not serve logs while a job runs; see the artifacts when it ends)";
  };
  const loadArtifacts = async () => {
    const list = await api.artifacts(id);
    const key = JSON.stringify(list.map((a) => a.name));
    if (key !== lastArtifacts) {
      lastArtifacts = key;
      artifacts.replaceChildren(...(list.length ? list.map((a) => h("li", {},
        h("button", { type: "button", class: "link", onclick: async () => saveBlob(await api.download(id, a.name), a.name.split("/").at(-1)) }, a.name),
        h("span", { class: "muted" }, ` ${bytes(a.size)}`))) : [h("li", { class: "muted" }, "none yet")]));
    }
    return list.length;
  };
  const loadAll = async () => {
    const [job, metrics] = await Promise.all([api.job(id), api.metrics(id)]);
    state.job = job;
    state.series = metrics.series;
    renderJobHead(head, job);
    drawCharts();
    configPre.textContent = JSON.stringify(job.config, null, 2);
    await loadLog();
    return loadArtifacts();
  };
  const terminal = () => TERMINAL.has(state.job?.status);

  // Events are applied to `state` at once and drawn at most every 250 ms (a replay comes in a burst).
  let timer = null;
  let refetchJob = false;
  let lastLog = 0;
  const flush = async () => {
    try {
      if (refetchJob) { // a status change: the job's own fields (times, error, attempts) from the API
        refetchJob = false;
        state.job = await api.job(id);
      }
      renderJobHead(head, state.job);
      drawCharts();
      if (terminal() || Date.now() - lastLog >= POLL_MS) {
        lastLog = Date.now();
        await loadLog();
      }
      if (terminal()) {
        if (page.dataset.live === "sse") live.textContent = "events: the job has ended";
        await loadArtifacts();
      }
    } catch (e) {
      showError(e);
    } finally {
      timer = null;
    }
  };
  const schedule = () => { timer ??= setTimeout(flush, 250); };
  const onEvent = (kind, data) => {
    page.dataset.events = String(Number(page.dataset.events) + 1);
    const job = state.job;
    if (kind === "progress") job.progress = data;
    else if (kind === "metric") addPoints(state.series, data.step, data.values || {});
    else if (kind === "final") {
      job.final_metrics = data.metrics;
      addPoints(state.series, data.step, Object.fromEntries(Object.entries(data.metrics || {}).map(([k, v]) => [`eval/${k}`, v])));
    } else if (kind === "status") {
      job.status = data.status;
      if (data.cancel_requested) job.cancel_requested = true;
      refetchJob = true;
    }
    schedule();
  };

  let stopped = false;
  let stopEvents = () => {};
  let stopPolling = () => {};
  const poll = () => {
    setMode("polling", `live: polling every ${POLL_MS / 1000} s`);
    stopPolling = watch(async () => {
      const files = await loadAll();
      return terminal() && files > 0;
    }, showError);
  };
  // A finished job's files may be registered just after its last event: look again a few times.
  let looks = 0;
  const stopArtifactsWatch = watch(async () => terminal() && ((await loadArtifacts()) > 0 || ++looks > 10), showError);
  stopWatching = () => { stopped = true; stopEvents(); stopPolling(); stopArtifactsWatch(); clearTimeout(timer); };
  loadAll().then(() => {
    if (stopped) return;
    stopEvents = followEvents(id, {
      onOpen: () => setMode("sse", "live: events"),
      onEvent,
      onError: showError,
      onFallback: () => { if (!stopped) poll(); },
      isDone: terminal,
    });
  }, showError);
}

function renderJobHead(head, job) {
  const cancel = h("button", { type: "button", id: "cancel", class: "danger", disabled: TERMINAL.has(job.status) || job.cancel_requested }, "Cancel");
  cancel.addEventListener("click", async () => {
    if (!confirm(`Cancel job ${job.name || job.id}?`)) return;
    try { renderJobHead(head, await api.cancel(job.id)); } catch (e) { showError(e); }
  });
  const fm = job.final_metrics || {};
  head.replaceChildren(
    h("h1", {}, job.name || shortId(job.id), " ", statusBadge(job.status)),
    h("div", { class: "facts" },
      h("span", {}, `kind ${job.kind}`), progressBar(job),
      h("span", {}, `ETA ${job.status === "running" ? duration(job.progress?.eta_seconds) : "—"}`),
      h("span", {}, `attempts ${job.attempts}`), h("span", {}, `duration ${duration(jobSeconds(job))}`),
      h("span", { class: "ap" }, `AP ${num(jobAP(job))}`),
      ...["AP50", "AP75"].map((k) => h("span", {}, `${k} ${num(fm[k])}`)),
      job.kind === "distill" ? h("a", { href: `#/jobs/${job.id}/instances`, id: "open-gi", class: "button" }, "General instances") : "",
      cancel),
    job.error ? h("p", { class: "error" }, job.error) : "");
}

// ------------------------------------------------------------------ compare

function roleOf(job, jobs) {
  if (job.kind === "distill") return "GID";
  return jobs.some((o) => o.teacher_model_id && o.teacher_model_id === job.output_model_id) ? "teacher" : "baseline";
}

async function renderCompare(ids) {
  if (!ids.length) {
    show(h("section", {}, h("h1", {}, "Compare"), h("p", {}, "Select two or more jobs on the Jobs page and press Compare selected.")));
    return;
  }
  const [jobs, metrics, models] = await Promise.all([
    Promise.all(ids.map(api.job)), Promise.all(ids.map((id) => api.metrics(id))), api.models()]);
  const sizeOf = Object.fromEntries(models.items.map((m) => [m.id, m.size]));
  const cols = ["AP", "AP50", "AP75", "APs", "APm", "APl"];
  const table = h("table", { id: "compare-table", class: "paper" },
    h("thead", {}, h("tr", {}, ["job", "role", ...cols, "params (M)", "time"].map((c) => h("th", {}, c)))),
    h("tbody", {}, jobs.map((j) => h("tr", { dataset: { jobId: j.id } },
      h("td", {}, h("a", { href: `#/jobs/${j.id}` }, j.name || shortId(j.id))),
      h("td", {}, roleOf(j, jobs)),
      ...cols.map((c) => h("td", {}, num(j.final_metrics?.[c] ?? j.latest_metrics?.[`eval/${c}`]))),
      // float32 weights: 4 bytes a parameter (the exported model file)
      h("td", { title: "from the float32 export's size" }, j.output_model_id && sizeOf[j.output_model_id] ? (sizeOf[j.output_model_id] / 4e6).toFixed(2) : "—"),
      h("td", {}, duration(jobSeconds(j)))))));
  const label = (j) => j.name || shortId(j.id);
  const overlay = (name) => metrics.map((m, i) => ({ name: label(jobs[i]), ...(m.series[name] || { steps: [], values: [] }) }));
  show(h("section", {}, h("h1", {}, "Compare"), table,
    h("div", { class: "charts", id: "compare-charts" },
      h("div", { class: "card" }, lineChart("total_loss", overlay("total_loss"))),
      h("div", { class: "card" }, lineChart("AP (validation, %)", overlay("eval/AP"))),
      h("div", { class: "card" }, lineChart("learning rate", overlay("lr"))))));
}

// ------------------------------------------------------------------ models and datasets

async function renderCatalog(kind) {
  const [page, jobs] = await Promise.all([kind === "models" ? api.models() : api.datasets(), api.jobs()]);
  const usedBy = (id) => jobs.items.filter((j) => (kind === "models"
    ? [j.teacher_model_id, j.init_model_id, j.output_model_id] : [j.train_dataset_id, j.val_dataset_id]).includes(id));
  const links = (id) => usedBy(id).map((j) => h("a", { href: `#/jobs/${j.id}`, class: "chip" }, j.name || shortId(j.id)));
  const rows = page.items.map((x) => kind === "models"
    ? [x.name, x.arch, `${(x.categories || []).length}: ${(x.categories || []).join(", ")}`, bytes(x.size), x.source_job_id ? shortId(x.source_job_id) : "upload", links(x.id)]
    : [x.name, x.source, `${x.num_categories}: ${x.categories.join(", ")}`, String(x.num_images), String(x.num_annotations), links(x.id)]);
  const headers = kind === "models" ? ["name", "arch", "categories", "size", "from", "used by"] : ["name", "source", "categories", "images", "annotations", "used by"];
  show(h("section", {}, h("h1", {}, kind === "models" ? "Models" : "Datasets"),
    h("table", { id: kind }, h("thead", {}, h("tr", {}, headers.map((c) => h("th", {}, c)))),
      h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, c))))))));
}

// ------------------------------------------------------------------ router

async function route() {
  stopWatching();
  stopWatching = () => {};
  if (!session.token()) return renderSignIn();
  document.getElementById("nav").hidden = false;
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  try {
    if (parts[0] === "jobs" && parts[1] && parts[2] === "instances") return await renderInstances(main, parts[1], showError);
    if (parts[0] === "jobs" && parts[1]) return renderJob(parts[1]);
    if (parts[0] === "compare") return await renderCompare((parts[1] || "").split(",").filter(Boolean));
    if (parts[0] === "models" || parts[0] === "datasets") return await renderCatalog(parts[0]);
    return renderJobs();
  } catch (e) {
    if (e instanceof AuthError) return renderSignIn(e.message);
    show(h("p", { class: "error error-box" }, e.message));
  }
}

document.getElementById("sign-out").addEventListener("click", () => { session.signOut(); location.hash = ""; route(); });
window.addEventListener("hashchange", route);
route();
