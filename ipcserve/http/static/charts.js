// ipcserve status page: charts of /v1/history, drawn as inline SVG (no library, no build step).
// Per model: requests per second by outcome (stacked bars), latency p50/p95/p99 (lines with
// points), batch size and queue depth (bars); ML process crashes, restarts and reloads from
// /v1/events are vertical markers on every chart's time axis. Colours come from style.css
// (light and dark). Every drawn element carries a <title> (a tooltip, read by screen readers).
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const W = 320, H = 140, LEFT = 38, RIGHT = 6, TOP = 8, BOTTOM = 20;
// An array: a JS object would list the keys "200", "503", "504" before "4xx".
const OUTCOMES = [["200", "200 OK"], ["4xx", "4xx"], ["503", "503"], ["504", "504"],
                  ["cancelled", "cancelled"], ["5xx", "other 5xx"]];
const MARKED = {crashed: "crash", "hung-killed": "crash", restarted: "restart", reloaded: "reload",
                "reload-failed": "crash", "circuit-opened": "crash", loaded: "restart",
                "load-failed": "crash", evicted: "reload", unloaded: "reload", promoted: "reload",
                "rolled-back": "crash", "weight-changed": "reload"};

function svgEl(name, attrs, parent) {
  const e = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}

function titled(e, text) {
  svgEl("title", {}, e).textContent = text;
  return e;
}

function clock(t) { return new Date(t * 1000).toLocaleTimeString(); }

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function fmt(v) { return v >= 100 ? Math.round(v) : +v.toPrecision(2); }

// One chart. spec: {name, title, unit, kind: "bars"|"lines", series: [{key, label, values}],
// t, bucket, start, end, markers}
function drawChart(spec) {
  const figure = document.createElement("figure");
  figure.className = "chart";
  figure.dataset.chart = spec.name;
  const svg = svgEl("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": spec.title,
                            preserveAspectRatio: "xMidYMid meet"});
  const plotW = W - LEFT - RIGHT, plotH = H - TOP - BOTTOM;
  const x = (t) => LEFT + (t - spec.start) / (spec.end - spec.start) * plotW;
  const totals = spec.t.map((_, i) => spec.kind === "bars"
    ? spec.series.reduce((n, s) => n + (s.values[i] || 0), 0)
    : Math.max(0, ...spec.series.map((s) => s.values[i] || 0)));
  const max = niceMax(Math.max(0, ...totals));
  const y = (v) => TOP + plotH - v / max * plotH;
  // Axes: grid at 0, max/2 and max; time labels every 5 minutes.
  const axis = svgEl("g", {class: "axis"}, svg);
  for (const v of [0, max / 2, max]) {
    svgEl("line", {x1: LEFT, x2: W - RIGHT, y1: y(v), y2: y(v), class: v ? "grid" : "base"}, axis);
    svgEl("text", {x: LEFT - 4, y: y(v) + 3, "text-anchor": "end"}, axis).textContent = fmt(v) + (v === max ? spec.unit : "");
  }
  // Time labels: every 5 minutes over 15, every minute over 5, every 15 s over 1.
  const span = spec.end - spec.start, step = span > 300 ? 300 : span > 60 ? 60 : 15;
  for (let ago = 0; ago <= span; ago += step) {
    const tx = x(spec.end - ago);
    svgEl("text", {x: tx, y: H - 5, "text-anchor": ago === 0 ? "end" : ago >= span - 1 ? "start" : "middle"}, axis)
      .textContent = ago === 0 ? "now" : ago < 60 ? "−" + ago + " s" : "−" + Math.round(ago / 60) + " min";
  }
  const data = svgEl("g", {class: "data"}, svg);
  let drawn = 0;
  if (spec.kind === "bars") {
    const bw = Math.max(1.5, spec.bucket / span * plotW - 0.5);
    spec.t.forEach((t, i) => {
      if (t < spec.start) return;  // before the chosen window
      let base = 0;
      for (const s of spec.series) {
        const v = s.values[i] || 0;
        if (!v) continue;
        const rect = svgEl("rect", {x: x(t), y: y(base + v), width: bw, height: Math.max(0.5, y(base) - y(base + v)),
                                    class: "bar s-" + s.key, "data-series": s.key, "data-t": t, "data-value": v}, data);
        titled(rect, clock(t) + " · " + s.label + ": " + fmt(v) + spec.unit);
        base += v;
        drawn += 1;
      }
    });
  } else {
    for (const s of spec.series) {
      const points = spec.t.map((t, i) => [t, s.values[i]]).filter(([t, v]) => v != null && t >= spec.start);
      if (!points.length) continue;
      const mid = spec.bucket / 2;
      svgEl("polyline", {class: "line s-" + s.key, fill: "none",
                         points: points.map(([t, v]) => `${x(t + mid).toFixed(1)},${y(v).toFixed(1)}`).join(" ")}, data);
      for (const [t, v] of points) {
        titled(svgEl("circle", {cx: x(t + mid), cy: y(v), r: 1.8, class: "point s-" + s.key,
                                "data-series": s.key, "data-t": t, "data-value": v}, data),
               clock(t) + " · " + s.label + ": " + fmt(v) + spec.unit);
        drawn += 1;
      }
    }
  }
  if (!drawn && !spec.traffic) {
    svgEl("text", {x: LEFT + plotW / 2, y: TOP + plotH / 2, "text-anchor": "middle", class: "empty"}, svg)
      .textContent = "no requests in the last " + windowLabel(spec.end - spec.start);
  }
  const marks = svgEl("g", {class: "markers"}, svg);
  for (const e of spec.markers) {
    if (e.time < spec.start || e.time > spec.end + spec.bucket) continue;
    const mx = Math.min(W - RIGHT, x(e.time));
    const line = svgEl("line", {x1: mx, x2: mx, y1: TOP, y2: TOP + plotH,
                                class: "marker " + MARKED[e.kind], "data-kind": e.kind}, marks);
    titled(line, clock(e.time) + " · " + e.kind + ": " + e.message);
  }
  figure.appendChild(svg);
  const caption = document.createElement("figcaption");
  caption.append(spec.title);
  if (spec.series.length > 1) {
    for (const s of spec.series) {
      const key = caption.appendChild(document.createElement("span"));
      key.className = "key s-" + s.key;
      key.textContent = s.label;
    }
  }
  figure.appendChild(caption);
  return figure;
}

