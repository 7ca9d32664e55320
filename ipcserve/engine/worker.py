"""The ML process: load the model once, then answer requests until the Shutdown sentinel.

It multiplexes the shared queue (new channels, Shutdown) and every channel it serves with
one persistent selector (epoll on Linux). Requests read off the channels are batched
(:mod:`ipcserve.batching`), expired ones are skipped without computing, and every request
gets exactly one :class:`~ipcserve.protocol.Reply`, unless its caller cancelled it
(:mod:`ipcserve.cancel`): then it is never computed, or its model call is interrupted when
nobody waits for any of that call's requests. A model exception (``SystemExit`` included) or
an unpicklable result fails that request only; the process lives on.

A batch request (``Request.items``) counts as its items everywhere: in a batch, in the
served and cancelled counters, in the time per item. Its items join the other pending items
in ``predict_batch`` calls of at most ``max_batch_size``; a model that does not batch
answers it with ``predict(item)`` per item, in order, in one round trip.

The ML process leads its own process group, so whatever the model starts (a tokenizer
server, a subprocess) is killed with it: by the supervisor when the process dies, and by
the process itself when its parent is gone.

Never imports Flask or waitress.
"""

from __future__ import annotations

import itertools
import logging
import os
import selectors
import signal
import threading
import time
import traceback
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler
from typing import Any

from . import batching, shm
from .cancel import Cancelled, CancelWatch, Undecoded
from .reply import model_error, send, signature_error
from .stepping import StepRunner, steps_of
from .streaming import StreamRunner, is_stream
from .errors import (
    ConfigError,
    InputError,
    IPCServeError,
    ModelError,
    QueueDeadlineError,
    WorkerCrashedError,
)
from .protocol import Attach, Attached, Cancel, Reply, Request, Shutdown
from .runtime import Plumbing, ServedModel
from .statusblock import State

__all__ = ["worker_main"]

# How often the loop looks again at streams paused by a slow reader (its pipe was full).
_PAUSED_STREAM_TICK = 0.005

logger = logging.getLogger(__name__)


class _Pending:
    """A request read off a channel and not yet answered."""

    __slots__ = ("conn", "request", "arrived")

    def __init__(self, conn: Connection, request: Request, arrived: float) -> None:
        self.conn = conn
        self.request = request
        self.arrived = arrived


def _watch_parent(parent_pid: int) -> None:
    """Exit when the process that started us dies, so no ML process is ever orphaned.

    ``multiprocessing.parent_process().sentinel`` is a pipe whose write end the parent
    holds: it turns readable the moment the parent dies, whatever killed it (SIGKILL too).
    """
    from multiprocessing import parent_process

    parent = parent_process()
    sentinel = getattr(parent, "sentinel", None)
    while True:
        if sentinel is not None:
            if wait([sentinel], timeout=1.0):
                break
        elif not wait([], timeout=1.0) and os.getppid() != parent_pid:
            break
        if os.getppid() != parent_pid:
            break
    logger.warning("ML process pid=%d: parent pid=%d is gone, exiting", os.getpid(), parent_pid)
    _exit_with_group(0)


def _exit_with_group(code: int) -> None:
    """Exit, taking every process the model started (our process group) with us."""
    try:
        if os.getpgid(0) == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)  # ourselves included: nothing outlives us
    except OSError:
        pass
    os._exit(code)


_DROPPED_LOG_EVERY = 10.0  # seconds between warnings about undecodable queue messages
_GATHER_SLICE = 0.001  # seconds between looks at the callers' in-flight count while gathering


