"""The Open Inference Protocol V2 over gRPC (``--grpc-port``) through a real server, with
tritonclient's real gRPC client (and its own generated stubs for what the client does not
send: typed contents, bad raw contents). The server is ``python app.py`` serving HTTP and
gRPC from one process."""

from __future__ import annotations

import re
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from conftest import wait_until

from server import Server

pytestmark = pytest.mark.timeout(120)


def _grpcclient() -> Any:
    return pytest.importorskip("tritonclient.grpc",
                               reason="tritonclient[grpc] has no wheel for this Python")


def _port(server: Server) -> int:
    match = re.search(r"V2 gRPC on \S+:(\d+)", server.output)
    assert match, server.output
    return int(match.group(1))


def _client(server: Server) -> Any:
    return _grpcclient().InferenceServerClient(f"127.0.0.1:{_port(server)}")


def _metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{name}\{{{re.escape(wanted)}\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def _metrics(server: Server) -> str:
    return requests.get(f"{server.url}/metrics", timeout=10).text


@pytest.fixture(scope="module")
def digits() -> Iterator[Server]:
    server = Server("--grpc-port", "0")
    yield server
    assert server.stop() == 0, server.output


def _pixels(rows: int = 5) -> np.ndarray:
    from digits_data import _held_out

    return np.asarray(_held_out()[0], dtype=np.float32)[:rows]


def _native_digits(server: Server, pixels: np.ndarray) -> np.ndarray:
    return np.asarray([requests.post(server.url + "/v1/models/digits/predict",
                                     json={"pixels": row.tolist()}, timeout=30
                                     ).json()["probabilities"] for row in pixels], np.float32)


def _status_of(call: Any) -> str:
    """The gRPC status name an InferenceServerException carries (``NOT_FOUND``)."""
    grpcclient = _grpcclient()
    with pytest.raises(grpcclient.InferenceServerException) as caught:
        call()
    return str(caught.value.status()).removeprefix("StatusCode.")


def test_health_and_metadata_with_tritonclient(digits: Server) -> None:
    client = _client(digits)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits")
    assert _status_of(lambda: client.is_model_ready("nope")) == "NOT_FOUND"
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "ipcserve" and meta["extensions"] == ["binary_tensor_data"]
    model = client.get_model_metadata("digits", as_json=True)
    assert model["platform"] == "onnxruntime_onnx" and model["versions"] == ["1"]
    # The same document as the REST surface's (gRPC's JSON form writes int64 as strings).
    rest = requests.get(f"{digits.url}/v2/models/digits", timeout=10).json()
    assert [{**t, "shape": [int(d) for d in t["shape"]]} for t in model["inputs"]] == rest["inputs"]
    assert _status_of(lambda: client.get_model_metadata("digits", "2")) == "NOT_FOUND"


def test_digits_infer_equals_the_native_endpoint_and_is_counted(digits: Server) -> None:
    grpcclient = _grpcclient()
    pixels = _pixels()
    before = _metric(_metrics(digits), "ipcserve_requests_total", model="digits", status="200")
    tensor = grpcclient.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)  # raw_input_contents
    result = _client(digits).infer("digits", [tensor], request_id="r7")
    assert result.get_response().id == "r7"
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (5, 10) and probabilities.dtype == np.float32
    np.testing.assert_array_equal(probabilities, _native_digits(digits, pixels))
    # One request through the serving core: in /metrics and the status page's history.
    after = _metric(_metrics(digits), "ipcserve_requests_total", model="digits", status="200")
    assert after - before == 1 + len(pixels)  # the gRPC call and the native ones
    history = requests.get(f"{digits.url}/v1/history", timeout=10).json()["models"]["digits"]
    assert sum(history["requests"]["200"]) >= 1 + len(pixels)


def _stubs() -> tuple[Any, Any, Any]:
    """tritonclient's own generated messages and stub, for requests its client never sends."""
    import grpc

    _grpcclient()
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    return service_pb2, service_pb2_grpc, grpc


def test_typed_contents_work_like_raw_ones(digits: Server) -> None:
    pb, pb_grpc, grpc = _stubs()
    pixels = _pixels(2)
    request = pb.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="pixels", datatype="FP32", shape=[2, 64])
    tensor.contents.fp32_contents.extend(pixels.reshape(-1).tolist())
    with grpc.insecure_channel(f"127.0.0.1:{_port(digits)}") as channel:
        answer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    (output,) = answer.outputs
    assert output.name == "probabilities" and list(output.shape) == [2, 10]
    got = np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(2, 10)
    np.testing.assert_array_equal(got, _native_digits(digits, pixels))


