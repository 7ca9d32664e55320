"""Running ipcserve as a server: the ``ipcserve`` command, config files, waitress,
gunicorn and Ray Serve.

The request path never climbs back up here: this package imports :mod:`ipcserve.http` and
:mod:`ipcserve.engine`, and neither imports it.
"""
