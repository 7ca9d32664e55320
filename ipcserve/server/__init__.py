"""Running ipcserve as a server: the ``ipcserve`` command, config files, waitress,
gunicorn and Ray Serve.

``from ipcserve.server import serve`` runs a Flask app that has :class:`~ipcserve.flask.IPCServe`
on waitress with every limit, timeout and signal the ``ipcserve`` command has.

The request path never climbs back up here: this package imports :mod:`ipcserve.http` and
:mod:`ipcserve.engine`, and neither imports it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_app", "create_app", "main", "serve"]


def __getattr__(name: str) -> Any:
    # Imported when asked for: `import ipcserve.ray` (this package) must not import Flask.
    if name == "serve":
        from .lifecycle import serve

        return serve
    if name in ("build_app", "create_app", "main"):
        from . import cli

        return getattr(cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
