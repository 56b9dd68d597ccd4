// All data access of the dashboard: the /v1 REST API with the session's bearer token.
// Live updates: a job's Server-Sent Events (followEvents: fetch() and a stream parser, since
// EventSource cannot send the bearer header and the token never goes in a URL), or polling (watch).

const TOKEN_KEY = "gid.token";
export const POLL_MS = 2000;

export class AuthError extends Error {}

export const session = {
  token: () => sessionStorage.getItem(TOKEN_KEY),
  signIn: (token) => sessionStorage.setItem(TOKEN_KEY, token),
  signOut: () => sessionStorage.removeItem(TOKEN_KEY),
};

async function request(path, { method = "GET", accept = "json" } = {}) {
  const response = await fetch(path, { method, headers: { Authorization: `Bearer ${session.token()}` } });
  if (response.status === 401) {
    session.signOut();
    throw new AuthError("the token is invalid or revoked");
  }
  if (!response.ok) {
    let detail = response.statusText;
    try {
      const body = await response.json();
      detail = typeof body.detail === "string" ? body.detail
        : body.detail.map((e) => `${e.loc.join(".")}: ${e.msg}`).join("; ");
    } catch { /* not JSON */ }
    const error = new Error(detail);
    error.status = response.status;
    throw error;
  }
  if (accept === "blob") return response.blob();
  if (accept === "text") return response.text();
  return response.json();
}

// A query string; an array value repeats its key (?tag=a&tag=b).
const q = (params) => new URLSearchParams(Object.entries(params).flatMap(([k, v]) => (Array.isArray(v) ? v : [v])
  .filter((x) => x !== undefined && x !== "").map((x) => [k, x]))).toString();

