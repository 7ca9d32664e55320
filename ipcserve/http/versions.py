"""Versions of one model and the split of its traffic between them. No Flask import.

A served model name maps to one or more versions, each its own MLProcess::

    request ──► Split.choose(pin)
                  │ X-IPCServe-Version: v2 ──► that version (testers), whatever the weights
                  └ otherwise: smooth weighted round robin over the versions with a share:
                    each canary its ``weight`` percent, the stable version the rest
    answer  ──► Split.outcome(version, failed)
                  └ a canary whose failures over the last ``window`` seconds pass
                    ``error_rate`` (with at least ``min_requests``) gets weight 0 at once:
                    an automatic rollback, recorded as an event

The shadow version (at most one) gets no share: :mod:`.shadow` sends it a copy of the
answered requests and compares its answers, which never reach a client.

The round robin is deterministic (nginx's smooth weighted round robin): a 10 % canary gets
exactly one request in ten, spread evenly, not 10 % on average with the variance of a coin.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from ..engine import events
from ..engine.errors import (ConfigError, ConflictError, InputError, NotFoundError,
                             WorkerUnavailableError)
from ..engine.mlprocess import MLProcess
from .rollback import Rollback, Window

__all__ = ["DEFAULT_VERSION", "FAILED", "LOADED", "LOADING", "Split", "UNLOADED", "UNLOADING",
           "VERSION_HEADER", "Version", "check_label"]

logger = logging.getLogger(__name__)

#: The version of a model served without versions.
DEFAULT_VERSION = "1"
#: The request header that pins a version, and the answer's header that names it.
VERSION_HEADER = "X-IPCServe-Version"

# Where a version is in its life (the pool's bookkeeping, :mod:`.pool`).
UNLOADED, LOADING, LOADED, UNLOADING, FAILED = ("unloaded", "loading", "loaded", "unloading",
                                                 "failed")


def check_label(label: Any, what: str = "version") -> str:
    """``label`` if it is a usable version name (as a model name: letters, digits, '-', '_',
    '.').

    Raises:
        ConfigError: it is not.
    """
    if not isinstance(label, str) or not label or \
            not label.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigError(f"a {what} name is letters, digits, '-', '_' or '.', got {label!r}")
    return label


class Version:
    """One version of a served model: its MLProcess, its share of the traffic and its
    place in the model pool.

    Args:
        model: the served model's name.
        label: the version's name (``v2``; :data:`DEFAULT_VERSION` for a model without
            versions).
        ml: its MLProcess (replaced by an unstarted copy when it is unloaded).
        weight: percent of the model's traffic (a canary); the stable version gets the rest.
        lazy: loaded on the first request, not at start.
        idle_unload: seconds without a request after which it is unloaded, or None.
    """

    def __init__(self, model: str, label: str, ml: MLProcess, *, weight: float = 0.0,
                 lazy: bool = False, idle_unload: float | None = None) -> None:
        self.model = model
        self.label = check_label(label)
        self.ml = ml
        self.weight = _weight(weight)
        self.lazy = lazy
        if idle_unload is not None and (isinstance(idle_unload, bool) or not isinstance(
                idle_unload, (int, float)) or not math.isfinite(idle_unload) or idle_unload <= 0):
            raise ConfigError(f"idle_unload must be a number of seconds > 0, got {idle_unload!r}")
        self.idle_unload = idle_unload
        # -- the pool's bookkeeping (guarded by its lock; see pool.py) --
        # A lazy version given already started is loaded: the pool takes it from there.
        self.state = UNLOADED if lazy and not ml.started else LOADED
        self.waiting = 0  # requests waiting to be admitted by it (never evicted meanwhile)
        self.pinned = 0  # a reload or a shadow call holds it (never evicted meanwhile)
        self.last_used = time.monotonic()
        self.loads: collections.Counter[str] = collections.Counter()  # by reason
        self.unloads: collections.Counter[str] = collections.Counter()  # by reason
        self.load_failures = 0
        self.retry_at = 0.0
        self.last_error: str | None = None
        self.rss: int | None = None  # bytes, measured once loaded
        self.unloaded_by: str | None = None  # "evicted" or "idle": why it was last unloaded
        # -- outcomes (this web process) --
        self.requests = 0
        self.failed = 0
        self.shadow_results: collections.Counter[str] = collections.Counter()

    @property
    def named(self) -> str:
        """``"version v2 "`` for messages; empty for a model without versions."""
        return "" if self.label == DEFAULT_VERSION else f"version {self.label} "

    def describe(self) -> dict[str, Any]:
        """JSON-ready: the version's name, load state and counts."""
        ml = self.ml
        started = ml.started
        return {"version": self.label, "weight": self.weight, "state": self.state,
                "unloaded_by": self.unloaded_by, "lazy": self.lazy,
                "idle_unload": self.idle_unload, "loaded_at": ml.loaded_at,
                "load_seconds": None if ml.load_seconds is None else round(ml.load_seconds, 3),
                "idle_seconds": round(time.monotonic() - self.last_used, 1),
                "ready": bool(started and ml.ready), "inflight": ml.inflight,
                "loads": dict(self.loads), "unloads": dict(self.unloads),
                "load_failures": self.load_failures, "last_error": self.last_error,
                "memory_bytes": self.rss, "requests": self.requests, "failed": self.failed,
                "pid": _pids(ml) if started else []}


