"""Answers from the ML process: exactly one per request, always picklable.

A result that pickle cannot carry (or whose pickling raises even ``KeyboardInterrupt``)
becomes a ``ModelError`` for that request; an exception from the model becomes the error the
caller sees, with the remote traceback; a call that does not fit ``predict``'s signature is
an ``InputError`` naming the problem.
"""

from __future__ import annotations

import logging
import traceback
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any

from . import shm
from .errors import InputError, IPCServeError, ModelError
from .protocol import Reply, Request, StreamEnd, StreamItem

__all__ = ["model_error", "send", "signature_error"]

logger = logging.getLogger(__name__)


def send(conn: Connection, reply: Reply | StreamItem | StreamEnd, threshold: int = 0,
         mailbox: shm.Mailbox | None = None) -> bool:
    """Send one message; an unpicklable value becomes a ModelError (a stream item: the end
    of its stream with that error). False: the caller is gone or the item could not be sent.

    ``mailbox``: the channel's reused shared memory, for a Reply (the one message its
    request gets); stream items, several per request, each take a fresh segment."""
    segment = None
    sent_as_is = True
    try:
        if mailbox is not None and isinstance(reply, Reply):
            data = mailbox.dumps(reply, threshold, reply.id)
        else:
            data, segment = shm.dumps(reply, threshold)
    except BaseException as exc:  # the model returned something pickle cannot carry
        # BaseException: a result whose __reduce__ raises SystemExit or KeyboardInterrupt
        # must fail its request, not the process.
        logger.warning("reply %s could not be pickled: %r", reply.id, exc)
        error = ModelError(f"the model's result could not be sent back: {type(exc).__name__}: {exc}",
                           remote_type=type(exc).__name__)
        if isinstance(reply, Reply):
            reply = Reply(reply.id, error=error, queue_wait=reply.queue_wait,
                          inference_time=reply.inference_time, batch_size=reply.batch_size)
        else:
            reply = StreamEnd(reply.id, error=error)
            sent_as_is = False
        data = bytes(ForkingPickler.dumps(reply))
    try:
        conn.send_bytes(data)
    except (BrokenPipeError, EOFError, OSError):
        logger.debug("caller of request %s is gone (channel closed)", reply.id)
        shm.discard(segment)
        return False
    return sent_as_is


def model_error(exc: BaseException) -> IPCServeError:
    """The error a caller sees for an exception raised by the model."""
    if isinstance(exc, IPCServeError):
        return exc  # the model raised an ipcserve error on purpose (e.g. InputError)
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return ModelError(f"{type(exc).__name__}: {exc}", remote_type=type(exc).__name__,
                      remote_traceback=tb)


def signature_error(predict: Any, request: Request) -> InputError | None:
    """An InputError if the call does not fit predict's signature (a wrong JSON field),
    None if it fits and the TypeError came from inside the model."""
    import inspect

    try:
        signature = inspect.signature(predict)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(*request.args, **request.kwargs)
    except TypeError as exc:
        return InputError(f"the inputs do not match the model: {exc} (predict takes {signature})")
    return None
