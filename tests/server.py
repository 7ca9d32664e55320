"""Run the real ``python app.py`` (waitress on a free port) for HTTP tests."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"serving .* on (http://\S+) \(pid (\d+)\)")


class Server:
    """``python app.py --port 0 ARGS``; ``url`` is known once it logs that it is serving."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, start_timeout: float = 60.0,
                 wait_ready: bool = True, module: bool = False, script: str | None = None) -> None:
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"),
                                                  full_env.get("PYTHONPATH", "")])
        # Unbuffered bytes, split into lines here: a buffered readline() after select() can
        # swallow the "serving" line into Python's buffer while select() waits for more.
        # module=True: `python -m ipcserve serve` instead of `python app.py` (the same server).
        # script: a program of the test's own that takes --port (e.g. one calling serve()).
        command = ["-m", "ipcserve", "serve"] if module else [script or str(ROOT / "app.py")]
        self.proc = subprocess.Popen([sys.executable, *command, "--port", "0", *args],
                                     cwd=ROOT, env=full_env, stderr=subprocess.PIPE, bufsize=0)
        self.log: list[str] = []
        self.url = ""
        self._pending = b""
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        deadline = time.monotonic() + start_timeout
        exited = False
        while not self.url and not exited:
            while b"\n" in self._pending and not self.url:
                raw, self._pending = self._pending.split(b"\n", 1)
                line = raw.decode(errors="replace") + "\n"
                self.log.append(line)
                match = _LISTENING.search(line)
                if match:
                    self.url = match.group(1)
            if self.url:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                self.kill()
                raise AssertionError("server did not start in time:\n" + "".join(self.log))
            chunk = os.read(fd, 65536)
            if not chunk:  # exited
                self.proc.wait(10)
                exited = True
            self._pending += chunk
        self._reader = threading.Thread(target=self._drain, name="server-log", daemon=True)
        self._reader.start()
        if self.url and wait_ready:
            self.wait_ready(deadline - time.monotonic())

    def wait_ready(self, timeout: float) -> None:
        """Wait until /readyz says 200 (models loaded), or the server exits."""
        import requests

        deadline = time.monotonic() + max(timeout, 1.0)
        tick = threading.Event()
        while self.proc.poll() is None:
            try:
                if requests.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("server never became ready:\n" + self.output)
            tick.wait(0.05)

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        while True:
            while b"\n" in self._pending:
                raw, self._pending = self._pending.split(b"\n", 1)
                self.log.append(raw.decode(errors="replace") + "\n")
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                if self._pending:
                    self.log.append(self._pending.decode(errors="replace"))
                    self._pending = b""
                return
            self._pending += chunk

    @property
    def output(self) -> str:
        return "".join(self.log)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        finally:
            self.kill()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.stderr is not None and getattr(self, "_reader", None) is None:
            self.proc.stderr.close()
        reader = getattr(self, "_reader", None)
        if reader is not None:
            reader.join(10)
            if self.proc.stderr is not None:
                self.proc.stderr.close()