function windowLabel(seconds) {
  const minutes = Math.round(seconds / 60);
  return minutes === 1 ? "minute" : minutes + " minutes";
}

// The last answers drawn, so that choosing another window redraws at once.
let lastDrawn = null;

// Draw every model's charts from a /v1/history answer and /v1/events' list, over the window
// chosen on the page (1, 5 or 15 minutes; never more than the history holds).
function renderCharts(history, events) {
  lastDrawn = [history, events];
  const box = $("charts");
  const bucket = history.bucket_seconds;
  const span = Math.min(Number($("window").value) || history.span_seconds, history.span_seconds);
  $("window-label").textContent = windowLabel(span);
  // The axis ends where the newest bucket ends, so that its bar and point fit.
  const end = (Math.floor(history.now / bucket) + 1) * bucket, start = end - span;
  $("bucket-seconds").textContent = bucket;
  $("web-pid").textContent = history.pid ?? "?";
  const wanted = Object.keys(history.models);
  box.replaceChildren();
  for (const name of wanted) {
    const h = history.models[name];
    // A version's own charts ("model@v2") carry its model's events about that version.
    const [model, version] = name.split("@");
    const markers = events.filter((e) => e.model === model && e.kind in MARKED &&
                                         (!version || !e.version || e.version === version));
    // Zero bars are not "no data" when requests came.
    const traffic = h.rate.some((r, i) => r > 0 && h.t[i] >= start);
    const common = {t: h.t, bucket, start, end, markers, traffic};
    const group = document.createElement("div");
    group.className = "model-charts";
    group.dataset.model = name;
    const heading = group.appendChild(document.createElement("h3"));
    heading.textContent = name;
    const grid = group.appendChild(document.createElement("div"));
    grid.className = "chart-grid";
    grid.append(
      drawChart(Object.assign({name: "requests", title: "Requests per second by outcome", unit: "/s", kind: "bars",
        series: OUTCOMES.filter(([key]) => key in h.requests).map(([key, label]) => (
          {key, label, values: h.requests[key].map((c) => c / bucket)}))}, common)),
      drawChart(Object.assign({name: "latency", title: "Latency (ms)", unit: " ms", kind: "lines",
        series: [["p50", h.p50_ms], ["p95", h.p95_ms], ["p99", h.p99_ms]].map(([key, values]) => ({key, label: key, values}))},
        common)),
      drawChart(Object.assign({name: "batch", title: "Mean batch size", unit: "", kind: "bars",
        series: [{key: "batch", label: "mean batch size", values: h.batch_mean}]}, common)),
      drawChart(Object.assign({name: "queue", title: "Queue depth (calls in flight)", unit: "", kind: "bars",
        series: [{key: "queue", label: "calls in flight", values: h.queue_depth}]}, common)));
    box.appendChild(group);
  }
}

$("window").addEventListener("change", () => { if (lastDrawn) renderCharts(...lastDrawn); });
