"""The requests LLM load generators and gateways send, exactly as they send them.

A load generator for LLM servers probes ``GET /health`` before it starts, then streams
``/v1/chat/completions`` and ``/v1/completions`` with ``ignore_eos`` (to control the length
it measures), ``stop: null`` and ``stream_options`` asking for the usage on every chunk
(``continuous_usage_stats``), and reads token counts only from ``usage``. Raw HTTP with
those bodies, the official ``openai`` client, and the real decoder's ``ignore_eos``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from server import Server

KEY = "sk-tools"


@pytest.fixture(scope="module")
def chat_server() -> Iterator[Server]:
    server = Server("--model", "models:FakeChat", "--api-key", KEY)
    try:
        yield server
    finally:
        assert server.stop() == 0, server.output


def _sse(response: requests.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    lines = [line for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


@pytest.mark.timeout(60)
def test_health_at_the_root_needs_no_key(chat_server: Server) -> None:
    answer = requests.get(f"{chat_server.url}/health", timeout=10)
    assert answer.status_code == 200 and answer.json()["ready"] is True
    assert requests.get(f"{chat_server.url}/v1/models", timeout=10).status_code == 401


@pytest.mark.timeout(60)
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_a_load_generators_streamed_request(chat_server: Server, route: str) -> None:
    body: dict[str, Any] = {
        "model": "fakechat", "stream": True, "max_tokens": 20, "temperature": 0.0,
        "ignore_eos": True, "stop": None,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    if route == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": "one two three"}]
    else:
        body["prompt"] = "one two three"
    chunks = _sse(requests.post(f"{chat_server.url}{route}", json=body, timeout=30,
                                headers={"Authorization": f"Bearer {KEY}"}))
    # Every chunk carries the usage so far: the prompt once, the tokens made until then.
    made = [c["usage"]["completion_tokens"] for c in chunks]
    assert all(c["usage"]["prompt_tokens"] == 3 for c in chunks), chunks
    assert all(c["usage"]["total_tokens"] == 3 + c["usage"]["completion_tokens"]
               for c in chunks)
    assert made == sorted(made) and made[-1] == 20
    text_chunks = [c for c in chunks if c["choices"] and (
        c["choices"][0].get("text") or c["choices"][0].get("delta", {}).get("content"))]
    assert [c["usage"]["completion_tokens"] for c in text_chunks] == list(range(1, 21))
    # ignore_eos: the echo of three words, which ends after them, went on to max_tokens.
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]
              and c["choices"][0]["finish_reason"]]
    assert finish == ["length"]
    assert chunks[-1]["choices"] == []

    # Without continuous_usage_stats: usage null on every chunk but the last (OpenAI's shape).
    body["stream_options"] = {"include_usage": True}
    chunks = _sse(requests.post(f"{chat_server.url}{route}", json=body, timeout=30,
                                headers={"Authorization": f"Bearer {KEY}"}))
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["usage"]["completion_tokens"] == 20


@pytest.mark.timeout(60)
def test_the_openai_client_sends_the_extensions(chat_server: Server) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{chat_server.url}/v1", api_key=KEY, max_retries=0)
    try:
        whole = client.completions.create(model="fakechat", prompt="a b", max_tokens=5,
                                          extra_body={"ignore_eos": True})
        assert whole.usage.completion_tokens == 5 and whole.choices[0].text == "a b a b a"
        assert whole.choices[0].finish_reason == "length"
        stream = client.chat.completions.create(
            model="fakechat", messages=[{"role": "user", "content": "x y z"}], stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True})
        usages = [chunk.usage.completion_tokens for chunk in stream]
        assert usages[-1] == 3 and all(u is not None for u in usages)
        # What is still not accepted is named.
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model="fakechat", prompt="a", extra_body={
                "ignore_eos": "yes"})
        assert "ignore_eos" in str(refused.value)
        with pytest.raises(openai.BadRequestError, match="stream_options"):
            client.chat.completions.create(
                model="fakechat", messages=[{"role": "user", "content": "x"}], stream=True,
                stream_options={"include_usage": True, "every_chunk": True})
    finally:
        client.close()


@pytest.mark.timeout(120)
def test_ignore_eos_decodes_past_the_models_end(tmp_path: Path) -> None:
    """The real decoder: a tiny LM whose third greedy token is made its end-of-sequence
    token stops after two; with ignore_eos it goes on to max_tokens, the same tokens first."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers", reason="text generation needs transformers and torch")
    sys.path.insert(0, str(Path(__file__).parent))
    import tiny_lm
    from ipcserve.adapters.hf import TransformersModel

    source = tiny_lm.build_causal_lm(tmp_path / "lm")
    free = TransformersModel(source, num_threads=1, warmup=False)
    free.load()
    prompt = {"prompt": "the cat sat on the mat", "temperature": 0, "max_tokens": 8}
    tokens = free.tokenizer(  # type: ignore[union-attr]
        "".join(i["text"] for i in free.predict(**prompt)), add_special_tokens=False)["input_ids"]
    ending = TransformersModel(tiny_lm.with_eos(source, tmp_path / "ends", tokens[2]),
                               num_threads=1, warmup=False)
    ending.load()
    stopped = list(ending.predict(**prompt))
    assert stopped[-1]["finish_reason"] == "stop"
    assert stopped[-1]["usage"]["completion_tokens"] == 3  # the end token counts, unseen
    ignoring = list(ending.predict(**prompt, ignore_eos=True, continuous_usage=True))
    assert ignoring[-1]["finish_reason"] == "length"
    assert ignoring[-1]["usage"]["completion_tokens"] == 8
    assert [i["usage"]["completion_tokens"] for i in ignoring[:-1]] == list(range(1, 9))
    assert "".join(i["text"] for i in ignoring).startswith(
        "".join(i["text"] for i in stopped))


