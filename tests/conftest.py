"""Shared fixtures: every test leaves no child process and no stray thread behind."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from server import Server

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
