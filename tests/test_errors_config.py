"""The error hierarchy and Config: pure logic, no processes."""

from __future__ import annotations

import inspect
import pickle

import pytest

import ipcserve
from ipcserve import errors
from ipcserve.config import Config
from ipcserve.protocol import Attached, Reply, Request, Shutdown

ERROR_CLASSES = [obj for _, obj in inspect.getmembers(errors, inspect.isclass)
                 if issubclass(obj, errors.IPCServeError)]


def test_every_error_is_exported() -> None:
    assert {cls.__name__ for cls in ERROR_CLASSES} <= set(ipcserve.__all__)


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_error_survives_pickling(cls: type[errors.IPCServeError]) -> None:
    if cls is errors.WorkerCrashedError:
        err = cls("died", exitcode=-9)
    elif cls is errors.ModelError:
        err = cls("ValueError: no", remote_type="ValueError", remote_traceback="Traceback ...")
    else:
        err = cls("something is wrong")
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is cls and copy.args == err.args and vars(copy) == vars(err)
    body = copy.to_dict()
    assert body["type"] == cls.__name__ and body["error"] == err.message
    assert isinstance(body["error"], str)


def test_statuses_follow_the_design() -> None:
    assert errors.InputError.http_status == 400
    assert errors.PayloadTooLargeError.http_status == 413
    assert errors.UnsupportedMediaTypeError.http_status == 415
    assert errors.OverloadedError.http_status == 503
    assert errors.WorkerCrashedError.http_status == 503
    assert errors.QueueDeadlineError.http_status == 504
    assert issubclass(errors.DeadlineError, TimeoutError)
    assert issubclass(errors.ConfigError, ValueError)


def test_errors_md_shows_the_same_tree_as_the_module() -> None:
    import pathlib

    doc = pathlib.Path(__file__).parent.parent / "docs" / "errors.md"
    tree = errors.__doc__.split("::")[1].split("\n\n")[1]
    assert tree.strip() in doc.read_text()


def test_protocol_messages_survive_pickling() -> None:
    for msg in (Shutdown(b"t" * 16), Attached(0, 3, 123), Request(1, 2.0, (1,), {"a": 2}),
                Reply(1, value=[1, 2], error=errors.ModelError("x", "ValueError", "tb"))):
        assert pickle.loads(pickle.dumps(msg)) == msg or isinstance(msg, Reply)
    assert "tttt" not in repr(Shutdown(b"t" * 16))


def test_config_validates_with_messages_naming_field_and_bound() -> None:
    with pytest.raises(errors.ConfigError, match="max_batch_size must be an integer >= 1, got 0"):
        Config(max_batch_size=0)
    with pytest.raises(errors.ConfigError, match="timeout must be a number > 0"):
        Config(timeout=-1)
    with pytest.raises(errors.ConfigError, match="start_method must be one of"):
        Config(start_method="thread")
    with pytest.raises(errors.ConfigError, match="unknown setting"):
        Config().replace(max_batch=3)
    with pytest.raises(errors.ConfigError, match="heartbeat_interval"):
        Config(hang_timeout=0.1, heartbeat_interval=0.5)


def test_config_from_env_converts_and_overrides() -> None:
    env = {"IPCSERVE_MAX_BATCH_SIZE": "8", "IPCSERVE_TIMEOUT": "2.5", "OTHER": "x"}
    config = Config.from_env(environ=env, workers=2)
    assert (config.max_batch_size, config.timeout, config.workers) == (8, 2.5, 2)
    with pytest.raises(errors.ConfigError, match="IPCSERVE_WORKERS must be int"):
        Config.from_env(environ={"IPCSERVE_WORKERS": "two"})


def test_batching_policy_counts_items_and_keeps_order() -> None:
    from ipcserve import batching

    class P:
        def __init__(self, i: int) -> None:
            self.request = Request(i, 0.0, (i,), {})

    pending = [P(i) for i in range(5)]
    batch, rest = batching.take(pending, 2)
    assert [p.request.id for p in batch] == [0, 1] and [p.request.id for p in rest] == [2, 3, 4]
    assert batching.item_of((), {"a": 1}) == {"a": 1}
    assert batching.item_of((5,), {}) == 5
    with pytest.raises(TypeError):
        batching.item_of((1, 2), {})