def _bad_requests(pb: Any) -> list[tuple[Any, str, str]]:
    """(request, expected code, words of the message) for malformed ModelInfer requests."""
    def infer(shape: list[int] = [1, 64], datatype: str = "FP32", raw: list[bytes] | None = None,
              name: str = "pixels", model: str = "digits", values: int = 0,
              outputs: tuple[str, ...] = ()) -> Any:
        request = pb.ModelInferRequest(model_name=model)
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        tensor.contents.fp32_contents.extend([0.0] * values)
        request.raw_input_contents.extend([b"\0" * 256] if raw is None else raw)
        for out in outputs:
            request.outputs.add(name=out)
        return request

    return [
        (infer(model="nope"), "NOT_FOUND", "no model named 'nope'"),
        (infer(shape=[1, 63]), "INVALID_ARGUMENT", "inputs[0].shape"),
        (infer(shape=[1, -64]), "INVALID_ARGUMENT", "inputs[0].shape"),
        (infer(datatype="FP64"), "INVALID_ARGUMENT", "inputs[0].datatype"),
        (infer(name="x"), "INVALID_ARGUMENT", "inputs[0].name"),
        (infer(raw=[b"\0" * 255]), "INVALID_ARGUMENT", "raw_input_contents[0]"),
        (infer(raw=[b"\0" * 256] * 2), "INVALID_ARGUMENT", "raw_input_contents has 2 entries"),
        (infer(values=64), "INVALID_ARGUMENT", "inputs[0].contents"),
        (infer(raw=[], values=3), "INVALID_ARGUMENT", "inputs[0].contents.fp32_contents"),
        (infer(outputs=("nope",)), "INVALID_ARGUMENT", "outputs[0].name"),
        (pb.ModelInferRequest(model_name="digits"), "INVALID_ARGUMENT", "'inputs'"),
    ]


