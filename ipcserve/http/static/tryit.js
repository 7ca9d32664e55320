// ipcserve status page: the try-it form, for every kind of model.
//   image (kind "image"): draw on the canvas or drop/choose a file -> multipart or image/png
//   json (kind "json"): a JSON body, pre-filled from the model's schema in /openapi.json
//   text generation (task "text-generation"): the answer streams in (NDJSON read from
//     fetch's ReadableStream, one item per token)
//   embeddings (task "feature-extraction"): POST /v1/embeddings, OpenAI's API
// Each request is also shown as a curl line; errors are shown as the API returned them.
// Uses app.js's helpers ($, headers, models, errorText).
"use strict";

let drawn = false;        // has the canvas anything on it?
let openapi = null;       // /openapi.json, fetched once (request schemas for JSON bodies)
let prefilledFor = null;  // the model whose schema filled the JSON body (null: the user's text)

function selected() {
  return models.find((m) => m.name === $("model").value);
}

// What the form asks for: "image", "json", "generate" or "embed".
function tryKind(m) {
  if (!m) return "image";
  if (m.task === "text-generation") return "generate";
  if (m.task === "feature-extraction") return "embed";
  return m.kind === "image" ? "image" : "json";
}

function showInputs() {
  const kind = tryKind(selected());
  $("image-input").hidden = kind !== "image";
  $("json-input").hidden = kind !== "json";
  $("text-input").hidden = kind !== "generate";
  $("embed-input").hidden = kind !== "embed";
  $("predict").textContent = {generate: "Generate", embed: "Embed"}[kind] || "Predict";
  if (kind === "json") prefillJSON(selected());
  clearResult();  // another model: the last answer was not its
}

function clearResult() {
  for (const id of ["result-label", "result-time", "result-json", "result-stream", "curl"]) $(id).textContent = "";
  $("result-bars").replaceChildren();
  $("error").hidden = true;
  $("result-stream").dataset.state = "";
}

// -- JSON bodies from the schema -------------------------------------------------------
function example(schema, depth) {
  if (!schema || typeof schema !== "object" || depth > 4) return 1;
  if ("default" in schema) return schema.default;
  if (Array.isArray(schema.examples) && schema.examples.length) return schema.examples[0];
  if ("const" in schema) return schema.const;
  if (Array.isArray(schema.enum) && schema.enum.length) return schema.enum[0];
  const type = Array.isArray(schema.type) ? schema.type.find((t) => t !== "null") : schema.type;
  switch (type) {
    case "string": return "text";
    case "integer": return Math.max(1, schema.minimum ?? 1);
    case "number": return Math.max(1, schema.minimum ?? 1);
    case "boolean": return true;
    case "array": return Array.from({length: Math.max(1, schema.minItems || 1)},
                                    () => example(schema.items, depth + 1));
    case "object": {
      const out = {}, props = schema.properties || {};
      const keys = schema.required && schema.required.length ? schema.required : Object.keys(props);
      for (const k of keys) out[k] = example(props[k], depth + 1);
      return out;
    }
    default: return 1;  // no type: any value; a number is the likeliest to make sense
  }
}

async function prefillJSON(m) {
  if (!m || prefilledFor === m.name) return;
  const area = $("json-body");
  if (prefilledFor === null && area.dataset.edited) return;  // keep what the user typed
  if (!openapi) {
    const r = await getJSON("openapi.json");
    if (!r.ok) return;
    openapi = r.body;
  }
  const path = Object.keys(openapi.paths || {}).find((p) => p.endsWith("/v1/models/" + m.name + "/predict"));
  const content = path && openapi.paths[path].post.requestBody.content["application/json"];
  if (!content) return;
  area.value = JSON.stringify(example(content.schema, 0), null, 2);
  prefilledFor = m.name;
  delete area.dataset.edited;
}

