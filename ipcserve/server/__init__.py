"""Running ipcserve as a server: the ``ipcserve`` command, config files, waitress,
gunicorn and Ray Serve.

``from ipcserve.server import serve`` runs a Flask app that has :class:`~ipcserve.flask.IPCServe`
on waitress with every limit, timeout and signal the ``ipcserve`` command has.

The request path never climbs back up here: this package imports :mod:`ipcserve.http` and
:mod:`ipcserve.engine`, and neither imports it.
"""

from .cli import build_app, create_app, main
from .lifecycle import serve

__all__ = ["build_app", "create_app", "main", "serve"]
