"""Streams: a predict that returns a generator sends each item as it is made.

Real ML processes and a real server; the model stamps each item with time.monotonic()
(one clock for every process on the host), so a test sees when items were made.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import signal
import socket
import threading
import time
from typing import Any

import pytest
from conftest import wait_until
from models import Streamer
from server import Server

from ipcserve import ModelError, ResultDeadlineError, WorkerCrashedError


def _counter() -> Any:
    return multiprocessing.get_context("spawn").Value("i", 0)


def test_items_arrive_as_they_are_made() -> None:
    with Streamer() as ml, ml.stream((), {"n": 4, "delay": 0.1}) as stream:
        arrivals = []
        for item in stream:
            arrivals.append((time.monotonic(), item["t"]))
        assert stream.streaming is True and stream.count == 4
        first_arrived, last_made = arrivals[0][0], arrivals[-1][1]
        assert first_arrived < last_made - 0.2  # the first was read while the rest were made
        assert all(arrived - made < 0.1 for arrived, made in arrivals)


def test_a_model_that_does_not_stream_gives_one_item_and_call_collects_a_stream() -> None:
    with Streamer() as ml:
        with ml.stream((), {"n": -1, "tag": "u"}) as stream:
            assert list(stream) == [{"unary": "u"}]
            assert stream.streaming is False and stream.result is not None
        assert [item["i"] for item in ml(n=3)] == [0, 1, 2]
        assert ml.inflight == 0


@pytest.mark.parametrize("fail, error", [("boom", ModelError), ("unpicklable", ModelError)])
def test_an_error_mid_stream_ends_it_once_and_the_process_lives(fail: str, error: type) -> None:
    with Streamer() as ml:
        pid = ml.pids[0]
        got = []
        with pytest.raises(error):
            for item in ml.stream((), {"n": 5, "fail": fail}):
                got.append(item["i"])
        assert got == [0, 1]
        assert ml(n=1)[0]["i"] == 0 and ml.pids == [pid] and ml.inflight == 0


def test_a_crash_mid_stream_ends_it_with_a_crash_error() -> None:
    with Streamer(restart_backoff=0.05) as ml:
        got = []
        t0 = time.monotonic()
        with pytest.raises(WorkerCrashedError, match="exited with code 5"):
            for item in ml.stream((), {"n": 5, "fail": "exit"}):
                got.append(item["i"])
        assert got == [0, 1] and time.monotonic() - t0 < 2
        wait_until(lambda: ml.ready, what="the restart")
        assert len(ml(n=2)) == 2


def test_closing_a_stream_stops_the_generator() -> None:
    counter = _counter()
    with Streamer(counter) as ml:
        with ml.stream((), {"n": 200, "delay": 0.01}) as stream:
            for item in stream:
                if item["i"] == 4:
                    break
        at_close = counter.value
        wait_until(lambda: ml.status["cancelled"]["running_disconnect"] == 1, what="the cancel")
        assert counter.value - at_close <= 2
        assert ml(n=1)[0]["i"] == 0  # the channel and the process serve on


def test_the_idle_time_between_items_is_bounded() -> None:
    counter = _counter()
    with Streamer(counter) as ml:
        got = []
        with pytest.raises(ResultDeadlineError):
            for item in ml.stream((), {"n": 50, "delay": 0.5}, timeout=5, idle_timeout=0.2):
                got.append(item)
        # The first item had the 5 s timeout; the second took 0.5 s, past the 0.2 s idle limit.
        assert [item["i"] for item in got] == [0]
        wait_until(lambda: ml.status["cancelled"]["running_deadline"] >= 1, what="the cancel")
        assert counter.value <= 3


def test_a_short_request_is_served_while_a_long_stream_runs() -> None:
    with Streamer() as ml, concurrent.futures.ThreadPoolExecutor(2) as pool:
        long = pool.submit(lambda: [(time.monotonic(), i) for i in ml.stream((), {"n": 40, "delay": 0.02})])
        wait_until(lambda: ml.status["workers"][0]["busy_for"] > 0 or ml.inflight == 1,
                   what="the long stream to start")
        t0 = time.monotonic()
        short = ml(n=1, tag="short")
        first_token_latency = time.monotonic() - t0
        long_items = long.result(20)
        assert short[0]["tag"] == "short"
        assert first_token_latency < 0.2, first_token_latency
        assert t0 < long_items[-1][0]  # the short one did not wait for the long one to end


def test_two_concurrent_streams_both_progress() -> None:
    with Streamer() as ml, concurrent.futures.ThreadPoolExecutor(2) as pool:
        streams = [pool.submit(lambda tag=tag: [(i["t"], tag) for i in ml.stream(
            (), {"n": 20, "delay": 0.01, "tag": tag})]) for tag in ("a", "b")]
        made = sorted(streams[0].result(20) + streams[1].result(20))
        order = "".join(tag for _, tag in made)
        assert order.count("ab") + order.count("ba") >= 10, order  # interleaved, not a then b


def test_a_slow_reader_pauses_its_generator() -> None:
    counter = _counter()
    with Streamer(counter) as ml:
        with ml.stream((), {"n": 100000, "tag": "x" * 65536}) as stream:
            next(stream)
            # Nothing read from here on: the model may fill the pipe, then must wait.
            last, stable = -1, 0
            deadline = time.monotonic() + 10
            while stable < 20:
                assert time.monotonic() < deadline, "the generator never paused"
                threading.Event().wait(0.01)
                stable = stable + 1 if counter.value == last else 0
                last = counter.value
            assert counter.value < 100, counter.value  # bounded by the pipe, not by n
            assert next(stream)["i"] == 1  # and it resumes


def _read_stream(server: Server, accept: str, n: int, delay: float) -> tuple[list[str], list[float]]:
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"n": n, "delay": delay}).encode()
    lines: list[str] = []
    stamps: list[float] = []
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Accept: %s\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                     % (accept.encode(), len(body), body))
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            stamps.append(time.monotonic())
    head, _, rest = data.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0], head
    lines.append(head.decode())
    # chunked transfer encoding: decode it
    text = b""
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        text += rest[:size]
        rest = rest[size + 2:]
    lines.extend(text.decode().splitlines())
    return lines, stamps


@pytest.mark.timeout(60)
def test_http_streams_ndjson_and_sse() -> None:
    server = Server("--model", "models:Streamer")
    try:
        lines, stamps = _read_stream(server, "application/x-ndjson", 5, 0.1)
        assert "application/x-ndjson" in lines[0]
        items = [json.loads(line) for line in lines[1:]]
        assert [i["i"] for i in items] == [0, 1, 2, 3, 4]
        assert stamps[-1] - stamps[0] > 0.3  # arrived over time, not at once
        lines, _ = _read_stream(server, "text/event-stream", 3, 0.0)
        assert "text/event-stream" in lines[0]
        events = [line for line in lines[1:] if line]
        assert [json.loads(e[6:])["i"] for e in events if e.startswith("data: ") and '"i"' in e] == [0, 1, 2]
        assert events[-2:] == ["event: end", 'data: {"items":3}']
    finally:
        assert server.stop() == 0, server.output


@pytest.mark.timeout(60)
def test_http_stream_error_and_disconnect() -> None:
    server = Server("--model", "models:Streamer")
    try:
        host, port = server.url.removeprefix("http://").split(":")
        import requests

        r = requests.post(f"{server.url}/predict", json={"n": 5, "fail": "boom"},
                          headers={"Accept": "text/event-stream"}, timeout=10)
        assert r.status_code == 200
        assert "event: error" in r.text and '"type":"ModelError"' in r.text
        # A client that leaves mid-stream stops the generation.
        with requests.post(f"{server.url}/predict", json={"n": 1000, "delay": 0.02},
                           stream=True, timeout=10) as r:
            lines = r.iter_lines()
            assert json.loads(next(lines))["i"] == 0
        def cancelled() -> int:
            status = requests.get(f"{server.url}/v1/models/streamer", timeout=5).json()["status"]
            return int(status["cancelled"]["running_disconnect"])
        wait_until(lambda: cancelled() == 1, what="the stream to be cancelled")
        assert requests.post(f"{server.url}/predict", json={"n": -1, "tag": "u"},
                             timeout=10).json() == {"unary": "u"}
    finally:
        assert server.stop() == 0, server.output
