"""What happened to the models lately: a bounded, process-wide event log for the status page.

The supervisor (ML process started, crashed with its exit cause, restarted, killed by the
watchdog, circuit opened, the supervisor itself failed or recovered), the Flask extension
(model reloaded or not, drain started), the model pool (a version loaded on demand or not,
evicted, unloaded when idle) and the versions (promoted, rolled back, weight changed) call
:func:`record`; ``GET /v1/events`` reads :data:`LOG` newest first. The log keeps the
last :data:`MAX_EVENTS` events in a deque: old ones fall off, memory stays bounded.

It is per process, like the supervisor that writes most of it: under gunicorn the ML
processes are watched from the master, so a web worker's log holds only what happened in
that worker (reloads, drains) and before it was forked. No Flask import.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from typing import Any

__all__ = ["EventLog", "KINDS", "LOG", "MAX_EVENTS", "record"]

#: Every kind of event, as the page and scripts see it.
KINDS = ("started", "crashed", "restarted", "hung-killed", "circuit-opened", "reloaded",
         "reload-failed", "drain-started", "supervisor-failed", "supervisor-recovered",
         # the model pool (http/pool.py): loads on demand, evictions, idle unloads
         "loaded", "load-failed", "evicted", "unloaded",
         # versions (http/versions.py): promotions, rollbacks, weights
         "promoted", "rolled-back", "weight-changed")

#: Events kept by :data:`LOG`.
MAX_EVENTS = 500


class EventLog:
    """A thread-safe ring of the latest events.

    Args:
        maxlen: events kept; older ones are dropped.
    """

    def __init__(self, maxlen: int = MAX_EVENTS) -> None:
        if maxlen < 1:
            raise ValueError(f"maxlen must be >= 1, got {maxlen}")
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=maxlen)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def record(self, kind: str, model: str | None, message: str, **details: Any) -> None:
        """Add one event.

        Args:
            kind: one of :data:`KINDS`.
            model: the model it concerns, or None for the whole server (a drain).
            message: one readable sentence, e.g. "ML process pid=12 was killed by signal 9".
            details: JSON-ready extras (``pid``, ``exitcode``, ``generation``...).
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        event = {"time": time.time(), "kind": kind, "model": model, "message": message,
                 **details}
        with self._lock:
            event["id"] = next(self._ids)
            self._events.append(event)

    def newest(self, limit: int | None = None, models: set[str] | None = None
               ) -> list[dict[str, Any]]:
        """The events, newest first.

        Args:
            limit: at most this many.
            models: only events of these models (and server-wide ones, model None).
        """
        with self._lock:
            events = list(self._events)
        events.reverse()
        if models is not None:
            events = [e for e in events if e["model"] is None or e["model"] in models]
        return events if limit is None else events[:limit]

    def clear(self) -> None:
        """Forget every event."""
        with self._lock:
            self._events.clear()


#: The log of this process.
LOG = EventLog()


def record(kind: str, model: str | None, message: str, **details: Any) -> None:
    """Add an event to :data:`LOG` (see :meth:`EventLog.record`)."""
    LOG.record(kind, model, message, **details)
