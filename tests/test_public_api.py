"""The public surface: ``ipcserve.__all__`` pinned, and every error (and protocol message)
surviving a trip through pickle, as it must to cross from the ML process to the caller.

Pure logic: no processes.
"""

from __future__ import annotations

import __future__
import inspect
import pathlib
import pickle
import types

import pytest

import ipcserve
from ipcserve.engine import errors
from ipcserve.engine.protocol import Attached, Cancel, Reply, Request, Shutdown

EXPECTED_ALL = [
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

ERROR_CLASSES = [obj for _, obj in inspect.getmembers(errors, inspect.isclass)
                 if issubclass(obj, errors.IPCServeError)]


# -- __all__ ---------------------------------------------------------------------------
def test_all_is_exactly_the_expected_list() -> None:
    assert ipcserve.__all__ == EXPECTED_ALL


def test_every_public_name_in_the_package_is_exported() -> None:
    # httpx's tests/test_exported_members.py, minus submodules (importing ipcserve imports
    # ipcserve.engine.config etc., which binds them as attributes) and the ``annotations`` name that
    # ``from __future__ import annotations`` binds (a compiler directive, not API).
    public = sorted(name for name, value in vars(ipcserve).items()
                    if not name.startswith("_")
                    and not isinstance(value, (types.ModuleType, __future__._Feature)))
    assert public == sorted(name for name in EXPECTED_ALL if not name.startswith("_"))
    for name in ipcserve.__all__:
        assert hasattr(ipcserve, name), name


def test_every_error_class_is_exported() -> None:
    assert {cls.__name__ for cls in ERROR_CLASSES} == set(errors.__all__)
    assert set(errors.__all__) <= set(ipcserve.__all__)


# -- the error hierarchy -------------------------------------------------------------------
def test_statuses_follow_the_design() -> None:
    assert errors.InputError.http_status == 400
    assert errors.PayloadTooLargeError.http_status == 413
    assert errors.UnsupportedMediaTypeError.http_status == 415
    assert errors.OverloadedError.http_status == 503
    assert errors.WorkerCrashedError.http_status == 502
    assert errors.ConflictError.http_status == 409
    assert errors.ReloadError.http_status == 500
    assert errors.QueueDeadlineError.http_status == 504
    assert issubclass(errors.DeadlineError, TimeoutError)
    assert issubclass(errors.ConfigError, ValueError)


def test_errors_md_shows_the_same_tree_as_the_module() -> None:
    doc = pathlib.Path(__file__).parent.parent / "docs" / "errors.md"
    assert errors.__doc__ is not None
    tree = errors.__doc__.split("::")[1].split("\n\n")[1]
    assert tree.strip() in doc.read_text()


def _example(cls: type[errors.IPCServeError]) -> errors.IPCServeError:
    if cls is errors.WorkerCrashedError:
        return cls("died", exitcode=-9)
    if cls is errors.ModelError:
        return cls("ValueError: no", remote_type="ValueError", remote_traceback="Traceback ...")
    return cls("something is wrong")


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_error_survives_pickling(cls: type[errors.IPCServeError]) -> None:
    err = _example(cls)
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is cls and copy.args == err.args and vars(copy) == vars(err)
    assert copy.message == err.message and str(copy) == str(err)
    assert (copy.http_status, copy.retry_after) == (err.http_status, err.retry_after)
    body = copy.to_dict()
    assert body["type"] == cls.__name__ and body["error"] == err.message
    assert isinstance(body["error"], str)


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_attributes_set_on_an_error_survive_pickling(cls: type[errors.IPCServeError]) -> None:
    # The circuit breaker sets retry_after on the instance; classes with their own
    # __reduce__ (WorkerCrashedError, ModelError) must keep such attributes too.
    err = _example(cls)
    err.retry_after = 7.0
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is cls and copy.retry_after == 7.0 and vars(copy) == vars(err)


def test_error_body_is_a_message_string_and_a_type() -> None:
    assert errors.InputError("field 'x' is missing").to_dict() == {
        "error": "field 'x' is missing", "type": "InputError"}
    assert errors.ModelError("boom", remote_type="KeyError").to_dict() == {
        "error": "boom", "type": "ModelError", "model_error_type": "KeyError"}
    assert errors.ModelError("boom").to_dict() == {"error": "boom", "type": "ModelError"}


# -- protocol messages ---------------------------------------------------------------------
@pytest.mark.parametrize("msg", [Shutdown(b"t" * 16), Attached(0, 3, 123), Request(1, 2.0, (1,), {"a": 2}),
                                 Cancel(1, "disconnect"), Reply(1, value=[1, 2])],
                         ids=lambda m: type(m).__name__)
def test_protocol_messages_survive_pickling(msg: object) -> None:
    copy = pickle.loads(pickle.dumps(msg))
    assert type(copy) is type(msg) and copy == msg


def test_a_reply_carrying_an_error_survives_pickling() -> None:
    # Exceptions compare by identity, so compare the reply field by field.
    msg = Reply(1, value=[1, 2], error=errors.ModelError("x", "ValueError", "tb"), queue_wait=0.5,
                inference_time=0.25, batch_size=3)
    copy = pickle.loads(pickle.dumps(msg))
    assert type(copy) is Reply
    assert (copy.id, copy.value, copy.queue_wait, copy.inference_time, copy.batch_size) == (
        1, [1, 2], 0.5, 0.25, 3)
    assert type(copy.error) is errors.ModelError
    assert copy.error.args == ("x",) and vars(copy.error) == vars(msg.error)


def test_the_shutdown_token_stays_out_of_repr() -> None:
    assert "tttt" not in repr(Shutdown(b"t" * 16))
