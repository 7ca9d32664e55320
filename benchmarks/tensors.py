"""V2 tensors three ways: ``python benchmarks/tensors.py``.

The same model (``models:TensorSum``: each row's sum, so the answer stays a few bytes) and
the same FP32 tensors of 1 KB, 1 MB and 8 MB, sent to one ``ipcserve serve --grpc-port``
server as the Open Inference Protocol's three encodings:

* **JSON REST**: ``POST /v2/models/tensorsum/infer``, the values as JSON numbers;
* **binary REST**: the same route with the binary tensor data extension (the JSON header,
  then the raw bytes; ``Inference-Header-Content-Length``);
* **gRPC**: ``ModelInfer`` with ``raw_input_contents``.

Every request body is made once by tritonclient's own encoders (``generate_request_body``
for REST, its ``service_pb2.ModelInferRequest`` for gRPC), with tritonclient's defaults for
each mode, and replayed by ``--concurrency`` client threads, each on its own keep-alive
connection or gRPC channel, for ``--seconds`` after a warm-up: like Triton's perf_analyzer,
a fast client, so the numbers are the server's. Every answer is checked (200 / OK and
the right sum). The server (and its ML process) runs on core 0 and the client on core 1,
127.0.0.1 only. Reports infer/s and p50/p99 latency per path and size, the median of
``--repeats`` rounds (each on a fresh server), as Markdown, and writes the raw numbers to
``benchmarks/results/tensors.json``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import select
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SERVER_CPUS, CLIENT_CPU = "0", 1
SIZES = {"1 KB": 1024, "1 MB": 1024 * 1024, "8 MB": 8 * 1024 * 1024}
PATHS = ("JSON REST", "binary REST", "gRPC")
_LISTENING = re.compile(r"serving .* on http://([\d.]+):(\d+) ")
_GRPC = re.compile(r"V2 gRPC on [\d.]+:(\d+)")


class TensorServer:
    """``ipcserve serve --model models:TensorSum --grpc-port 0`` pinned to SERVER_CPUS."""

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT)]),
                   PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            ["taskset", "-c", SERVER_CPUS, sys.executable, "-m", "ipcserve", "serve",
             "--model", "models:TensorSum", "--kind", "json", "--port", "0", "--grpc-port", "0",
             "--max-content-length", str(256 * 1024 * 1024), "--timeout", "120"],
            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        self.port = self.grpc_port = 0
        deadline = time.monotonic() + 120
        assert self.proc.stderr is not None
        while not (self.port and self.grpc_port):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the server did not start")
            if select.select([self.proc.stderr], [], [], 1.0)[0]:
                line = self.proc.stderr.readline()
                if (match := _LISTENING.search(line)) is not None:
                    self.port = int(match.group(2))
                if (match := _GRPC.search(line)) is not None:
                    self.grpc_port = int(match.group(1))
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()
        while True:  # until the model is loaded
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", "/readyz")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server never became ready")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def bodies(size: int) -> tuple[dict[str, Any], float]:
    """Each path's request, made once with tritonclient's encoders, and the expected sum."""
    import tritonclient.http as httpclient
    from tritonclient.grpc import service_pb2

    x = np.random.default_rng(0).standard_normal((1, size // 4)).astype(np.float32)
    made: dict[str, Any] = {}
    for path, binary in (("JSON REST", False), ("binary REST", True)):
        tensor = httpclient.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        output = httpclient.InferRequestedOutput("sum", binary_data=binary)
        body, json_size = httpclient.InferenceServerClient.generate_request_body(
            [tensor], outputs=[output])
        headers = {"Content-Type": "application/octet-stream" if binary else "application/json"}
        if json_size is not None:
            headers["Inference-Header-Content-Length"] = str(json_size)
        made[path] = (bytes(body), headers)
    # What tritonclient.grpc's infer() sends for set_data_from_numpy(x): the tensor's
    # metadata, and its bytes in raw_input_contents.
    request = service_pb2.ModelInferRequest(model_name="tensorsum")
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    made["gRPC"] = request.SerializeToString()
    return made, float(x.astype(np.float64).sum())


def _rest_sender(port: int, body: bytes, headers: dict[str, str], expected: float
                 ) -> Callable[[], None]:
    import tritonclient.http as httpclient

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def send() -> None:
        connection.request("POST", "/v2/models/tensorsum/infer", body, headers)
        response = connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {data[:200]!r}")
        length = response.getheader("Inference-Header-Content-Length")
        result = httpclient.InferenceServerClient.parse_response_body(
            data, header_length=None if length is None else int(length))
        _check(result.as_numpy("sum")[0], expected)

    return send


def _grpc_sender(port: int, body: bytes, expected: float) -> Callable[[], None]:
    import grpc
    from tritonclient.grpc import service_pb2

    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[
        ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)])
    # The request is already serialized: the channel sends the bytes as they are.
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")

    def send() -> None:
        answer = service_pb2.ModelInferResponse.FromString(infer(body, timeout=120))
        _check(np.frombuffer(answer.raw_output_contents[0], "<f8")[0], expected)

    return send


def _check(got: float, expected: float) -> None:
    if not np.isclose(got, expected, rtol=1e-9, atol=1e-6):
        raise RuntimeError(f"wrong answer: {got} != {expected}")


def load(senders: list[Callable[[], None]], seconds: float) -> dict[str, float]:
    """Each sender in its own thread, back to back, for ``seconds`` (at least 3 requests
    each); infer/s and latency percentiles in ms."""
    for send in senders:  # warm-up: connections open, the server's caches warm
        for _ in range(2):
            send()
    latencies: list[list[float]] = [[] for _ in senders]
    errors: list[BaseException] = []
    start = time.perf_counter()
    stop_at = start + seconds

    def run(send: Callable[[], None], out: list[float]) -> None:
        try:
            while time.perf_counter() < stop_at or len(out) < 3:
                t0 = time.perf_counter()
                send()
                out.append(time.perf_counter() - t0)
        except BaseException as exc:  # reported below, never swallowed
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s, out)) for s, out in zip(senders, latencies)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    elapsed = time.perf_counter() - start
    every = sorted(v for out in latencies for v in out)
    return {"infer_per_s": len(every) / elapsed, "p50_ms": 1000 * statistics.median(every),
            "p99_ms": 1000 * every[min(len(every) - 1, int(0.99 * len(every)))],
            "requests": len(every)}


def one_round(concurrency: int, seconds: float) -> dict[str, dict[str, dict[str, float]]]:
    server = TensorServer()
    try:
        results: dict[str, dict[str, dict[str, float]]] = {}
        for size_name, size in SIZES.items():
            made, expected = bodies(size)
            results[size_name] = {}
            for path in PATHS:
                if path == "gRPC":
                    senders = [_grpc_sender(server.grpc_port, made[path], expected)
                               for _ in range(concurrency)]
                else:
                    body, headers = made[path]
                    senders = [_rest_sender(server.port, body, headers, expected)
                               for _ in range(concurrency)]
                result = load(senders, seconds)
                result["request_bytes"] = len(made[path] if path == "gRPC" else made[path][0])
                results[size_name][path] = result
                print(f"  c={concurrency} {size_name:>5} {path:<12} "
                      f"{result['infer_per_s']:8.1f} infer/s  p50 {result['p50_ms']:8.2f} ms",
                      file=sys.stderr, flush=True)
        return results
    finally:
        server.stop()


def median_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for size_name in SIZES:
        merged[size_name] = {}
        for path in PATHS:
            runs = [r[size_name][path] for r in rounds]
            merged[size_name][path] = {key: statistics.median(run[key] for run in runs)
                                       for key in runs[0]}
            merged[size_name][path]["rounds_infer_per_s"] = [run["infer_per_s"] for run in runs]
    return merged


def report(results: dict[int, dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [f"`python benchmarks/tensors.py --repeats {args.repeats} --seconds {args.seconds}`"
             f", {time.strftime('%Y-%m-%d')}, Python {platform.python_version()}, "
             f"{os.cpu_count()} cores, 1-minute load before the run: {args.load_before:.2f}.", ""]
    for concurrency, merged in results.items():
        lines += [f"**concurrency {concurrency}**: infer/s (p50 / p99 latency, ms); median of "
                  f"{args.repeats}", "",
                  "| tensor | request bytes (JSON / binary / gRPC) | JSON REST | binary REST | gRPC "
                  "| binary REST ÷ JSON | gRPC ÷ JSON |", "|---|---|---:|---:|---:|---:|---:|"]
        for size_name in SIZES:
            row = merged[size_name]
            cells = [f"{row[p]['infer_per_s']:,.1f} ({row[p]['p50_ms']:.2f} / "
                     f"{row[p]['p99_ms']:.2f})" for p in PATHS]
            sizes = " / ".join(f"{row[p]['request_bytes'] / 1e6:.3g} MB" if
                               row[p]["request_bytes"] >= 1e5 else
                               f"{row[p]['request_bytes']:,} B" for p in PATHS)
            json_rate = row["JSON REST"]["infer_per_s"]
            lines.append(f"| {size_name} | {sizes} | " + " | ".join(cells) +
                         f" | {row['binary REST']['infer_per_s'] / json_rate:.1f}× | "
                         f"{row['gRPC']['infer_per_s'] / json_rate:.1f}× |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--json", default=str(HERE / "results" / "tensors.json"))
    args = parser.parse_args()
    args.load_before = os.getloadavg()[0]
    os.sched_setaffinity(0, {CLIENT_CPU})  # the client's threads, gRPC's included
    results = {}
    for concurrency in args.concurrency:
        rounds = []
        for i in range(args.repeats):
            print(f"round {i + 1}/{args.repeats}, concurrency {concurrency}", file=sys.stderr)
            rounds.append(one_round(concurrency, args.seconds))
        results[concurrency] = median_rounds(rounds)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()},
                                           "results": results}, indent=1))
    print(report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