class _Loop:
    """State of one ML process's serving loop."""

    def __init__(self, model: ServedModel, plumbing: Plumbing, slot: int, generation: int) -> None:
        self.model = model
        self.slot = slot
        self.generation = generation
        self.queue = plumbing.queue
        self.status = plumbing.status
        self.token = plumbing.token
        self.config = plumbing.config
        self.wait_policy = batching.BatchWait(self.config.max_batch_size, self.config.max_batch_wait)
        self.conns: list[Connection] = []
        self.mailboxes: dict[Connection, shm.Mailbox] = {}  # each channel's shared memory
        # One persistent epoll/poll selector: multiprocessing.connection.wait() builds a new
        # selector per call, which cost more than the rest of a small request.
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.queue._reader, selectors.EVENT_READ)
        self.pending: list[_Pending] = []
        self.stopping = False
        self.dropped_unlogged = 0  # undecodable queue messages since the last warning
        self.dropped_logged_at = -_DROPPED_LOG_EVERY
        self.batchable = model.batching
        self.watch = CancelWatch(bool(getattr(model, "interruptible", True)), self._handle)
        model._cancel_probe = self.watch.cancelled  # type: ignore[attr-defined]
        steps = (StepRunner(model, self.status, slot, self.watch,  # type: ignore[arg-type]
                            self.config.shm_threshold, self.config.max_batch_size)
                 if steps_of(model) else None)
        self.streams = StreamRunner(self.status, slot, self.watch, self.config.shm_threshold,
                                    steps)
        self.item_time = 0.0  # moving average of model seconds per item, for "time saved"

    # -- input -----------------------------------------------------------------------
    def _take_from_queue(self) -> Any:
        """One message off the shared queue, or None if another ML process got it first.

        We never block inside ``SimpleQueue.get()``: it holds the queue's read lock while
        it waits, so an ML process killed while idle would leave the lock held and starve
        every process after it. The lock is held only for a read we know will not block.
        """
        rlock = self.queue._rlock
        if not rlock.acquire(timeout=self.config.heartbeat_interval):
            return None
        try:
            if not self.queue._reader.poll(0):
                return None
            data = self.queue._reader.recv_bytes()
        finally:
            rlock.release()
        try:
            return ForkingPickler.loads(data)
        except Exception as exc:
            # E.g. the web process that sent this channel died before we fetched its fd, or
            # the fd transfer failed (out of fds). Counted where callers look: one waiting on
            # a channel nobody attached sends its request again at once on a fresh channel.
            self.status.count_undecodable(self.slot)
            self._log_dropped(exc)
            return None

    def _log_dropped(self, exc: Exception) -> None:
        """Warn about an undecodable queue message, at most once per
        ``_DROPPED_LOG_EVERY`` seconds: when fds run out, every new channel fails."""
        self.dropped_unlogged += 1
        now = time.monotonic()
        if now - self.dropped_logged_at < _DROPPED_LOG_EVERY:
            return
        logger.warning("ML process pid=%d: dropped %d queue message(s) that could not be "
                       "decoded (a new channel's pipe end did not arrive; its caller sends "
                       "again): %r", os.getpid(), self.dropped_unlogged, exc)
        self.dropped_unlogged = 0
        self.dropped_logged_at = now

    def _on_queue_message(self, message: Any) -> Connection | None:
        """Handle one queue message; returns the new channel's end for an Attach."""
        if isinstance(message, Attach):
            conn = message.conn
            try:
                conn.send(Attached(self.slot, self.generation, os.getpid()))
            except (BrokenPipeError, EOFError, OSError):
                conn.close()
                return None
            self.conns.append(conn)
            self.mailboxes[conn] = shm.Mailbox()
            self.selector.register(conn, selectors.EVENT_READ)
            return conn
        elif isinstance(message, Shutdown):
            if message.token == self.token:
                self.stopping = True
            else:
                logger.error("ignored a Shutdown message with a wrong token")
        elif message is not None:
            logger.error("ignored an unexpected queue message of type %s", type(message).__name__)
        return None

    def _drop(self, conn: Connection) -> None:
        """The caller closed its channel: requests of it not yet computed never will be."""
        if conn not in self.conns:
            return
        for item in [p for p in self.pending if p.conn is conn]:
            self._cancel_queued(item, "disconnect")
        self.streams.cancel(conn, None, "disconnect")
        self.conns.remove(conn)
        mailbox = self.mailboxes.pop(conn, None)
        if mailbox is not None:
            mailbox.close()
        self.selector.unregister(conn)
        conn.close()

    def _read(self, conn: Connection, now: float) -> None:
        """Read every message waiting on ``conn``: a Cancel right behind its Request must
        be seen before the request is computed."""
        while True:
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                self._drop(conn)  # the caller closed its channel (thread ended, timed out)
                return
            message, failed_id = self._decode(conn, data)
            self._handle(conn, message, now, failed_id)
            try:
                if not conn.poll(0):
                    return
            except (EOFError, OSError):
                self._drop(conn)
                return

    def _decode(self, conn: Connection, data: bytes) -> tuple[Any, int | None]:
        """A channel message, through the channel's mailbox; on failure the exception and
        the request id when it is known."""
        try:
            mailbox = self.mailboxes.get(conn)
            return (mailbox.loads(data) if mailbox is not None else shm.loads(data)), None
        except Exception as exc:
            # E.g. the segment of a request its caller abandoned (it timed out before we read
            # it): answer under that request's id, which the caller drops as stale, never
            # id-less, which would fail the caller's current call instead.
            return exc, shm.message_id(data)

    def _handle(self, conn: Connection, message: Any, now: float, failed_id: int | None = None) -> None:
        """One decoded channel message (None: the channel closed; an exception: it could not
        be decoded, ``failed_id`` is its request id when known; Undecoded: read by the
        cancel watch during a model call, decoded here)."""
        if isinstance(message, Undecoded):
            message, failed_id = self._decode(conn, message.data)
        if message is None:
            self._drop(conn)
        elif isinstance(message, Request):
            if message.items is not None and (not isinstance(message.items, list)
                                              or not message.items):
                send(conn, Reply(message.id, error=InputError(
                    "a batch request needs a non-empty list of items")))
            else:
                self.pending.append(_Pending(conn, message, now))
        elif isinstance(message, Cancel):
            queued = [p for p in self.pending if p.conn is conn and p.request.id == message.id]
            for item in queued:
                self._cancel_queued(item, message.reason)
            if not queued:
                self.streams.cancel(conn, message.id, message.reason)
        else:
            what = (f"{type(message).__name__}: {message}" if isinstance(message, Exception)
                    else f"expected a Request, got {type(message).__name__}")
            send(conn, Reply(failed_id, error=InputError(
                f"the ML process could not decode the request: {what}")))

    def _cancel_queued(self, item: _Pending, reason: str) -> None:
        self.pending.remove(item)
        self._count_cancelled(item, "queued", reason)
        logger.debug("request %s cancelled while queued (%s)", item.request.id, reason)

    def _count_cancelled(self, item: _Pending, stage: str, reason: str,
                         saved: float | None = None) -> None:
        """Count a cancelled request as its items; ``saved``: the model seconds it saved
        (default: the time per item, times its items)."""
        size = batching.size_of(item.request)
        if saved is None:
            saved = self.item_time * size
        for index in range(size):
            self.status.count_cancelled(self.slot, stage, reason, saved if index == 0 else 0.0)

    def poll_once(self, timeout: float) -> None:
        reader = self.queue._reader
        events = self.selector.select(timeout)
        now = time.monotonic()
        self.status.beat(self.slot)
        for key, _ in events:
            conn = key.fileobj
            if conn is reader:
                if not self.stopping:  # after our Shutdown, the rest is for our siblings
                    self._drain_queue(now)
            else:
                self._read(conn, now)  # type: ignore[arg-type]

    def _drain_queue(self, now: float) -> None:
        """Take every queued message now (bounded), reading each new channel's first
        request at once, so a burst of new callers lands in one batch."""
        for _ in range(256):
            message = self._take_from_queue()
            if message is None:
                return
            attached = self._on_queue_message(message)
            if self.stopping:
                return  # one Shutdown per process: leave the others' on the queue
            if attached is not None and attached.poll(0):
                self._read(attached, now)
            if not self.queue._reader.poll(0):
                return

    # -- compute ---------------------------------------------------------------------
    def run_pending(self) -> None:
        """Answer everything read so far, in batches of at most max_batch_size items."""
        while self.pending:
            now = time.monotonic()
            live: list[_Pending] = []
            for item in self.pending:
                if item.request.deadline <= now:
                    self._count_cancelled(item, "queued", "deadline")
                    send(item.conn, Reply(item.request.id, error=QueueDeadlineError(
                        "the request's deadline passed while it was queued; it was not computed")))
                else:
                    live.append(item)
            self.pending = []
            if not live:
                return
            if self.batchable:
                batch, self.pending = batching.take(live, self.config.max_batch_size)
                self._run_batch(batch)
            else:
                # The rest first: messages read while the model runs (the cancel watch
                # hands them back when the call ends) are appended to self.pending.
                self.pending = live[1:]
                self._run_single(live[0])
            self._poll_more()

    def _poll_more(self) -> None:
        """Read whatever arrived during the last batch, so the next one forms naturally."""
        self.poll_once(0)

    def _finish(self, items: list[_Pending], answers: list[batching.Outcome],
                started: float, cancelled: dict[int, str] | None = None) -> None:
        """Reply to each of ``items`` with its answer (value, error, model call size)."""
        elapsed = time.monotonic() - started
        size = sum(batching.size_of(item.request) for item in items)
        self.item_time = 0.8 * self.item_time + 0.2 * elapsed / max(1, size)
        # Published for admission's estimate in every web process (seconds and requests per
        # batch: calls in flight are counted in requests, whatever their items).
        self.status.record_batch(self.slot, elapsed, len(items),
                                 self.config.max_batch_size if self.batchable else 1)
        traces = [t for t in (item.request.trace for item in items) if t is not None]
        for item, (value, error, batch_size) in zip(items, answers):
            if cancelled and id(item) in cancelled:
                continue  # nobody waits for it: its result is discarded
            trace = item.request.trace
            send(item.conn, Reply(item.request.id, value=value, error=error,
                                   queue_wait=max(0.0, started - item.arrived),
                                   inference_time=elapsed, batch_size=batch_size,
                                   started=started, links=() if trace is None else tuple(
                                       t for t in traces if t != trace)),
                  self.config.shm_threshold, self.mailboxes.get(item.conn))
        self.status.set_busy(self.slot, 0.0)
        self.status.add_served(self.slot, size)
        self.status.beat(self.slot)

    def _interrupted(self, items: list[_Pending], cancelled: dict[int, str], started: float) -> None:
        """The model call was interrupted: nobody waited for any of ``items``."""
        elapsed = time.monotonic() - started
        size = sum(batching.size_of(item.request) for item in items)
        saved = max(0.0, self.item_time * size - elapsed)
        for index, item in enumerate(items):
            reason = cancelled.get(id(item), "deadline")
            self._count_cancelled(item, "running", reason, saved if index == 0 else 0.0)
        logger.info("model call of %d request(s) interrupted after %.3fs: nobody waits for it",
                    len(items), elapsed)
        self.status.set_busy(self.slot, 0.0)
        self.status.beat(self.slot)

    def _run_single(self, item: _Pending) -> None:
        if self.streams.join(item):  # a stepping model: the stream joins the next step
            return
        if item.request.items is not None:
            self._run_items(item)
            return
        started = time.monotonic()
        self.status.set_busy(self.slot, started)
        request = item.request
        cancelled: dict[int, str] = {}
        self.watch.begin([item])
        try:
            try:
                result: tuple[Any, IPCServeError | None] = (
                    self.model.predict(*request.args, **request.kwargs), None)
            finally:
                cancelled = self.watch.end()
        except Cancelled:  # (end() is idempotent: the signal may land inside it)
            self._interrupted([item], cancelled or self.watch.end(), started)
            return
        except TypeError as exc:
            result = (None, signature_error(self.model.predict, request) or model_error(exc))
        except BaseException as exc:  # SystemExit from a model fails the request, not us
            result = (None, model_error(exc))
        if result[1] is None and is_stream(result[0]) and id(item) not in cancelled:
            self.status.set_busy(self.slot, 0.0)
            self.streams.add(item, result[0])  # items go out as the serving loop advances it
            return
        self._finish([item], [(*result, 1)], started, cancelled)

    def _run_items(self, item: _Pending) -> None:
        """A batch request to a model that does not batch: ``predict(x)`` for each item, in
        order, under one cancel watch; the first failing item ends it (nobody needs the
        rest: the request fails)."""
        started = time.monotonic()
        self.status.set_busy(self.slot, started)
        request = item.request
        assert request.items is not None
        outcomes: list[batching.Outcome] = []
        cancelled: dict[int, str] = {}
        self.watch.begin([item])
        try:
            try:
                for x in request.items:
                    if outcomes:
                        self._between_calls()
                    outcomes.append(self._predict_item(request, x))
                    if outcomes[-1][1] is not None:
                        break
            finally:
                cancelled = self.watch.end()
        except Cancelled:  # (end() is idempotent: the signal may land inside it)
            self._interrupted([item], cancelled or self.watch.end(), started)
            return
        self._finish([item], [batching.answer(request, outcomes)], started, cancelled)

    def _predict_item(self, request: Request, x: Any) -> batching.Outcome:
        """``predict(x)`` for one item of a batch request; Cancelled passes through."""
        try:
            value = self.model.predict(x)
        except Cancelled:
            raise
        except TypeError as exc:
            call = Request(request.id, request.deadline, (x,), {})
            return None, signature_error(self.model.predict, call) or model_error(exc), 1
        except BaseException as exc:  # SystemExit from a model fails the request, not us
            return None, model_error(exc), 1
        if is_stream(value):
            close = getattr(value, "close", None)
            try:
                if callable(close):
                    close()  # a generator: its finally blocks run now
            except Cancelled:
                raise
            except BaseException as exc:
                logger.debug("closing a stream made for a batch request raised %r", exc)
            return None, ModelError("a streaming model cannot answer a batch request: predict "
                                    "returned an iterator; stream each item on its own "
                                    "instead"), 1
        return value, None, 1

    def _run_batch(self, items: list[_Pending]) -> None:
        good: list[_Pending] = []
        xs: list[Any] = []
        owners: list[int] = []  # for each of xs, its request's index in good
        for item in items:
            try:
                its = batching.items_of(item.request)
            except TypeError as exc:
                send(item.conn, Reply(item.request.id, error=InputError(str(exc))))
                continue
            owners.extend([len(good)] * len(its))
            xs.extend(its)
            good.append(item)
        if not good:
            return
        items = good
        started = time.monotonic()
        self.status.set_busy(self.slot, started)
        cancelled: dict[int, str] = {}
        self.watch.begin(items)
        try:
            try:
                outcomes = self._compute(xs, owners)
            finally:
                cancelled = self.watch.end()
        except Cancelled:  # (end() is idempotent: the signal may land inside it)
            self._interrupted(items, cancelled or self.watch.end(), started)
            return
        sizes = [batching.size_of(item.request) for item in items]  # each one's span of xs
        answers = [batching.answer(item.request, outcomes[end - size:end])
                   for item, size, end in zip(items, sizes, itertools.accumulate(sizes))]
        self._finish(items, answers, started, cancelled)

    def _compute(self, xs: list[Any], owners: list[int]) -> list[batching.Outcome]:
        """Every item's outcome, from ``predict_batch`` calls of at most ``max_batch_size``
        items (only a batch request bigger than that makes several). Items of a request
        that already failed are skipped (outcome ``(None, None, 0)``). Cancelled passes
        through."""
        outcomes: list[batching.Outcome] = [(None, None, 0)] * len(xs)
        failed: set[int] = set()  # owners with a failed item
        limit = self.config.max_batch_size
        position = 0
        while position < len(xs):
            if position:
                self._between_calls()
            chunk: list[int] = []
            while position < len(xs) and len(chunk) < limit:
                if owners[position] not in failed:
                    chunk.append(position)
                position += 1
            if not chunk:
                continue
            batch = [xs[p] for p in chunk]
            try:
                outputs = self.model.predict_batch(batch)
                if len(outputs) != len(batch):
                    raise ModelError(f"predict_batch returned {len(outputs)} results for "
                                     f"{len(batch)} inputs")
            except Cancelled:
                raise
            except BaseException as exc:  # SystemExit from a model fails the request, not us
                if len(chunk) > 1:
                    # One poison input must not fail its batchmates: retry each alone.
                    logger.info("batch of %d failed (%r); retrying items one by one",
                                len(chunk), exc)
                for p in chunk:
                    if owners[p] in failed:
                        continue
                    outcomes[p] = self._predict_alone(xs[p]) if len(chunk) > 1 else (
                        None, model_error(exc), 1)
                    if outcomes[p][1] is not None:
                        failed.add(owners[p])
                continue
            for p, output in zip(chunk, outputs):
                outcomes[p] = (output, None, len(chunk))
        return outcomes

    def _between_calls(self) -> None:
        """Between two model calls of one batch request: each call that returned is progress
        (the watchdog kills a process that shows none for ``hang_timeout``, however long the
        request), and a model that opted out of interruption still stops here."""
        self.status.beat(self.slot)
        if self.watch.cancelled():
            raise Cancelled("nobody waits for the rest of this batch request")

    def _predict_alone(self, x: Any) -> batching.Outcome:
        """``predict_batch([x])`` for an item whose batch failed; Cancelled passes through."""
        try:
            outputs = self.model.predict_batch([x])
            if len(outputs) != 1:
                raise ModelError(f"predict_batch returned {len(outputs)} results for 1 input")
            return outputs[0], None, 1
        except Cancelled:
            raise
        except BaseException as exc:
            return None, model_error(exc), 1

    # -- lifecycle -------------------------------------------------------------------
    def serve(self) -> None:
        interval = self.config.heartbeat_interval
        self.watch.start()
        advanced = False
        while not self.stopping:
            if self.pending or advanced:
                timeout = 0.0
            elif self.streams:
                timeout = _PAUSED_STREAM_TICK  # streams wait for slow readers: look again soon
            else:
                timeout = interval
            self.poll_once(timeout)
            if self.pending and self.batchable:
                self._gather()
            self.run_pending()
            # One item per active stream per turn, channels read in between: fairness.
            advanced = self.streams.advance()
        # Drain: answer whatever is already readable, then exit.
        self.poll_once(0)
        self.run_pending()
        # Only a stop past its grace (or a second signal) finds a stream still running: it
        # was admitted and computed in part, so 502 as for a crash, never a resendable 503.
        self.streams.close_all(WorkerCrashedError(
            "the model was stopped (a reload or a shutdown, after its grace period) while "
            "this stream was in flight"))
        self.watch.stop()
        for conn in self.conns:
            conn.close()
        self.selector.close()

    def _gather(self) -> None:
        """Keep reading while the batch policy says to wait for the batch to fill: only
        while callers have admitted more requests than this process has read."""
        while not self.stopping and self.pending:
            items = sum(batching.size_of(p.request) for p in self.pending)
            # Admitted calls not read yet (streams being served count as admitted; calls
            # read by a sibling ML process make us wait at most max_batch_wait).
            coming = self.status.callers_inflight() - len(self.pending) - len(self.streams)
            remaining = self.wait_policy.remaining(items, min(p.arrived for p in self.pending), coming)
            if remaining <= 0:
                return
            # Short slices: a caller that gives up before sending (a 400 after admission)
            # lowers the count without waking us.
            self.poll_once(min(remaining, _GATHER_SLICE))


