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

Every error names the file, the table and the key (``models.toml: [models.sentiment]
workers: must be an integer >= 1, got 0``); ``ipcserve serve`` exits 2 on one.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from typing import Any

from ..http.cache import CacheSettings
from ..engine.config import Config, Setting, settings_of
from ..engine.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["ModelEntry", "ServerFile", "load"]

#: Server-table keys that are not settings of the [server] table itself.
_NOT_IN_SERVER = ("model", "task", "kind", "config")
#: Model-table keys besides the engine settings.
_MODEL_KEYS = ("model", "kind", "task", "default", "cache", "cache_ttl", "cache_size")
_KINDS = ("json", "image")


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One ``[models.NAME]`` table."""

    name: str
    model: str
    kind: str | None = None
    task: str | None = None
    default: bool = False
    engine: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    cache: CacheSettings | None = None


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
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
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
    model = table.get("model")
    if not isinstance(model, str) or not model:
        raise ConfigError(f"{where} model: required: \"digits\", \"package.module:Attr\" or the "
                          "path of a model directory or file")
    kind = _typed(table, "kind", str, where)
    if kind is not None and kind not in _KINDS:
        raise ConfigError(f"{where} kind: must be one of {', '.join(_KINDS)}, got {kind!r}")
    task = _typed(table, "task", str, where)
    default = bool(_typed(table, "default", bool, where))
    engine = {key: _convert(engine_settings[key], raw, f"{where} {key}")
              for key, raw in table.items() if key in engine_settings}
    try:
        Config(**engine)  # every engine check, per model, before anything starts
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
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
    return ModelEntry(name, model, kind, task, default, engine, cache)


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
