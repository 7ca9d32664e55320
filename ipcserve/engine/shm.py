"""Large payloads through shared memory instead of the pipe.

Messages are pickled with protocol 5. Buffers that pickle can carry out of band (numpy
arrays, ``pickle.PickleBuffer``) of at least ``threshold`` bytes are copied once into a
fresh segment in ``/dev/shm``; the pipe carries only the small pickle and the segment's
name. The receiver maps the segment, unlinks its name at once and unpickles with views on
the mapping: arrays arrive without another copy, and the memory is freed when the last
view is gone.

Who removes a segment's name: the receiver, as soon as it has mapped it; the sender too,
when it learns the message will never be read (a request that failed or timed out, a reply
the caller was no longer there to take). Unlinking twice is harmless. So a crash on either
side leaves no segment behind, except when the sending process itself dies between
creating a segment and handing it over: segment names start with the creator's pid, and
the supervisor removes a dead ML process's segments with :func:`sweep`.
"""

from __future__ import annotations

import io
import itertools
import mmap
import os
import pickle
import secrets
from multiprocessing.reduction import ForkingPickler
from typing import Any

__all__ = ["Mailbox", "Segment", "discard", "dumps", "loads", "sweep"]

SHM_DIR = "/dev/shm"
_PREFIX = "ipcserve-"
_ALIGN = 64
_counter = itertools.count()
_HAVE_SHM = os.path.isdir(SHM_DIR)  # checked once: a stat per message showed in strace
# Populate the page tables in one call instead of taking a fault per 4 KiB page.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


class Segment:
    """Pipe message: a pickled message whose large buffers live in a shared-memory file.

    ``reused``: the segment belongs to the sender's :class:`Mailbox` and will carry its next
    message too: the receiver keeps it mapped and copies the buffers out. ``id``: the
    message's request id, readable without touching the buffers (a stale reply is dropped
    before its segment, maybe already overwritten, is read).
    """

    __slots__ = ("name", "layout", "data", "reused", "id")

    def __init__(self, name: str, layout: list[tuple[int, int]], data: bytes,
                 reused: bool = False, id: int | None = None) -> None:
        self.name = name
        self.layout = layout
        self.data = data
        self.reused = reused
        self.id = id

    def __reduce__(self) -> tuple[Any, ...]:
        return (Segment, (self.name, self.layout, self.data, self.reused, self.id))


class _Pickler(pickle.Pickler):
    """ForkingPickler's reducers (pipe ends, sockets) with protocol 5 out-of-band buffers;
    ForkingPickler itself does not take a buffer_callback."""

    def __init__(self, file: Any, buffer_callback: Any) -> None:
        super().__init__(file, 5, buffer_callback=buffer_callback)
        self.dispatch_table = _dispatch_table()


_table: tuple[int, dict[Any, Any]] = (-1, {})


def _dispatch_table() -> dict[Any, Any]:
    """ForkingPickler's table, built once (copying it per message cost ~7 us), and again
    only if a reducer was registered since."""
    global _table
    extra = ForkingPickler._extra_reducers  # type: ignore[attr-defined]
    if _table[0] != len(extra):
        table = ForkingPickler._copyreg_dispatch_table.copy()  # type: ignore[attr-defined]
        table.update(extra)
        _table = (len(extra), table)
    return _table[1]


def _path(name: str) -> str:
    if not name.startswith(_PREFIX) or "/" in name:
        raise ValueError(f"not an ipcserve segment name: {name!r}")
    return os.path.join(SHM_DIR, name)


