"""The Open Inference Protocol V2 through a real server, with the real tritonclient."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import requests

from server import Server

pytestmark = pytest.mark.timeout(120)
_GONE = object()


def _httpclient() -> Any:
    """tritonclient's HTTP client, imported per test: the protocol's own tests below run
    wherever ipcserve does."""
    return pytest.importorskip("tritonclient.http",
                               reason="tritonclient[http] has no wheel for this Python")


@pytest.fixture(scope="module")
def digits() -> Iterator[Server]:
    server = Server()
    yield server
    assert server.stop() == 0, server.output


def _client(server: Server) -> Any:
    return _httpclient().InferenceServerClient(server.url.removeprefix("http://"))


def test_health_and_metadata_with_tritonclient(digits: Server) -> None:
    client = _client(digits)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits")
    assert not client.is_model_ready("nope")
    assert client.get_server_metadata()["name"] == "ipcserve"
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    meta = client.get_model_metadata("digits")
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]


def test_digits_infer_equals_the_native_endpoint(digits: Server) -> None:
    from digits_data import _held_out

    httpclient = _httpclient()
    pixels = np.asarray(_held_out()[0], dtype=np.float32)[:5]
    tensor = httpclient.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=False)
    output = httpclient.InferRequestedOutput("probabilities", binary_data=False)
    result = _client(digits).infer("digits", [tensor], outputs=[output])
    v2 = result.as_numpy("probabilities")
    assert v2.shape == (5, 10) and v2.dtype == np.float32
    native = np.asarray([requests.post(digits.url + "/v1/models/digits/predict",
                                       json={"pixels": row.tolist()}, timeout=30
                                       ).json()["probabilities"] for row in pixels], np.float32)
    np.testing.assert_array_equal(v2, native)


def _native_digits(server: Server, pixels: np.ndarray) -> np.ndarray:
    return np.asarray([requests.post(server.url + "/v1/models/digits/predict",
                                     json={"pixels": row.tolist()}, timeout=30
                                     ).json()["probabilities"] for row in pixels], np.float32)


def test_tritonclient_defaults_binary_data_and_it_equals_the_native_endpoint(digits: Server
                                                                             ) -> None:
    # As a new user copies tritonclient's own example: set_data_from_numpy(x) sends the
    # tensor as binary data, and infer() without outputs asks for every output as binary.
    from digits_data import _held_out

    httpclient = _httpclient()
    pixels = np.asarray(_held_out()[0], dtype=np.float32)[:5]
    tensor = httpclient.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    native = _native_digits(digits, pixels)
    result = _client(digits).infer("digits", [tensor])
    assert result.get_output("probabilities")["parameters"] == {"binary_data_size": 5 * 10 * 4}
    np.testing.assert_array_equal(result.as_numpy("probabilities"), native)
    # Binary input, JSON output; and binary output asked for by name.
    for binary_out in (False, True):
        output = httpclient.InferRequestedOutput("probabilities", binary_data=binary_out)
        result = _client(digits).infer("digits", [tensor], outputs=[output])
        assert ("data" in result.get_output("probabilities")) is not binary_out
        np.testing.assert_array_equal(result.as_numpy("probabilities"), native)


def _binary_body(header: dict[str, Any], *raw: bytes) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header).encode()
    return text + b"".join(raw), {"Inference-Header-Content-Length": str(len(text)),
                                  "Content-Type": "application/octet-stream"}


def _raw_pixels(rows: int = 1, size: int | None = None, **change: Any) -> dict[str, Any]:
    tensor = {"name": "pixels", "datatype": "FP32", "shape": [rows, 64],
              "parameters": {"binary_data_size": rows * 256 if size is None else size}}
    tensor.update(change)
    return {"inputs": [{k: v for k, v in tensor.items() if v is not _GONE}]}


def test_a_binary_answer_is_the_json_header_then_the_raw_outputs(digits: Server) -> None:
    pixels = np.zeros((2, 64), np.float32)
    body, headers = _binary_body({**_raw_pixels(2), "id": "r1",
                                  "parameters": {"binary_data_output": True}}, pixels.tobytes())
    answer = requests.post(digits.url + "/v2/models/digits/infer", data=body, headers=headers,
                           timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"] == "application/octet-stream"
    length = int(answer.headers["Inference-Header-Content-Length"])
    header = json.loads(answer.content[:length])
    assert header["id"] == "r1" and header["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [2, 10],
         "parameters": {"binary_data_size": 80}}]
    probabilities = np.frombuffer(answer.content[length:], "<f4").reshape(2, 10)
    np.testing.assert_array_equal(probabilities, _native_digits(digits, pixels))


BAD_BINARY = [
    ("x", _raw_pixels(), b"\0" * 256, "Inference-Header-Content-Length"),
    ("99999", _raw_pixels(), b"\0" * 256, "Inference-Header-Content-Length"),
    (None, _raw_pixels(), b"", "inputs[0].parameters.binary_data_size: binary data needs"),
    ("", _raw_pixels(size=255), b"\0" * 255, "inputs[0].parameters.binary_data_size: shape"),
    ("", _raw_pixels(size=512), b"\0" * 256, "inputs[0].parameters.binary_data_size: 512"),
    ("", _raw_pixels(size=-1), b"", "inputs[0].parameters.binary_data_size must be"),
    ("", _raw_pixels(size=True), b"", "inputs[0].parameters.binary_data_size must be"),
    ("", _raw_pixels(), b"\0" * 260, "4 bytes of binary data"),
    ("", _raw_pixels(data=[0.0] * 64), b"\0" * 256, "inputs[0].data: a tensor sent as binary"),
    ("", {**_raw_pixels(), "parameters": {"binary_data_output": "yes"}}, b"\0" * 256,
     "parameters.binary_data_output"),
    ("", {**_raw_pixels(), "outputs": [{"name": "probabilities", "parameters": {
        "binary_data": 1}}]}, b"\0" * 256, "outputs[0].parameters.binary_data"),
    ("", {**_raw_pixels(), "outputs": [{"name": "probabilities", "parameters": {
        "classification": 3}}]}, b"\0" * 256, "outputs[0].parameters.classification"),
]


@pytest.mark.parametrize("length, header, raw, field", BAD_BINARY,
                         ids=[f"{i}-{b[3][:30]}" for i, b in enumerate(BAD_BINARY)])
def test_every_malformed_binary_request_is_a_400_naming_the_field(
        digits: Server, length: str | None, header: dict[str, Any], raw: bytes,
        field: str) -> None:
    body, headers = _binary_body(header, raw)
    if length is None:
        del headers["Inference-Header-Content-Length"]
        body = json.dumps(header).encode()
    elif length:
        headers["Inference-Header-Content-Length"] = length
    answer = requests.post(digits.url + "/v2/models/digits/infer", data=body, headers=headers,
                           timeout=30)
    assert answer.status_code == 400, answer.text
    assert list(answer.json()) == ["error"] and field in answer.json()["error"], answer.json()


def test_an_8_mb_binary_tensor_reaches_the_model_exactly() -> None:
    httpclient = _httpclient()
    server = Server("--model", "iface_models:Checksum", "--kind", "json")
    try:
        x = np.random.default_rng(1).standard_normal((1, 2 * 1024 * 1024)).astype(np.float32)
        tensor = httpclient.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = _client(server).infer("checksum", [tensor])
        assert result.as_numpy("length").tolist() == [x.shape[1]]
        assert result.as_numpy("sum")[0] == x.astype(np.float64).sum()
    finally:
        assert server.stop() == 0, server.output


def test_torch_model_infer_equals_the_native_endpoint() -> None:
    pytest.importorskip("torch", reason="torch is installed by the 3.11 CI leg only")
    httpclient = _httpclient()
    server = Server("--model", "iface_models:TorchMLP", "--kind", "json")
    try:
        client = _client(server)
        assert client.get_model_metadata("mlp")["inputs"][0]["shape"] == [-1, 4]
        x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
        tensor = httpclient.InferInput("input", [3, 4], "FP32")
        tensor.set_data_from_numpy(x, binary_data=False)
        result = client.infer("mlp", [tensor],
                              outputs=[httpclient.InferRequestedOutput("y", binary_data=False)])
        native = np.asarray([requests.post(server.url + "/v1/models/mlp/predict",
                                           json={"input": row.tolist()}, timeout=30).json()
                             for row in x], np.float32)
        np.testing.assert_allclose(result.as_numpy("y"), native, rtol=1e-6)
    finally:
        assert server.stop() == 0, server.output


def test_a_torch_model_of_several_inputs_and_outputs_json_and_binary() -> None:
    pytest.importorskip("torch", reason="torch is installed by the 3.11 CI leg only")
    httpclient = _httpclient()
    server = Server("--model", "iface_models:TorchTwoHeads", "--kind", "json")
    try:
        client = _client(server)
        meta = client.get_model_metadata("twoheads")
        assert [t["name"] for t in meta["inputs"]] == ["image", "offset"]
        assert [t["name"] for t in meta["outputs"]] == ["score", "label"]
        rng = np.random.default_rng(2)
        image = rng.standard_normal((3, 3, 4, 4)).astype(np.float32)
        offset = rng.integers(-5, 5, (3, 2)).astype(np.int64)
        native = [requests.post(server.url + "/v1/models/twoheads/predict", timeout=30,
                                json={"image": i.tolist(), "offset": o.tolist()}).json()
                  for i, o in zip(image, offset)]
        for binary in (False, True):
            inputs = [httpclient.InferInput("image", [3, 3, 4, 4], "FP32"),
                      httpclient.InferInput("offset", [3, 2], "INT64")]
            inputs[0].set_data_from_numpy(image, binary_data=binary)
            inputs[1].set_data_from_numpy(offset, binary_data=binary)
            outputs = [httpclient.InferRequestedOutput(n, binary_data=binary)
                       for n in ("score", "label")]
            result = client.infer("twoheads", inputs, outputs=outputs)
            assert result.as_numpy("label").dtype == np.int64
            np.testing.assert_allclose(result.as_numpy("score"),
                                       np.asarray([n["score"] for n in native], np.float32),
                                       rtol=1e-5, atol=1e-6)  # a batch of 3 against 3 of 1
            assert result.as_numpy("label").tolist() == [n["label"] for n in native]
    finally:
        assert server.stop() == 0, server.output


def test_a_raw_tensor_is_a_view_on_the_request_bytes_not_a_copy() -> None:
    from ipcserve.http import tensors

    raw = np.arange(12, dtype="<f4").tobytes()
    array = tensors.array_from_bytes(memoryview(raw)[16:], "FP32", [2, 4], "inputs[0]")
    assert np.shares_memory(array, np.frombuffer(raw, np.uint8))
    assert array.tolist() == [[4, 5, 6, 7], [8, 9, 10, 11]]
    rows = tensors.items_of({"x": array}, {"inputs": [{"name": "x"}]})
    assert all(np.shares_memory(row, array) for row in rows)


def _pixels(**change: Any) -> dict[str, Any]:
    tensor = {"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}
    tensor.update(change)
    return {"inputs": [{k: v for k, v in tensor.items() if v is not _GONE}]}


MALFORMED = [
    ([], "body"), ({"inputs": []}, "'inputs'"), ({"inputs": {}}, "'inputs'"),
    ({"inputs": ["pixels"]}, "inputs[0] must be an object"),
    (_pixels(name=7), "inputs[0].name"), (_pixels(name="x"), "inputs[0].name"),
    (_pixels(datatype=["FP32"]), "inputs[0].datatype"), (_pixels(datatype=32), "inputs[0].datatype"),
    (_pixels(datatype="NOPE"), "inputs[0].datatype"), (_pixels(datatype="FP64"), "inputs[0].datatype"),
    (_pixels(datatype=_GONE), "inputs[0].datatype"),
    (_pixels(shape="1,64"), "inputs[0].shape"), (_pixels(shape=[1, "64"]), "inputs[0].shape"),
    (_pixels(shape=[1, -64]), "inputs[0].shape"), (_pixels(shape=[1, True]), "inputs[0].shape"),
    (_pixels(shape=[64]), "inputs[0].shape"), (_pixels(shape=[1, 8, 8]), "inputs[0].shape"),
    (_pixels(shape=[1, 63], data=[0.0] * 63), "inputs[0].shape"),
    (_pixels(shape=[0, 64], data=[]), "inputs[0].shape"), (_pixels(shape=_GONE), "inputs[0].shape"),
    (_pixels(data=_GONE), "inputs[0].data"), (_pixels(data="0"), "inputs[0].data"),
    (_pixels(data=[0.0] * 3), "inputs[0].data"), (_pixels(data=["a"] * 64), "inputs[0].data"),
    (_pixels(data=[[0.0], [0.0, 1.0]]), "inputs[0].data"), (_pixels(data=[1e300] * 64), "inputs[0].data"),
    (_pixels(parameters=[]), "inputs[0].parameters"),
    ({"inputs": _pixels()["inputs"] * 2}, "inputs[1].name"),
    ({**_pixels(), "id": 7}, "'id'"), ({**_pixels(), "parameters": "x"}, "'parameters'"),
    ({**_pixels(), "outputs": "probabilities"}, "'outputs'"),
    ({**_pixels(), "outputs": [{"name": "nope"}]}, "outputs[0].name"),
    ({**_pixels(), "outputs": [{"name": "probabilities", "parameters": 1}]}, "outputs[0].parameters"),
    ({**_pixels(), "input": []}, "unknown field"),
]


@pytest.mark.parametrize("body, field", MALFORMED, ids=[f for _, f in MALFORMED])
def test_every_malformed_request_is_a_400_naming_the_field(digits: Server, body: Any,
                                                           field: str) -> None:
    answer = requests.post(digits.url + "/v2/models/digits/infer", json=body, timeout=30)
    assert answer.status_code == 400, answer.text
    assert list(answer.json()) == ["error"] and field in answer.json()["error"], answer.json()


@pytest.mark.parametrize("body, status, words", [
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64], "data": [0] * 64}]},
     400, "takes the inputs"),
    ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [0] * 3}]},
     400, "needs 64 values"),
    ({"inputs": [{"name": "pixels", "datatype": "NOPE", "shape": [1, 64], "data": [0] * 64}]},
     400, "datatype"),
    ({"inputs": []}, 400, "non-empty"),
])
def test_bad_requests_get_the_protocols_error_body(digits: Server, body: dict, status: int,
                                                    words: str) -> None:
    answer = requests.post(digits.url + "/v2/models/digits/infer", json=body, timeout=30)
    assert answer.status_code == status
    assert list(answer.json()) == ["error"] and words in answer.json()["error"]
    missing = requests.get(digits.url + "/v2/models/nope", timeout=30)
    assert missing.status_code == 404 and "nope" in missing.json()["error"]
