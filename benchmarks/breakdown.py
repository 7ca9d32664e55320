"""Where one request's CPU goes: ``python benchmarks/breakdown.py``.

Two views, printed as Markdown:

1. Whole servers under load (wrk, like run.py: server pinned to core 0, wrk to core 1):
   user and system CPU per request of every server process, read from ``/proc/PID/stat``
   before and after the run, for the naive app, ipcserve, and (echo) the naive handler
   calling the model through ``MLProcess.call``: the IPC's share apart from ipcserve's
   HTTP layer.
2. The stages of ipcserve's request path, each timed alone in this process
   (``time.process_time`` over many repetitions; the ML process's CPU from ``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import run  # noqa: E402  (Served, wrk's arguments, the core pinning)


def _cpu(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def server_cpu(app: str, model: str, body: str, connections: int, seconds: int) -> dict[str, Any]:
    served = run.Served(app, model)
    try:
        served.wait_ready(body)
        run.wrk(served.url, body, connections, 2)  # warm up
        pids = [int(p) for p in subprocess.run(["ps", "-o", "pid=", "-g", str(served.proc.pid)],
                                               capture_output=True, text=True).stdout.split()]
        before = {p: _cpu(p) for p in pids}
        out = subprocess.run(["taskset", "-c", run.CLIENT_CPUS, "wrk", "-t1", f"-c{connections}",
                              f"-d{seconds}s", "-s", str(HERE / "post.lua"), served.url],
                             env=dict(os.environ, BODY=body), capture_output=True, text=True, check=True).stdout
        after = {p: _cpu(p) for p in pids}
        n = int(re.search(r"(\d+) requests in", out).group(1))
        processes = []
        for p in pids:
            user = (after[p][0] - before[p][0]) / n * 1e6
            system = (after[p][1] - before[p][1]) / n * 1e6
            if user + system >= 1:
                role = "web" if p == served.proc.pid else "ML"
                processes.append({"process": role, "user_us": round(user, 1), "sys_us": round(system, 1)})
        return {"rps": round(n / seconds, 1), "processes": processes,
                "total_us": round(sum(p["user_us"] + p["sys_us"] for p in processes), 1)}
    finally:
        served.close()


def per_call(fn: Callable[[], Any], n: int) -> float:
    """CPU microseconds of this process per call of ``fn`` (median of 5 runs)."""
    for _ in range(min(n, 500)):
        fn()
    runs = []
    for _ in range(5):
        start = time.process_time()
        for _ in range(n):
            fn()
        runs.append((time.process_time() - start) / n * 1e6)
    return round(statistics.median(runs), 2)


def stages() -> dict[str, float]:
    from flask import Flask, jsonify

    from ipcserve.http import decode

    from ipcserve.engine import shm
    from ipcserve.http.metrics import Metrics
    from ipcserve.engine.protocol import Reply, Request

    from models import Echo

    body = json.dumps({"x": 1, "y": "hello"}).encode()
    out: dict[str, float] = {}
    out["parse and check the JSON body (decode.parse_json_object)"] = per_call(
        lambda: decode.parse_json_object(body), 20000)
    mailbox = shm.Mailbox()
    request = Request(1, time.monotonic() + 30, (), {"x": 1, "y": "hello"})
    out["pickle the request (Mailbox.dumps)"] = per_call(lambda: mailbox.dumps(request, 1 << 20, 1), 20000)
    reply = mailbox.dumps(Reply(1, value={"x": 1, "y": "hello"}, queue_wait=0.0, inference_time=0.0,
                                batch_size=1), 1 << 20, 1)
    out["unpickle the reply (Mailbox.loads)"] = per_call(lambda: mailbox.loads(reply, expect=1), 20000)
    app = Flask("breakdown")
    with app.app_context():
        out["the JSON response (flask.jsonify)"] = per_call(lambda: jsonify({"x": 1, "y": "hello"}), 20000)
    metrics = Metrics(lambda: {})
    out["metrics of one request (Metrics.observe)"] = per_call(lambda: metrics.observe("echo", 200, 0.001), 20000)
    with Echo(name="echo") as ml:
        def admit_release() -> None:
            ml.admit().release()

        out["admission (admit + release)"] = per_call(admit_release, 20000)
        ml_pid = ml.pids[0]
        n = 5000
        kwargs = {"x": 1, "y": "hello"}
        for _ in range(500):
            ml.call((), kwargs)
        ml_before = sum(_cpu(ml_pid))
        start, wall = time.process_time(), time.perf_counter()
        for _ in range(n):
            ml.call((), kwargs)
        caller = (time.process_time() - start) / n * 1e6
        wall_us = (time.perf_counter() - wall) / n * 1e6
        ml_us = (sum(_cpu(ml_pid)) - ml_before) / n * 1e6
        out["a whole call, caller's CPU (MLProcess.call)"] = round(caller, 2)
        out["a whole call, ML process's CPU"] = round(ml_us, 2)
        out["a whole call, wall time (one thread, nothing else running)"] = round(wall_us, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=7)
    args = parser.parse_args()
    os.sched_setaffinity(0, {int(c) for c in run.SERVER_CPUS.split(",")})
    print("## Stages of one ipcserve request (echo model), CPU per call\n")
    print("| stage | µs |\n|---|---:|")
    for stage, us in stages().items():
        print(f"| {stage} | {us} |")
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    print("\n## Whole servers under wrk, CPU per request\n")
    print("| model, connections | server | req/s | process: user + sys µs | total µs |\n|---|---|---:|---|---:|")
    cases = [("echo", json.dumps({"x": 1, "y": "hello"}), 8), ("mlp", json.dumps({"x": [0.5] * 256}), 64)]
    for model, body, connections in cases:
        for app in ("naive", "flask-call", "ipcserve") if model == "echo" else ("naive", "ipcserve"):
            r = server_cpu(app, model, body, connections, args.seconds)
            procs = ", ".join(f"{p['process']}: {p['user_us']} + {p['sys_us']}" for p in r["processes"])
            print(f"| {model}, c={connections} | {app} | {r['rps']} | {procs} | {r['total_us']} |", flush=True)


if __name__ == "__main__":
    main()
