"""Every ipcserve benchmark in one command: ``python benchmarks/run.py``.

Each comparison is measured in one run, side by side, as the median of ``--repeats``
repeats; HTTP load comes from wrk (Debian's ``wrk``) against 127.0.0.1 only, bounded in
time. A whole run writes the raw numbers to ``results/run.json`` (committed: the run the
docs quote) and rewrites the peers and targets tables of docs/benchmarks.md from them
(benchmarks/report.py); a partial run (``--only``, ``--servers``) writes
``results/latest.json`` and prints its tables without touching the docs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def median_of(repeats: int, fn: Callable[[], float]) -> tuple[float, list[float]]:
    values = [fn() for _ in range(repeats)]
    return statistics.median(values), values


# -- IPC round trips -------------------------------------------------------------------
def _echo_child(r: int, w: int, others: tuple[int, int]) -> None:
    for fd in others:  # the parent's ends, inherited by fork: keep them or EOF never comes
        os.close(fd)
    while True:
        data = os.read(r, 65536)
        if not data:
            os._exit(0)
        os.write(w, data)


def raw_pipe_round_trip(n: int = 5000) -> float:
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_echo_child, args=(r1, w2, (w1, r2)))
    proc.start()
    os.close(r1)
    os.close(w2)
    msg = b"x" * 100
    t = time.perf_counter()
    for _ in range(n):
        os.write(w1, msg)
        os.read(r2, 65536)
    elapsed = (time.perf_counter() - t) / n
    os.close(w1)
    os.close(r2)
    proc.join(5)
    return elapsed


def _literal_server(queue: Any) -> None:
    while True:
        conn = queue.get()
        if conn is None:
            return
        with conn:
            conn.send(conn.recv())


def literal_pipe_per_request(n: int = 300) -> float:
    """The naive shape taken literally: a fresh Pipe per request, sent through the queue."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    proc = ctx.Process(target=_literal_server, args=(queue,))
    proc.start()
    t = time.perf_counter()
    for i in range(n):
        mine, theirs = ctx.Pipe()
        queue.put(theirs)
        theirs.close()
        mine.send({"x": i})
        mine.poll(5)
        mine.recv()
        mine.close()
    elapsed = (time.perf_counter() - t) / n
    queue.put(None)
    proc.join(5)
    return elapsed


def ipcserve_round_trip(ml: Any, n: int = 5000) -> float:
    for i in range(200):
        ml(x=i)
    t = time.perf_counter()
    for i in range(n):
        ml(x=i)
    return (time.perf_counter() - t) / n


def bench_ipc(repeats: int) -> dict[str, Any]:
    from models import Echo

    with Echo() as ml:
        rows = {"raw_os_pipe": [], "ipcserve": [], "literal_pipe_per_request": []}
        for _ in range(repeats):  # interleaved, so noise hits all three alike
            rows["raw_os_pipe"].append(raw_pipe_round_trip())
            rows["ipcserve"].append(ipcserve_round_trip(ml))
            rows["literal_pipe_per_request"].append(literal_pipe_per_request())
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {"us": {k: round(v * 1e6, 1) for k, v in med.items()},
            "ratio_ipcserve_to_raw": round(med["ipcserve"] / med["raw_os_pipe"], 2),
            "ratio_literal_to_raw": round(med["literal_pipe_per_request"] / med["raw_os_pipe"], 1),
            "samples_us": {k: [round(x * 1e6, 1) for x in v] for k, v in rows.items()}}


