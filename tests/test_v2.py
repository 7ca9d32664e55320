"""The Open Inference Protocol V2 through a real server, with the real tritonclient."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import requests

from server import Server

pytestmark = pytest.mark.timeout(120)


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


def _pixels(**change: Any) -> dict[str, Any]:
    tensor = {"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}
    tensor.update(change)
    return {"inputs": [{k: v for k, v in tensor.items() if v is not _GONE}]}


_GONE = object()
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