def _warm_up(model: ServedModel) -> None:
    """Run the model's example requests (``MLProcess.warmup_requests``) as requests run."""
    for kwargs in getattr(model, "warmup_requests", ()):
        if model.batching:
            answer = model.predict_batch([batching.item_of((), dict(kwargs))])[0]
        else:
            answer = model.predict(**kwargs)
        if is_stream(answer):  # a stream: its items too
            for _ in answer:
                pass


def _place(config: Any) -> None:
    """Run on the CPUs and at the niceness the config asks for (``cpus``, ``nice``), before
    ``load()``: torch and BLAS size their thread pools to the CPUs a process may use.

    Raises:
        ConfigError: the CPUs cannot be used (not in this container's cpuset, say).
    """
    if config.cpus:
        try:
            os.sched_setaffinity(0, config.cpus)
        except OSError as exc:
            raise ConfigError(f"cpus={','.join(map(str, config.cpus))}: this ML process cannot "
                              f"run there: {exc.strerror or exc}") from None
    if config.nice:
        os.nice(config.nice)


def worker_main(model: ServedModel, plumbing: Plumbing, slot: int, generation: int,
                ready: Connection, parent_pid: int) -> None:
    """Entry point of an ML process (module level, plain arguments, so spawn can import it)."""
    # Our own process group: the supervisor kills the group when we die, so processes the
    # model started do not outlive us (issue: grandchildren survived with ppid 1).
    try:
        os.setpgid(0, 0)
    except OSError:  # already a group or session leader
        pass
    config, status = plumbing.config, plumbing.status
    # Ctrl-C in a terminal, and systemd's stop (KillMode=control-group), signal the whole
    # process group; the parent decides how and when to stop us (sentinel, then SIGKILL).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="ipcserve-parent-watch",
                     daemon=True).start()
    model.worker_index = slot  # type: ignore[attr-defined]
    if config.devices:
        model.device = config.devices[slot % len(config.devices)]  # type: ignore[attr-defined]
    try:
        _place(config)
        model.load()
        model.warmup()
        _warm_up(model)
    except BaseException as exc:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            ready.send(("error", type(exc).__name__, str(exc), tb))
        finally:
            ready.close()
        _exit_with_group(3)
    status.beat(slot)
    status.set_state(slot, State.READY)
    ready.send(("ready",))
    ready.close()
    logger.info("ML process pid=%d slot=%d generation=%d ready", os.getpid(), slot, generation)
    _Loop(model, plumbing, slot, generation).serve()
    logger.info("ML process pid=%d slot=%d stopped", os.getpid(), slot)