# -- large arrays ----------------------------------------------------------------------
def bench_array(repeats: int) -> dict[str, Any]:
    import numpy as np

    from models import Array

    x = np.random.default_rng(0).standard_normal((1024, 2048)).astype(np.float32)  # 8 MiB
    out: dict[str, list[float]] = {"shared_memory": [], "pickled_through_pipe": []}
    with Array(name="shm") as shm_ml, Array(name="pipe", shm_threshold=0) as pipe_ml:
        for ml in (shm_ml, pipe_ml):
            ml(x)
        for _ in range(repeats):
            for key, ml in (("shared_memory", shm_ml), ("pickled_through_pipe", pipe_ml)):
                times = []
                for _ in range(20):
                    t = time.perf_counter()
                    ml(x)
                    times.append(time.perf_counter() - t)
                out[key].append(statistics.median(times))
    med = {k: statistics.median(v) for k, v in out.items()}
    return {"ms": {k: round(v * 1e3, 2) for k, v in med.items()},
            "speedup": round(med["pickled_through_pipe"] / med["shared_memory"], 1)}


# -- several workers -------------------------------------------------------------------
def bench_workers(repeats: int, seconds: float = 3.0) -> dict[str, Any]:
    from models import Spin

    def throughput(ml: Any) -> float:
        ml(1000)
        stop = time.monotonic() + seconds
        count = [0] * 8

        def loop(i: int) -> None:
            while time.monotonic() < stop:
                ml(200_000)
                count[i] += 1

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(loop, range(8)))
        return sum(count) / seconds

    res: dict[str, list[float]] = {"1": [], "2": []}
    with Spin(name="one", workers=1) as one, Spin(name="two", workers=2) as two:
        for _ in range(repeats):
            res["1"].append(throughput(one))
            res["2"].append(throughput(two))
    med = {k: statistics.median(v) for k, v in res.items()}
    return {"calls_per_s": {k: round(v, 1) for k, v in med.items()},
            "speedup": round(med["2"] / med["1"], 2)}


# -- HTTP ------------------------------------------------------------------------------
SERVERS = ("naive", "fastapi", "litserve", "ipcserve", "ipcserve-wait")
SERVER_CPUS = "0"  # every server pinned to these cores (taskset), wrk to CLIENT_CPUS
CLIENT_CPUS = "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """One server of servers.py in its own process group, pinned to SERVER_CPUS."""

    def __init__(self, app: str, model: str) -> None:
        self.name = app
        self.port = free_port()
        self.proc = subprocess.Popen(["taskset", "-c", SERVER_CPUS, sys.executable, str(HERE / "servers.py"),
                                      app, model, str(self.port)], stdout=subprocess.PIPE, text=True,
                                     stderr=open(self.log_path(app, model), "w"),
                                     start_new_session=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "READY" not in line:
            self.close()
            raise RuntimeError(f"{app} {model} server did not start")
        self.url = f"http://127.0.0.1:{self.port}/predict"

    @staticmethod
    def log_path(app: str, model: str) -> Path:
        """The server's stderr, kept out of the report (results/APP-MODEL.log)."""
        path = HERE / "results" / f"{app}-{model}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def wait_ready(self, body: str, timeout: float = 180) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            try:
                req = urllib.request.Request(self.url, data=body.encode(), method="POST",
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=30) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not answer {self.url}")
            time.sleep(0.2)  # benchmark start-up poll, not test synchronisation

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, 2)
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(5)
        except ProcessLookupError:
            pass
        if self.proc.stdout:
            self.proc.stdout.close()