def test_errors_carry_the_protocols_codes_and_name_the_field(digits: Server) -> None:
    pb, pb_grpc, grpc = _stubs()
    with grpc.insecure_channel(f"127.0.0.1:{_port(digits)}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for request, code, words in _bad_requests(pb):
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(request, timeout=30)
            assert caught.value.code().name == code, (request, caught.value.details())
            assert words in caught.value.details(), caught.value.details()
    # Nothing of it reached the model, and the 400s are counted like REST ones.
    assert _metric(_metrics(digits), "ipcserve_requests_total", model="digits",
                   status="400") >= 9


def test_a_stream_answers_each_request_in_order_an_error_as_its_message(digits: Server) -> None:
    grpcclient = _grpcclient()
    answers: list[Any] = []
    done = threading.Event()

    def callback(result: Any, error: Any) -> None:
        answers.append(error if error is not None else result.as_numpy("probabilities"))
        if len(answers) == 3:
            done.set()

    client = _client(digits)
    client.start_stream(callback)
    try:
        for rows in (1, 3, 2):
            tensor = grpcclient.InferInput("pixels", [rows, 64 if rows != 3 else 63], "FP32")
            tensor.set_data_from_numpy(np.zeros((rows, 64 if rows != 3 else 63), np.float32))
            client.async_stream_infer("digits", [tensor])
        assert done.wait(30), answers
    finally:
        client.stop_stream()
    assert answers[0].shape == (1, 10) and answers[2].shape == (2, 10)
    assert "inputs[0].shape" in str(answers[1])


def test_ipcserves_messages_and_tritonclients_share_one_process() -> None:
    # Both define the protocol's inference.* messages; ipcserve's own descriptor pool keeps
    # them apart, so a process can serve with ipcserve and call Triton with tritonclient.
    pb, _, _ = _stubs()
    from ipcserve.http import v2_grpc
    from ipcserve.http.oip import inference_pb2

    ours = inference_pb2.ModelInferRequest(model_name="m", raw_input_contents=[b"x"])
    assert pb.ModelInferRequest.FromString(ours.SerializeToString()).raw_input_contents == [b"x"]
    assert v2_grpc.code_of(503).name == "UNAVAILABLE"
    assert v2_grpc.code_of(504).name == "DEADLINE_EXCEEDED"


# -- the lifecycle: cancellation, deadlines, shedding, draining, the API key --------------
@pytest.fixture
def rows(tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    steps = tmp_path / "steps"
    steps.write_text("")
    server = Server("--model", "iface_models:Rows", "--grpc-port", "0", "--max-inflight", "1",
                    env={"IPCSERVE_TEST_STEPS": str(steps), "IPCSERVE_TEST_STEP": "0.1"})
    try:
        yield server, steps
    finally:
        assert server.stop() == 0, server.output


def _rows(first: float = 0.0) -> Any:
    grpcclient = _grpcclient()
    tensor = grpcclient.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.asarray([[first, 0, 0, 0]], np.float32))
    return [tensor]


def _cancelled(server: Server, reason: str) -> float:
    return _metric(_metrics(server), "ipcserve_cancelled_total", model="rows", reason=reason,
                   stage="running")


def test_a_cancelled_grpc_call_cancels_the_work(rows: tuple[Server, Path]) -> None:
    server, steps = rows
    client = _client(server)
    answers: list[Any] = []
    call = client.async_infer("rows", _rows(first=-100), callback=lambda result, error: answers.append(error))
    wait_until(lambda: len(steps.read_text()) >= 3, what="3 steps")
    call.cancel()
    at_cancel = len(steps.read_text())
    wait_until(lambda: _cancelled(server, "disconnect") == 1, what="the cancellation")
    assert len(steps.read_text()) - at_cancel <= 2  # stopped within a step or two
    assert _metric(_metrics(server), "ipcserve_requests_total", model="rows", status="499") == 1
    result = client.infer("rows", _rows(), client_timeout=10)  # the model serves on
    assert result.as_numpy("batch").tolist() == [[1]]


def test_the_grpc_deadline_is_the_requests_deadline(rows: tuple[Server, Path]) -> None:
    server, steps = rows
    client = _client(server)
    assert _status_of(lambda: client.infer("rows", _rows(first=-100), client_timeout=0.5)
                      ) == "DEADLINE_EXCEEDED"
    # Answered 504 at its deadline (or 499: the client's own deadline, the same instant,
    # may end the call first).
    wait_until(lambda: sum(_metric(_metrics(server), "ipcserve_requests_total", model="rows",
                                   status=status) for status in ("504", "499")) == 1,
               what="the request counted")
    # The 100 steps (10 s) were cancelled: the ML process is free for the next call at once.
    result = client.infer("rows", _rows(), client_timeout=5)
    assert result.as_numpy("batch").tolist() == [[1]]
    assert len(steps.read_text()) <= 10


def test_shed_is_unavailable_with_retry_after_and_draining_answers_what_it_admitted(
        rows: tuple[Server, Path]) -> None:
    import grpc

    server, steps = rows
    pb, pb_grpc, _ = _stubs()
    client = _client(server)
    answers: list[Any] = []
    client.async_infer("rows", _rows(first=-15), callback=lambda result, error: answers.append((result, error)))
    wait_until(lambda: len(steps.read_text()) >= 1, what="the first call running")
    request = pb.ModelInferRequest(model_name="rows")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(b"\0" * 16)
    with grpc.insecure_channel(f"127.0.0.1:{_port(server)}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:  # max_inflight 1: shed at once
            stub.ModelInfer(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert dict(caught.value.trailing_metadata())["retry-after"] == "1"
        assert _metric(_metrics(server), "ipcserve_shed_total", model="rows",
                       reason="inflight") >= 1
        # SIGTERM with the first call in flight: it is answered, then the server exits 0.
        server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: answers, timeout=30, what="the call in flight answered")
    result, error = answers[0]
    assert error is None and result.as_numpy("batch").tolist() == [[1]]
    assert server.proc.wait(30) == 0, server.output


def test_the_api_key_is_metadata_and_the_health_calls_stay_open() -> None:
    grpcclient = _grpcclient()
    server = Server("--grpc-port", "0", "--api-key", "s3cret")
    try:
        client = _client(server)
        assert client.is_server_live() and client.is_server_ready()
        tensor = grpcclient.InferInput("pixels", [1, 64], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 64), np.float32))
        assert _status_of(lambda: client.infer("digits", [tensor])) == "UNAUTHENTICATED"
        assert _status_of(lambda: client.get_model_metadata(
            "digits", headers={"authorization": "Bearer wrong"})) == "UNAUTHENTICATED"
        result = client.infer("digits", [tensor], headers={"authorization": "Bearer s3cret"})
        assert result.as_numpy("probabilities").shape == (1, 10)
    finally:
        assert server.stop() == 0, server.output


