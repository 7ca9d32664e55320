// ipcserve status page: polls /v1/models and /readyz, and sends try-it requests.
// Plain browser JavaScript, no build step, no requests to other hosts.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "ipcserve-api-key";
const REFRESH_MS = 2000;
let models = [];          // the last /v1/models answer's "data" (one entry per model)
let drawn = false;        // has the canvas anything on it?

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
  const states = [...new Set((s.workers || []).map((w) => w.state))];
  return states.join(", ") || "unknown";
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
    const s = m.status || {}, workers = s.workers || [], lat = m.recent_latency, state = modelState(s);
    const sum = (field) => workers.reduce((n, w) => n + (w[field] || 0), 0);
    const row = tbody.insertRow();
    row.dataset.model = m.name;
    cell(row, "name", m.name + " (" + m.kind + ")");
    const badge = cell(row, "state", "").appendChild(document.createElement("span"));
    badge.className = "badge " + (state === "ready" ? "ok" : "bad");
    badge.textContent = state;
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
  }
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
    const [listing, ready] = await Promise.all([getJSON("v1/models"), getJSON("readyz")]);
    const r = ready.body || {};
    $("ready").textContent = r.draining ? "draining" : r.ready ? "ready" : "not ready";
    $("ready").className = "badge " + (r.ready ? "ok" : "bad");
    if (listing.ok) {
      models = listing.body.data;  // OpenAI's list shape; "default" is ipcserve's
      renderModels(models);
      renderModelChoice(models, listing.body.default);
      $("status-note").textContent = "Updated " + new Date().toLocaleTimeString() + "; refreshes every 2 s.";
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

// -- try it ----------------------------------------------------------------------
function selected() {
  return models.find((m) => m.name === $("model").value);
}

function showInputs() {
  const m = selected();
  const isImage = !m || m.kind === "image";
  $("image-input").hidden = !isImage;
  $("json-input").hidden = isImage;
}

// status 0: no HTTP answer; body is then the message to show.
function showResult(status, body, ms) {
  $("result-time").textContent = status ? "HTTP " + status + " in " + Math.round(ms) + " ms" : "";
  // Indented JSON, but arrays of plain values on one line (10 probabilities, not 10 lines).
  $("result-json").textContent = !status ? "" : JSON.stringify(body, null, 2)
    .replace(/\[\s+([^[\]{}]*?)\s+\]/g, (all, inner) => "[" + inner.replace(/,\s+/g, ", ") + "]");
  const obj = body !== null && typeof body === "object" ? body : {};  // models may answer 42
  // ipcserve errors are {"error": "<message>", "type": "<ErrorType>"}.
  const ok = status >= 200 && status < 400, err = obj.error;
  $("error").hidden = ok;
  $("error").textContent = ok ? "" : !status ? body : "HTTP " + status + " " +
    (typeof err === "string" ? (obj.type ? obj.type + ": " : "") + err : "(no JSON error body)");
  $("result-label").textContent = ok && "label" in obj ? obj.label : "";
  const bars = $("result-bars");
  bars.replaceChildren();
  (ok && Array.isArray(obj.probabilities) ? obj.probabilities : []).forEach((p, i) => {
    const li = document.createElement("li");
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = Math.max(0, Math.min(100, p * 100)) + "%";
    li.append(String(i), bar, " " + (p * 100).toFixed(1) + "%");
    bars.append(li);
  });
}

async function predict(body, contentType) {
  const m = selected();
  const name = m ? m.name : $("model").value;
  if (!name) return showResult(0, "No model is served (yet).");
  const extra = contentType ? {"Content-Type": contentType} : {};  // FormData sets its own
  const started = performance.now();
  $("predict").disabled = true;
  try {
    const r = await fetch("v1/models/" + encodeURIComponent(name) + "/predict",
                          {method: "POST", headers: headers(extra), body, signal: AbortSignal.timeout(60000)});
    const text = await r.text();
    let parsed;
    try { parsed = JSON.parse(text); } catch { parsed = text; }
    showResult(r.status, parsed, performance.now() - started);
  } catch (err) {
    showResult(0, "Request failed: " + err.message);
  } finally {
    $("predict").disabled = false;
  }
}

function sendFile(file) {
  if (!file) return;
  const form = new FormData();
  form.append("image", file, file.name);
  predict(form, null);
  // Show the picture on the canvas too (if the browser can decode it).
  createImageBitmap(file).then((img) => {
    clearCanvas();
    const c = $("canvas"), scale = Math.min(c.width / img.width, c.height / img.height);
    const w = img.width * scale, h = img.height * scale;
    c.getContext("2d").drawImage(img, (c.width - w) / 2, (c.height - h) / 2, w, h);
    drawn = true;
  }).catch(() => {});
}

// -- canvas ------------------------------------------------------------------------
function clearCanvas() {
  const c = $("canvas"), ctx = c.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, c.width, c.height);
  drawn = false;
}

function setUpCanvas() {
  const c = $("canvas"), ctx = c.getContext("2d");
  let last = null;
  const point = (e) => {  // CSS pixels -> canvas pixels
    const box = c.getBoundingClientRect();
    return [(e.clientX - box.left) * c.width / box.width, (e.clientY - box.top) * c.height / box.height];
  };
  const line = (from, to) => {
    ctx.strokeStyle = "#000";
    ctx.lineWidth = c.width / 10;   // a thick pen, like a marker on a small card
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(...from);
    ctx.lineTo(...to);
    ctx.stroke();
    drawn = true;
  };
  c.addEventListener("pointerdown", (e) => {
    c.setPointerCapture(e.pointerId);
    last = point(e);
    line(last, last);
  });
  c.addEventListener("pointermove", (e) => {
    if (!last) return;
    const p = point(e);
    line(last, p);
    last = p;
  });
  const stop = () => { last = null; };
  c.addEventListener("pointerup", stop);
  c.addEventListener("pointercancel", stop);
  clearCanvas();
}

// -- wiring ------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  const key = $("api-key");
  key.value = localStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("input", () => {
    if (key.value) localStorage.setItem(KEY_STORAGE, key.value);
    else localStorage.removeItem(KEY_STORAGE);
  });
  setUpCanvas();
  $("clear").addEventListener("click", clearCanvas);
  $("model").addEventListener("change", showInputs);
  $("file").addEventListener("change", (e) => { sendFile(e.target.files[0]); e.target.value = ""; });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    sendFile(e.dataTransfer.files[0]);
  });
  $("try").addEventListener("submit", (e) => {
    e.preventDefault();
    const m = selected();
    if (m && m.kind === "json") return predict($("json-body").value, "application/json");
    if (!drawn) return showResult(0, "Draw a digit first, or choose an image file.");
    $("canvas").toBlob((blob) => predict(blob, "image/png"), "image/png");
  });
  refresh();
});
