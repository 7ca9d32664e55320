"""Every exception ipcserve raises, each knowing its HTTP status.

::

    IPCServeError                           500
    ├── ConfigError (+ValueError)                 startup only, never per request
    ├── InputError                          400   names the offending field
    │   ├── PayloadTooLargeError            413
    │   └── UnsupportedMediaTypeError       415
    ├── UnauthorizedError                   401   missing or wrong API key
    ├── ForbiddenError                      403   the key may not use that model
    ├── RateLimitedError                    429   the key is over its quota; Retry-After
    ├── NotFoundError                       404   unknown model or route
    ├── ConflictError                       409   a reload of that model is already running
    ├── ReloadError                         500   the new version failed to load; the old one serves
    ├── OverloadedError                     503   cap reached or deadline out of reach; Retry-After
    ├── DeadlineError (+TimeoutError)       504
    │   ├── QueueDeadlineError                    expired before the ML process took it
    │   └── ResultDeadlineError                   taken, no reply in time
    ├── RequestCancelledError               499   the caller stopped waiting (client gone)
    ├── WorkerUnavailableError              503   starting / restarting / stopped / circuit open
    │   └── WorkerCrashedError              502   died with this request in flight; .exitcode
    └── ModelError                          500   predict raised; .remote_traceback

Only the HTTP layer turns ``http_status`` into a response; bodies never carry tracebacks.
Every class survives ``pickle.loads(pickle.dumps(err))``: errors cross the pipe from
the ML process to the caller.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConfigError",
    "ConflictError",
    "DeadlineError",
    "ForbiddenError",
    "IPCServeError",
    "InputError",
    "ModelError",
    "NotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "QueueDeadlineError",
    "RateLimitedError",
    "ReloadError",
    "RequestCancelledError",
    "ResultDeadlineError",
    "UnauthorizedError",
    "UnsupportedMediaTypeError",
    "WorkerCrashedError",
    "WorkerUnavailableError",
]


class IPCServeError(Exception):
    """Base of every ipcserve error.

    Attributes:
        http_status: the status code the HTTP layer answers with.
        retry_after: seconds a client should wait before retrying, or None.
    """

    http_status: int = 500
    retry_after: float | None = None

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__

    def to_dict(self) -> dict[str, Any]:
        """The JSON error body: ``{"error": <message>, "type": <class name>}``.

        ``error`` is the readable message itself, not an object, so a plain ``fetch`` client
        that shows ``body.error`` shows the sentence rather than ``[object Object]``.
        """
        return {"error": self.message, "type": type(self).__name__}


class ConfigError(IPCServeError, ValueError):
    """A setting is invalid. Raised at start-up, never per request."""


class InputError(IPCServeError):
    """The request's input is malformed; the message names the offending field."""

    http_status = 400


class PayloadTooLargeError(InputError):
    """The request body, image or array is larger than the configured cap."""

    http_status = 413


class UnsupportedMediaTypeError(InputError):
    """The request's content type is not one this endpoint accepts."""

    http_status = 415


class UnauthorizedError(IPCServeError):
    """An API key is configured and the request did not present it."""

    http_status = 401


class ForbiddenError(IPCServeError):
    """The API key is valid but may not use this model (its ``models`` in the keys file)."""

    http_status = 403


class RateLimitedError(IPCServeError):
    """The API key is over its quota (requests or tokens per minute): retry after
    ``retry_after`` seconds. Other keys are not affected.

    Args:
        message: which quota, as a sentence.
        retry_after: seconds until the quota has room again.
    """

    http_status = 429
    retry_after = 1.0

    def __init__(self, *args: Any, retry_after: float | None = None) -> None:
        super().__init__(*args)
        if retry_after is not None:
            self.retry_after = retry_after


class NotFoundError(IPCServeError):
    """No model or route by that name."""

    http_status = 404


class ConflictError(IPCServeError):
    """The request conflicts with work in progress, e.g. a second reload of a model while
    the first is still loading."""

    http_status = 409