# -- several inputs and outputs, large tensors, KServe's arguments ------------------------
def test_a_torch_model_of_several_inputs_and_outputs_equals_the_native_endpoint() -> None:
    pytest.importorskip("torch", reason="torch is installed by the 3.11 CI leg only")
    grpcclient = _grpcclient()
    server = Server("--model", "iface_models:TorchTwoHeads", "--kind", "json", "--grpc-port", "0")
    try:
        rng = np.random.default_rng(2)
        image = rng.standard_normal((3, 3, 4, 4)).astype(np.float32)
        offset = rng.integers(-5, 5, (3, 2)).astype(np.int64)
        native = [requests.post(server.url + "/v1/models/twoheads/predict", timeout=30,
                                json={"image": i.tolist(), "offset": o.tolist()}).json()
                  for i, o in zip(image, offset)]
        inputs = [grpcclient.InferInput("image", [3, 3, 4, 4], "FP32"),
                  grpcclient.InferInput("offset", [3, 2], "INT64")]
        inputs[0].set_data_from_numpy(image)
        inputs[1].set_data_from_numpy(offset)
        result = _client(server).infer("twoheads", inputs)
        np.testing.assert_allclose(result.as_numpy("score"),
                                   np.asarray([n["score"] for n in native], np.float32),
                                   rtol=1e-5, atol=1e-6)  # a batch of 3 against 3 of 1
        assert result.as_numpy("label").dtype == np.int64
        assert result.as_numpy("label").tolist() == [n["label"] for n in native]
        only = _client(server).infer("twoheads", inputs,
                                     outputs=[grpcclient.InferRequestedOutput("label")])
        assert [o.name for o in only.get_response().outputs] == ["label"]
    finally:
        assert server.stop() == 0, server.output


def test_an_8_mb_tensor_reaches_the_model_exactly() -> None:
    grpcclient = _grpcclient()
    server = Server("--model", "iface_models:Checksum", "--kind", "json", "--grpc-port", "0")
    try:
        x = np.random.default_rng(1).standard_normal((1, 2 * 1024 * 1024)).astype(np.float32)
        tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = _client(server).infer("checksum", [tensor])
        assert result.as_numpy("length").tolist() == [x.shape[1]]
        assert result.as_numpy("sum")[0] == x.astype(np.float64).sum()
    finally:
        assert server.stop() == 0, server.output


def test_kserves_arguments_serve_a_model_directory(tmp_path: Path) -> None:
    # What a KServe ServingRuntime passes: the storage initializer's directory, the
    # InferenceService's name, and its ports (the harness adds --port 0 before them).
    from ipcserve.adapters import digits as digits_adapter

    model_dir = tmp_path / "models"
    model_dir.mkdir()
    (model_dir / "model.onnx").write_bytes(Path(digits_adapter.__file__).with_name(
        "digits.onnx").read_bytes())
    with socket.socket() as probe:  # a free port for --http_port
        probe.bind(("127.0.0.1", 0))
        http_port = probe.getsockname()[1]
    server = Server("--model_dir", str(model_dir), "--model_name", "mnist",
                    "--http_port", str(http_port), "--grpc_port", "0")
    try:
        assert server.url == f"http://127.0.0.1:{http_port}"
        assert requests.get(f"{server.url}/v2/models/mnist/ready", timeout=10).json()["ready"]
        assert _client(server).is_model_ready("mnist")
    finally:
        assert server.stop() == 0, server.output


def test_a_grpc_port_in_use_stops_the_start() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = Server("--grpc-port", str(taken.getsockname()[1]), wait_ready=False)
        try:
            assert server.proc.wait(30) == 1
            assert "cannot serve V2 gRPC" in server.output
        finally:
            server.kill()


def test_the_status_mapping_in_the_docs_is_the_codes_table() -> None:
    from ipcserve.http.v2_grpc import GRPC_CODES

    docs = (Path(__file__).resolve().parent.parent / "docs" / "http.md").read_text()
    section = docs[docs.index("### V2 over gRPC"):]
    table = dict(re.findall(r"^\| (\d{3}) [^|]*\| `(\w+)` \|", section, re.M))
    assert {int(k): v for k, v in table.items()} == {k: v.name for k, v in GRPC_CODES.items()}
