"""Every setting of ipcserve in one table: keyword = env var ``IPCSERVE_*`` = CLI flag =
``app.config`` key.

Three layers, one table (:data:`SETTINGS`):

* ``engine``: the fields of :class:`Config`, one per MLProcess (``MLProcess(timeout=5)``);
* ``http``: the Flask extension's, read from ``app.config["IPCSERVE_*"]`` by ``init_app``;
* ``server``: ``ipcserve serve`` / ``python app.py`` only (host, port, threads, ...).

Field ``max_batch_size`` is env var ``IPCSERVE_MAX_BATCH_SIZE``, flag
``--max-batch-size`` and ``app.config["IPCSERVE_MAX_BATCH_SIZE"]``; ``cli.py`` builds its
flags from the table and ``tests/test_config.py`` checks docs/configuration.md against it.

When you add a setting: add a :class:`Config` field (engine) or a :class:`Setting` row below
(http, server), with its help text; add its row to docs/configuration.md (the test tells
you if you forget); read it where it takes effect.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["Config", "SETTINGS", "Setting", "cpu_list", "read_toml", "settings_of"]

START_METHODS = ("spawn", "forkserver", "fork")
PREFIX = "IPCSERVE_"


def _field(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class Config:
    """Engine settings. Durations are seconds (floats).

    Every field can also come from the environment: field ``max_batch_size`` is read from
    ``IPCSERVE_MAX_BATCH_SIZE`` by :meth:`from_env`.
    """

    # Default per-call deadline (seconds). HTTP requests measure it from their arrival.
    timeout: float = _field(30.0, "default deadline of a call, in seconds")
    # Past it requests are shed at once instead of queueing without bound.
    max_inflight: int = _field(64, "calls in flight per model and web process; more get 503 at once")
    # The margin on the estimate (engine/admission.py): 1.25 lets it be 25 % short.
    estimate_factor: float = _field(
        1.25, "refuse at once (503) a call whose estimated wait times this is past its "
              "deadline; 0 turns the estimate off")
    max_batch_size: int = _field(32, "most items handed to predict_batch at once")
    # 0 keeps latency at low load minimal: the ML process runs whatever is queued at once.
    max_batch_wait: float = _field(0.0, "seconds a forming batch may wait to fill")
    workers: int = _field(1, "ML processes fed from the one shared queue (each loads the model)")
    devices: tuple[str, ...] = _field((), "per-process devices, e.g. cuda:0,cuda:1")
    # Set in each ML process before load(), so torch's and BLAS's thread pools size
    # themselves to these CPUs (Linux: os.sched_setaffinity).
    cpus: tuple[int, ...] = _field(
        (), "CPUs its ML processes run on, e.g. 1-3 or 1,3 (Linux); none: the server's CPUs "
            "less --web-cpus")
    nice: int = _field(0, "niceness its ML processes add, 0 to 19: higher lets the web "
                          "process and the rest of the machine go first")
    # spawn is safe with threads and CUDA; fork is not.
    start_method: str = _field("spawn", "multiprocessing start method: spawn, forkserver or fork")
    start_timeout: float = _field(300.0, "seconds load() plus warmup() may take")
    hang_timeout: float = _field(60.0, "seconds without progress before the watchdog kills a process")
    heartbeat_interval: float = _field(0.5, "how often an idle ML process proves it is alive")
    poll_interval: float = _field(0.05, "how often a waiting caller re-checks liveness")
    restart_backoff: float = _field(0.1, "first restart delay after a crash; doubles per crash in a row")
    max_restart_backoff: float = _field(30.0, "the longest restart delay")
    # No request served in between: a restart loop, not bad luck.
    circuit_breaker_threshold: int = _field(5, "crashes in a row that open the circuit breaker")
    shutdown_grace: float = _field(10.0, "seconds calls in flight may take to finish at shutdown")
    # 0 turns shared memory off.
    shm_threshold: int = _field(1 << 20, "bytes from which arrays travel through /dev/shm")

    def __post_init__(self) -> None:
        positive = ("timeout", "start_timeout", "hang_timeout", "heartbeat_interval",
                    "poll_interval", "restart_backoff", "max_restart_backoff")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a number > 0, got {value!r}")
        for name in ("max_batch_wait", "shutdown_grace", "estimate_factor"):
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
        object.__setattr__(self, "cpus", cpu_list(self.cpus, "cpus"))
        if isinstance(self.nice, bool) or not isinstance(self.nice, int) \
                or not 0 <= self.nice <= 19:
            raise ConfigError(f"nice must be an integer from 0 to 19, got {self.nice!r}")
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
        return cls(**read_settings(values, "engine", prefix))

    @classmethod
    def from_env(cls, prefix: str = "IPCSERVE_", environ: Mapping[str, str] | None = None,
                 **overrides: Any) -> Config:
        """Read settings from environment variables, then apply keyword overrides."""
        config = cls.from_mapping(os.environ if environ is None else environ, prefix)
        return config.replace(**overrides) if overrides else config


def cpu_list(spec: Any, name: str) -> tuple[int, ...]:
    """CPU numbers, sorted and once each, from ``"1-3,5"``, ``("1-3", "5")``, ``[1, 2]`` or
    ``2``; ``()`` for none.

    Raises:
        ConfigError: not CPU numbers or ranges, a CPU this machine does not have, or CPUs
            given where processes cannot be placed (no ``os.sched_setaffinity``: not Linux).
    """
    parts = [spec] if isinstance(spec, (str, int)) else list(spec)
    cpus: set[int] = set()
    try:
        for part in parts:
            if isinstance(part, bool) or not isinstance(part, (int, str)):
                raise ValueError(part)
            for piece in ([str(part)] if isinstance(part, int) else part.split(",")):
                low, dash, high = piece.strip().partition("-")
                if not low and not dash:
                    continue
                first, last = int(low), int(high if dash else low)
                if first < 0 or last < first:
                    raise ValueError(piece)
                cpus.update(range(first, last + 1))
    except ValueError:
        raise ConfigError(f"{name} must be CPU numbers or ranges such as 1-3 or 0,2, got "
                          f"{spec!r}") from None
    if not cpus:
        return ()
    if not hasattr(os, "sched_setaffinity"):
        raise ConfigError(f"{name} needs Linux (os.sched_setaffinity); leave it empty here")
    count = os.cpu_count() or 1
    if max(cpus) >= count:
        raise ConfigError(f"{name}: this machine has CPUs 0-{count - 1}, got {spec!r}")
    return tuple(sorted(cpus))


def read_toml(path: str, where: str, what: str) -> dict[str, Any]:
    """The TOML document in ``path`` (a config or keys file).

    Raises:
        ConfigError: ``"{where}: cannot read {what}: ..."`` or ``"{where}: not valid TOML:
            ..."``.
    """
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {what}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None


def _tuple(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _optional_str(text: str) -> str:
    return text


def _optional_int(text: str) -> int | None:
    return None if text.strip() == "" else int(text)


def _seconds(text: str) -> float:
    """A number of seconds >= 0."""
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError(text)
    return value


_seconds.__name__ = "a number of seconds >= 0"


def _positive_seconds(text: str) -> float:
    """A number of seconds > 0."""
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(text)
    return value


_positive_seconds.__name__ = "a number of seconds > 0"


def _fraction(text: str) -> float:
    """A number from 0 to 1."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(text)
    return value


