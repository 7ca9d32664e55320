"""Real gunicorn, several sync web workers, one shared ML process."""

from __future__ import annotations

import concurrent.futures
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import free_port, wait_until
from digits_data import held_out_pngs

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parent.parent


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def test_gunicorn_workers_share_one_ml_process() -> None:
    pytest.importorskip("gunicorn")
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    cmd = [sys.executable, "-m", "gunicorn", "-c", "python:ipcserve.gunicorn_conf", "--workers", "4",
           "--bind", f"127.0.0.1:{port}", "gunicorn_wsgi:app"]
    # Unbuffered bytes split into lines here: select() then a buffered readline() can leave
    # the last "Booting worker" line in Python's buffer while select() waits for more.
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, bufsize=0) as master:
        log: list[str] = []
        pending = b""
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 90
            assert master.stderr is not None
            while sum("Booting worker" in line for line in log) < 4:
                assert time.monotonic() < deadline, "".join(log)
                if select.select([master.stderr], [], [], 5)[0]:
                    chunk = os.read(master.stderr.fileno(), 65536)
                    assert chunk, "gunicorn exited:\n" + "".join(log)
                    *lines, pending = (pending + chunk).split(b"\n")
                    log.extend(line.decode(errors="replace") + "\n" for line in lines)
            wait_until(lambda: _get(f"{url}/readyz") == 200, timeout=30, what="readiness")
            samples = held_out_pngs()[:64]

            def classify(sample: tuple[bytes, int]) -> tuple[int, int]:
                r = requests.post(f"{url}/predict", data=sample[0],
                                  headers={"Content-Type": "image/png"}, timeout=30)
                assert r.status_code == 200, r.text
                return r.json()["label"], sample[1]

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                results = list(pool.map(classify, samples))
            assert sum(a == b for a, b in results) / len(results) >= 0.9
            # Every web worker reports the same single ML process, which served them all.
            pids = set()
            served = 0
            for _ in range(16):
                status = requests.get(f"{url}/v1/models", timeout=30).json()["data"][0]["status"]
                pids.add(status["workers"][0]["pid"])
                served = status["workers"][0]["served"]
            assert len(pids) == 1 and served >= 64
            ml_pid = pids.pop()
            kids = _children(master.pid)
            assert ml_pid in kids
            ml_like = [k for k in kids if "multiprocessing" in _cmdline(k) and "resource_tracker" not in _cmdline(k)]
            assert ml_like == [ml_pid], [(_cmdline(k)) for k in kids]
        finally:
            master.send_signal(signal.SIGTERM)
            try:
                code = master.wait(60)
            except subprocess.TimeoutExpired:
                master.kill()
                code = master.wait(10)
            if master.stderr is not None:
                log.append((pending + master.stderr.read()).decode(errors="replace"))
        assert code == 0, "".join(log)
        assert "ipcserve: models stopped" in "".join(log)
        wait_until(lambda: not Path(f"/proc/{ml_pid}").exists(), what="the ML process to exit")


def _get(url: str) -> int:
    try:
        return requests.get(url, timeout=5).status_code
    except requests.ConnectionError:
        return 0
