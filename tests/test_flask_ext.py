"""The Flask extension in-process, through Flask's test client: registration, ``url_prefix``,
JSON-schema validation, two apps side by side, and JSON for every error.

Models are the real fixture models from tests/models.py: started for real (with a bounded
``timeout``) where a test needs an answer, left unstarted where a 503 is all it needs.
The same app over real HTTP (waitress, ``python app.py``) is tested in test_http.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from models import Doubler, Sleeper
from werkzeug.exceptions import HTTPException

from ipcserve.flask import IPCServe, error_response

CALL_TIMEOUT = 10.0  # seconds: a started model's calls never wait longer


def make_app(**config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(config)
    return app


def assert_json_error(response: Any, status: int, error_type: str) -> str:
    """The response is the documented error body; returns its message."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error", "type"}, body
    assert body["type"] == error_type, body
    assert isinstance(body["error"], str) and body["error"], body
    assert "Traceback" not in response.get_data(as_text=True)
    if status == 503:
        assert response.headers["Retry-After"].isdigit()
    return str(body["error"])


@pytest.fixture
def doubler() -> Iterator[Doubler]:
    with Doubler(timeout=CALL_TIMEOUT) as ml:
        yield ml


# -- registration ----------------------------------------------------------------------------
def test_init_app_twice_raises() -> None:
    app = make_app()
    ext = IPCServe(app)
    with pytest.raises(RuntimeError, match="already registered on this app"):
        ext.init_app(app)
    with pytest.raises(RuntimeError, match="already registered on this app"):
        IPCServe(app)
    assert app.extensions["ipcserve"].extension is ext


def test_init_app_later_registers_state_and_config_defaults() -> None:
    ext = IPCServe()
    app = make_app(IPCSERVE_MAX_IMAGE_PIXELS=1000)
    assert "ipcserve" not in app.extensions
    ext.init_app(app)
    assert app.extensions["ipcserve"].extension is ext
    assert app.extensions["ipcserve"].max_pixels == 1000  # setdefault keeps the app's value
    assert app.config["IPCSERVE_API_KEY"] is None
    assert app.config["MAX_CONTENT_LENGTH"] == 16 * 1024 * 1024


def test_url_prefix_moves_every_route() -> None:
    app = make_app()
    ext = IPCServe(app, url_prefix="/ml")
    ext.add_model(Doubler())  # never started: these routes answer without it
    client = app.test_client()
    assert client.get("/ml/healthz").get_json() == {"status": "ok"}
    assert client.get("/healthz").status_code == 404
    models = client.get("/ml/v1/models").get_json()
    assert models["default"] == "doubler"
    assert models["object"] == "list" and models["data"][0]["id"] == "doubler"
    assert models["data"][0]["url"] == "/ml/v1/models/doubler/predict"
    assert client.get("/ml/readyz").status_code == 503
    assert client.get("/ml/").status_code == 200
    message = assert_json_error(client.post("/ml/predict", json={"x": 1}), 503, "WorkerUnavailableError")
    assert "not started" in message
    assert client.post("/predict", json={"x": 1}).status_code == 404


# -- JSON schema ----------------------------------------------------------------------------
JSON_SCHEMA = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"],
               "additionalProperties": False}


