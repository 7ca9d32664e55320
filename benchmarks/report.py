"""The tables of docs/benchmarks.md, made from the raw results the benchmarks write.

Each generated table sits between two markers in docs/benchmarks.md::

    <!-- table: peers (benchmarks/report.py, from benchmarks/results/run.json) -->
    ...
    <!-- /table: peers -->

``python benchmarks/run.py`` and ``python benchmarks/cpus.py`` write their results under
``benchmarks/results/`` (committed: the run the docs quote) and rewrite their tables;
``python benchmarks/report.py`` rewrites every table from the committed results, and
``--check`` says whether the docs match them (tests/test_benchmark_tables.py runs it).
A server that answered anything but 2xx in a run is shown as failed, never as throughput.

Pure Python and the standard library: the test imports it without the benchmarks' peers.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOCS = HERE.parent / "docs" / "benchmarks.md"

SERVER_NAMES = {"naive": "naive Flask + waitress", "fastapi": "FastAPI + uvicorn, global model",
                "litserve": "LitServe, batch 32 / 5 ms", "ipcserve": "**ipcserve**, batch 32",
                "ipcserve-wait": "**ipcserve** + 5 ms batch wait"}
COLUMNS = [("echo", "c1", "echo c=1"), ("echo", "c8", "echo c=8"), ("mlp", "c1", "matmul c=1"),
           ("mlp", "c64", "matmul c=64"), ("minilm", "c64", "MiniLM c=64")]


def _get(report: dict[str, Any], *keys: str) -> Any:
    node: Any = report
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _failed(cell: dict[str, Any]) -> int:
    return int(cell.get("non2xx", 0)) + int(cell.get("socket_errors", 0))


def _rps(report: dict[str, Any], model: str, conc: str, server: str) -> float | None:
    """Requests/s of a server, or None when it did not run or answered non-2xx."""
    cell = _get(report, model, conc, server)
    if not cell or _failed(cell):
        return None
    return float(cell["rps"])


def _header(report: dict[str, Any], source: str) -> str:
    return (f"*{source}, {report.get('date', '?')}, commit {report.get('commit', '?')}, "
            f"{report.get('machine', '?')}; median of {report.get('repeats', '?')} rounds.*\n\n")


def peers(report: dict[str, Any]) -> str:
    """Requests/s (p50 ms) of every server on every model, and the in-process limits."""
    servers = [s for s in SERVER_NAMES if any(_get(report, m, c, s) for m, c, _ in COLUMNS)]
    lines = [_header(report, "`python benchmarks/run.py`"),
             "| server | " + " | ".join(title for _, _, title in COLUMNS) + " |\n",
             "|---|" + "---:|" * len(COLUMNS) + "\n"]
    for server in servers:
        cells = []
        for model, conc, _ in COLUMNS:
            cell = _get(report, model, conc, server)
            if not cell:
                cells.append("")
            elif _failed(cell):
                cells.append(f"failed ({_failed(cell)} non-2xx or socket errors)")
            else:
                cells.append(f"{cell['rps']:,.0f} ({cell['p50_ms']:.2f})")
        lines.append(f"| {SERVER_NAMES[server]} | " + " | ".join(cells) + " |\n")
    mlp, minilm = _get(report, "mlp", "in_process"), _get(report, "minilm", "in_process")
    limit = ["", "",
             f"{mlp['single_per_s']:,.0f} single" if mlp else "",
             f"{mlp['batch32_items_per_s']:,.0f} items/s (batch 32)" if mlp else "",
             f"{minilm['batch32_items_per_s']:,.0f} items/s (batch 32)" if minilm else ""]
    lines.append("| limit (in-process) | " + " | ".join(limit) + " |\n")
    return "".join(lines)


def targets(report: dict[str, Any]) -> str:
    """The targets, each measured, with met or missed."""
    rows = [_header(report, "`python benchmarks/run.py`"), "| target | measured | |\n",
            "|---|---|---|\n"]

    def row(target: str, measured: str, met: bool) -> None:
        rows.append(f"| {target} | {measured} | {'met' if met else 'missed'} |\n")

    limit = _get(report, "minilm", "in_process", "batch32_items_per_s")
    best = [r for r in (_rps(report, "minilm", "c64", s) for s in ("ipcserve", "ipcserve-wait"))
            if r is not None]
    if limit and best:
        lit = _rps(report, "minilm", "c64", "litserve")
        vs_lit = f"; LitServe {lit:,.0f} ({max(best) / lit:.2f}×)" if lit else ""
        row("MiniLM c=64 ≥ 0.95× the in-process batch-32 limit (one core shared by both "
            "processes)", f"{max(best):,.0f} req/s vs {limit:,.0f} items/s: "
            f"**{max(best) / limit:.2f}×**{vs_lit}", max(best) >= 0.95 * limit)
    ours = [r for r in (_rps(report, "mlp", "c64", s) for s in ("ipcserve", "ipcserve-wait"))
            if r is not None]
    others = {s: _rps(report, "mlp", "c64", s) for s in ("fastapi", "litserve")}
    if ours and all(others.values()):
        row("matmul c=64 ≥ FastAPI + uvicorn and ≥ LitServe",
            f"{max(ours):,.0f} vs {others['fastapi']:,.0f} (**{max(ours) / others['fastapi']:.2f}×** "
            f"FastAPI) and {others['litserve']:,.0f} (**{max(ours) / others['litserve']:.2f}×** "
            "LitServe)", all(max(ours) >= v for v in others.values() if v))
    echo, naive = _rps(report, "echo", "c8", "ipcserve"), _rps(report, "echo", "c8", "naive")
    if echo and naive:
        row("echo c=8 ≥ 0.85× the naive app (same WSGI server)",
            f"{echo:,.0f} vs {naive:,.0f}: **{echo / naive:.2f}×**", echo >= 0.85 * naive)
    for model, title in (("echo", "echo"), ("mlp", "matmul")):
        ours_p50 = _get(report, model, "c1", "ipcserve", "p50_ms")
        naive_p50 = _get(report, model, "c1", "naive", "p50_ms")
        if ours_p50 is not None and naive_p50 is not None:
            row(f"{title} c=1 p50 ≤ the naive app's + 0.2 ms",
                f"{ours_p50:.2f} vs {naive_p50:.2f} ms (**{ours_p50 - naive_p50:+.2f} ms**)",
                ours_p50 <= naive_p50 + 0.2)
    for model, title in (("echo", "echo"), ("mlp", "matmul")):
        wait, none = _rps(report, model, "c1", "ipcserve-wait"), _rps(report, model, "c1", "ipcserve")
        if wait and none:
            row(f"a 5 ms batch wait costs nothing at low load: {title} c=1 ≥ 0.9× no wait",
                f"{wait:,.0f} vs {none:,.0f}: **{wait / none:.2f}×**", wait >= 0.9 * none)
    ipc = _get(report, "ipc")
    if ipc:
        us = ipc["us"]
        row("IPC round trip, small payload, ≤ 2× a raw `os.pipe` round trip",
            f"{us['ipcserve']:.0f} vs {us['raw_os_pipe']:.0f} µs "
            f"(**{ipc['ratio_ipcserve_to_raw']:.1f}×**)", ipc["ratio_ipcserve_to_raw"] <= 2)
    array = _get(report, "array")
    if array:
        row("8 MiB float32 array round trip through shared memory ≥ 5× the pipe",
            f"{array['ms']['shared_memory']:.1f} vs {array['ms']['pickled_through_pipe']:.1f} ms: "
            f"**{array['speedup']:.1f}×**", array["speedup"] >= 5)
    workers = _get(report, "workers")
    if workers:
        calls = workers["calls_per_s"]
        row("2 ML processes vs 1, CPU-bound single-threaded model, 2 cores, ≥ 1.7×",
            f"{calls['2']:.1f} vs {calls['1']:.1f} calls/s: **{workers['speedup']:.2f}×**",
            workers["speedup"] >= 1.7)
    memory = _get(report, "memory")
    if memory:
        row("gunicorn, 4 workers + one ML process, PSS ≤ 1.3× one web + one ML process (MiniLM)",
            f"{memory['gunicorn_4_workers']['pss_mb']:.0f} vs "
            f"{memory['one_web_process']['pss_mb']:.0f} MB: **{memory['ratio']:.2f}×**",
            memory["ratio"] <= 1.3)
    return "".join(rows)


PLACEMENTS = {"shared": "web and ML process on CPU 0, wrk on CPU 1",
              "nice": "the same, the ML process at `--nice 10`",
              "split": "`--web-cpus 0`: web process on CPU 0, ML process on CPU 1; wrk on CPU 0"}


def cpus(report: dict[str, Any]) -> str:
    """MiniLM c=64 with the processes placed three ways (benchmarks/cpus.py)."""
    limit = report["in_process"]["batch32_items_per_s"]
    lines = [_header(report, "`python benchmarks/cpus.py`"),
             f"In-process limit: {limit:,.0f} items/s (batch 32, one core, one torch thread).\n\n",
             "| server | placement | req/s | p50 ms | × limit |\n", "|---|---|---:|---:|---:|\n"]
    for key, found in report["variants"].items():
        server, placement = key.split()
        name = SERVER_NAMES[server]
        if found["failed"]:
            lines.append(f"| {name} | {PLACEMENTS[placement]} | failed ({found['failed']} "
                         "non-2xx or socket errors) | | |\n")
            continue
        lines.append(f"| {name} | {PLACEMENTS[placement]} | {found['rps']:,.0f} | "
                     f"{found['p50_ms']:.0f} | **{found['rps'] / limit:.2f}×** |\n")
    return "".join(lines)


#: table name: (results file, render)
TABLES: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "peers": ("run.json", peers), "targets": ("run.json", targets), "cpus": ("cpus.json", cpus)}


def _block(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- table: {name} \(.*?\) -->\n)(.*?)(<!-- /table: {name} -->)", re.S)


def rendered(name: str, results: Path = RESULTS) -> str:
    """Table ``name`` made from its committed results."""
    source, render = TABLES[name]
    return render(json.loads((results / source).read_text()))


def in_docs(name: str, docs: Path = DOCS) -> str:
    """Table ``name`` as docs/benchmarks.md has it now."""
    found = _block(name).search(docs.read_text())
    if found is None:
        raise LookupError(f"{docs.name} has no '<!-- table: {name} (...) -->' block")
    return found.group(2)


def write(names: list[str] | None = None, docs: Path = DOCS) -> None:
    """Rewrite tables ``names`` (default: every table) in docs/benchmarks.md."""
    text = docs.read_text()
    for name in names or list(TABLES):
        table = rendered(name)
        text, count = _block(name).subn(lambda m: m.group(1) + table + m.group(3), text)
        if count != 1:
            raise LookupError(f"{docs.name} has no '<!-- table: {name} (...) -->' block")
    docs.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only say whether the docs' tables match the committed results")
    args = parser.parse_args()
    if args.check:
        stale = [name for name in TABLES if in_docs(name) != rendered(name)]
        if stale:
            print(f"stale tables: {', '.join(stale)} (python benchmarks/report.py)",
                  file=sys.stderr)
        return 1 if stale else 0
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
