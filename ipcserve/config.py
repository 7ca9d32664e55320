"""One settings object for the engine: keyword = env var ``IPCSERVE_*`` = CLI flag.

When you add a setting: add the field here (with a comment on its default), a row in
docs/configuration.md, and, if the server should expose it, a flag in ``cli.py``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError

__all__ = ["Config"]

START_METHODS = ("spawn", "forkserver", "fork")


@dataclasses.dataclass(frozen=True)
class Config:
    """Engine settings. Durations are seconds (floats).

    Every field can also come from the environment: field ``max_batch_size`` is read from
    ``IPCSERVE_MAX_BATCH_SIZE`` by :meth:`from_env`.
    """

    # Default per-request deadline; a call may pass its own ``timeout=``.
    timeout: float = 30.0
    # Requests in flight (sent, not yet answered) per MLProcess and web process; past it
    # requests are shed at once with OverloadedError instead of queueing without bound.
    max_inflight: int = 64
    # Most items the ML process hands to predict_batch at once.
    max_batch_size: int = 32
    # How long the ML process may wait for more items once a batch has started to form.
    # 0 keeps latency at low load minimal: it runs whatever is queued at once.
    max_batch_wait: float = 0.0
    # ML processes fed from the one shared queue.
    workers: int = 1
    # Per-process devices, e.g. ("cuda:0", "cuda:1"): ML process i gets devices[i % len]
    # as its model's ``device`` attribute before load(). Empty: the model's own choice.
    devices: tuple[str, ...] = ()
    # multiprocessing start method; spawn is safe with threads and CUDA.
    start_method: str = "spawn"
    # How long load() plus warm-up may take before start() gives up.
    start_timeout: float = 300.0
    # A process that made no progress for this long is killed and restarted by the watchdog.
    hang_timeout: float = 60.0
    # How often an idle ML process proves it is alive; also the watchdog's tick.
    heartbeat_interval: float = 0.5
    # How often a waiting caller re-checks liveness between polls of its pipe.
    poll_interval: float = 0.05
    # First restart delay after a crash; doubles per crash in a row up to max_restart_backoff.
    restart_backoff: float = 0.1
    max_restart_backoff: float = 30.0
    # Crashes in a row (no request served in between) that open the circuit breaker:
    # new requests fail fast with 503 until a restarted process is ready again.
    circuit_breaker_threshold: int = 5
    # shutdown(): how long in-flight requests may take to finish before the process is stopped.
    shutdown_grace: float = 10.0
    # Arrays (and other out-of-band pickle buffers) of at least this many bytes travel
    # through shared memory (/dev/shm) instead of the pipe; 0 turns that off.
    shm_threshold: int = 1 << 20

    def __post_init__(self) -> None:
        positive = ("timeout", "start_timeout", "hang_timeout", "heartbeat_interval",
                    "poll_interval", "restart_backoff", "max_restart_backoff")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a number > 0, got {value!r}")
        for name in ("max_batch_wait", "shutdown_grace"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
        for name in ("max_inflight", "max_batch_size", "workers", "circuit_breaker_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.shm_threshold, bool) or not isinstance(self.shm_threshold, int) \
                or self.shm_threshold < 0:
            raise ConfigError(f"shm_threshold must be an integer >= 0, got {self.shm_threshold!r}")
        if isinstance(self.devices, str) or not all(isinstance(d, str) and d for d in self.devices):
            raise ConfigError(f"devices must be a sequence of device names such as "
                              f"('cuda:0', 'cuda:1'), got {self.devices!r}")
        object.__setattr__(self, "devices", tuple(self.devices))
        if self.start_method not in START_METHODS:
            raise ConfigError(f"start_method must be one of {', '.join(START_METHODS)}, "
                              f"got {self.start_method!r}")
        if self.heartbeat_interval >= self.hang_timeout:
            raise ConfigError(f"heartbeat_interval ({self.heartbeat_interval}) must be below "
                              f"hang_timeout ({self.hang_timeout})")

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], prefix: str = "") -> Config:
        """Build a Config from ``{prefix + FIELD_NAME_UPPER: value}``; strings are converted.

        Raises:
            ConfigError: a value does not convert or is out of bounds.
        """
        kwargs: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            key = prefix + field.name.upper()
            if key not in values:
                continue
            raw = values[key]
            kind: Any = type(field.default)
            try:
                if kind is tuple and isinstance(raw, str):
                    kwargs[field.name] = tuple(p.strip() for p in raw.split(",") if p.strip())
                else:
                    kwargs[field.name] = kind(raw) if isinstance(raw, str) else raw
            except ValueError:
                raise ConfigError(f"{key} must be {kind.__name__}, got {raw!r}") from None
        return cls(**kwargs)

    @classmethod
    def from_env(cls, prefix: str = "IPCSERVE_", environ: Mapping[str, str] | None = None,
                 **overrides: Any) -> Config:
        """Read settings from environment variables, then apply keyword overrides."""
        config = cls.from_mapping(os.environ if environ is None else environ, prefix)
        return config.replace(**overrides) if overrides else config
