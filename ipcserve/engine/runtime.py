"""What the caller side, the supervisor and an ML process share for one MLProcess.

* :class:`ServedModel`: the hooks an ML process calls. ``MLProcess`` implements it, but the
  supervisor and the worker loop are typed against this protocol, not against
  ``MLProcess``, so the modules depend in one direction only::

      errors, config, protocol, statusblock, runtime  <-  channel, worker, batching
                                                      <-  supervisor  <-  mlprocess

* :class:`Plumbing`: the shared queue, the status block, the Shutdown token and the
  settings, made once by ``MLProcess.start()`` and handed whole to the supervisor, the
  callers and (pickled) to every ML process.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from .config import Config
from .statusblock import StatusBlock

__all__ = ["Plumbing", "ServedModel"]


class ServedModel(Protocol):
    """The hooks an ML process calls on the model object it was given."""

    name: str

    def load(self) -> None: ...

    def warmup(self) -> None: ...

    def predict(self, *args: Any, **kwargs: Any) -> Any: ...

    def predict_batch(self, xs: list[Any]) -> list[Any]: ...

    @property
    def batching(self) -> bool:
        """True when concurrent calls should be handed to ``predict_batch`` together."""
        ...


@dataclasses.dataclass(frozen=True)
class Plumbing:
    """The IPC objects of one MLProcess; picklable for the spawn start method.

    Attributes:
        name: the model's name, for logs and messages.
        config: the engine settings.
        queue: the shared ``SimpleQueue`` that carries Attach and Shutdown messages.
        status: the shared status block.
        token: the secret that makes a Shutdown message genuine.
    """

    name: str
    config: Config
    queue: Any
    status: StatusBlock
    token: bytes
