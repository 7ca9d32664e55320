"""``GET /openapi.json`` and ``GET /docs`` against the real server."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from server import Server

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def digits() -> Iterator[Server]:
    server = Server()
    yield server
    assert server.stop() == 0, server.output


def test_document_is_valid_openapi_31_and_lists_the_routes(digits: Server) -> None:
    from openapi_spec_validator import validate

    document = requests.get(digits.url + "/openapi.json", timeout=30).json()
    validate(document)
    assert document["openapi"] == "3.1.0"
    paths = document["paths"]
    predict = paths["/v1/models/digits/predict"]["post"]
    assert {"application/json", "multipart/form-data", "image/*"} <= set(
        predict["requestBody"]["content"])
    assert predict["responses"]["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"}
    assert "/v2/models/digits/infer" in paths and "/healthz" in paths
    assert "securitySchemes" not in document["components"]  # no key set


def test_api_key_is_a_security_scheme_and_guards_the_document() -> None:
    from openapi_spec_validator import validate

    server = Server("--model", "models:Doubler", env={"IPCSERVE_API_KEY": "sekrit"})
    try:
        assert requests.get(server.url + "/openapi.json", timeout=30).status_code == 401
        assert requests.get(server.url + "/docs", timeout=30).status_code == 200
        document = requests.get(server.url + "/openapi.json", timeout=30,
                                headers={"Authorization": "Bearer sekrit"}).json()
        validate(document)
        assert document["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
        assert document["security"] == [{"apiKey": []}]
        assert document["paths"]["/healthz"]["get"]["security"] == []
        body = document["paths"]["/v1/models/doubler/predict"]["post"]["requestBody"]
        # No schema given: the predict signature is the fallback.
        assert "x" in body["content"]["application/json"]["schema"]["properties"]
    finally:
        assert server.stop() == 0, server.output


# Which checks hold where. Everywhere: no 5xx, every status, content type, body and header as
# documented, schema-violating requests refused, 405 with Allow for undocumented methods.
# Schema-valid requests accepted (positive_data_acceptance) wherever JSON Schema can say
# what the route accepts: not the V2 infer routes (a tensor's data must have as many values
# as its shape says), not the predict routes of models documented only by their predict
# signature (any value), and for image models an upload is accepted or refused as not an
# image (no schema can say "a decodable picture"); /detokenize and /v1/completions refuse
# token ids beyond the model's vocabulary and /v1/embeddings a 'dimensions' beyond the
# model's, which only the ML process knows.
SCHEMATHESIS_CONFIG = """
[checks]
enabled = true
use_after_free.enabled = false
ensure_resource_availability.enabled = false
ignored_auth.enabled = false
object_level_authorization.enabled = false

[[operations]]
include-path-regex = "^/v1/models/(fakechat|fakeembedder)/predict$|^/v2/models/[^/]+/infer$"
checks.positive_data_acceptance.enabled = false

[[operations]]
include-path-regex = "^/detokenize$|^/v1/completions$|^/v1/embeddings$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400"]

[[operations]]
include-path-regex = "^/predict$|^/v1/models/digits/predict$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "415"]
"""


@pytest.mark.timeout(600)
def test_schemathesis_finds_no_server_error_and_no_nonconforming_response(tmp_path: Any) -> None:
    import os
    import re
    import subprocess
    import sys

    # The fuzzer is a client: where this Python has no schemathesis (4 needs 3.11), CI runs it
    # from another interpreter against the server of this one.
    runner = os.environ.get("IPCSERVE_SCHEMATHESIS_PYTHON") or sys.executable
    if runner == sys.executable:
        pytest.importorskip("schemathesis", reason="schemathesis has no wheel for this Python")

    server = Server("--model", "digits", "--model", "models:FakeChat", "--model",
                    "models:FakeEmbedder", "--model", "iface_models:Rows")
    try:
        document = requests.get(server.url + "/openapi.json", timeout=30).json()
        # Every operation but the document's own (schemathesis does not test its source).
        operations = sum(len(item) for path, item in document["paths"].items()
                         if path != "/openapi.json")
        assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/metrics",
                "/v2/models/rows/infer"} <= set(document["paths"])
        config = tmp_path / "schemathesis.toml"
        config.write_text(SCHEMATHESIS_CONFIG)
        # The real CLI: every phase that needs no state (examples, coverage, fuzzing), every
        # failure and every error of generation reported, exit 1 on any.
        run = subprocess.run(
            [runner, "-c", "from schemathesis.cli import schemathesis; schemathesis()",
             "--config-file", str(config), "run", server.url + "/openapi.json",
             "--phases", "examples,coverage,fuzzing", "--max-examples", "60", "--workers", "1",
             "--seed", "1", "--suppress-health-check", "all", "--output-sanitize", "false",
             "--request-timeout", "30"],
            cwd=tmp_path, capture_output=True, text=True, timeout=540)
        output = run.stdout + run.stderr
        assert run.returncode == 0, output[-20000:]
        tested = re.search(r"Tested: (\d+)", output)
        assert tested is not None and int(tested.group(1)) == operations, output[-5000:]
    finally:
        assert server.stop() == 0, server.output


def test_the_document_lists_every_registered_route() -> None:
    from flask import Flask
    from iface_models import Rows
    from models import Doubler, FakeChat

    from ipcserve.adapters.digits import DigitsClassifier
    from ipcserve.flask import IPCServe
    from ipcserve.http.openapi import openapi_document

    app = Flask("every-route")
    ext = IPCServe(app, url_prefix="/ml")
    for ml, kind in ((DigitsClassifier(), "image"), (Doubler(), "json"), (FakeChat(), "json"),
                     (Rows(), "json")):
        ext.add_model(ml, kind)
    with app.test_request_context():
        paths = set(openapi_document()["paths"])
    rules = [rule.rule for rule in app.url_map.iter_rules() if rule.endpoint.startswith("ipcserve.")]
    assert len(rules) >= 20
    for rule in rules:
        pattern = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", "[^/]+", rule)
        assert any(re.fullmatch(pattern, path) for path in paths), rule
    models = {"digits", "doubler", "fakechat", "rows"}
    assert {p.split("/")[4] for p in paths if re.fullmatch(r"/ml/v1/models/[^/]+/predict", p)} == models
    # V2 lists the models with a tensor signature.
    assert {p.split("/")[4] for p in paths if re.fullmatch(r"/ml/v2/models/[^/]+", p)} == {
        "digits", "rows"}


def test_docs_page_renders_the_document_in_chromium(digits: Server, tmp_path: Any) -> None:
    import chromium

    chromium.skip_unless_available()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with chromium.browser(tmp_path) as browser:
        browser.get(digits.url + "/docs")
        WebDriverWait(browser, 30).until(
            lambda b: b.find_elements(By.CSS_SELECTOR, "details.op"))
        shown = {e.get_attribute("data-path") for e in
                 browser.find_elements(By.CSS_SELECTOR, "details.op")}
        assert {"/v1/models/digits/predict", "/v2/models/digits/infer",
                "/v1/history", "/v1/events"} <= shown
        assert browser.find_element(By.ID, "title").text.startswith("ipcserve")