def _post(server: Server, route: str, body: dict[str, Any]) -> requests.Response:
    return requests.post(f"{server.url}{route}", json=body, timeout=30,
                         headers={"Authorization": f"Bearer {KEY}"})


@pytest.mark.timeout(60)
def test_tokenize_and_detokenize_in_vllms_shapes(chat_server: Server) -> None:
    # FakeChat's tokenizer is character-level: a token id is a code point.
    answer = _post(chat_server, "/tokenize", {"model": "fakechat", "prompt": "hi there"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"count": 8, "max_model_len": 2048,
                             "tokens": [ord(c) for c in "hi there"]}
    chat = _post(chat_server, "/tokenize", {"model": "fakechat", "messages": [
        {"role": "user", "content": "hi"}]})
    assert chat.status_code == 200 and chat.json()["count"] == 2
    back = _post(chat_server, "/detokenize", {"model": "fakechat",
                                              "tokens": answer.json()["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": "hi there"}
    for route, body, param in [
            ("/tokenize", {"model": "fakechat"}, "prompt"),
            ("/tokenize", {"model": "fakechat", "prompt": "a", "messages": []}, "prompt"),
            ("/tokenize", {"model": "fakechat", "prompt": 3}, "prompt"),
            ("/tokenize", {"model": "fakechat", "prompt": "a", "add_special_tokens": 1},
             "add_special_tokens"),
            ("/detokenize", {"model": "fakechat", "tokens": [1, -2]}, "tokens"),
            ("/detokenize", {"model": "fakechat", "tokens": "abc"}, "tokens"),
            ("/detokenize", {"model": "fakechat", "tokens": [1], "x": 1}, "x")]:
        refused = _post(chat_server, route, body)
        assert refused.status_code == 400, (body, refused.text)
        assert refused.json()["error"]["param"] == param, refused.json()
    too_big = _post(chat_server, "/detokenize", {"model": "fakechat", "tokens": [2 ** 40]})
    assert too_big.status_code == 400 and "token ids" in too_big.json()["error"]["message"]
    assert requests.post(f"{chat_server.url}/tokenize", json={"model": "fakechat",
                                                              "prompt": "a"},
                         timeout=10).status_code == 401


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_tokenize_round_trips_through_a_real_tokenizer(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    transformers = pytest.importorskip(
        "transformers", reason="text generation needs transformers and torch")
    sys.path.insert(0, str(Path(__file__).parent))
    import tiny_lm

    path = tiny_lm.build_causal_lm(tmp_path / "lm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    server = Server("--model", str(path), "--api-key", KEY, "--timeout", "60",
                    start_timeout=150)
    try:
        assert server.url, server.output
        text = "the cat sat on the mat"
        answer = _post(server, "/tokenize", {"model": "lm", "prompt": text})
        assert answer.status_code == 200, answer.text
        assert answer.json()["tokens"] == tokenizer(text)["input_ids"]
        assert answer.json()["max_model_len"] == tiny_lm.CONTEXT
        plain = _post(server, "/tokenize", {"model": "lm", "prompt": text,
                                            "add_special_tokens": False}).json()["tokens"]
        assert plain == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert _post(server, "/detokenize", {"model": "lm", "tokens": plain}).json() == {
            "prompt": text}
        messages = [{"role": "user", "content": "hello world"}]
        chat = _post(server, "/tokenize", {"model": "lm", "messages": messages}).json()
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=False)
        assert chat["tokens"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
        outside = _post(server, "/detokenize", {"model": "lm", "tokens": [len(tokenizer)]})
        assert outside.status_code == 400 and "token ids" in outside.text
        # The context and special tokens in the model list, as harnesses read them.
        listed = requests.get(f"{server.url}/v1/models", timeout=30,
                              headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]
        assert listed["max_model_len"] == tiny_lm.CONTEXT
        assert listed["special_tokens"] == {"bos_token": "<s>", "eos_token": "</s>",
                                            "pad_token": "<pad>", "unk_token": "<unk>"}
    finally:
        assert server.stop() == 0, server.output
