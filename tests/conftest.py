"""Shared fixtures: every test leaves no child process and no stray thread behind, and a
test that runs out of time fails with every thread's stack after its children are killed."""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from server import Server

# -- skips that are not allowed -------------------------------------------------------------
# CI sets IPCSERVE_ALLOWED_SKIPS to the skip reasons a Python may have ("torch|transformers"
# where torch is not installed; "" on 3.11, where everything is): a test skipped for any
# other reason fails the run, so a missing dependency cannot pass as green. Unset (a local
# run), skips are reported as usual.
_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    allowed = os.environ.get("IPCSERVE_ALLOWED_SKIPS")
    if allowed is None:
        return
    words = [w for w in allowed.split("|") if w]
    unexplained = [s for s in _skipped if not any(w in s.partition(": ")[2] for w in words)]
    if unexplained:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_sep("=", f"{len(unexplained)} skip(s) not allowed here "
                                    f"(IPCSERVE_ALLOWED_SKIPS={allowed!r})", red=True)
            for line in unexplained:
                reporter.write_line(line)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# -- a test that runs out of time ------------------------------------------------------------
# pytest-timeout (timeout_method = signal in setup.cfg) fails a test whose time is up by
# raising in the main thread. We take over its timer to do first what CPython's
# test_concurrent_futures does in _fail_on_deadlock: dump every thread's stack with
# faulthandler (which also shows threads blocked inside C calls) into the failure report,
# and kill every child process, so that a pipe held open by a hung child cannot block the
# test's own teardown or leak into the next test. Then the test fails.
#
# A main thread stuck in C code never runs the handler; faulthandler's own watchdog thread
# is armed a little later as a last resort: it dumps the stacks to the real stderr and exits.
_LAST_RESORT_AFTER = 15.0  # seconds past the test's timeout
_real_stderr_fd: int | None = None


def pytest_configure(config: pytest.Config) -> None:
    # Output capture is suspended while plugins configure, so fd 2 is the terminal here;
    # during a test it is pytest's capture file, which an os._exit would throw away.
    global _real_stderr_fd
    _real_stderr_fd = os.dup(2)


def pytest_unconfigure(config: pytest.Config) -> None:
    global _real_stderr_fd
    if _real_stderr_fd is not None:
        faulthandler.cancel_dump_traceback_later()
        os.close(_real_stderr_fd)
        _real_stderr_fd = None


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    if settings.method != "signal" or threading.current_thread() is not threading.main_thread():
        return None  # pytest-timeout's thread method: it dumps stacks and exits by itself
    timeout = settings.timeout

    def on_timeout(signum: int, frame: Any) -> None:
        __tracebackhide__ = True
        stacks = all_stacks()
        killed = kill_children()
        pytest.fail(f"Timeout: the test ran for more than {timeout}s. Killed child processes "
                    f"{killed}.\nStacks of all threads when it timed out (faulthandler):\n{stacks}")

    def cancel() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        faulthandler.cancel_dump_traceback_later()

    item.cancel_timeout = cancel  # type: ignore[attr-defined]  # pytest-timeout's cancel hook calls it
    signal.signal(signal.SIGALRM, on_timeout)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    faulthandler.dump_traceback_later(timeout + _LAST_RESORT_AFTER, exit=True,
                                      file=_real_stderr_fd if _real_stderr_fd is not None else 2)
    return True  # the timer is set: pytest-timeout's own implementation is skipped


def all_stacks() -> str:
    """Every thread's stack, as faulthandler writes it."""
    with tempfile.TemporaryFile("w+") as f:
        faulthandler.dump_traceback(file=f, all_threads=True)
        f.seek(0)
        return f.read()


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_children() -> list[int]:
    """SIGKILL every process below this one (ML processes, servers, browsers).

    multiprocessing's own helpers (the resource tracker, the forkserver) are spared: later
    tests need them, and the resource tracker warns if it has to be relaunched.
    """
    from multiprocessing import forkserver, resource_tracker

    helpers = {getattr(getattr(resource_tracker, "_resource_tracker", None), "_pid", None),
               getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)}
    killed = []
    for pid in _descendants(os.getpid()):
        if pid in helpers:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
    multiprocessing.active_children()  # reaps the killed multiprocessing children
    return killed


# Threads the stdlib starts once per process and keeps (multiprocessing's resource sharer,
# which hands pipe ends to other processes); not ours to reap.
_ALLOWED_THREAD_PREFIXES = ("MainThread", "pytest_timeout")


def _stray_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    stray = []
    for thread in threading.enumerate():
        if thread in before or not thread.is_alive():
            continue
        target = getattr(thread, "_target", None)
        if target is not None and getattr(target, "__qualname__", "").startswith("_ResourceSharer"):
            continue
        stray.append(thread)
    return stray


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    threads_before = set(threading.enumerate())
    yield
    children = multiprocessing.active_children()
    for child in children:
        if child.pid:
            os.kill(child.pid, signal.SIGKILL)
        child.join(5)
    # Threads end when their MLProcess shut down; give them a bounded moment to exit.
    for thread in _stray_threads(threads_before):
        thread.join(5)
    stray = _stray_threads(threads_before)
    assert not children, f"test left child processes behind: {children}"
    assert not stray, f"test left threads behind: {[t.name for t in stray]}"


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    """Wait for a condition another process makes true, bounded by ``timeout``."""
    import time

    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        tick.wait(0.01)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """The real ``python app.py`` on the digits model, shared by a test module."""
    server = Server()
    try:
        yield server
    finally:
        assert server.stop() == 0, server.output


def spawn_events() -> tuple[Any, Any]:
    """Two Events that travel to a spawned ML process (entered, release)."""
    ctx = multiprocessing.get_context("spawn")
    return ctx.Event(), ctx.Event()
