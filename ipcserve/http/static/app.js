// ipcserve status page: polls /v1/models, /readyz, /v1/history and /v1/events every 2 s.
// charts.js draws the history, tryit.js sends try-it requests. Plain browser JavaScript,
// no build step, no requests to other hosts.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "ipcserve-api-key";
const REFRESH_MS = 2000;
let models = [];          // the last /v1/models answer's "data" (one entry per model)
let needsKey = false;     // did the server answer 401 without a key?

// -- API key and fetch ----------------------------------------------------------
function headers(extra) {
  const h = Object.assign({Accept: "application/json"}, extra);
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function getJSON(path) {
  // Document-relative paths ("v1/models") so a url_prefix just works.
  const r = await fetch(path, {headers: headers(), cache: "no-store", signal: AbortSignal.timeout(5000)});
  let body = null;
  try { body = await r.json(); } catch { /* not JSON: leave null */ }
  return {status: r.status, ok: r.ok, body};
}

// -- status table -----------------------------------------------------------------
function modelState(s) {
  if (!s.started) return "stopped";
  if (s.draining) return "draining";
  if (s.circuit_open) return "circuit open";
  if (s.supervisor_failing) return "supervisor failing";  // not ready: nothing restarts crashes
  const states = [...new Set((s.workers || []).map((w) => w.state))];
  return states.join(", ") || "unknown";
}

// A version the model pool loads on demand, when it is not loaded: not a failure.
const POOL_STATES = {unloaded: "not loaded", loading: "loading", unloading: "unloading",
                     failed: "load failed"};

function poolState(load) {
  if (!load || !load.managed || load.state === "loaded") return null;
  if (load.state === "unloaded" && load.unloaded_by === "evicted") return "evicted";
  if (load.state === "unloaded" && load.unloaded_by === "idle") return "unloaded (idle)";
  return POOL_STATES[load.state] || load.state;
}

// "v1 90 % · v2 10 % canary · v3 shadow": each version with its share, role and state.
function versionsText(m) {
  const versions = m.versions || [];
  if (versions.length < 2) return "-";
  return versions.map((v) => {
    const share = v.role === "shadow" ? "shadow" : (+v.share.toFixed(1)) + " %" +
      (v.role === "canary" ? " canary" : v.role === "standby" ? " standby" : "");
    const state = v.state === "loaded" ? "" : " (" + (poolState(Object.assign({managed: true}, v)) || v.state) + ")";
    return v.version + " " + share + state;
  }).join(" · ");
}

function versionsTitle(m) {
  return (m.versions || []).map((v) => v.version + ": " + v.role + ", " + v.state + ", " +
    v.requests + " requests, " + v.failed + " failed" +
    (Object.keys(v.shadow_results || {}).length ? ", shadow " + Object.entries(v.shadow_results)
      .map(([k, c]) => k + " " + c).join(" ") : "")).join("\n");
}

function cell(row, cls, text) {
  const td = row.insertCell();
  td.className = cls;
  td.textContent = text;
  return td;
}

function renderModels(list) {
  const tbody = $("models");
  tbody.replaceChildren();
  for (const m of list) {
    const s = m.status || {}, workers = s.workers || [], lat = m.recent_latency;
    const pooled = poolState(m.load), state = pooled || modelState(s);
    const sum = (field) => workers.reduce((n, w) => n + (w[field] || 0), 0);
    const row = tbody.insertRow();
    row.dataset.model = m.name;
    cell(row, "name", m.name + " (" + (m.task || m.kind) + ")");
    const badge = cell(row, "state", "").appendChild(document.createElement("span"));
    badge.className = "badge " + (state === "ready" ? "ok" : pooled && pooled !== "load failed" ? "idle" : "bad");
    badge.textContent = state;
    cacheWarning(badge.parentNode, m.cache);
    // Loaded at start, or on demand (lazy) by the model pool, maybe unloaded after idling.
    const load = m.load || {};
    cell(row, "load", load.mode === "lazy" ? "lazy" : "at start").title = load.idle_unload
      ? "unloaded after " + load.idle_unload + " s without a request" : "";
    const versions = cell(row, "versions", versionsText(m));
    versions.title = versionsTitle(m);
    cell(row, "pid", workers.map((w) => w.pid || "-").join(", "));
    cell(row, "restarts", sum("restarts"));
    cell(row, "crashes", s.crashes ?? 0);
    cell(row, "inflight", s.inflight ?? 0);  // requests waiting for or inside the ML process
    cell(row, "served", sum("served"));
    // Requests nobody waited for any more (client gone, deadline passed): skipped or interrupted.
    const cancelled = Object.values(s.cancelled || {}).reduce((n, c) => n + c, 0);
    cell(row, "cancelled", cancelled).title = Object.entries(s.cancelled || {})
      .map(([k, c]) => k.replace("_", ", ") + ": " + c).join("\n");
    cell(row, "p50", lat ? lat.p50_ms + " ms" : "-");
    cell(row, "p95", lat ? lat.p95_ms + " ms" : "-");
    cell(row, "revision", m.revision ?? "-");
    const loaded = cell(row, "loaded", m.load_seconds == null ? "-" : m.load_seconds + " s");
    if (m.loaded_at) loaded.title = "loaded at " + new Date(m.loaded_at * 1000).toLocaleString();
    const actions = cell(row, "actions", "");
    if (m.reload) {  // only where the server offers a reload
      const button = actions.appendChild(document.createElement("button"));
      button.type = "button";
      button.className = "reload";
      button.textContent = reloading.has(m.name) ? "Reloading…" : "Reload";
      button.disabled = reloading.has(m.name);
      button.title = "Load a new version of " + m.name + " and switch to it without dropping a request";
      button.addEventListener("click", () => reloadModel(m));
    }
    const figures = generationFigures(m.name, s.steps, m.task);
    if (figures) {  // a row of its own under the model's: continuous batching at work
      const line = tbody.insertRow();
      line.className = "generation";
      line.dataset.generation = m.name;
      const td = cell(line, "figures", figures.text);
      td.colSpan = row.cells.length;
      td.title = figures.title;
    }
  }
}

// A cache backend that fails (Redis down or hung) looks like a cold cache from outside: the
// model answers every request. Say so next to the state: red while the backend is failing,
// grey once it works again (the count stays, for the record).
function cacheWarning(td, cache) {
  const errors = (cache && cache.errors) || {};
  const total = Object.values(errors).reduce((n, c) => n + c, 0);
  if (!total) return;
  td.append(" ");
  const warning = td.appendChild(document.createElement("span"));
  warning.className = "badge cache-errors" + (cache.failing ? " bad" : "");
  warning.textContent = "cache errors: " + total;
  const last = cache.last_error;
  warning.title = "The response cache (" + cache.backend + ") failed " + total + " time(s): " +
    Object.entries(errors).map(([op, c]) => op + " " + c).join(", ") +
    (last ? "\nlast: " + new Date(last.time * 1000).toLocaleTimeString() + ", " + last.op + ": " + last.error : "") +
    "\nThe model answered those requests; " + (cache.failing ? "the backend is still failing." : "the backend works again.");
}

// -- generation figures --------------------------------------------------------------
// /v1/models gives the step scheduler's counters (status.steps); rates and means are taken
// between two refreshes of the page.
const lastSteps = new Map();  // model name -> {at: ms, steps: the previous counters}

function generationFigures(name, steps, task) {
  if (!steps || (!steps.steps && task !== "text-generation")) return null;
  const now = performance.now(), before = lastSteps.get(name);
  lastSteps.set(name, {at: now, steps});
  const ms = (sum) => (sum * 1000).toFixed(sum < 0.1 ? 1 : 0) + " ms";
  const mean = (h, old) => {
    const count = h.count - (old ? old.count : 0), sum = h.sum - (old ? old.sum : 0);
    return count > 0 ? ms(sum / count) : h.count > 0 ? ms(h.sum / h.count) : "-";
  };
  const old = before && before.steps.steps <= steps.steps ? before.steps : null;
  const seconds = before ? (now - before.at) / 1000 : 0;
  const tokensPerS = old && seconds > 0 ? (steps.tokens - old.tokens) / seconds : null;
  const stepsNow = old ? steps.steps - old.steps : 0;
  const meanBatch = stepsNow > 0 ? (steps.rows_total - old.rows_total) / stepsNow
    : steps.steps > 0 ? steps.rows_total / steps.steps : 0;
  return {
    text: "Generation: batch " + steps.rows + " now (mean " + meanBatch.toFixed(1) + ") · " +
      (tokensPerS === null ? "-" : tokensPerS.toFixed(1)) + " tokens/s · first token " +
      mean(steps.first_item, old && old.first_item) + " · between tokens " +
      mean(steps.between_items, old && old.between_items),
    title: "The running batch: sequences in the step running now, and per step since the last " +
      "refresh. Means since the last refresh (or since start when nothing new came): time to " +
      "first token (from the ML process reading the request) and between tokens of a stream. " +
      steps.tokens + " tokens in " + steps.steps + " steps in all.",
  };
}

// -- reload ------------------------------------------------------------------------
const reloading = new Set();  // models with a reload in flight (the table is re-drawn meanwhile)

async function reloadModel(m) {
  const note = $("reload-note");
  if (needsKey && !$("api-key").value.trim()) {
    // Reloading replaces the model for everyone: ask for the key, never send without it.
    const key = window.prompt("Reloading " + m.name + " needs the server's API key:");
    if (!key) { note.textContent = "Not reloaded: no API key given."; return; }
    $("api-key").value = key;
    saveKey();
  }
  reloading.add(m.name);
  note.textContent = "Reloading " + m.name + "…";
  try {
    const r = await fetch(m.reload, {method: "POST", headers: headers(), signal: AbortSignal.timeout(300000)});
    let body = null;
    try { body = await r.json(); } catch { /* not JSON */ }
    note.textContent = r.ok
      ? m.name + ": revision " + body.revision + " serving (loaded in " + body.load_seconds + " s)."
      : m.name + " not reloaded: HTTP " + r.status + " " + errorText(body);
    note.className = "note " + (r.ok ? "" : "bad");
  } catch (err) {
    note.textContent = m.name + " not reloaded: " + err.message;
  } finally {
    reloading.delete(m.name);
  }
}

// The message of an ipcserve error ({"error": "...", "type": "..."}) or an OpenAI-shaped one
// ({"error": {"message": "...", "type": "..."}}), as the API returned it.
function errorText(body) {
  const e = body && typeof body === "object" ? body.error : null;
  if (typeof e === "string") return (body.type ? body.type + ": " : "") + e;
  if (e && typeof e === "object") return (e.type ? e.type + ": " : "") + (e.message || "");
  return "(no JSON error body)";
}

function renderModelChoice(list, fallback) {
  const select = $("model");
  const names = list.map((m) => m.name);
  if (names.join() === [...select.options].map((o) => o.value).join()) return;
  const current = select.value || fallback;
  select.replaceChildren(...names.map((n) => new Option(n, n, false, n === current)));
  showInputs();
}

async function refresh() {
  try {
    const [listing, ready, history, events] = await Promise.all(
      [getJSON("v1/models"), getJSON("readyz"), getJSON("v1/history"), getJSON("v1/events?limit=100")]);
    if (listing.status === 401 && !$("api-key").value.trim()) needsKey = true;
    const r = ready.body || {};
    $("ready").textContent = r.draining ? "draining" : r.ready ? "ready" : "not ready";
    $("ready").className = "badge " + (r.ready ? "ok" : "bad");
    if (listing.ok) {
      models = listing.body.data;  // OpenAI's list shape; "default" is ipcserve's
      renderModels(models);
      renderModelChoice(models, listing.body.default);
      $("status-note").textContent = "Updated " + new Date().toLocaleTimeString() + "; refreshes every 2 s.";
      const eventList = events.ok ? events.body.data : [];
      if (events.ok) renderEvents(eventList);
      if (history.ok) renderCharts(history.body, eventList);  // charts.js
      if (history.ok) renderKeys(history.body.keys);
    } else {
      const e = listing.body || {};  // ipcserve errors: {"error": "<message>", "type": "<ErrorType>"}
      $("status-note").textContent = "Status unavailable: HTTP " + listing.status + " " +
        (e.type || "") + (listing.status === 401 ? " (enter the API key above)" : "");
    }
  } catch (err) {
    $("ready").textContent = "unreachable";
    $("ready").className = "badge bad";
    $("status-note").textContent = "Cannot reach the server: " + err.message;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

// -- wiring ------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  // The key stays in this tab's sessionStorage: it survives a reload of the page, and
  // is never written to disk or shared with other tabs.
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("input", saveKey);
  setUpTryIt();  // tryit.js
  refresh();
});

function saveKey() {
  const key = $("api-key").value;
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

// -- API keys -------------------------------------------------------------------------
function renderKeys(keys) {
  $("keys-section").hidden = !keys;
  if (!keys) return;
  const tbody = $("keys");
  tbody.replaceChildren();
  for (const [name, usage] of Object.entries(keys)) {
    const row = tbody.insertRow();
    row.dataset.key = name;
    cell(row, "name", name);
    cell(row, "requests", String(usage.requests));
    cell(row, "limited", String(usage.limited));
    cell(row, "tokens", String(usage.tokens));
  }
}

// -- event log -------------------------------------------------------------------------
function renderEvents(list) {
  const tbody = $("events");
  tbody.replaceChildren();
  for (const e of list) {
    const row = tbody.insertRow();
    row.dataset.kind = e.kind;
    row.className = "event " + e.kind;
    const when = new Date(e.time * 1000);
    cell(row, "time", when.toLocaleTimeString()).title = when.toISOString();
    cell(row, "model", e.model || "(server)");
    cell(row, "kind", e.kind);
    cell(row, "message", e.message);
  }
  if (!list.length) cell(tbody.insertRow(), "empty", "Nothing happened yet.").colSpan = 4;
}
