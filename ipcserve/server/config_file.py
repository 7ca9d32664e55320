"""``ipcserve serve --config models.toml``: several models and the server's settings in one
TOML file, checked before anything starts.

::

    [server]                      # any server or HTTP setting, by its name
    port = 8000
    threads = 24
    api_key_env = "MY_TEAM_KEY"   # the NAME of the environment variable holding the key

    [cache]                       # optional: flask-caching's own CACHE_* settings (ipcserve's
    CACHE_TYPE = "RedisCache"     # cache_timeout, per backend operation, goes in [server])
    CACHE_REDIS_URL = "redis://127.0.0.1:6379/0"

    [models.digits]               # one table per model; the table's name is the model's
    model = "digits"

    [models.sentiment]
    model = "team.models:Sentiment"   # or a path: a transformers directory, .onnx, .pt2 ...
    workers = 2                       # any engine setting: timeout, max_batch_size, devices
    cache = true                      # with cache_ttl (seconds) and cache_size (answers)
    default = true                    # also served at POST /predict
    warmup = "sentiment.jsonl"        # example request bodies, run in every ML process
                                      # before it is ready (relative to this file)
    load = "lazy"                     # loaded on its first request; idle_unload = SECONDS

    [models.ranker]                   # versions: stable, shadow, rollback_* here
    stable = "v1"
    [models.ranker.versions.v1]       # each: model, task, weight (%), warmup, engine keys
    model = "team.models:RankerV1"
    [models.ranker.versions.v2]
    model = "/models/ranker-v2.onnx"
    weight = 10                       # a canary: 10 % of the traffic

Every error names the file, the table and the key (``models.toml: [models.sentiment]
workers: must be an integer >= 1, got 0``); ``ipcserve serve`` exits 2 on one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

from ..http.cache import CacheSettings
from ..http.rollback import Rollback
from ..http.versions import DEFAULT_VERSION, check_label
from ..engine.config import Config, Setting, read_toml, settings_of
from ..engine.errors import ConfigError

__all__ = ["ModelEntry", "ServerFile", "VersionEntry", "load"]

#: Server-table keys that are not settings of the [server] table itself.
_NOT_IN_SERVER = ("model", "task", "kind", "config")
#: Model-table keys besides the engine settings.
_MODEL_KEYS = ("model", "kind", "task", "default", "cache", "cache_ttl", "cache_size", "load",
               "idle_unload", "warmup", "versions", "stable", "shadow", "shadow_tolerance",
               "rollback_error_rate", "rollback_window", "rollback_min_requests")
#: Version-table keys ([models.NAME.versions.V]) besides the engine settings.
_VERSION_KEYS = ("model", "task", "weight", "warmup")
#: Model-table keys that describe one version: in each version table when there are several.
_PER_VERSION = ("model", "task")
_KINDS = ("json", "image")
_LOADS = ("eager", "lazy")


@dataclasses.dataclass(frozen=True)
class VersionEntry:
    """One version of a model: a ``[models.NAME.versions.V]`` table, or the model table
    itself for a model without versions."""

    name: str
    model: str
    task: str | None = None
    weight: float = 0.0
    engine: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    warmup: tuple[dict[str, Any], ...] = ()  # example request bodies


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One ``[models.NAME]`` table."""

    name: str
    model: str  # the stable version's
    kind: str | None = None
    task: str | None = None
    default: bool = False
    engine: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    cache: CacheSettings | None = None
    lazy: bool = False
    idle_unload: float | None = None
    warmup: tuple[dict[str, Any], ...] = ()
    #: Every version, the stable one first; one (named ``1``) for a model without versions.
    versions: tuple[VersionEntry, ...] = ()
    shadow: str | None = None
    shadow_tolerance: float = 1e-6
    rollback: Rollback = dataclasses.field(default_factory=Rollback)


@dataclasses.dataclass(frozen=True)
class ServerFile:
    """A config file, read and checked."""

    path: str
    server: Mapping[str, Any]  # server and HTTP settings by name, converted
    models: tuple[ModelEntry, ...]
    cache_backend: Mapping[str, Any]  # CACHE_* keys for flask-caching


