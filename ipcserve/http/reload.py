"""Reloading a model: a new version swapped in without failing a request.

One module, whoever asks: ``POST /v1/models/<name>/reload`` (:mod:`.native`),
:meth:`IPCServe.reload <ipcserve.http.extension.IPCServe.reload>` and SIGHUP (the server
calls :func:`reload_all`).

1. New ML processes start beside the old ones and load the model: its weights, and its
   code too under the spawn and forkserver start methods (fork copies this process's
   modules as they are). Requests go on to the old version meanwhile.
2. Once every new process is ready, requests go to the new version (one attribute swap);
   the model's cached answers are forgotten (the revision is in the key).
3. The old version stops admitting (a request that raced the swap is admitted by the new
   one, :meth:`Endpoint.admit <.serving.Endpoint.admit>`), answers what it holds within
   ``grace`` seconds (default: its ``shutdown_grace``), and its processes stop. A request
   still being computed when the grace runs out is answered 502 ``WorkerCrashedError``
   ("stopped after its grace period"), as for a crash: it reached the model, so it is
   never the 503 that a balancer resends (503 is only for requests no ML process took).

A model with several versions reloads each version that is loaded, all or none; a version
the model pool has not loaded needs nothing (its next load runs the current code). Memory
holds both copies during the load, past ``max_loaded_models`` if need be. A load that fails, times out or is interrupted
by a drain leaves the old version serving, unchanged.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from ..engine import events
from ..engine.errors import ConflictError, IPCServeError, ReloadError, WorkerUnavailableError
from ..engine.mlprocess import MLProcess
from .serving import Endpoint, Models
from .versions import Version

__all__ = ["reload", "reload_all"]

logger = logging.getLogger(__name__)


def reload(models: Models, name: str, grace: float | None = None) -> dict[str, Any]:
    """Replace every loaded version of model ``name`` by a fresh copy of itself without
    failing a request. A version the pool has not loaded (lazy, evicted, unloaded) needs
    nothing: its next load runs the current code.

    Returns:
        ``{"model", "revision", "previous_revision", "load_seconds", "drained",
        "versions"}`` (``versions``: the versions reloaded).

    Raises:
        NotFoundError: no such model.
        ConflictError: a reload of it is already running; it is still loading its first
            version, or a version is being loaded or unloaded by the pool; or this web
            process did not start it (a gunicorn worker).
        ReloadError: a new version failed to load (every old one keeps serving).
        WorkerUnavailableError: the server is draining.
    """
    endpoint = models.get(name)
    if not endpoint.reloading.acquire(blocking=False):
        raise ConflictError(f"a reload of model {name!r} is already running")
    pinned: list[Version] = []
    try:
        if models.unready.is_set() or models.draining.is_set():
            raise WorkerUnavailableError("the server is shutting down")
        for version in endpoint.versions:
            # Kept loaded until the swap: the pool must not evict what is being replaced.
            if models.pool.pin(version):
                pinned.append(version)
        loaded = [v for v in pinned if v.ml.owner_pid is not None]
        if not loaded and not any(models.pool.managed(v) for v in endpoint.versions):
            raise ConflictError(f"model {name!r} is not started yet (still loading its first "
                                "version?); reload it once it serves")
        for version in loaded:
            if version.ml.owner_pid != os.getpid():
                raise ConflictError(
                    f"model {name!r} was started by process {version.ml.owner_pid}, not this "
                    "web process (a gunicorn worker?); restart the server to load a new version")
        previous = endpoint.revision
        logger.info("model %s: reloading (revision %d -> %d)", name, previous, previous + 1)
        began = time.monotonic()
        fresh = _load_all(endpoint, loaded, previous)
        if models.unready.is_set() or models.draining.is_set():  # a drain began meanwhile
            for new in fresh:
                new.shutdown(grace=0)
            raise WorkerUnavailableError("the server is shutting down")
        olds = [version.ml for version in loaded]
        for version, new in zip(loaded, fresh):
            version.ml = new
        endpoint.revision = previous + 1
        if endpoint.cache is not None:
            endpoint.cache.clear()
        drained = True
        for old in olds:
            drained = old.shutdown(grace=grace) and drained
        seconds = time.monotonic() - began
        endpoint.last_reload = {"at": time.time(), "ok": True, "error": None,
                                "revision": endpoint.revision}
        labels = [version.label for version in loaded]
        what = (f"version(s) {', '.join(labels)} loaded in {seconds:.2f}s" if labels else
                "nothing was loaded: the next request loads the current code")
        events.record("reloaded", name, f"reloaded: revision {endpoint.revision} serving "
                      f"({what}), revision {previous} stopped", revision=endpoint.revision)
        logger.info("model %s: revision %d serving (%s); revision %d stopped",
                    name, endpoint.revision, what, previous)
        return {"model": name, "revision": endpoint.revision, "previous_revision": previous,
                "load_seconds": round(seconds if labels else 0.0, 3), "drained": drained,
                "versions": labels}
    finally:
        for version in pinned:
            models.pool.unpin(version)
        endpoint.reloading.release()


def _load_all(endpoint: Endpoint, loaded: list[Version], previous: int) -> list[MLProcess]:
    """A started fresh copy of each version in ``loaded``; all or none.

    Raises:
        ReloadError: one failed to load (the copies already started are stopped).
    """
    name = endpoint.name
    fresh: list[MLProcess] = []
    for version in loaded:
        new = version.ml.fresh()
        try:
            new.start()
        except Exception as exc:
            new.shutdown(grace=0)
            for started in fresh:
                started.shutdown(grace=0)
            endpoint.last_reload = {"at": time.time(), "ok": False, "error": str(exc),
                                    "revision": previous}
            events.record("reload-failed", name, f"reload failed, revision {previous} keeps "
                          f"serving: {exc}", revision=previous, version=version.label)
            cause = getattr(exc, "remote_traceback", None)
            logger.error("model %s: reload failed, revision %d keeps serving: %s%s",
                         name, previous, exc, f"\n{cause}" if cause else "")
            raise ReloadError(f"model {name!r}: the new version failed to load ({exc}); "
                              f"revision {previous} keeps serving") from None
        fresh.append(new)
    return fresh


def reload_all(models: Models, grace: float | None = None) -> dict[str, Any]:
    """:func:`reload` every model, one after the other (SIGHUP). A model whose reload
    fails keeps its old version; the others are reloaded all the same.

    Returns:
        ``{name: reload()'s answer, or the error body}``.
    """
    results: dict[str, Any] = {}
    for name in list(models.endpoints):
        try:
            results[name] = reload(models, name, grace)
        except IPCServeError as exc:
            logger.error("model %s: not reloaded: %s", name, exc)
            results[name] = exc.to_dict()
    return results