class ReloadError(IPCServeError):
    """A reload's new version failed to load (or to start); the previous version keeps
    serving. The message says why; the log has the model's traceback."""

    http_status = 500


class OverloadedError(IPCServeError):
    """The request was refused at once, never admitted (safe to send again, here or
    elsewhere, after ``retry_after``): too many requests are in flight, or the queue ahead
    of it is too long for it to be answered before its deadline.

    Args:
        message: why, as a sentence.
        reason: what refused it, the ``reason`` label of ``ipcserve_shed_total``:
            ``"inflight"`` (``max_inflight`` calls in flight), ``"estimate"`` (the estimated
            answer would come after the deadline).
        retry_after: seconds to wait before retrying (default 1).
    """

    http_status = 503
    retry_after = 1.0
    reason = "inflight"

    def __init__(self, *args: Any, reason: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(*args)
        # Instance attributes travel in __dict__, which pickling keeps.
        if reason is not None:
            self.reason = reason
        if retry_after is not None:
            self.retry_after = retry_after


class DeadlineError(IPCServeError, TimeoutError):
    """The request's deadline passed before an answer came back."""

    http_status = 504


class QueueDeadlineError(DeadlineError):
    """The deadline passed before the ML process took the request; it is skipped, never computed."""


class ResultDeadlineError(DeadlineError):
    """The ML process had the request, but no answer came back before the deadline."""


class RequestCancelledError(IPCServeError):
    """The caller stopped waiting (e.g. the HTTP client disconnected); the request was
    cancelled in the ML process: never computed, or its model call interrupted.

    499 is nginx's "client closed request": nobody is there to read it; it shows in logs
    and metrics.
    """

    http_status = 499


class WorkerUnavailableError(IPCServeError):
    """No ML process can take requests: starting, restarting, stopped, or the circuit is open."""

    http_status = 503
    retry_after = 1.0


class WorkerCrashedError(WorkerUnavailableError):
    """The ML process died with this request in flight.

    HTTP 502, not 503: the request was admitted and may be what killed the process, so a
    load balancer that retries 503s (never-admitted requests, safe anywhere) must not send
    it to the next host. A client that knows its input is harmless may retry.

    Attributes:
        exitcode: the dead process's exit code (negative: killed by that signal), or None.
    """

    http_status = 502

    def __init__(self, message: str, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.exitcode = exitcode

    def __reduce__(self) -> tuple[Any, ...]:
        # The third item keeps attributes set on the instance (e.g. a retry_after).
        return (type(self), (self.message, self.exitcode), self.__dict__)


class ModelError(IPCServeError):
    """The model raised while predicting. The ML process lives on.

    Attributes:
        remote_type: the name of the exception class the model raised.
        remote_traceback: the formatted traceback from the ML process (logged; never sent over HTTP).
    """

    def __init__(self, message: str, remote_type: str = "", remote_traceback: str = "") -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[Any, ...]:
        # The third item keeps attributes set on the instance (e.g. a retry_after).
        return (type(self), (self.message, self.remote_type, self.remote_traceback), self.__dict__)

    def to_dict(self) -> dict[str, Any]:
        body = super().to_dict()
        if self.remote_type:
            body["model_error_type"] = self.remote_type
        return body


class RemoteTraceback(Exception):
    """The ML process's formatted traceback, attached as the ``__cause__`` of a ModelError
    so that a local traceback shows where the model failed."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f"\n\"\"\"\n{self.tb}\"\"\""


def describe_exit(exitcode: int | None) -> str:
    """A readable cause for a process exit code, e.g. "was killed by signal 9 (SIGKILL)"."""
    if exitcode is None:
        return "exited (exit code not yet known)"
    if exitcode < 0:
        import signal

        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "unknown signal"
        return f"was killed by signal {-exitcode} ({name})"
    return f"exited with code {exitcode}"