def _pids(ml: MLProcess) -> list[int]:
    try:
        return ml.pids
    except WorkerUnavailableError:  # stopped since it was looked at
        return []


def _weight(weight: Any) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
            or not math.isfinite(weight) or not 0 <= weight <= 100:
        raise ConfigError(f"weight must be a percentage from 0 to 100, got {weight!r}")
    return float(weight)


class Split:
    """The versions of one model and who gets the next request.

    Args:
        model: the served model's name.
        first: its first version, the stable one until another is promoted.
        rollback: when a canary is rolled back on its own.
        clock: for the rollback windows (tests pass their own).
    """

    def __init__(self, model: str, first: Version, rollback: Rollback | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model
        self.versions: dict[str, Version] = {first.label: first}
        self.stable = first.label
        self.shadow: str | None = None
        self.rollback = rollback or Rollback()
        self._clock = clock
        self._lock = threading.Lock()
        self._current: dict[str, float] = {}  # the smooth round robin's running credits
        self._windows: dict[str, Window] = {}
        self.rollbacks: collections.Counter[tuple[str, str]] = collections.Counter()

    @property
    def several(self) -> bool:
        """More than one version: requests are routed, answers name their version."""
        return len(self.versions) > 1

    def add(self, version: Version, *, shadow: bool = False) -> None:
        """Serve ``version`` beside the others (a canary when its weight is above 0).

        Raises:
            ConfigError: a version of that name exists, a second shadow, or the weights of
                the canaries would pass 100.
        """
        if version.label in self.versions:
            raise ConfigError(f"model {self.model!r} has a version {version.label!r} already")
        if shadow:
            if self.shadow is not None:
                raise ConfigError(f"model {self.model!r} has a shadow version already "
                                  f"({self.shadow!r})")
            if version.weight:
                raise ConfigError(f"model {self.model!r}: the shadow version "
                                  f"{version.label!r} gets copies, not a share: weight must be 0")
        with self._lock:
            self._check_total({**self._canary_weights(), version.label: version.weight})
            self.versions[version.label] = version
            if shadow:
                self.shadow = version.label

    def _canary_weights(self) -> dict[str, float]:
        return {label: v.weight for label, v in self.versions.items() if label != self.stable}

    def _check_total(self, weights: dict[str, float]) -> None:
        total = sum(weights.values())
        if total > 100:
            raise ConfigError(f"model {self.model!r}: the canaries' weights add up to "
                              f"{total:g} %, more than 100")

    def shares(self) -> dict[str, float]:
        """Percent of the traffic each version gets now: canaries their weight, the stable
        version the rest, the shadow none."""
        canaries = self._canary_weights()
        return {self.stable: 100.0 - sum(canaries.values()), **canaries}

    def choose(self, pin: str | None = None) -> Version:
        """The version to serve the next request.

        Args:
            pin: the request's :data:`VERSION_HEADER`, or None.

        Raises:
            InputError: ``pin`` names no version of this model.
        """
        if pin is not None:
            version = self.versions.get(pin.strip())
            if version is None:
                raise InputError(f"header {VERSION_HEADER}: model {self.model!r} has no version "
                                 f"{pin!r}; versions: {', '.join(self.versions)}")
            return version
        if len(self.versions) == 1:
            return self.versions[self.stable]
        with self._lock:
            shares = {label: share for label, share in self.shares().items() if share > 0}
            if not shares:  # every share on a canary rolled back to 0 and stable at 0: stable
                return self.versions[self.stable]
            total = sum(shares.values())
            best = None
            for label, share in shares.items():
                credit = self._current.get(label, 0.0) + share
                self._current[label] = credit
                if best is None or credit > self._current[best]:
                    best = label
            assert best is not None
            self._current[best] -= total
            return self.versions[best]

    def outcome(self, version: Version, failed: bool) -> None:
        """Count one answered request of ``version``; roll a failing canary back.

        Args:
            failed: it failed on the version's side (a model error, a crash, a deadline, an
                ML process unavailable), not the client's (bad input) or overload.
        """
        policy = self.rollback
        with self._lock:  # request threads count at once: += is not atomic
            version.requests += 1
            version.failed += failed
            if version.label == self.stable or not version.weight or not policy.error_rate:
                return
            window = self._windows.get(version.label)
            if window is None:
                window = self._windows[version.label] = Window(policy.window, self._clock)
            window.add(failed)
            total, bad = window.counts()
            if total < policy.min_requests or bad / total <= policy.error_rate \
                    or not version.weight:
                return
            version.weight = 0.0
            self._current.pop(version.label, None)
            window.clear()
            self.rollbacks[(version.label, "auto")] += 1
        message = (f"canary {version.label} rolled back on its own: {bad} of {total} requests "
                   f"failed in the last {policy.window:g} s ({bad / total:.0%}, over the "
                   f"threshold {policy.error_rate:.0%}); its traffic goes to {self.stable}")
        logger.warning("model %s: %s", self.model, message)
        events.record("rolled-back", self.model, message, version=version.label,
                      reason="auto", failed=bad, requests=total)

    # -- the API's actions ---------------------------------------------------------------
    def get(self, label: str) -> Version:
        """Version ``label``.

        Raises:
            NotFoundError: there is none (the message lists the versions).
        """
        version = self.versions.get(label)
        if version is None:
            raise NotFoundError(f"model {self.model!r} has no version {label!r}; versions: "
                                f"{', '.join(self.versions)}")
        return version

    def promote(self, label: str) -> dict[str, Any]:
        """Make version ``label`` the stable one: it gets every request the canaries do
        not; the previous stable version keeps serving pinned requests with weight 0.

        Raises:
            NotFoundError: no such version.
        """
        version = self.get(label)
        with self._lock:
            previous = self.stable
            if label == previous:
                return self.describe()
            if label == self.shadow:
                self.shadow = None
            version.weight = 0.0
            self.versions[previous].weight = 0.0
            self.stable = label
            self._current.clear()
            self._windows.pop(label, None)
        message = f"version {label} promoted: it serves the traffic {previous} served"
        logger.info("model %s: %s", self.model, message)
        events.record("promoted", self.model, message, version=label, previous=previous)
        return self.describe()

    def roll_back(self, reason: str = "api") -> dict[str, Any]:
        """Every canary to weight 0: all traffic to the stable version."""
        with self._lock:
            canaries = [v for label, v in self.versions.items()
                        if label != self.stable and v.weight]
            for version in canaries:
                version.weight = 0.0
                self._current.pop(version.label, None)
                self._windows.pop(version.label, None)
                self.rollbacks[(version.label, reason)] += 1
        for version in canaries:
            message = (f"canary {version.label} rolled back ({reason}): its traffic goes to "
                       f"{self.stable}")
            logger.info("model %s: %s", self.model, message)
            events.record("rolled-back", self.model, message, version=version.label,
                          reason=reason)
        return self.describe()

    def set_weight(self, label: str, weight: Any) -> dict[str, Any]:
        """Give canary ``label`` ``weight`` percent of the traffic.

        Raises:
            NotFoundError: no such version.
            InputError: not a percentage, or the canaries' weights would pass 100.
            ConflictError: ``label`` is the stable or the shadow version.
        """
        version = self.get(label)
        try:
            value = _weight(weight)
        except ConfigError as exc:
            raise InputError(str(exc)) from None
        with self._lock:
            if label == self.stable:
                raise ConflictError(f"version {label} is the stable one: it gets the share the "
                                    "canaries leave; set a canary's weight, or promote one")
            if label == self.shadow:
                raise ConflictError(f"version {label} is the shadow: it gets copies, not a share")
            try:
                self._check_total({**self._canary_weights(), label: value})
            except ConfigError as exc:
                raise InputError(str(exc)) from None
            previous, version.weight = version.weight, value
            self._current.clear()
            self._windows.pop(label, None)
        message = f"version {label}: weight {previous:g} % -> {value:g} %"
        logger.info("model %s: %s", self.model, message)
        events.record("weight-changed", self.model, message, version=label, weight=value)
        return self.describe()

    def describe(self) -> dict[str, Any]:
        """JSON-ready: stable, shadow, and every version with its share."""
        shares = self.shares()
        versions = []
        for label, version in self.versions.items():
            role = "stable" if label == self.stable else "shadow" if label == self.shadow \
                else "canary" if version.weight else "standby"
            versions.append({**version.describe(), "role": role,
                             "share": round(shares.get(label, 0.0), 3),
                             "shadow_results": dict(version.shadow_results)})
        return {"model": self.model, "stable": self.stable, "shadow": self.shadow,
                "rollback": dataclasses.asdict(self.rollback), "versions": versions}
