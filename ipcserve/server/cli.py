"""``ipcserve serve`` / ``python -m ipcserve serve`` / ``python app.py``: a complete server.

The flags come from the settings table (:data:`ipcserve.engine.config.SETTINGS`): every
setting is a flag (``--max-batch-wait``) and an environment variable
(``IPCSERVE_MAX_BATCH_WAIT``); a flag on the command line wins over the variable, which wins
over the config file's ``[server]`` table, which wins over the default.

Models: ``--model`` (repeat it for several), or ``--config models.toml`` for several models
with their own settings (:mod:`ipcserve.server.config_file`). Running, stopping and
reloading: :mod:`ipcserve.server.lifecycle`. ``ipcserve --version`` says which ipcserve.

KServe starts a custom runtime's container with its own argument names: ``--model_dir``,
``--model_name``, ``--http_port`` and ``--grpc_port`` are accepted as the same flags as
``--model``, ``--model-name``, ``--port`` and ``--grpc-port`` (:data:`ALIASES`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from .. import __version__
from ..engine.config import SETTINGS, Config, Setting, settings_of
from ..engine.errors import ConfigError

__all__ = ["ALIASES", "build_app", "build_model", "create_app", "help_of", "main", "resolve"]

_BY_NAME = {s.name: s for s in SETTINGS}

#: Other names of some flags: ``--grace`` (ipcserve 0.1's), and the arguments KServe's
#: model servers take (``--model_dir=/mnt/models --http_port=8080 ...``), so a KServe
#: ServingRuntime can pass them as it passes them to its own runtimes.
ALIASES = {"shutdown_grace": ("--grace",), "model": ("--model_dir",),
           "model_name": ("--model_name",), "port": ("--http_port",),
           "grpc_port": ("--grpc_port",)}

logger = logging.getLogger(__name__)

def build_model(spec: str, config: Config, task: str | None = None) -> Any:
    """The model ``--model`` names: ``digits`` (the built-in model);
    ``package.module:attr`` where attr is an MLProcess subclass, an MLProcess instance, or a
    factory callable returning a model; or a path: a transformers model directory (with a
    config.json; ``task`` or inferred from it), an ``.onnx`` file, a ``.pt2`` (torch.export)
    or ``.pt``/``.ts`` (TorchScript) file. A path's model is named after its stem.

    Raises:
        ConfigError: the spec is none of these, its module does not import or lacks the
            attribute, or ``task`` is given for something other than a transformers model
            directory.
    """
    from ..engine.mlprocess import MLProcess

    if task is not None and not os.path.isdir(spec):
        raise ConfigError(f"--task is for a transformers model directory; --model {spec!r} "
                          "is not one")
    if spec == "digits":
        from ..adapters.digits import DigitsClassifier

        return DigitsClassifier(config=config)
    module_name, sep, attr = spec.partition(":")
    if os.path.exists(spec) or not sep:
        return _model_at(spec, config, task)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        # The module the spec names is not importable from here (a typo, or its folder is
        # not on PYTHONPATH); an ImportError from inside it (a missing dependency) too.
        hint = (" (is its folder on PYTHONPATH? python finds modules from the current "
                "directory and PYTHONPATH)"
                if f"{module_name}.".startswith(f"{getattr(exc, 'name', None)}.") else "")
        raise ConfigError(f"cannot import {spec!r}: {exc}{hint}") from None
    try:
        target = getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"cannot import {spec!r}: module {module_name!r} has no {attr!r}") \
            from None
    if isinstance(target, MLProcess):
        return target
    if isinstance(target, type) and issubclass(target, MLProcess):
        return target(config=config)
    return MLProcess.from_factory(target, config=config)


_MODEL_FILES = (".onnx", ".pt2", ".pt", ".ts")


def _model_at(path: str, config: Config, task: str | None) -> Any:
    """The adapter for a model directory or file (see :func:`build_model`)."""
    suffix = os.path.splitext(path)[1].lower()
    if os.path.isfile(os.path.join(path, "config.json")):
        from ..adapters.hf import TransformersModel

        return TransformersModel(path, task=task, config=config)
    if os.path.isfile(path) and suffix == ".onnx":
        from ..adapters.onnxrt import OnnxModel

        return OnnxModel(path, config=config)
    if os.path.isfile(path) and suffix in _MODEL_FILES:
        from ..adapters.pytorch import TorchModel

        return TorchModel(path, config=config)
    if os.path.isdir(path):
        # KServe's storage initializer puts the model's files in /mnt/models: a directory
        # holding one model file is that file.
        files = sorted(name for name in os.listdir(path)
                       if os.path.splitext(name)[1].lower() in _MODEL_FILES
                       and os.path.isfile(os.path.join(path, name)))
        if len(files) == 1:
            return _model_at(os.path.join(path, files[0]), config, task)
        what = f"holds {len(files)} model files ({', '.join(files)})" if files else \
            f"holds no {'/'.join(_MODEL_FILES)} file"
        raise ConfigError(f"--model {path} is a directory without a config.json that {what}; "
                          "serve a transformers directory written by save_pretrained, or "
                          "a directory with one model file")
    what = "is not a model file" if os.path.exists(path) else "does not exist"
    raise ConfigError(f"--model must be 'digits', 'package.module:attribute', a transformers "
                      f"model directory or a {'/'.join(_MODEL_FILES)} file; {path!r} {what}")


def create_app(models: Sequence[tuple[Any, ...]], *, cache_backend: Any = None,
               **http_settings: Any) -> Any:
    """A Flask app serving ``models``, with JSON errors everywhere.

    Args:
        models: ``(MLProcess, kind)`` pairs, or ``(MLProcess, kind, options)`` where options
            are keywords of :meth:`IPCServe.add_model <ipcserve.http.extension.IPCServe.add_model>`
            (``cache``, ``default``, ``lazy``...), and ``versions``: the model's other
            versions as ``(name, MLProcess, add_version keywords)``.
        cache_backend: flask-caching ``CACHE_*`` settings for the models' response caches.
        http_settings: the ``http`` settings by name (``api_key=...``,
            ``max_content_length=...``), put into ``app.config`` as ``IPCSERVE_*``.
    """
    from flask import Flask
    from werkzeug.exceptions import HTTPException

    from ..http.extension import IPCServe, error_response

    app = Flask("ipcserve")
    app.config.update(cache_backend or {})
    known = {s.name: s for s in settings_of("http")}
    for name, value in http_settings.items():
        if name not in known:
            raise ConfigError(f"unknown HTTP setting {name!r}; known: {', '.join(known)}")
        app.config[known[name].env] = value
    ipc = IPCServe(app)
    for ml, kind, *more in models:
        options = dict(more[0]) if more else {}
        versions = options.pop("versions", ())
        if ml.name in ipc.endpoints:
            raise ConfigError(f"two models are named {ml.name!r}; name them in a config file "
                              "([models.NAME] tables)")
        ipc.add_model(ml, kind=kind, **options)
        for label, version_ml, version_options in versions:
            ipc.add_version(ml.name, label, version_ml, **version_options)
    ipc.models.pool.check_start()  # exit 2 now rather than fail to start later
    app.register_error_handler(HTTPException, error_response)
    return app


def help_of(setting: Setting) -> str:
    """A setting's help line, with the facts it refers to filled in."""
    from ..http import routes
    from ..http.extension import ROUTES

    return setting.help.format(open_routes=", ".join(routes.open_paths(ROUTES)))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ipcserve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ipcserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a model over HTTP on waitress",
                       description="Every flag also reads IPCSERVE_<NAME> from the environment.")
    for setting in SETTINGS:
        names = [setting.flag, *ALIASES.get(setting.name, ())]
        default = f"{setting.default!r}" if setting.default not in (None, ()) else "none"
        switch = isinstance(setting.default, bool)  # a bare --flag means true
        s.add_argument(*names, dest=setting.name, metavar=setting.name.upper(),
                       choices=setting.choices, type=_typed(setting), default=None,
                       action="append" if setting.name == "model" else "store",
                       nargs="?" if switch else None, const=True if switch else None,
                       help=f"{help_of(setting)} ({setting.env}, default {default})")
    return parser