// -- the curl line ----------------------------------------------------------------------
function shellQuote(s) { return "'" + String(s).replace(/'/g, "'\\''") + "'"; }

function showCurl(path, parts) {
  const url = new URL(path, document.baseURI).href;
  // The key itself is never shown (screenshots, screen sharing): curl reads it from the environment.
  const key = $("api-key").value.trim() ? " -H \"Authorization: Bearer $IPCSERVE_API_KEY\"" : "";
  $("curl").textContent = "curl -sS" + (parts.stream ? " -N" : "") + " -X POST " + shellQuote(url) + key +
    (parts.type ? " -H " + shellQuote("Content-Type: " + parts.type) : "") +
    (parts.accept ? " -H " + shellQuote("Accept: " + parts.accept) : "") +
    (parts.data !== undefined ? " -d " + shellQuote(parts.data) : "") +
    (parts.form ? " -F " + shellQuote(parts.form) : "") +
    (parts.file ? " --data-binary " + shellQuote("@" + parts.file) : "");
}

// -- results ------------------------------------------------------------------------------
// status 0: no HTTP answer; body is then the message to show.
function showResult(status, body, ms) {
  $("result-time").textContent = status ? "HTTP " + status + " in " + Math.round(ms) + " ms" : "";
  // Indented JSON, but arrays of plain values on one line (10 probabilities, not 10 lines).
  $("result-json").textContent = !status ? "" : JSON.stringify(body, null, 2)
    .replace(/\[\s+([^[\]{}]*?)\s+\]/g, (all, inner) => "[" + inner.replace(/,\s+/g, ", ") + "]");
  const obj = body !== null && typeof body === "object" ? body : {};  // models may answer 42
  const ok = status >= 200 && status < 400;
  $("error").hidden = ok;
  $("error").textContent = ok ? "" : !status ? body : "HTTP " + status + " " + errorText(obj);
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

function startRequest() {
  $("predict").disabled = true;
  $("result-stream").textContent = "";
  $("result-stream").dataset.state = "";
  return performance.now();
}

async function send(path, init) {
  const r = await fetch(path, Object.assign({signal: AbortSignal.timeout(60000)}, init));
  const text = await r.text();
  let parsed;
  try { parsed = JSON.parse(text); } catch { parsed = text; }
  return [r.status, parsed];
}

function predictPath(name) { return "v1/models/" + encodeURIComponent(name) + "/predict"; }

async function predict(body, contentType, curlParts) {
  const m = selected();
  const name = m ? m.name : $("model").value;
  if (!name) return showResult(0, "No model is served (yet).");
  const extra = contentType ? {"Content-Type": contentType} : {};  // FormData sets its own
  showCurl(predictPath(name), curlParts);
  const started = startRequest();
  try {
    const [status, parsed] = await send(predictPath(name), {method: "POST", headers: headers(extra), body});
    showResult(status, parsed, performance.now() - started);
  } catch (err) {
    showResult(0, "Request failed: " + err.message);
  } finally {
    $("predict").disabled = false;
  }
}

// Text generation: POST the prompt, read NDJSON items as they arrive, append each token.
async function generate(m) {
  const maxTokens = parseInt($("max-tokens").value, 10) || 32;
  const body = JSON.stringify({prompt: $("prompt").value, max_tokens: maxTokens});
  const accept = "application/x-ndjson";
  showCurl(predictPath(m.name), {type: "application/json", accept, data: body, stream: true});
  const out = $("result-stream");
  const started = startRequest();
  showResult(0, "");
  $("error").hidden = true;
  try {
    const r = await fetch(predictPath(m.name), {method: "POST", body, signal: AbortSignal.timeout(120000),
                                                 headers: headers({"Content-Type": "application/json", Accept: accept})});
    if (!r.ok || !(r.headers.get("Content-Type") || "").includes("ndjson")) {
      const text = await r.text();
      let parsed;
      try { parsed = JSON.parse(text); } catch { parsed = text; }
      return showResult(r.status, parsed, performance.now() - started);
    }
    out.dataset.state = "streaming";
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let pending = "", last = null, count = 0;
    for (;;) {
      const {value, done} = await reader.read();
      pending += decoder.decode(value || new Uint8Array(), {stream: !done});
      let nl;
      while ((nl = pending.indexOf("\n")) >= 0) {
        const line = pending.slice(0, nl);
        pending = pending.slice(nl + 1);
        if (!line.trim()) continue;
        const item = JSON.parse(line);
        if (typeof item.error === "string") {  // the stream ended with an error frame
          $("error").hidden = false;
          $("error").textContent = "Stream ended with an error: " + errorText(item);
          continue;
        }
        count += 1;
        last = item;
        if (typeof item.text === "string") out.textContent += item.text;
        else out.textContent += JSON.stringify(item) + "\n";
      }
      if (done) break;
    }
    out.dataset.state = "done";
    $("result-time").textContent = "HTTP " + r.status + ", " + count + " items streamed in " +
      Math.round(performance.now() - started) + " ms";
    $("result-json").textContent = last ? JSON.stringify(last, null, 2) : "";
  } catch (err) {
    out.dataset.state = "failed";
    showResult(0, "Request failed: " + err.message);
  } finally {
    $("predict").disabled = false;
  }
}

// Embeddings through OpenAI's API; long vectors are shown shortened.
async function embed(m) {
  const input = $("texts").value.split("\n").map((t) => t.trim()).filter(Boolean);
  const body = JSON.stringify({model: m.name, input, encoding_format: "float"});
  showCurl("v1/embeddings", {type: "application/json", data: body});
  const started = startRequest();
  try {
    const [status, parsed] = await send("v1/embeddings", {method: "POST", body,
                                                          headers: headers({"Content-Type": "application/json"})});
    if (status === 200 && parsed && Array.isArray(parsed.data)) {
      const dims = parsed.data.length ? parsed.data[0].embedding.length : 0;
      $("result-stream").textContent = parsed.data.length + " vectors of " + dims + " dimensions";
      const shown = Object.assign({}, parsed, {data: parsed.data.map((d) => Object.assign({}, d, {
        embedding: d.embedding.length > 8 ? [...d.embedding.slice(0, 8).map((v) => +v.toFixed(4)), "…"] : d.embedding}))});
      return showResult(status, shown, performance.now() - started);
    }
    showResult(status, parsed, performance.now() - started);
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
  predict(form, null, {form: "image=@" + file.name});
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

// -- wiring (called by app.js once the page is parsed) -------------------------------------
function setUpTryIt() {
  setUpCanvas();
  $("clear").addEventListener("click", clearCanvas);
  $("model").addEventListener("change", showInputs);
  $("json-body").addEventListener("input", () => { $("json-body").dataset.edited = "1"; prefilledFor = null; });
  $("file").addEventListener("change", (e) => { sendFile(e.target.files[0]); e.target.value = ""; });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    sendFile(e.dataTransfer.files[0]);
  });
  $("copy-curl").addEventListener("click", () => {
    const text = $("curl").textContent;
    // The clipboard API needs a secure context (https or localhost); select the text otherwise.
    if (navigator.clipboard && window.isSecureContext) navigator.clipboard.writeText(text).catch(() => {});
    const range = document.createRange();
    range.selectNodeContents($("curl"));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
  });
  $("try").addEventListener("submit", (e) => {
    e.preventDefault();
    const m = selected(), kind = tryKind(m);
    if (kind === "generate") return generate(m);
    if (kind === "embed") return embed(m);
    if (kind === "json") {
      const body = $("json-body").value;
      return predict(body, "application/json", {type: "application/json", data: body});
    }
    if (!drawn) return showResult(0, "Draw a digit first, or choose an image file.");
    $("canvas").toBlob((blob) => predict(blob, "image/png",
                                         {type: "image/png", file: "digit.png"}), "image/png");
  });
}
