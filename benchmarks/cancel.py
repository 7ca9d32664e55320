"""Goodput with and without cancellation: ``python benchmarks/cancel.py``.

Clients with a short patience against a slow model: each client sends a request, waits up
to ``--patience`` seconds, and if no answer has come it closes the connection, waits
``--think`` seconds and sends a new one, the way a user reloads a page or a service retries. Goodput counts the
answers delivered to a client that was still waiting, per second.

Both runs use the real ``python app.py`` (waitress on 127.0.0.1) on the same model: with
cancellation (the default: a client that leaves is detected and its work dropped or
interrupted) and without (``--detect-disconnects false``: waitress does not tell the app,
as with servers that give no disconnect signal). The deadline (``--timeout 60``) never
fires here. Prints a Markdown table and one JSON line per run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import select
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
_LISTENING = re.compile(r"serving .* on http://([\d.]+):(\d+)")


def start_server(detect: bool) -> tuple[subprocess.Popen[str], str, int]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT)]), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", "0", "--model",
                             "models:SlowSteps", "--timeout", "60",
                             "--detect-disconnects", "true" if detect else "false"],
                            env=env, stderr=subprocess.PIPE, bufsize=0)
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not select.select([proc.stderr], [], [], 1.0)[0]:
            continue
        line = proc.stderr.readline().decode(errors="replace")  # unbuffered: select() stays true
        match = _LISTENING.search(line)
        if match:
            host, port = match.group(1), int(match.group(2))
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # type: ignore[union-attr]
            _wait_ready(host, port)
            return proc, host, port
    proc.kill()
    raise RuntimeError("the server did not start")


def _wait_ready(host: str, port: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection(host, port, timeout=5)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        threading.Event().wait(0.1)
    raise RuntimeError("the server never became ready")


def load(host: str, port: int, clients: int, patience: float, duration: float,
         work: float, think: float) -> dict[str, Any]:
    body = json.dumps({"work": work}).encode()
    delivered: list[float] = []
    abandoned = [0]
    lock = threading.Lock()
    end = time.monotonic() + duration

    def client() -> None:
        while time.monotonic() < end:
            conn = http.client.HTTPConnection(host, port, timeout=patience)
            t0 = time.monotonic()
            try:
                conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    with lock:
                        delivered.append(time.monotonic() - t0)
            except (TimeoutError, OSError):
                with lock:
                    abandoned[0] += 1  # gave up: close the connection, then ask again
                conn.close()
                threading.Event().wait(think)  # the user's pause before reloading
                continue
            finally:
                conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + patience + 10)
    return {"delivered": len(delivered), "abandoned": abandoned[0],
            "goodput_per_s": round(len(delivered) / duration, 2),
            "p50_delivered_s": round(statistics.median(delivered), 3) if delivered else None}


def run(detect: bool, args: argparse.Namespace) -> dict[str, Any]:
    proc, host, port = start_server(detect)
    try:
        result = load(host, port, args.clients, args.patience, args.duration, args.work,
                      args.think)
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", "/v1/models/slowsteps")
        status = json.loads(conn.getresponse().read())["status"]
        conn.close()
        result.update(cancelled=status["cancelled"], saved_s=status["cancel_saved_seconds"])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    result["cancellation"] = detect
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--patience", type=float, default=1.0, help="seconds a client waits")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--work", type=float, default=0.25, help="model seconds per request")
    parser.add_argument("--think", type=float, default=0.5,
                        help="seconds a client waits after giving up before it asks again")
    args = parser.parse_args()
    results = [run(True, args), run(False, args)]
    print(f"{args.clients} clients, patience {args.patience} s, pause {args.think} s after giving "
          f"up, {args.work} s of model time per request (capacity {1 / args.work:.1f}/s), "
          f"{args.duration:.0f} s per run\n")
    print("| cancellation | goodput (answers/s to a waiting client) | delivered | gave up "
          "| p50 of delivered | cancelled (queued / running) |")
    print("|---|---:|---:|---:|---:|---|")
    for r in results:
        c = r["cancelled"]
        print(f"| {'on' if r['cancellation'] else 'off'} | {r['goodput_per_s']} | {r['delivered']} "
              f"| {r['abandoned']} | {r['p50_delivered_s']} s | "
              f"{c['queued_disconnect']} / {c['running_disconnect']} |")
    on, off = results
    if off["goodput_per_s"]:
        print(f"\ngoodput ratio on/off: {on['goodput_per_s'] / off['goodput_per_s']:.1f}x")
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
