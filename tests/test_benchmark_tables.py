"""docs/benchmarks.md's generated tables are what benchmarks/report.py makes from the
committed raw results (benchmarks/results/*.json), so no number in them can go stale or be
typed by hand; a server that answered non-2xx is flagged, never counted as throughput."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _report_module() -> Any:
    # By path, under its own name: benchmarks/ has a models.py of its own, as tests/ has.
    spec = importlib.util.spec_from_file_location("benchmark_report",
                                                  ROOT / "benchmarks" / "report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


report = _report_module()


@pytest.mark.parametrize("name", sorted(report.TABLES))
def test_the_docs_table_is_the_committed_results(name: str) -> None:
    source, _ = report.TABLES[name]
    assert (ROOT / "benchmarks" / "results" / source).exists(), f"{source} is not committed"
    assert report.in_docs(name) == report.rendered(name), (
        f"docs/benchmarks.md's {name} table differs from benchmarks/results/{source}: "
        "python benchmarks/report.py rewrites it")


def _cell(rps: float, non2xx: int = 0) -> dict[str, Any]:
    return {"rps": rps, "p50_ms": 1.0, "non2xx": non2xx, "socket_errors": 0}


def test_a_server_that_answered_non_2xx_is_flagged_not_counted() -> None:
    results = {"date": "2026-12-04", "commit": "abc1234", "machine": "2 CPUs", "repeats": 3,
               "echo": {"c8": {"naive": _cell(3000.0), "ipcserve": _cell(9000.0, non2xx=17)}}}
    table = report.peers(results)
    assert "failed (17 non-2xx or socket errors)" in table and "9,000" not in table
    # The target is not judged on the failed server's number.
    assert "echo c=8" not in report.targets(results)
    results["echo"]["c8"]["ipcserve"] = _cell(2700.0)
    assert "2,700 vs 3,000: **0.90×** | met" in report.targets(results)
