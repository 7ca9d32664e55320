"""ipcserve: serve a Python ML model over HTTP from one long-lived ML process.

Importing ipcserve imports neither Flask, torch nor transformers.
"""

from __future__ import annotations

from .engine.channel import CallResult, Stream
from .engine.config import Config
from .engine.errors import (
    ConfigError,
    ConflictError,
    DeadlineError,
    ForbiddenError,
    InputError,
    IPCServeError,
    ModelError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    QueueDeadlineError,
    RateLimitedError,
    ReloadError,
    RequestCancelledError,
    ResultDeadlineError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
    WorkerCrashedError,
    WorkerUnavailableError,
)
from .engine.mlprocess import MLProcess

__version__ = "0.3.0"

__all__ = [
    "CallResult",
    "Config",
    "ConfigError",
    "ConflictError",
    "DeadlineError",
    "ForbiddenError",
    "IPCServeError",
    "InputError",
    "MLProcess",
    "ModelError",
    "NotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "QueueDeadlineError",
    "RateLimitedError",
    "ReloadError",
    "RequestCancelledError",
    "ResultDeadlineError",
    "Stream",
    "UnauthorizedError",
    "UnsupportedMediaTypeError",
    "WorkerCrashedError",
    "WorkerUnavailableError",
    "__version__",
]
