"""The official `openai` client against `python -m ipcserve serve --model <dir>`: a real
(tiny, random) Llama and a real BERT encoder served by path, no Python of the user's."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

openai = pytest.importorskip("openai", reason="the openai client is in the test extra")
pytest.importorskip("transformers", reason="text generation needs transformers and torch")

import tiny_lm  # noqa: E402
from conftest import wait_until  # noqa: E402
from server import Server  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
KEY = "s3cret-key"


@pytest.fixture(scope="module")
def lm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    model_dir = tiny_lm.build_causal_lm(tmp_path_factory.mktemp("models") / "tiny-llama")
    server = Server("--model", str(model_dir), "--timeout", "60", "--api-key", KEY,
                    env={"HF_HUB_OFFLINE": "1"}, start_timeout=180, module=True)
    try:
        yield server
    finally:
        assert server.stop() == 0, server.output


def _client(server: Server, key: str = KEY) -> Any:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


def _cancelled(server: Server) -> int:
    import requests

    status = requests.get(f"{server.url}/v1/models/tiny-llama", timeout=5,
                          headers={"Authorization": f"Bearer {KEY}"}).json()["status"]
    return int(status["cancelled"]["running_disconnect"])


def test_models_chat_completions_and_errors(lm_server: Server) -> None:
    client = _client(lm_server)
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]
    chat = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "hello world"}],
        max_tokens=6, temperature=0)
    assert chat.choices[0].finish_reason == "length" and chat.choices[0].message.content
    assert chat.usage.completion_tokens == 6 and chat.usage.prompt_tokens > 2
    again = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "hello world"}],
        max_tokens=6, temperature=0)
    assert again.choices[0].message.content == chat.choices[0].message.content  # greedy
    text = client.completions.create(model="tiny-llama", prompt="once upon a", max_tokens=3,
                                     temperature=0)
    assert text.usage.completion_tokens == 3 and text.choices[0].text
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-llama", temperature=-1,
                                       messages=[{"role": "user", "content": "x"}])
    assert "temperature" in str(info.value)
    with pytest.raises(openai.AuthenticationError):
        _client(lm_server, key="wrong").models.list()


def test_a_stream_arrives_token_by_token(lm_server: Server) -> None:
    client = _client(lm_server)
    arrivals = []
    t0 = time.monotonic()
    stream = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "once upon a time"}],
        max_tokens=30, temperature=0, stream=True, stream_options={"include_usage": True})
    usage = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage is not None and usage.completion_tokens == 30
    assert len(arrivals) >= 10
    # The first piece came well before the last: streamed, not sent at the end.
    assert arrivals[0] - t0 < (arrivals[-1] - t0) / 2, (arrivals[0] - t0, arrivals[-1] - t0)


def test_a_client_that_leaves_stops_the_generation(lm_server: Server) -> None:
    client = _client(lm_server)
    before = _cancelled(lm_server)
    stream = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "tell a story"}],
        max_tokens=2000, temperature=0, stream=True)
    for index, _ in enumerate(stream):
        if index == 3:
            break
    stream.close()
    wait_until(lambda: _cancelled(lm_server) == before + 1, timeout=20, what="the cancel")


def test_two_concurrent_streams_both_progress(lm_server: Server) -> None:
    client = _client(lm_server)

    def run(tag: str) -> list[tuple[float, str]]:
        stream = client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": tag}],
            max_tokens=25, temperature=0, stream=True)
        return [(time.monotonic(), tag) for c in stream if c.choices and c.choices[0].delta.content]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        a, b = pool.submit(run, "hello"), pool.submit(run, "world")
        events = sorted(a.result(120) + b.result(120))
    order = "".join("a" if tag == "hello" else "b" for _, tag in events)
    assert order.count("ab") + order.count("ba") >= 5, order  # interleaved, not one then the other


def test_embeddings_by_path(tmp_path: Path) -> None:
    encoder = tiny_lm.build_encoder(tmp_path / "tiny-bert")
    server = Server("--model", str(encoder), env={"HF_HUB_OFFLINE": "1"}, start_timeout=180,
                    module=True)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        result = client.embeddings.create(model="tiny-bert", input=["the cat sat", "a dog"])
        assert len(result.data) == 2 and len(result.data[0].embedding) == 32
        assert result.usage.prompt_tokens >= 5
    finally:
        assert server.stop() == 0, server.output
