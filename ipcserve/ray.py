"""``ipcserve.ray:app``: ipcserve as a Ray Serve application (a stable import path).

``serve run ipcserve.ray:app model=pkg.mod:Class num_replicas=2``; the implementation is
:mod:`ipcserve.server.rayserve`, which also documents the builder's arguments. Importing
this module imports no Ray.
"""

from __future__ import annotations

from .server.rayserve import (
    IPCServeReplica,
    ReplicaLostAsJSON,
    app,
    deployment,
    parse_args,
    proxy_middlewares,
)

__all__ = ["IPCServeReplica", "ReplicaLostAsJSON", "app", "deployment", "parse_args",
           "proxy_middlewares"]