def load(path: str, environ: Mapping[str, str] | None = None) -> ServerFile:
    """Read and check ``path``.

    Raises:
        ConfigError: the file is missing or not TOML, or a table or key is unknown or has a
            bad value (the message names the file, the table and the key).
    """
    environ = os.environ if environ is None else environ
    document = read_toml(path, path, "the config file")
    unknown = sorted(set(document) - {"server", "cache", "models"})
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {', '.join(f'[{t}]' for t in unknown)}; "
                          "the tables are [server], [cache] and [models.NAME]")
    server = _server(path, _table(path, document, "server"), environ)
    cache_backend = _table(path, document, "cache")
    for key in cache_backend:
        if not key.startswith("CACHE_"):
            hint = ("; ipcserve's own cache_timeout (seconds per backend operation) goes in "
                    "[server]" if "timeout" in key.lower() else "")
            raise ConfigError(f"{path}: [cache] {key}: the keys of [cache] are flask-caching's "
                              f"settings, such as CACHE_TYPE and CACHE_REDIS_URL{hint}")
    models_table = _table(path, document, "models")
    if not models_table:
        raise ConfigError(f"{path}: no model: add a [models.NAME] table with model = "
                          "\"package.module:Attr\" (or \"digits\")")
    models = tuple(_model(path, name, table) for name, table in models_table.items())
    defaults = [m.name for m in models if m.default]
    if len(defaults) > 1:
        raise ConfigError(f"{path}: default = true in more than one model: {', '.join(defaults)}")
    return ServerFile(path, server, models, dict(cache_backend))


def _table(path: str, document: Mapping[str, Any], name: str) -> dict[str, Any]:
    table = document.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {name} must be a table ([{name}]), got a "
                          f"{type(table).__name__}")
    return table


