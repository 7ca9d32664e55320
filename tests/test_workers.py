"""Several ML processes per model, fed from the one shared queue."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal

from conftest import wait_until
from models import Blocker, Spinner


def test_two_workers_share_the_load_and_get_their_devices() -> None:
    with Spinner(workers=2, devices=("cpu:a", "cpu:b")) as ml:
        assert len(ml.pids) == 2
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: ml(20000), range(200)))
        pids = {a["pid"] for a in answers}
        assert pids == set(ml.pids)
        assert {(a["worker"], a["device"]) for a in answers} == {(0, "cpu:a"), (1, "cpu:b")}
        served = [w["served"] for w in ml.status["workers"]]
        assert min(served) >= 0.2 * sum(served), served


def test_no_worker_idles_while_another_is_busy() -> None:
    ctx = multiprocessing.get_context("spawn")
    entered, release = ctx.Event(), ctx.Event()
    with Blocker(entered, release, workers=2) as ml:
        # Bind this thread's channel, then block whichever process serves it.
        first = ml("hello")
        assert first == "hello"
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            blocked = pool.submit(ml, "block")
            assert entered.wait(5)
            # Calls from the main thread are answered by the other process meanwhile.
            for i in range(20):
                assert ml(i, timeout=5) == i
            release.set()
            assert blocked.result(5) == "block"


def test_one_worker_crashing_leaves_the_other_serving() -> None:
    with Spinner(workers=2, restart_backoff=0.05) as ml:
        victim = ml.pids[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: ml.status["crashes"] == 1, what="the crash to be seen")
        # The main thread's channel may have been bound to the dead process; nothing was
        # in flight on it, so calls go to a new channel instead of failing.
        answers = [ml(10, timeout=5)["pid"] for _ in range(10)]
        assert victim not in answers
        wait_until(lambda: ml.ready, what="the restart")
        assert len(ml.pids) == 2 and victim not in ml.pids


def test_shutdown_stops_every_worker_with_its_own_sentinel() -> None:
    ml = Spinner(workers=2).start()
    runtime = ml._runtime()
    assert ml(10)["pid"] in ml.pids
    ml.shutdown(grace=5)
    # Both exited cleanly on a sentinel (exit code 0), none had to be killed.
    assert [runtime.status.exitcode(s) for s in range(2)] == [0, 0]