def wrk(url: str, body: str, connections: int, seconds: int) -> dict[str, float]:
    out = subprocess.run(["taskset", "-c", CLIENT_CPUS, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
                          "--latency", "-s", str(HERE / "post.lua"), url], env=dict(os.environ, BODY=body),
                         capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[p50.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    failed = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"rps": rps, "p50_ms": float(p50.group(1)) * scale,
            "non2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": sum(int(x) for x in failed.groups()) if failed else 0}


def bench_http(model: str, body: str, concurrencies: list[int], repeats: int, seconds: int,
               servers: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Every server on ``model``, one at a time (an idle server is not idle for all of them:
    LitServe's workers poll, ~20% of a core): ``repeats`` rounds, each starting every
    server in turn, warming it up and running wrk at each concurrency; medians."""
    names = servers or SERVERS
    runs: dict[str, dict[int, list[dict[str, float]]]] = {n: {c: [] for c in concurrencies} for n in names}
    for _ in range(repeats):
        for name in names:
            served = Served(name, model)
            try:
                served.wait_ready(body)
                # Warm up one request at a time: requests a wrk run leaves behind when it
                # closes its connections would still hold places among max_inflight.
                for _ in range(20):
                    served.wait_ready(body)
                for c in concurrencies:
                    runs[name][c].append(wrk(served.url, body, c, seconds))
            finally:
                served.close()
    result: dict[str, Any] = {}
    for c in concurrencies:
        result[f"c{c}"] = {
            name: {"rps": round(statistics.median(r["rps"] for r in runs[name][c]), 1),
                   "p50_ms": round(statistics.median(r["p50_ms"] for r in runs[name][c]), 3),
                   "rps_runs": [round(r["rps"], 1) for r in runs[name][c]],
                   "non2xx": sum(int(r["non2xx"]) for r in runs[name][c]),
                   "socket_errors": sum(int(r["socket_errors"]) for r in runs[name][c])}
            for name in names}
    return result


def in_process(name: str, repeats: int) -> dict[str, float]:
    """The model ``name`` (``mlp``, ``minilm``) called in-process: its limit, measured in a
    fresh process started pinned to SERVER_CPUS, as the servers are. (Measured in this
    process it would not be pinned: the threads torch started when an earlier step imported
    it keep the CPUs they had, and the limit came out 1.6x too high.)"""
    out = subprocess.run(["taskset", "-c", SERVER_CPUS, sys.executable, __file__, "--limit", name,
                          "--repeats", str(repeats)], capture_output=True, text=True,
                         timeout=600, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def in_process_mlp(repeats: int) -> dict[str, float]:
    import torch

    from models import MLP_IN, make_mlp

    net = make_mlp()
    one = torch.randn(1, MLP_IN)
    batch = torch.randn(32, MLP_IN)

    def per_item(x: Any, n: int) -> float:
        with torch.inference_mode():
            for _ in range(5):
                net(x)
            t = time.perf_counter()
            for _ in range(n):
                net(x)
        return (time.perf_counter() - t) / n

    single = statistics.median(per_item(one, 1000) for _ in range(repeats))
    b32 = statistics.median(per_item(batch, 100) for _ in range(repeats))
    return {"single_per_s": round(1 / single, 1), "single_ms": round(single * 1e3, 3),
            "batch32_items_per_s": round(32 / b32, 1)}


def in_process_minilm(repeats: int) -> dict[str, float]:
    import torch

    from ipcserve.adapters.hf import TransformersModel

    from models import minilm_path

    torch.set_num_threads(1)  # as every server runs it: one core each
    tm = TransformersModel(minilm_path(), task="feature-extraction", normalize=True)
    tm.load()
    texts = [TEXT] * 32
    tm.predict_batch(texts)

    def timed(xs: list[str], n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            tm.predict_batch(xs)
        return (time.perf_counter() - t) / n

    single = statistics.median(timed([TEXT], 20) for _ in range(repeats))
    b32 = statistics.median(timed(texts, 3) for _ in range(repeats))
    return {"single_ms": round(single * 1e3, 2), "batch32_items_per_s": round(32 / b32, 1)}


TEXT = "A man is playing a guitar on a quiet street corner."


# -- memory ----------------------------------------------------------------------------
def pss_kb(pid: int) -> int:
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return int(re.search(r"^Pss:\s+(\d+) kB", text, re.M).group(1))


def tree(pid: int) -> list[int]:
    out = [pid]
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        out += tree(int(child))
    return out


def bench_memory() -> dict[str, Any]:
    """PSS of gunicorn (4 sync workers) + one ML process vs one web process + one ML process."""
    import requests

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT)]))
    results = {}
    for label, cmd in (
        ("one_web_process", [sys.executable, str(HERE / "servers.py"), "ipcserve", "minilm"]),
        ("gunicorn_4_workers", [sys.executable, "-m", "gunicorn", "-c", "python:ipcserve.gunicorn_conf",
                                "--workers", "4", "gunicorn_minilm:app", "--bind"]),
    ):
        port = free_port()
        full = cmd + ([str(port)] if label == "one_web_process" else [f"127.0.0.1:{port}"])
        proc = subprocess.Popen(full, cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    r = requests.post(f"http://127.0.0.1:{port}/predict", json={"text": TEXT}, timeout=10)
                    if r.status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                assert time.monotonic() < deadline, f"{label} did not start"
                time.sleep(0.5)  # benchmark start-up poll, not test synchronisation
            for _ in range(40):  # touch every web worker
                requests.post(f"http://127.0.0.1:{port}/predict", json={"text": TEXT}, timeout=10)
            pids = [p for p in tree(proc.pid) if "resource_tracker" not in Path(f"/proc/{p}/cmdline").read_text()]
            results[label] = {"processes": len(pids), "pss_mb": round(sum(pss_kb(p) for p in pids) / 1024, 1)}
        finally:
            proc.send_signal(15)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    results["ratio"] = round(results["gunicorn_4_workers"]["pss_mb"] / results["one_web_process"]["pss_mb"], 2)
    return results


def main() -> None:
    global SERVERS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=7, help="length of each wrk run")
    parser.add_argument("--servers", nargs="*", help=f"HTTP servers to compare (default: {' '.join(SERVERS)})")
    parser.add_argument("--only", nargs="*", help="ipc array workers echo mlp minilm memory")
    parser.add_argument("--json", help="where the raw results go (default: results/run.json "
                        "for a whole run, which the docs quote; results/latest.json for a part)")
    parser.add_argument("--limit", choices=["mlp", "minilm"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.limit:  # a child of in_process(): one model's in-process limit, as JSON
        limit = in_process_mlp if args.limit == "mlp" else in_process_minilm
        print(json.dumps(limit(args.repeats)))
        return
    whole = not args.only and not args.servers
    if args.servers:
        SERVERS = tuple(args.servers)
    want = set(args.only or ["ipc", "array", "workers", "echo", "mlp", "minilm", "memory"])
    if args.json is None:
        args.json = str(HERE / "results" / ("run.json" if whole else "latest.json"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                            text=True).stdout.strip()
    report: dict[str, Any] = {"machine": f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
                                         f"{platform.machine()}",
                              "date": time.strftime("%Y-%m-%d"), "commit": commit,
                              "repeats": args.repeats}
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("ipc", lambda: bench_ipc(args.repeats)),
        ("array", lambda: bench_array(args.repeats)),
        ("workers", lambda: bench_workers(args.repeats)),
        ("echo", lambda: bench_http("echo", json.dumps({"x": 1, "y": "hello"}), [1, 8], args.repeats,
                                    args.seconds)),
        ("mlp", lambda: {"in_process": in_process("mlp", args.repeats),
                         **bench_http("mlp", json.dumps({"x": [0.5] * 256}), [1, 64], args.repeats, args.seconds)}),
        ("minilm", lambda: {"in_process": in_process("minilm", args.repeats),
                            **bench_http("minilm", json.dumps({"text": TEXT}), [64], args.repeats, args.seconds)}),
        ("memory", bench_memory),
    ]
    for name, step in steps:
        if name in want:
            t = time.monotonic()
            report[name] = step()
            print(f"{name}: {json.dumps(report[name])}  ({time.monotonic() - t:.0f}s)", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    import report as tables  # benchmarks/report.py: the docs' tables from these results

    print(tables.peers(report))
    print(tables.targets(report))
    if whole and Path(args.json) == HERE / "results" / "run.json":
        tables.write(["peers", "targets"])
        print("docs/benchmarks.md: peers and targets tables rewritten from results/run.json")


if __name__ == "__main__":
    main()