export const api = {
  check: (token) => fetch("/v1/jobs?limit=1", { headers: { Authorization: `Bearer ${token}` } }).then((r) => r.ok),
  jobs: ({ status, kind, tag = [], limit = 200 } = {}) => request(`/v1/jobs?${q({ status, kind, tag, limit })}`),
  job: (id) => request(`/v1/jobs/${encodeURIComponent(id)}`),
  metrics: (id, maxPoints = 500) => request(`/v1/jobs/${encodeURIComponent(id)}/metrics?${q({ max_points: maxPoints })}`),
  artifacts: (id) => request(`/v1/jobs/${encodeURIComponent(id)}/artifacts`),
  download: (id, name) => request(`/v1/jobs/${encodeURIComponent(id)}/artifacts/${name.split("/").map(encodeURIComponent).join("/")}`, { accept: "blob" }),
  cancel: (id) => request(`/v1/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST" }),
  instances: (id, image) => request(`/v1/jobs/${encodeURIComponent(id)}/instances?${q({ image })}`),
  // GET /v1/jobs/{id}/logs?tail=N (plain text) where the server has it; null where it does not.
  logTail: async (id, tail = 200) => {
    try {
      return await request(`/v1/jobs/${encodeURIComponent(id)}/logs?${q({ tail })}`, { accept: "text" });
    } catch (e) {
      if (e instanceof AuthError) throw e;
      return null;
    }
  },
  datasets: () => request("/v1/datasets?limit=500"),
  models: () => request("/v1/models?limit=500"),
};

// Calls load() now and every POLL_MS until the returned stop() is called or load() says it is done
// (returns true). One call in flight at a time; errors go to onError and polling continues.
export function watch(load, onError) {
  let stopped = false;
  let timer = null;
  const tick = async () => {
    let done = false;
    try {
      done = await load();
    } catch (e) {
      onError?.(e);
      if (e instanceof AuthError) done = true;
    }
    if (!stopped && !done) timer = setTimeout(tick, POLL_MS);
  };
  tick();
  return () => { stopped = true; clearTimeout(timer); };
}

// ------------------------------------------------------------------ Server-Sent Events

// Reads an SSE body (text/event-stream) from a fetch() response and calls onMessage({ id, event,
// data }) per dispatched message, as the EventSource algorithm does: lines end in \n, \r\n or
// \r; ":" starts a comment; a blank line dispatches; "id" is remembered even by messages without
// data (returned at the end: the Last-Event-ID to resume from). Returns { lastId, retry }.
export async function readEventStream(response, onMessage, { lastId = null } = {}) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let retry = null;
  let event = "";
  let data = [];
  const line = (text) => {
    if (text === "") {
      if (data.length) onMessage({ id: lastId, event: event || "message", data: data.join("\n") });
      event = "";
      data = [];
      return;
    }
    if (text.startsWith(":")) return;
    const colon = text.indexOf(":");
    const field = colon < 0 ? text : text.slice(0, colon);
    let value = colon < 0 ? "" : text.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
    else if (field === "id" && !value.includes("\0")) lastId = value;
    else if (field === "retry" && /^\d+$/.test(value)) retry = Number(value);
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    // a trailing \r may be the first half of \r\n: keep it for the next chunk
    const parts = buffer.split(/\r\n|\r(?!$)|\n/);
    buffer = parts.pop();
    parts.forEach(line);
  }
  return { lastId, retry };
}

export const STREAM_FAILURES = 3; // streams in a row that fail before any event: give up, poll

// Follows /v1/jobs/{id}/events: onEvent(kind, data, id) per event, oldest first; reconnects after
// the server's retry delay with Last-Event-ID (nothing missed, nothing twice) until isDone() says
// the job is over, or stop() is called. A stream that cannot be had (an HTTP error, or
// STREAM_FAILURES connections in a row that bring no event) calls onFallback() once: poll instead.
// An invalid token goes to onError as AuthError and ends it.
export function followEvents(id, { onEvent, onOpen, onFallback, onError, isDone }) {
  const abort = new AbortController();
  let lastId = null;
  let retryMs = POLL_MS;
  let failures = 0;
  const run = async () => {
    while (!abort.signal.aborted) {
      let gotEvent = false;
      let opened = null;
      try {
        const headers = { Authorization: `Bearer ${session.token()}`, Accept: "text/event-stream" };
        if (lastId !== null) headers["Last-Event-ID"] = lastId;
        const response = await fetch(`/v1/jobs/${encodeURIComponent(id)}/events`, { headers, signal: abort.signal, cache: "no-store" });
        if (response.status === 401) {
          session.signOut();
          throw new AuthError("the token is invalid or revoked");
        }
        if (!response.ok || !(response.headers.get("content-type") || "").startsWith("text/event-stream")) {
          throw Object.assign(new Error(`events: HTTP ${response.status}`), { fatal: true });
        }
        onOpen?.();
        opened = Date.now();
        const end = await readEventStream(response, (m) => {
          gotEvent = true;
          if (m.id !== null) lastId = m.id; // kept as it comes: a stream that breaks resumes after it
          let data = null;
          try { data = JSON.parse(m.data); } catch { return; }
          onEvent(m.event, data, m.id);
        }, { lastId });
        if (end.retry !== null) retryMs = end.retry;
      } catch (e) {
        if (abort.signal.aborted) return;
        if (e instanceof AuthError) return onError?.(e);
        if (e.fatal) return onFallback?.(e);
      }
      // a stream that brought events, or stayed open a while (idle: keep-alives only), was no failure
      failures = gotEvent || (opened !== null && Date.now() - opened > 10_000) ? 0 : failures + 1;
      if (isDone?.()) return;
      if (failures >= STREAM_FAILURES) return onFallback?.(new Error("events: the stream keeps failing"));
      await new Promise((resolve) => setTimeout(resolve, retryMs));
    }
  };
  run();
  return () => abort.abort();
}

export async function saveBlob(blob, filename) {
  const url = URL.createObjectURL(blob);
  const a = Object.assign(document.createElement("a"), { href: url, download: filename });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}