def _pickle(obj: Any, threshold: int) -> tuple[bytes, list[memoryview], list[tuple[int, int]], int]:
    """Pickle ``obj`` with buffers of ``threshold`` bytes or more out of band: the pickle,
    those buffers, where each goes in a segment, and the segment size they need."""
    large: list[memoryview] = []

    def out_of_band(buffer: Any) -> bool:
        raw = buffer.raw()
        if raw.nbytes < threshold:
            return True  # small: keep it in the pickle
        large.append(raw)
        return False

    stream = io.BytesIO()
    _Pickler(stream, out_of_band).dump(obj)
    layout = []
    offset = 0
    for raw in large:
        layout.append((offset, raw.nbytes))
        offset += (raw.nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
    return stream.getvalue(), large, layout, offset


def _flat(raw: memoryview) -> memoryview:
    return raw.cast("B") if raw.ndim != 1 or raw.format != "B" else raw


def _new_name() -> str:
    return f"{_PREFIX}{os.getpid()}-{next(_counter)}-{secrets.token_hex(4)}"


def dumps(obj: Any, threshold: int) -> tuple[bytes, str | None]:
    """Pickle ``obj``; buffers of ``threshold`` bytes or more go to a new segment.

    Returns the bytes to send and the segment's name (None when nothing went out of band).
    """
    if threshold <= 0 or not _HAVE_SHM:
        return bytes(ForkingPickler.dumps(obj)), None
    data, large, layout, offset = _pickle(obj, threshold)
    if not large:
        return data, None
    name = _new_name()
    fd = os.open(_path(name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, max(offset, 1))
        # pwrite, not a mapping: tmpfs fills pages about twice as fast through write()
        # (8 MiB: ~3.5 ms vs ~7 ms measured here).
        for (start, size), raw in zip(layout, large):
            flat = _flat(raw)
            done = 0
            while done < size:
                done += os.pwrite(fd, flat[done:], start + done)
    except BaseException:
        discard(name)
        raise
    finally:
        os.close(fd)
    return bytes(ForkingPickler.dumps(Segment(name, layout, data))), name


def _map(name: str) -> mmap.mmap:
    """Map segment ``name`` and remove its name (the mapping keeps the memory)."""
    fd = os.open(_path(name), os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        return mmap.mmap(fd, size, flags=_MAP_FLAGS)
    finally:
        os.close(fd)
        discard(name)


class Mailbox:
    """One channel end's reusable shared memory: the segment it sends through, kept mapped
    and reused for every large message, and the peer's segment, mapped once.

    A fresh segment per message costs tmpfs allocating and zeroing every page twice per
    round trip (~3.5 ms per 8 MiB here); a reused one costs a copy into pages already there,
    and the receiver copies the buffers out (its arrays must outlive the next message).

    Reuse is safe because a channel carries one call at a time: the caller sends its next
    request only after the reply to the last (so the ML process has copied that request
    out), and the ML process replies again only after the next request. When a call ends
    without its reply (a deadline, a cancel, a crash), the caller abandons its segment
    (:meth:`abandon`): the ML process may read the old request later. Stream items, many per request,
    use a fresh segment each (:func:`dumps`).
    """

    __slots__ = ("_out_name", "_out", "_in_name", "_in")

    def __init__(self) -> None:
        self._out_name: str | None = None
        self._out: mmap.mmap | None = None
        self._in_name: str | None = None
        self._in: mmap.mmap | None = None

    def dumps(self, obj: Any, threshold: int, id: int | None = None) -> bytes:
        """Pickle ``obj``, its buffers of ``threshold`` bytes or more through the segment."""
        if threshold <= 0 or not _HAVE_SHM:
            return bytes(ForkingPickler.dumps(obj))
        data, large, layout, needed = _pickle(obj, threshold)
        if not large:
            return data
        if self._out is None or len(self._out) < needed:
            self.abandon()
            name = _new_name()
            fd = os.open(_path(name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                os.ftruncate(fd, needed)
                # Populated now, once: tmpfs allocates and zeroes the pages here, not per message.
                self._out = mmap.mmap(fd, needed, flags=_MAP_FLAGS)
            except BaseException:
                discard(name)
                raise
            finally:
                os.close(fd)
            self._out_name = name
        view = memoryview(self._out)
        for (start, size), raw in zip(layout, large):
            view[start:start + size] = _flat(raw)
        view.release()
        assert self._out_name is not None
        return bytes(ForkingPickler.dumps(Segment(self._out_name, layout, data, True, id)))

    def open(self, message: Segment) -> Any:
        """The message a reused segment carries, its buffers copied out.

        Raises:
            FileNotFoundError: the segment is gone (its sender gave up on it).
        """
        self._mapped(message.name)
        assert self._in is not None
        view = memoryview(self._in)
        try:
            buffers = [bytearray(view[start:start + length]) for start, length in message.layout]
        finally:
            view.release()
        return ForkingPickler.loads(message.data, buffers=buffers)

    def _mapped(self, name: str) -> None:
        """Map the peer's segment ``name`` once (its name is removed as soon as it is mapped)."""
        if name != self._in_name or self._in is None:
            if self._in is not None:
                self._in.close()
                self._in = None
            self._in = _map(name)
            self._in_name = name

    def loads(self, data: bytes | memoryview, expect: int | None = None) -> Any:
        """Unpickle a message from the peer (a reused segment, a fresh one, or none).

        ``expect``: the request id we wait for; a reused segment's message for another id is
        stale (a reply nobody waits for) and returns None unread: the peer may already have
        written its next message over it.
        """
        message = ForkingPickler.loads(data)
        if isinstance(message, Segment):
            if not message.reused:
                return _load_segment(message)
            if expect is not None and message.id != expect:
                try:  # not read, but mapped: its name must not outlive the peer
                    self._mapped(message.name)
                except FileNotFoundError:
                    pass
                return None
            return self.open(message)
        return message

    def abandon(self) -> None:
        """Stop reusing the segment we send through (its last message may still be read)."""
        if self._out is not None:
            self._out.close()
            self._out = None
        discard(self._out_name)
        self._out_name = None

    def close(self) -> None:
        self.abandon()
        if self._in is not None:
            self._in.close()
            self._in = None
        self._in_name = None


def loads(data: bytes | memoryview) -> Any:
    """Unpickle a message, mapping its shared-memory segment if it has one.

    Raises:
        FileNotFoundError: the segment is gone (its sender gave up on the message).
    """
    message = ForkingPickler.loads(data)
    if not isinstance(message, Segment):
        return message
    return _load_segment(message)


def _load_segment(message: Segment) -> Any:
    """A fresh segment's message, its buffers viewing the mapping (no copy)."""
    mm = _map(message.name)
    view = memoryview(mm)
    buffers = [view[start:start + length] for start, length in message.layout]
    return ForkingPickler.loads(message.data, buffers=buffers)


def discard(name: str | None) -> None:
    """Remove a segment's name (idempotent); mapped views stay valid."""
    if name is None:
        return
    try:
        os.unlink(_path(name))
    except FileNotFoundError:
        pass


def message_id(data: bytes) -> int | None:
    """The request id a mailbox message carries, readable even when its segment is gone
    (so the error for an unreadable request reaches the right call, or is dropped as stale)."""
    try:
        message = ForkingPickler.loads(data)
    except Exception:
        return None
    return message.id if isinstance(message, Segment) else None


def segment_of(data: bytes) -> str | None:
    """The segment named by a message that was never read (to discard it)."""
    try:
        message = ForkingPickler.loads(data)
    except Exception:
        return None
    return message.name if isinstance(message, Segment) else None


def sweep(pid: int) -> int:
    """Remove every segment made by process ``pid`` (which must be dead); returns how many."""
    if not _HAVE_SHM:
        return 0
    prefix = f"{_PREFIX}{pid}-"
    removed = 0
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for name in names:
        if name.startswith(prefix):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed += 1
            except FileNotFoundError:
                pass
    return removed