def _pydantic_schema() -> Any:
    pydantic = pytest.importorskip("pydantic", reason="pydantic is optional")

    class Inputs(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        x: int

    return Inputs


@pytest.mark.parametrize("kind", ["jsonschema", "pydantic"])
def test_schema_refuses_bad_bodies_before_the_model(kind: str, doubler: Doubler) -> None:
    schema = JSON_SCHEMA if kind == "jsonschema" else _pydantic_schema()
    app = make_app()
    IPCServe(app).add_model(doubler, schema=schema)
    client = app.test_client()
    before = doubler("count")
    for body, field in [({"x": "abc"}, "'x'"), ({}, "'x'"), ({"x": 1, "y": 2}, "'y'")]:
        message = assert_json_error(client.post("/predict", json=body), 400, "InputError")
        assert message.startswith("field ") and field in message, (body, message)
    assert doubler("count") == before + 1  # only the count call itself reached the model


def test_admission_comes_before_decoding() -> None:
    # Overload, loading and draining are refused before the body is parsed: a refused
    # request costs no decoding. So a bad body to a model that is not started is a 503.
    app = make_app()
    IPCServe(app).add_model(Doubler(), schema=JSON_SCHEMA)
    client = app.test_client()
    assert_json_error(client.post("/predict", json={"x": "abc"}), 503, "WorkerUnavailableError")
    assert_json_error(client.post("/predict", data=b"{not json", content_type="application/json"),
                      503, "WorkerUnavailableError")


@pytest.mark.parametrize("kind", ["jsonschema", "pydantic"])
def test_valid_bodies_reach_a_real_model(kind: str, doubler: Doubler) -> None:
    schema = JSON_SCHEMA if kind == "jsonschema" else _pydantic_schema()
    app = make_app()
    IPCServe(app).add_model(doubler, schema=schema)
    client = app.test_client()
    r = client.post("/predict", json={"x": 21})
    assert r.status_code == 200 and r.get_json() == 42
    if kind == "pydantic":
        # pydantic's model_dump is what the model gets: "4" was converted to 4.
        assert client.post("/predict", json={"x": "4"}).get_json() == 8
    assert_json_error(client.post("/predict", json={"x": "abc"}), 400, "InputError")
    # Calls that reached the model, this one included: the 400 never did.
    assert doubler("count") == (2 if kind == "jsonschema" else 3)


# -- two apps --------------------------------------------------------------------------------
def test_two_apps_with_one_extension_each_keep_their_own_models(doubler: Doubler) -> None:
    app_a, app_b = make_app(), make_app(IPCSERVE_API_KEY="b-key")
    ext_a, ext_b = IPCServe(app_a), IPCServe(app_b, url_prefix="/b")
    ext_a.add_model(doubler)
    ext_b.add_model(Sleeper())  # never started
    assert app_a.extensions["ipcserve"].extension is ext_a and app_b.extensions["ipcserve"].extension is ext_b
    a, b = app_a.test_client(), app_b.test_client()
    auth = {"Authorization": "Bearer b-key"}
    assert [m["name"] for m in a.get("/v1/models").get_json()["data"]] == ["doubler"]
    assert [m["name"] for m in b.get("/b/v1/models", headers=auth).get_json()["data"]] == ["sleeper"]
    assert a.post("/predict", json={"x": 2}).get_json() == 4  # app A needs no key
    assert_json_error(b.post("/b/predict", json={"seconds": 0}), 401, "UnauthorizedError")
    message = assert_json_error(b.post("/b/predict", json={"seconds": 0}, headers=auth), 503,
                                "WorkerUnavailableError")
    assert "sleeper" in message
    assert_json_error(a.post("/v1/models/sleeper/predict", json={}), 404, "NotFoundError")
    assert a.get("/readyz").status_code == 200 and b.get("/b/readyz").status_code == 503


# -- every error is JSON ------------------------------------------------------------------------
@pytest.fixture
def client() -> Iterator[FlaskClient]:
    """An app with a started Doubler, a started model with a broken schema, an unstarted
    model, a 100-byte body cap, and error_response for the whole app (as docs/api.md says),
    so routing errors are JSON too. (Admission comes before decoding: the input errors need
    a started model.)"""
    app = make_app(MAX_CONTENT_LENGTH=100)
    ext = IPCServe(app)
    ext.add_model(Doubler(timeout=CALL_TIMEOUT))
    ext.add_model(Sleeper(), schema=object(), default=False)  # a broken schema: a server bug
    ext.add_model(Doubler(name="idle"), default=False)  # never started
    app.register_error_handler(HTTPException, error_response)
    for name in ("doubler", "sleeper"):
        ext.endpoints[name].ml.start()
    try:
        yield app.test_client()
    finally:
        ext.drain(grace=1)


@pytest.mark.parametrize("method, path, kwargs, status, error_type", [
    ("post", "/predict", {"data": b"{", "content_type": "application/json"}, 400, "InputError"),
    ("post", "/predict", {"json": [1, 2]}, 400, "InputError"),
    ("post", "/predict", {"data": b"", "content_type": "application/json"}, 400, "InputError"),
    ("post", "/v1/models/nope/predict", {"json": {}}, 404, "NotFoundError"),
    ("get", "/v1/models/nope", {}, 404, "NotFoundError"),
    ("get", "/no/such/page", {}, 404, "NotFound"),
    ("get", "/predict", {}, 405, "MethodNotAllowed"),
    ("post", "/predict", {"data": b"x" * 1000, "content_type": "application/json"}, 413,
     "PayloadTooLargeError"),
    ("post", "/predict", {"data": b"hello", "content_type": "text/plain"}, 415,
     "UnsupportedMediaTypeError"),
    ("post", "/v1/models/sleeper/predict", {"json": {}}, 500, "InternalServerError"),
    ("post", "/v1/models/idle/predict", {"json": {"x": 1}}, 503, "WorkerUnavailableError"),
], ids=["bad-json", "not-an-object", "empty", "unknown-model", "unknown-model-status",
        "unknown-url", "wrong-method", "too-large", "wrong-type", "server-bug", "not-started"])
def test_every_error_is_json(client: FlaskClient, method: str, path: str, kwargs: dict,
                             status: int, error_type: str) -> None:
    assert_json_error(getattr(client, method)(path, **kwargs), status, error_type)


def test_api_key_errors_are_json() -> None:
    app = make_app(IPCSERVE_API_KEY="s3cret")
    IPCServe(app).add_model(Doubler())
    client = app.test_client()
    message = assert_json_error(client.post("/predict", json={}), 401, "UnauthorizedError")
    assert "Authorization: Bearer" in message
    assert_json_error(client.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401,
                      "UnauthorizedError")
    assert client.get("/healthz").status_code == 200  # open without a key


def test_draining_is_a_json_503() -> None:
    app = make_app()
    IPCServe(app).add_model(Doubler())
    IPCServe.of(app).draining.set()
    client = app.test_client()
    message = assert_json_error(client.post("/predict", json={"x": 1}), 503, "WorkerUnavailableError")
    assert "shutting down" in message
    assert client.get("/readyz").get_json()["draining"] is True
