"""The access log (``access_log``): one JSON line per request, for operators.

Every request gets exactly one line, written when its answer is done (a streamed answer: at
its end): ``time`` (arrival, UTC, ISO 8601), ``method``, ``path``, ``route`` (the URL rule),
``status``, ``latency_ms`` (arrival to the last byte handed to the server), and for model
requests ``model``, ``version``, ``queue_ms`` (waiting in the ML process before its batch
started), ``compute_ms`` (the model call) and ``batch_size``; ``key`` is the name of the API
key (from the keys file; never the key), ``trace_id`` the W3C ``traceparent``'s trace id when
the request carried one. Rotation is the system's (logrotate with ``copytruncate``, or
journald for ``-``).

With ``access_log_bodies`` (a fraction, default 0: off), that share of requests, chosen at
random, also logs ``request_body`` and, for an answer that is not streamed,
``response_body``: JSON as JSON with the values of secret-looking keys (password, token,
api_key, secret, authorization, cookie) replaced by ``"[redacted]"``, strings cut to 200
characters and lists to 20 items; any other body as its content type and size only (an
image is never written out).
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from typing import IO, Any

from ..engine.errors import ConfigError

__all__ = ["AccessLog", "body_of", "redact", "trace_id"]

_SECRET = re.compile(r"pass(word)?|secret|token|api[_-]?key|authori[sz]ation|cookie", re.I)
MAX_TEXT = 200
MAX_ITEMS = 20
MAX_DEPTH = 8

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


def trace_id(traceparent: str | None) -> str | None:
    """The trace id of a W3C ``traceparent`` header, or None (absent or malformed)."""
    match = _TRACEPARENT.match((traceparent or "").strip().lower())
    if match is None or match.group(1) == "0" * 32:
        return None
    return match.group(1)


class AccessLog:
    """Writes access log lines to a file (appending) or stdout (``-``); thread-safe.

    Raises:
        ConfigError: the file cannot be opened for appending.
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self.lock = threading.Lock()
        if target == "-":
            self.stream: IO[str] = sys.stdout
        else:
            try:
                self.stream = open(target, "a", encoding="utf-8", buffering=1)
            except OSError as exc:
                raise ConfigError(f"IPCSERVE_ACCESS_LOG: cannot append to {target}: "
                                  f"{exc.strerror or exc}") from None

    def write(self, entry: dict[str, Any]) -> None:
        """One line: ``entry`` with its None values left out."""
        line = json.dumps({k: v for k, v in entry.items() if v is not None},
                          separators=(",", ":"), ensure_ascii=False)
        with self.lock:
            self.stream.write(line + "\n")
            self.stream.flush()


def stamp(arrived_monotonic: float) -> str:
    """An arrival time (``time.monotonic()``) as UTC ISO 8601 with milliseconds."""
    wall = time.time() - (time.monotonic() - arrived_monotonic)
    seconds = int(wall)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + \
        f".{int((wall - seconds) * 1000):03d}Z"


def redact(value: Any, depth: int = 0) -> Any:
    """``value`` (parsed JSON) fit for an audit log: secrets replaced, long texts and lists
    cut (see the module docstring)."""
    if depth >= MAX_DEPTH:
        return "[...]"
    if isinstance(value, dict):
        return {str(k): "[redacted]" if _SECRET.search(str(k)) else redact(v, depth + 1)
                for k, v in value.items()}
    if isinstance(value, list):
        kept = [redact(v, depth + 1) for v in value[:MAX_ITEMS]]
        return kept + [f"[{len(value) - MAX_ITEMS} more]"] if len(value) > MAX_ITEMS else kept
    if isinstance(value, str) and len(value) > MAX_TEXT:
        return value[:MAX_TEXT] + f"[{len(value) - MAX_TEXT} more characters]"
    return value


def body_of(data: bytes, content_type: str | None) -> Any:
    """A request's or answer's body for the audit log: JSON redacted, anything else as its
    type and size."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind == "application/json" or kind.endswith("+json"):
        try:
            return redact(json.loads(data))
        except ValueError:
            pass
    return {"content_type": kind or None, "bytes": len(data)}

