#!/usr/bin/env node
// Send an image to an ipcserve server and print the model's answer.
//
//   node examples/client.js http://127.0.0.1:8000 digit.png
//
// If the server was started with --api-key KEY, set IPCSERVE_API_KEY=KEY.
// Exit status: 0 with the JSON answer on stdout, 1 with the error on stderr.
// Node 18+ only: uses the built-in fetch, no npm packages.
"use strict";

const { readFile } = require("node:fs/promises");
const { extname } = require("node:path");
const { setTimeout: sleep } = require("node:timers/promises");

const RETRIES = 3; // extra attempts when the server answers 503 (starting, restarting, overloaded)
const TYPES = { ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
                ".gif": "image/gif", ".bmp": "image/bmp", ".webp": "image/webp" };

// POST the image file as the raw request body to /predict; retry on 503.
async function predict(server, imagePath) {
  const body = await readFile(imagePath);
  const headers = { "Content-Type": TYPES[extname(imagePath).toLowerCase()] || "application/octet-stream" };
  if (process.env.IPCSERVE_API_KEY) headers.Authorization = `Bearer ${process.env.IPCSERVE_API_KEY}`;
  for (let attempt = 0; ; attempt++) {
    const response = await fetch(`${server.replace(/\/+$/, "")}/predict`, {
      method: "POST", headers, body,
      signal: AbortSignal.timeout(60_000), // never wait forever
    });
    if (response.status !== 503 || attempt === RETRIES) return response;
    // 503 means "try again shortly"; the server says how long in Retry-After (seconds).
    const delay = Number(response.headers.get("Retry-After") ?? 1);
    const seconds = Number.isFinite(delay) ? Math.min(Math.max(delay, 0), 30) : 1;
    console.error(`server busy (503), retrying in ${seconds}s`);
    await response.arrayBuffer(); // finish reading this answer so the connection is reused
    await sleep(seconds * 1000);
  }
}

async function main([server, imagePath]) {
  if (!server || !imagePath) {
    console.error("usage: node client.js SERVER_URL IMAGE_PATH");
    return 2;
  }
  let response;
  try {
    response = await predict(server, imagePath);
  } catch (err) { // unreadable file, no server, timeout
    console.error(`error: ${err.cause?.message ?? err.message}`);
    return 1;
  }
  const text = await response.text();
  let body = null;
  try { body = JSON.parse(text); } catch { /* not JSON (a proxy's HTML error page, say) */ }
  if (!response.ok) {
    // ipcserve errors look like {"error": "<message>", "type": "<ErrorType>"}.
    const error = body?.error;
    const detail = typeof error === "string" ? `${body.type}: ${error}` : text.slice(0, 200);
    console.error(`error: HTTP ${response.status} ${detail}`);
    return 1;
  }
  console.log(JSON.stringify(body, null, 2)); // e.g. {"label": 7, "probabilities": [...]}
  return 0;
}

main(process.argv.slice(2)).then((code) => { process.exitCode = code; });
