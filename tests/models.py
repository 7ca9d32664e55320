"""Fixture models for tests. Module level, so the spawn start method can import them."""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any

from ipcserve import InputError, MLProcess


class Doubler(MLProcess):
    def load(self) -> None:
        self.k = 2
        self.computed = 0

    def predict(self, x: Any = None, **kwargs: Any) -> Any:
        self.computed += 1
        if x == "pid":
            return os.getpid()
        if x == "count":
            return self.computed
        if x == "raise":
            raise ValueError("the model does not like 'raise'")
        if x == "input-error":
            raise InputError("field 'x' must not be 'input-error'")
        if x == "unpicklable":
            return threading.Lock()
        if x == "exit":
            os._exit(3)
        if x == "segfault":
            ctypes.string_at(0)
        if x == "hang":
            threading.Event().wait()  # never returns: only the watchdog ends this
        if kwargs:
            return {k: v * self.k for k, v in kwargs.items()}
        return x * self.k


class GatedDoubler(Doubler):
    """A Doubler whose load() waits on ``gate``, an Event the test holds: while the gate is
    clear, a restarted process stays loading, so the test decides when it becomes ready."""

    def __init__(self, gate: Any, **settings: Any) -> None:
        super().__init__(**settings)
        self.gate = gate

    def load(self) -> None:
        if not self.gate.wait(60):  # bounded: a test that forgot the gate fails, not hangs
            raise RuntimeError("the test never opened the load gate")
        super().load()


class Blocker(MLProcess):
    """predict("block") signals ``entered`` and waits on ``release``; anything else echoes.

    Events are created by the test and travel to the ML process when it is started.
    """

    def __init__(self, entered: Any, release: Any, **settings: Any) -> None:
        super().__init__(**settings)
        self.entered = entered
        self.release = release

    def load(self) -> None:
        self.computed: list[Any] = []

    def predict(self, x: Any) -> Any:
        if x == "computed":
            return list(self.computed)
        self.computed.append(x)
        if x == "block":
            self.entered.set()
            self.release.wait()
        if x == "hang":
            self.entered.set()
            threading.Event().wait()  # never returns: only the watchdog ends this
        if x == "exit":
            os._exit(3)
        return x


class FailsToLoad(MLProcess):
    def load(self) -> None:
        raise RuntimeError("weights file /nonexistent/model.bin is missing")

    def predict(self, x: Any) -> Any:  # pragma: no cover - never loaded
        return x


class Batcher(MLProcess):
    """Records every batch it sees; a 'poison' item makes the whole batch raise."""

    def __init__(self, entered: Any, release: Any, **settings: Any) -> None:
        super().__init__(**settings)
        self.entered = entered
        self.release = release

    def load(self) -> None:
        self.batches: list[list[Any]] = []

    def predict_batch(self, xs: list[Any]) -> list[Any]:
        if xs == ["batches"]:
            return [list(self.batches)]
        self.batches.append(list(xs))
        if "block" in xs:
            self.entered.set()
            self.release.wait()
        if "poison" in xs:
            raise ValueError("poison in batch")
        return [x if x == "block" else x * 10 for x in xs]


def make_tripler() -> Any:
    """A factory for MLProcess.from_factory: returns a plain callable."""
    return lambda x: x * 3


class BatchTripler:
    def predict_batch(self, xs: list[Any]) -> list[Any]:
        return [x * 3 for x in xs]


class Sleeper(MLProcess):
    """Slow work on purpose (for drain tests): sleeps ``seconds`` then answers."""

    def predict(self, seconds: float = 0.0) -> Any:
        import time

        time.sleep(float(seconds))
        return {"slept": seconds, "pid": os.getpid()}


class ArrayModel(MLProcess):
    """Echoes arrays (optionally scaled); 'block' waits on ``release`` for crash tests."""

    def __init__(self, entered: Any = None, release: Any = None, **settings: Any) -> None:
        super().__init__(**settings)
        self.entered = entered
        self.release = release

    def predict(self, x: Any, scale: float = 1.0, block: bool = False) -> Any:
        if block:
            self.entered.set()
            self.release.wait()
        return x * scale


class Spinner(MLProcess):
    """CPU-bound, single-threaded work; answers with its pid and worker index."""

    def predict(self, n: int) -> Any:
        total = 0
        for i in range(int(n)):
            total += i * i
        return {"pid": os.getpid(), "worker": getattr(self, "worker_index", None),
                "device": getattr(self, "device", None)}


class GatedLoad(MLProcess):
    """load() waits (bounded) until the file named by IPCSERVE_TEST_GATE exists."""

    def load(self) -> None:
        import time

        gate = os.environ["IPCSERVE_TEST_GATE"]
        deadline = time.monotonic() + 60
        while not os.path.exists(gate):
            if time.monotonic() > deadline:
                raise RuntimeError(f"gate {gate} never opened")
            threading.Event().wait(0.02)

    def predict(self, x: Any = None) -> Any:
        return x