_fraction.__name__ = "a number from 0 to 1"


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000 ** 2, "mb": 1000 ** 2,
          "mib": 1024 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3, "gib": 1024 ** 3,
          "t": 1000 ** 4, "tb": 1000 ** 4, "tib": 1024 ** 4}


def _optional_bytes(text: str) -> int | None:
    """A number of bytes > 0 (``2GiB``, ``512MB``, ``1000000``), or none."""
    value = text.strip().lower().replace(" ", "")
    if value in ("", "none"):
        return None
    number = value.rstrip("kmgtib")
    unit = value[len(number):]
    if unit not in _UNITS or not number:
        raise ValueError(text)
    result = int(float(number) * _UNITS[unit])
    if result < 1:
        raise ValueError(text)
    return result


_optional_bytes.__name__ = "a number of bytes such as 2GiB or 512MB, or none"


def _optional_count(text: str) -> int | None:
    """An integer >= 1, or none."""
    if text.strip().lower() in ("", "none"):
        return None
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


_optional_count.__name__ = "an integer >= 1, or none"


def _cpus(text: str) -> tuple[int, ...]:
    """CPU numbers or ranges (``0-1``, ``0,2``), or none."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return cpu_list(text, "CPUs")
    except ConfigError:
        raise ValueError(text) from None


_cpus.__name__ = "CPU numbers or ranges of this machine such as 0-1 or 0,2 (Linux), or none"


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One row of the settings table.

    Attributes:
        name: the keyword, e.g. ``max_batch_size``.
        layer: ``engine`` (a :class:`Config` field), ``http`` (``app.config``, read by the
            Flask extension) or ``server`` (``ipcserve serve`` only).
        default: the value when nothing sets it.
        help: one line for ``--help`` and the docs; ``{open_routes}`` in it stands for the
            routes that need no API key (filled in by the CLI from the route registry).
        convert: turns the text of an env var or flag into the value.
        choices: the allowed values, if only a few are.
    """

    name: str
    layer: str
    default: Any
    help: str
    convert: Callable[[str], Any]
    choices: tuple[str, ...] | None = None

    @property
    def env(self) -> str:
        """The env var, which is also the ``app.config`` key: ``IPCSERVE_<NAME>``."""
        return PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        """The CLI flag: ``--max-batch-size``."""
        return "--" + self.name.replace("_", "-")

    def parse(self, raw: Any) -> Any:
        """``raw`` from an env var, a flag or ``app.config``: text is converted, other values
        are taken as they are.

        Raises:
            ConfigError: naming the env var and what it should be.
        """
        if not isinstance(raw, str):
            return raw
        try:
            value = self.convert(raw)
        except ValueError:
            kind = getattr(self.convert, "__name__", "a value").lstrip("_")
            raise ConfigError(f"{self.env} must be {kind}, got {raw!r}") from None
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{self.env} must be one of {', '.join(self.choices)}, got {raw!r}")
        return value