def _typed(setting: Setting) -> Any:
    def convert(text: str) -> Any:
        try:
            return setting.parse(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc).replace(setting.env, setting.flag)) from None

    convert.__name__ = setting.name
    return convert


def resolve(args: argparse.Namespace, environ: Any = None,
            file_values: Any = None) -> dict[str, Any]:
    """Every setting's value: the flag if given, else the env var, else the config file's
    ``[server]`` table (``file_values``), else the default. ``model`` is a list."""
    environ = os.environ if environ is None else environ
    file_values = file_values or {}
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        flagged = getattr(args, setting.name, None)
        if flagged is not None:
            values[setting.name] = flagged
        elif setting.env in environ:
            values[setting.name] = setting.parse(environ[setting.env])
        elif setting.name in file_values:
            values[setting.name] = file_values[setting.name]
        else:
            values[setting.name] = setting.default
    if not isinstance(values["model"], list):
        values["model"] = [values["model"]]
    return values


def _models_of(values: dict[str, Any], plan: Any, args: Any) -> list[tuple[Any, ...]]:
    """The (MLProcess, kind, options) to serve: the config file's models, or ``--model``'s."""
    engine = {s.name: values[s.name] for s in settings_of("engine")}
    if values["web_cpus"] and not engine["cpus"]:
        # The web process keeps --web-cpus; the ML processes get the rest (if any is left).
        rest = sorted(set(os.sched_getaffinity(0)) - set(values["web_cpus"]))
        engine["cpus"] = tuple(rest)
    if plan is None:
        if values["model_name"] is not None and len(values["model"]) != 1:
            raise ConfigError(f"--model-name names one model; {len(values['model'])} are "
                              "given: name several in a config file ([models.NAME] tables)")
        kinds = []
        for spec in values["model"]:
            ml = build_model(spec, Config(**engine), values["task"])
            if values["model_name"] is not None:
                ml.name = _checked_name(values["model_name"])
            kinds.append((ml, values["kind"] or ("image" if spec == "digits" else "json")))
        return kinds
    if values["model_name"] is not None:
        raise ConfigError(f"--model-name and --config {plan.path} both name models; name "
                          "them in the config file")
    if getattr(args, "model", None):
        raise ConfigError(f"--model and --config {plan.path} both name models; put every model "
                          "in the config file")
    if "IPCSERVE_MODEL" in os.environ:  # not an error: an image may set it for its default
        logger.warning("IPCSERVE_MODEL is set, but the config file %s names the models: it is "
                       "ignored", plan.path)
    models: list[tuple[Any, ...]] = []
    for entry in plan.models:
        where = f"{plan.path}: [models.{entry.name}]"
        built = []
        for version in entry.versions:
            at = where if len(entry.versions) == 1 else \
                f"{plan.path}: [models.{entry.name}.versions.{version.name}]"
            built.append(_build_version(entry.name, version, engine, at))
        kind = entry.kind or ("image" if entry.model == "digits" else "json")
        stable, *others = entry.versions
        options: dict[str, Any] = {
            "cache": entry.cache, "default": entry.default or None, "version": stable.name,
            "lazy": entry.lazy, "idle_unload": entry.idle_unload, "rollback": entry.rollback}
        if others:
            options["versions"] = [
                (v.name, ml, {"weight": v.weight, "shadow": v.name == entry.shadow,
                              "tolerance": entry.shadow_tolerance})
                for v, ml in zip(others, built[1:])]
        models.append((built[0], kind, options))
    return models


