"""The web process off the model's core: MiniLM at 64 connections with ipcserve's processes
placed three ways, against the model's in-process limit on one core.

    python benchmarks/cpus.py      # ~5 min: results/cpus.json and the table in the docs

- ``shared``: the web process and the ML process on CPU 0 (``taskset -c 0``, as every
  server in run.py), wrk on CPU 1: today's default on a machine where they share a core.
- ``nice``: the same, with the ML process at ``nice = 10`` (``--nice 10``).
- ``split``: the web process on CPU 0 and the ML process on CPU 1, as ``--web-cpus 0`` does
  (the ML process gets the rest); wrk shares CPU 0 with the web process, for want of a
  third core.

Every variant serves ``ipcserve serve``'s app (batch 32, with and without a 5 ms batch
wait), one torch thread; a round starts each variant afresh, warms it up and runs wrk for
``--seconds``; the report is the median of ``--repeats`` rounds, measured in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import run  # noqa: E402  (benchmarks/run.py: the servers, wrk, the in-process limit)

TEXT = run.TEXT
VARIANTS = {
    # name: (server CPUs by taskset, wrk's CPUs, environment of the server)
    "shared": ("0", "1", {}),
    "nice": ("0", "1", {"BENCH_ML_NICE": "10"}),
    "split": ("0", "0", {"BENCH_ML_CPUS": "1"}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=7)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "cpus.json")
    args = parser.parse_args()
    assert len(os.sched_getaffinity(0)) >= 2, "needs two CPUs"
    body = json.dumps({"text": TEXT})
    runs: dict[str, list[dict[str, float]]] = {}
    for _ in range(args.repeats):
        for server in ("ipcserve", "ipcserve-wait"):
            for name, (server_cpus, client_cpus, env) in VARIANTS.items():
                run.SERVER_CPUS, run.CLIENT_CPUS = server_cpus, client_cpus
                saved = dict(os.environ)
                os.environ.update(env)
                try:
                    served = run.Served(server, "minilm")
                finally:
                    os.environ.clear()
                    os.environ.update(saved)
                try:
                    for _ in range(21):
                        served.wait_ready(body)
                    runs.setdefault(f"{server} {name}", []).append(
                        run.wrk(served.url, body, 64, args.seconds))
                finally:
                    served.close()
    run.SERVER_CPUS, run.CLIENT_CPUS = "0", "1"
    limit = run.in_process("minilm", args.repeats)
    report: dict[str, Any] = {
        "machine": f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
                   f"{platform.machine()}",
        "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                                 capture_output=True, text=True).stdout.strip(),
        "in_process": limit, "variants": {}}
    for key, results in runs.items():
        report["variants"][key] = {
            "rps": statistics.median(r["rps"] for r in results),
            "p50_ms": statistics.median(r["p50_ms"] for r in results),
            "failed": sum(int(r["non2xx"]) + int(r["socket_errors"]) for r in results),
            "runs": results}
    import report as tables  # benchmarks/report.py: the docs' table from these results

    print(tables.cpus(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.json == HERE / "results" / "cpus.json":
        tables.write(["cpus"])
        print("\ndocs/benchmarks.md: the cpus table rewritten from results/cpus.json")


if __name__ == "__main__":
    main()