def _converter(kind: Any) -> Callable[[str], Any]:
    if kind is tuple:
        return _tuple
    return kind  # type: ignore[no-any-return]


_ENGINE = tuple(
    Setting(f.name, "engine", f.default, f.metadata["help"], _converter(type(f.default)),
            START_METHODS if f.name == "start_method" else None)
    for f in dataclasses.fields(Config))

_MIB = 1024 * 1024

#: Every setting, in the order of docs/configuration.md.
SETTINGS: tuple[Setting, ...] = _ENGINE + (
    # -- http: the Flask extension, from app.config (and the server's flags) --
    # {open_routes} is filled in from the route registry where the help is shown
    # (ipcserve.http.routes: the routes registered as open).
    Setting("api_key", "http", None,
            "require 'Authorization: Bearer KEY' on every route but {open_routes}",
            _optional_str),
    Setting("keys_file", "http", None,
            "a TOML file of API keys per team: the models each may use, its requests and "
            "tokens per minute (429 past them); --api-key keeps working beside it",
            _optional_str),
    Setting("access_log", "http", None,
            "write one JSON line per request (route, model, status, latency split, key name, "
            "trace id) to this file, or - for stdout; none: off", _optional_str),
    Setting("access_log_bodies", "http", 0.0,
            "share of requests (0 to 1, chosen at random) whose access log line also holds "
            "the request's and the answer's body, secrets redacted and long values cut; 0: "
            "none", _fraction),
    Setting("tracing", "http", False,
            "record OpenTelemetry spans of each request (admission, queue, model call with "
            "its batch's links, stream); exported by OTLP as the OTEL_* variables say, unless "
            "the app set up its tracer provider (needs ipcserve[otel])", _bool),
    Setting("cors_origins", "http", None,
            "origins (comma-separated, or *) whose web pages may call the API from a browser "
            "(CORS; needs flask-cors); none: off", _tuple),
    Setting("max_content_length", "http", 16 * _MIB,
            "largest request body in bytes (413 past it)", int),
    Setting("max_image_pixels", "http", 20_000_000,
            "largest image in pixels, checked before decoding (413 past it)", int),
    Setting("decode_memory_budget", "http", 256 * _MIB,
            "bytes of decoded images held at once across threads (503 when full, 413 past it)",
            int),
    Setting("shed_status", "http", 503,
            "status of a request shed by max_inflight: 503 or 429 (Retry-After either way)",
            int),
    Setting("cache_timeout", "http", 0.25,
            "seconds a response cache backend on the network (Redis) may take per operation "
            "before the model answers instead", _positive_seconds),
    # The model pool (ipcserve.http.pool): past either limit, a load on demand first evicts
    # the least recently used idle model version.
    Setting("max_loaded_models", "http", None,
            "model versions loaded at once; past it the least recently used idle one is "
            "evicted (loaded again on its next request); none: no limit", _optional_count),
    Setting("max_loaded_memory", "http", None,
            "resident memory of the loaded models' ML processes (e.g. 8GiB); past it the least "
            "recently used idle one is evicted; none: no limit", _optional_bytes),
    # -- server: ipcserve serve / python app.py --
    Setting("host", "server", "127.0.0.1",
            "address to bind; another one without an API key logs a warning", str),
    Setting("port", "server", 8000, "port to listen on; 0 picks a free one (KServe's "
            "--http_port is this flag)", int),
    # Off unless asked for: a second listener is a second thing to secure and monitor.
    Setting("grpc_port", "server", None,
            "also serve the Open Inference Protocol V2 over gRPC on this port (same host, "
            "models and API key; 0 picks a free one; needs ipcserve[grpc]); none: no gRPC "
            "(KServe's --grpc_port is this flag)", _optional_int),
    Setting("threads", "server", None,
            "waitress threads that run requests; none: the models' max_inflight + 4",
            _optional_int),
    # The web process off the ML processes' CPUs (docs/deployment.md, "CPUs").
    Setting("web_cpus", "server", (),
            "CPUs the web process runs on, e.g. 0 or 0-1 (Linux); the ML processes then run "
            "on the others unless a model sets cpus; none: every CPU", _cpus),
    Setting("connection_limit", "server", None,
            "open connections at most; none: from the open-files limit, at most 10,000",
            _optional_int),
    Setting("header_timeout", "server", 10.0,
            "seconds from a request's first byte until its headers are complete", float),
    Setting("body_timeout", "server", 60.0,
            "seconds from the end of the headers until the body is complete", float),
    Setting("idle_timeout", "server", 65.0,
            "seconds a keep-alive connection with no request in progress stays open", float),
    Setting("config", "server", None,
            "a TOML file: a [server] table and one [models.NAME] table per model "
            "(docs/configuration.md)", str),
    Setting("model", "server", "digits",
            "'digits', package.module:attribute, or the path of a transformers model "
            "directory, an .onnx/.pt2/.pt/.ts file or a directory holding one such file "
            "(KServe's --model_dir is this flag); repeat the flag to serve several", str),
    Setting("model_name", "server", None,
            "the name to serve the one --model under (URLs, V2, metrics); none: from the "
            "model (KServe's --model_name is this flag)", str),
    Setting("task", "server", None,
            "the task of a transformers model directory given by path; none: from its "
            "config.json", str),
    Setting("kind", "server", None, "endpoint kind: image (default for digits) or json", str,
            ("json", "image")),
    Setting("require_api_key", "server", False,
            "refuse to start without an API key (exit 2): for images and manifests that "
            "listen on every interface", _bool),
    Setting("drain_delay", "server", 0.0,
            "seconds after SIGTERM during which /readyz says 503 while requests are still "
            "served, so load balancers stop sending before anything is refused", _seconds),
    Setting("detect_disconnects", "server", True,
            "cancel the work of a client that disconnects (waitress channel_request_lookahead)",
            _bool),
    Setting("log_level", "server", "INFO", "DEBUG, INFO, WARNING or ERROR", str.upper,
            ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")),
)


def settings_of(layer: str) -> tuple[Setting, ...]:
    """The rows of one layer: ``engine``, ``http`` or ``server``."""
    return tuple(s for s in SETTINGS if s.layer == layer)


def read_settings(values: Mapping[str, Any], layer: str, prefix: str = PREFIX) -> dict[str, Any]:
    """``{name: value}`` for the settings of ``layer`` present in ``values`` (keyed
    ``prefix + NAME``, e.g. ``os.environ`` or ``app.config``), converted.

    Raises:
        ConfigError: a value does not convert.
    """
    found: dict[str, Any] = {}
    for setting in settings_of(layer):
        key = prefix + setting.name.upper()
        if key in values:
            found[setting.name] = setting.parse(values[key])
    return found