def _build_version(name: str, version: Any, engine: dict[str, Any], where: str) -> Any:
    """The MLProcess of one version of a config file's model, named after the model."""
    try:
        ml = build_model(version.model, Config(**{**engine, **version.engine}), version.task)
    except ConfigError as exc:
        raise ConfigError(f"{where} model: {exc}") from None
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{where} model: cannot import {version.model!r}: {exc}") from None
    if version.engine:  # also over the settings of an MLProcess instance the spec names
        ml.configure(**version.engine)
    ml.name = name
    if version.warmup:  # run in every ML process before it reports ready (engine/worker.py)
        ml.warmup_requests = version.warmup
    return ml


def _checked_name(name: str) -> str:
    if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigError(f"--model-name must be letters, digits, '-', '_' or '.', got {name!r}")
    return name


def build_app(args: Any, environ: Any = None) -> tuple[Any, dict[str, Any]]:
    """The Flask app that ``ipcserve serve`` would serve, and every setting's value.

    The one code path from settings to app: ``ipcserve serve`` and :mod:`ipcserve.ray`'s
    replicas both build their app here. The models are built, not started.

    Args:
        args: the given settings as attributes named like the settings
            (an ``argparse.Namespace``); a missing or None one is read from ``environ``
            (default ``os.environ``), then the config file's ``[server]`` table, then its
            default. ``model`` is a list of specs.

    Raises:
        ConfigError: a setting, the config file or a model spec is invalid.
    """
    environ = os.environ if environ is None else environ
    config_path = getattr(args, "config", None)
    if config_path is None:
        config_path = environ.get(_BY_NAME["config"].env) or None
    plan = None
    if config_path:
        from . import config_file

        plan = config_file.load(config_path)
    values = resolve(args, environ, file_values=None if plan is None else plan.server)
    if values["require_api_key"] and not values["api_key"]:
        raise ConfigError("an API key is required (--require-api-key): set IPCSERVE_API_KEY "
                          "or --api-key")
    models = _models_of(values, plan, args)
    app = create_app(models, cache_backend=None if plan is None else plan.cache_backend,
                     **{s.name: values[s.name] for s in settings_of("http")})
    return app, values


def _place_web_process(cpus: tuple[int, ...]) -> None:
    """Run this process on ``cpus`` (``--web-cpus``; its threads start after this).

    Raises:
        ConfigError: the CPUs cannot be used here (not in this container's cpuset, say).
    """
    if cpus:
        try:
            os.sched_setaffinity(0, cpus)
        except OSError as exc:
            raise ConfigError(f"--web-cpus {','.join(map(str, cpus))}: cannot run there: "
                              f"{exc.strerror or exc}") from None
        logger.info("web process on CPUs %s", ",".join(map(str, cpus)))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .lifecycle import LOG_FORMAT

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=LOG_FORMAT)
    try:
        app, values = build_app(args)
        logging.getLogger().setLevel(values["log_level"])
        _place_web_process(values["web_cpus"])
        from .waitress_conf import ServerLimits

        limits = ServerLimits(**{name: values[name] for name in (
            "connection_limit", "header_timeout", "body_timeout", "idle_timeout")})
    except ConfigError as exc:
        logger.error("invalid setting: %s", exc)
        return 2
    from .lifecycle import serve

    return serve(app, host=values["host"], port=values["port"], threads=values["threads"],
                 grace=values["shutdown_grace"], detect_disconnects=values["detect_disconnects"],
                 limits=limits, drain_delay=values["drain_delay"], grpc_port=values["grpc_port"])
