#!/usr/bin/env node
// The plain front-end client from the project's brief, as a browser app would write it:
// POST {features} as JSON and, on an error status, throw
// `API Error: ${response.status} - ${errorData.error}`.
// ipcserve's error body must make that line readable, never "[object Object]".
//
//   node tests/plain_fetch_client.js SERVER_URL '[1, 2, 3]'
//
// Prints the JSON answer, or the thrown error's message; exits 1 on an error.
"use strict";

async function predict(server, features) {
  const response = await fetch(`${server}/predict`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ features }),
    signal: AbortSignal.timeout(30_000), // never wait forever
  });
  if (!response.ok) {
    const errorData = await response.json();
    throw new Error(`API Error: ${response.status} - ${errorData.error}`);
  }
  return response.json();
}

const [server, features] = process.argv.slice(2);
predict(server, JSON.parse(features)).then(
  (result) => { console.log(JSON.stringify(result)); },
  (err) => { console.log(err.message); process.exitCode = 1; },
);
