"""Protobuf request and response schemas through a real waitress server and ML process."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests

pytestmark = pytest.mark.timeout(120)

pytest.importorskip("google.protobuf", reason="protobuf is in the 'interfaces' extra")


def _messages() -> tuple[Any, Any]:
    """EchoRequest {string text = 1; int32 count = 2;} and EchoResponse (the same fields),
    built at run time as protoc would generate them."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    proto = descriptor_pb2.FileDescriptorProto(name="echo_test.proto", package="ipcserve.test",
                                               syntax="proto3")
    for name in ("EchoRequest", "EchoResponse"):
        message = proto.message_type.add(name=name)
        message.field.add(name="text", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                          label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
        message.field.add(name="count", number=2, type=descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
                          label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return (message_factory.GetMessageClass(pool.FindMessageTypeByName("ipcserve.test.EchoRequest")),
            message_factory.GetMessageClass(pool.FindMessageTypeByName("ipcserve.test.EchoResponse")))


# Per test: conftest checks that every test leaves no process behind.
@pytest.fixture
def url() -> Iterator[str]:
    from flask import Flask
    from iface_models import Echo

    from ipcserve.http.extension import IPCServe
    from ipcserve.server.waitress_conf import create_server

    request_class, response_class = _messages()
    app = Flask("proto")
    ipc = IPCServe(app)
    ipc.add_model(Echo(name="echo"), schema=request_class, response_schema=response_class)
    ipc.start()
    server = create_server(app, port=0)
    thread = threading.Thread(target=server.run, name="waitress", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        server.close()
        server.task_dispatcher.shutdown()
        ipc.shutdown()
        thread.join(10)


def test_valid_request_and_response(url: str) -> None:
    answer = requests.post(url + "/v1/models/echo/predict", json={"text": "hi", "count": 2},
                           timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"text": "HI", "count": 3}


@pytest.mark.parametrize("body, words", [
    ({"text": "hi", "count": "two"}, "count"),
    ({"text": "hi", "extra": 1}, "extra"),
    ({"text": 5}, "text"),
    ({"count": 2 ** 40}, "count"),
])
def test_requests_that_break_the_message_get_400(url: str, body: dict, words: str) -> None:
    answer = requests.post(url + "/v1/models/echo/predict", json=body, timeout=30)
    assert answer.status_code == 400
    assert answer.json()["type"] == "InputError"
    assert "ipcserve.test.EchoRequest" in answer.json()["error"]
    assert words in answer.json()["error"]


def test_answer_that_breaks_the_response_message_is_a_logged_500(
        url: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="ipcserve.http.schemas"):
        answer = requests.post(url + "/v1/models/echo/predict", json={"text": "break"},
                               timeout=30)
    assert answer.status_code == 500
    assert answer.json()["type"] == "ModelError"
    assert "EchoResponse" in answer.json()["error"]
    assert "not a number" not in answer.text  # the broken answer is not sent
    assert "not a valid ipcserve.test.EchoResponse" in caplog.text


def test_openapi_document_shows_the_message_schema(url: str) -> None:
    from openapi_spec_validator import validate

    document = requests.get(url + "/openapi.json", timeout=30).json()
    validate(document)
    schema = document["paths"]["/v1/models/echo/predict"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]
    assert schema["title"] == "ipcserve.test.EchoRequest"
    assert schema["properties"] == {"text": {"type": "string"}, "count": {"type": "integer"}}
