"""What the caller side, the supervisor and an ML process share for one MLProcess.

* :class:`ServedModel`: the hooks an ML process calls. ``MLProcess`` implements it, but the
  supervisor and the worker loop are typed against this protocol, not against
  ``MLProcess``, so the modules depend in one direction only::

      errors, config, protocol, statusblock, runtime  <-  channel, worker, batching
                                                      <-  supervisor  <-  mlprocess

* :class:`SteppedModel` and :class:`Made`: the step hook of a model that can advance many
  streams in one call (continuous batching of generation): the ML process's step scheduler
  (``stepping``) is typed against it.

* :class:`Plumbing`: the shared queue, the status block, the Shutdown token and the
  settings, made once by ``MLProcess.start()`` and handed whole to the supervisor, the
  callers and (pickled) to every ML process.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from .config import Config
from .statusblock import StatusBlock

__all__ = ["Made", "Plumbing", "ServedModel", "SteppedModel"]


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


@dataclasses.dataclass
class Made:
    """What one step made for one stream.

    Attributes:
        items: the stream's items, in order (none while its request is still prefilled).
        done: the stream is over: its last item is among ``items``.
        tokens: how many tokens (units of work) the step made for it, for tokens/s.
    """

    items: list[Any]
    done: bool = False
    tokens: int = 0


class SteppedModel(Protocol):
    """A model that advances many streams in one call (``stepping`` is True).

    The ML process calls :meth:`begin` for each streaming request instead of ``predict``,
    then, once per turn, :meth:`step` with the states of every active stream that can take
    more (up to ``max_batch_size`` rows), and :meth:`finish` exactly once per started state,
    whatever ended it (done, cancelled, expired, failed). A state may have a ``rows``
    attribute: the batch rows it takes (1 if it has none).
    """

    @property
    def stepping(self) -> bool:
        """True when streaming requests go through :meth:`begin` / :meth:`step`."""
        ...

    def begin(self, *args: Any, **kwargs: Any) -> Any:
        """Check a request and return its state; nothing heavy yet.

        Raises:
            InputError: the request is invalid (the caller gets it before any item).
        """
        ...

    def step(self, states: list[Any]) -> list[Made]:
        """Advance every state by one step; one :class:`Made` per state, in order."""
        ...

    def finish(self, state: Any) -> None:
        """Forget ``state`` and free what it holds."""
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