def _server(path: str, table: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    known = {s.name: s for s in settings_of("server") + settings_of("http")
             if s.name not in _NOT_IN_SERVER}
    values: dict[str, Any] = {}
    for key, raw in table.items():
        where = f"{path}: [server] {key}"
        if key == "api_key":
            raise ConfigError(f"{where}: keep the key out of the file: put it in an environment "
                              "variable and name that variable with api_key_env")
        if key == "api_key_env":
            if not isinstance(raw, str) or not raw:
                raise ConfigError(f"{where}: must be the name of an environment variable")
            if raw not in environ:
                raise ConfigError(f"{where}: the environment variable {raw} is not set")
            values["api_key"] = environ[raw]
            continue
        setting = known.get(key)
        if setting is None:
            hint = (" (model settings go in a [models.NAME] table)"
                    if key in _NOT_IN_SERVER or key in _engine_names() else "")
            raise ConfigError(f"{where}: unknown key{hint}; known: api_key_env, "
                              f"{', '.join(sorted(known))}")
        values[key] = _convert(setting, raw, where)
    return values


def _engine_names() -> tuple[str, ...]:
    return tuple(s.name for s in settings_of("engine"))


def _model(path: str, name: str, table: Any) -> ModelEntry:
    where = f"{path}: [models.{name}]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigError(f"{where}: a model's name is letters, digits, '-', '_' or '.'")
    engine_settings = {s.name: s for s in settings_of("engine")}
    unknown = sorted(set(table) - set(_MODEL_KEYS) - set(engine_settings))
    if unknown:
        raise ConfigError(f"{where} {unknown[0]}: unknown key; known: "
                          f"{', '.join(_MODEL_KEYS + tuple(engine_settings))}")
    kind = _typed(table, "kind", str, where)
    if kind is not None and kind not in _KINDS:
        raise ConfigError(f"{where} kind: must be one of {', '.join(_KINDS)}, got {kind!r}")
    default = bool(_typed(table, "default", bool, where))
    engine = _engine(table, where)
    warmup = _warmup(path, table, where)
    load = _typed(table, "load", str, where) or "eager"
    if load not in _LOADS:
        raise ConfigError(f"{where} load: must be \"eager\" (at start) or \"lazy\" (on the "
                          f"first request), got {load!r}")
    idle_unload = _number(table, "idle_unload", where)
    if idle_unload is not None and idle_unload <= 0:
        raise ConfigError(f"{where} idle_unload: must be a number of seconds > 0, got "
                          f"{idle_unload!r}")
    cache = None
    if _typed(table, "cache", bool, where):
        options = {field: table[f"cache_{field}"] for field in ("ttl", "size")
                   if f"cache_{field}" in table}
        try:
            cache = CacheSettings(**options)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    elif "cache_ttl" in table or "cache_size" in table:
        raise ConfigError(f"{where}: cache_ttl and cache_size need cache = true")
    try:
        rollback = Rollback(**{key: table[f"rollback_{key}"] for key in
                               ("error_rate", "window", "min_requests") if f"rollback_{key}" in table})
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    tolerance = _number(table, "shadow_tolerance", where)
    if tolerance is not None and tolerance < 0:
        raise ConfigError(f"{where} shadow_tolerance: must be a number >= 0, got {tolerance!r}")
    if "versions" in table:
        versions, shadow = _versions(path, name, table, where, engine, warmup)
        if cache is not None:
            raise ConfigError(f"{where} cache: a model with versions has no response cache "
                              "(a cached answer would skip the traffic split)")
    else:
        for key in ("stable", "shadow"):
            if key in table:
                raise ConfigError(f"{where} {key}: names a version; add the versions as "
                                  f"[models.{name}.versions.V] tables")
        versions = (_version(table, DEFAULT_VERSION, where, engine, warmup, per_model=True),)
        shadow = None
    first = versions[0]
    return ModelEntry(name, first.model, kind, first.task, default, first.engine, cache,
                      load == "lazy", idle_unload, first.warmup, versions, shadow,
                      1e-6 if tolerance is None else tolerance, rollback)


def _engine(table: Mapping[str, Any], where: str,
            base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The engine settings of a table, over ``base``, each checked as ``Config`` would."""
    engine_settings = {s.name: s for s in settings_of("engine")}
    engine = dict(base or {})
    engine.update({key: _convert(engine_settings[key], raw, f"{where} {key}")
                   for key, raw in table.items() if key in engine_settings})
    try:
        Config(**engine)  # every engine check, per model, before anything starts
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return engine


def _version(table: Mapping[str, Any], label: str, where: str, engine: Mapping[str, Any],
             warmup: tuple[dict[str, Any], ...], per_model: bool = False) -> VersionEntry:
    model = table.get("model")
    if not isinstance(model, str) or not model:
        raise ConfigError(f"{where} model: required: \"digits\", \"package.module:Attr\" or the "
                          "path of a model directory or file")
    task = _typed(table, "task", str, where)
    weight = 0.0 if per_model else _number(table, "weight", where) or 0.0
    if not 0 <= weight <= 100:
        raise ConfigError(f"{where} weight: must be a percentage from 0 to 100, got {weight!r}")
    return VersionEntry(label, model, task, float(weight), engine, warmup)


def _versions(path: str, name: str, table: Mapping[str, Any], where: str,
              engine: Mapping[str, Any], warmup: tuple[dict[str, Any], ...]
              ) -> tuple[tuple[VersionEntry, ...], str | None]:
    """The ``[models.NAME.versions.V]`` tables, the stable one first, and the shadow."""
    for key in _PER_VERSION:
        if key in table:
            raise ConfigError(f"{where} {key}: with versions, each [models.{name}.versions.V] "
                              f"table says its own {key}")
    tables = table["versions"]
    if not isinstance(tables, dict) or not tables \
            or not all(isinstance(t, dict) for t in tables.values()):
        raise ConfigError(f"{where} versions: add one [models.{name}.versions.V] table per "
                          "version")
    engine_settings = {s.name for s in settings_of("engine")}
    versions = {}
    for label, version_table in tables.items():
        at = f"{path}: [models.{name}.versions.{label}]"
        try:
            check_label(label)
        except ConfigError as exc:
            raise ConfigError(f"{at}: {exc}") from None
        unknown = sorted(set(version_table) - set(_VERSION_KEYS) - engine_settings)
        if unknown:
            raise ConfigError(f"{at} {unknown[0]}: unknown key; known: "
                              f"{', '.join(_VERSION_KEYS)} and the engine settings")
        versions[label] = _version(version_table, label, at, _engine(version_table, at, engine),
                                   _warmup(path, version_table, at) or warmup)
    stable = _typed(table, "stable", str, where)
    if stable is None:
        if len(versions) > 1:
            raise ConfigError(f"{where} stable: required with several versions: the version "
                              f"that gets what the canaries leave, one of {', '.join(versions)}")
        stable = next(iter(versions))
    shadow = _typed(table, "shadow", str, where)
    for key, label in (("stable", stable), ("shadow", shadow)):
        if label is not None and label not in versions:
            raise ConfigError(f"{where} {key}: no version {label!r}; versions: "
                              f"{', '.join(versions)}")
    if shadow == stable:
        raise ConfigError(f"{where} shadow: the stable version cannot be its own shadow")
    for key, label in (("stable", stable), ("shadow", shadow)):
        if label is not None and "weight" in tables[label]:
            raise ConfigError(f"{path}: [models.{name}.versions.{label}] weight: the {key} "
                              "version has no weight (" + ("it gets what the canaries leave)"
                              if key == "stable" else "it gets copies, not a share)"))
    total = sum(v.weight for v in versions.values())
    if total > 100:
        raise ConfigError(f"{where} versions: the canaries' weights add up to {total:g} %, "
                          "more than 100")
    ordered = (versions[stable], *(v for label, v in versions.items() if label != stable))
    return ordered, shadow


def _warmup(path: str, table: Mapping[str, Any], where: str) -> tuple[dict[str, Any], ...]:
    """The example requests of ``warmup = "FILE"``: JSON lines, one request body (a JSON
    object) per line, the path relative to the config file."""
    name = _typed(table, "warmup", str, where)
    if name is None:
        return ()
    full = os.path.join(os.path.dirname(os.path.abspath(path)), os.path.expanduser(name))
    try:
        with open(full, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where} warmup: cannot read {full}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    bodies = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            body = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"{where} warmup: {full}, line {number}: not JSON ({exc})") from None
        if not isinstance(body, dict):
            raise ConfigError(f"{where} warmup: {full}, line {number}: each line is one request "
                              f"body, a JSON object; got {type(body).__name__}")
        bodies.append(body)
    if not bodies:
        raise ConfigError(f"{where} warmup: {full} has no example request (one JSON object per "
                          "line)")
    return tuple(bodies)


def _number(table: Mapping[str, Any], key: str, where: str) -> float | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where} {key}: must be a number, got {value!r}")
    return float(value)


def _typed(table: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    value = table.get(key)
    if value is not None and not isinstance(value, kind):
        raise ConfigError(f"{where} {key}: must be a {kind.__name__}, got {value!r}")
    return value


def _convert(setting: Setting, raw: Any, where: str) -> Any:
    """A TOML value for ``setting``: through the same conversion and checks as its
    environment variable, so ``port = "80a"`` or ``workers = 1.5`` fail the same way."""
    if isinstance(raw, list) and isinstance(setting.default, tuple):
        if not all(isinstance(item, str) for item in raw):
            raise ConfigError(f"{where}: must be a list of strings, got {raw!r}")
        return tuple(raw)
    if isinstance(raw, bool):
        if not isinstance(setting.default, bool):
            raise ConfigError(f"{where}: must be {_kind(setting)}, got {raw!r}")
        return raw
    if isinstance(raw, (dict, list)) or hasattr(raw, "isoformat"):
        raise ConfigError(f"{where}: must be {_kind(setting)}, got {raw!r}")
    try:
        return setting.parse(str(raw))
    except ConfigError as exc:
        message = str(exc).split(" must ", 1)[-1]
        raise ConfigError(f"{where}: must {message}") from None


def _kind(setting: Setting) -> str:
    if isinstance(setting.default, bool):
        return "true or false"
    return getattr(setting.convert, "__name__", "a value").lstrip("_")
