"""Text generation (a causal LM streamed one token per step), embeddings with token usage,
and serving a model by its path.

Most tests run the generator in this process (``load()``, then iterate ``predict(...)``):
the ML process runs the very same code. The tests marked slow go through a real ML process
and a real server. Models come from ``tiny_lm.py``: built from configs, nothing downloaded.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tiny_lm  # noqa: E402
from server import Server  # noqa: E402

from ipcserve import Config, ConfigError, InputError  # noqa: E402
from ipcserve.adapters.generation import IncrementalDecoder, StopBuffer  # noqa: E402
from ipcserve.adapters.hf import TransformersModel, infer_task  # noqa: E402
from ipcserve.server.cli import build_model  # noqa: E402

PROMPT = "the cat sat on the mat"
CHAT = [{"role": "system", "content": "be good"}, {"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_lm.build_causal_lm(tmp_path_factory.mktemp("gen") / "tiny-lm")


@pytest.fixture(scope="module")
def lm(lm_dir: Path) -> TransformersModel:
    """The adapter loaded in this process (no ML process)."""
    model = TransformersModel(lm_dir, num_threads=1)
    model.load()
    return model


@pytest.fixture(scope="module")
def reference(lm_dir: Path) -> Any:
    """Greedy decoding the plain way: the whole sequence through the model for every token,
    no cache; returns (prompt ids, completion ids, completion text)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(lm_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(lm_dir).eval()

    def greedy(ids: list[int], n: int) -> tuple[list[int], list[int], str]:
        out = list(ids)
        with torch.no_grad():
            for _ in range(n):
                out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
        prompt_text = tokenizer.decode(ids, skip_special_tokens=True)
        return ids, out[len(ids):], tokenizer.decode(out, skip_special_tokens=True)[
            len(prompt_text):]

    greedy.tokenizer = tokenizer  # type: ignore[attr-defined]
    return greedy


def _run(lm: TransformersModel, **fields: Any) -> list[dict[str, Any]]:
    return list(lm.predict(**fields))


def _text(items: list[dict[str, Any]]) -> str:
    return "".join(item["text"] for item in items)


def _check_shape(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Every item but the last is a delta; the last is the one final item. Returns it."""
    *deltas, final = items
    assert all(set(d) == {"text"} and isinstance(d["text"], str) for d in deltas), deltas
    assert set(final) == {"text", "finish_reason", "usage"} and final["text"] == ""
    assert final["finish_reason"] in ("stop", "length")
    assert set(final["usage"]) == {"prompt_tokens", "completion_tokens"}
    return final


# -- in process ---------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_greedy_stream_is_the_plain_greedy_completion_token_by_token(lm: Any, reference: Any
                                                                     ) -> None:
    assert lm.task == "text-generation" and lm.batching is False and lm.name == "tiny-lm"
    ids, completion, text = reference(reference.tokenizer(PROMPT)["input_ids"], 10)
    items = _run(lm, prompt=PROMPT, max_tokens=10, temperature=0)
    final = _check_shape(items)
    assert final["finish_reason"] == "length"
    assert final["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 10}
    assert len(items) == 11  # one item per token, then the final one
    assert _text(items) == text and text.strip()  # deltas join to the completion
    assert _run(lm, prompt=PROMPT, max_tokens=10, temperature=0) == items  # greedy: same twice
    five = _run(lm, prompt=PROMPT, max_tokens=5, temperature=0)
    assert _check_shape(five)["usage"]["completion_tokens"] == 5 and len(five) == 6
    assert five[:5] == items[:5]


@pytest.mark.timeout(120)
def test_messages_go_through_the_chat_template(lm: Any, reference: Any) -> None:
    tokenizer = reference.tokenizer
    rendered = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|assistant|>")
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    _, _, text = reference(ids, 6)
    items = _run(lm, messages=CHAT, max_tokens=6, temperature=0)
    assert _check_shape(items)["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 6}
    assert _text(items) == text
    # OpenAI's content parts are the same text
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in CHAT]
    assert _run(lm, messages=parts, max_tokens=6, temperature=0) == items
    # a positional string is a prompt
    assert list(lm.predict(PROMPT, max_tokens=3, temperature=0)) == _run(
        lm, prompt=PROMPT, max_tokens=3, temperature=0)


@pytest.mark.timeout(120)
def test_a_stop_sequence_ends_the_text_before_it(lm: Any) -> None:
    items = _run(lm, prompt=PROMPT, max_tokens=10, temperature=0)
    full, deltas = _text(items), [i["text"] for i in items[:-1]]
    stop = (deltas[3] + deltas[4]).strip()  # spans two tokens
    at = full.find(stop)
    # the token that completes the stop is the last one generated
    needed = next(j for j in range(1, 11) if len("".join(deltas[:j])) >= at + len(stop))
    cut = _run(lm, prompt=PROMPT, max_tokens=10, temperature=0, stop=["never", stop])
    final = _check_shape(cut)
    assert _text(cut) == full[:at] and final["finish_reason"] == "stop"
    assert final["usage"]["completion_tokens"] == needed and len(cut) == needed + 1
    assert _text(_run(lm, prompt=PROMPT, max_tokens=10, temperature=0, stop=stop)) == full[:at]


@pytest.mark.timeout(120)
def test_text_that_may_start_a_stop_is_held_until_it_cannot(lm: Any) -> None:
    items = _run(lm, prompt=PROMPT, max_tokens=10, temperature=0)
    full = _text(items)
    # Starts like the 5th word, then goes on with text this vocabulary cannot make.
    stop = items[4]["text"].strip() + " zzz"
    held = _run(lm, prompt=PROMPT, max_tokens=10, temperature=0, stop=stop)
    assert _text(held) == full  # released in the end: the stop never completed
    assert _check_shape(held)["finish_reason"] == "length"
    sent = ""
    for item in held[:-2]:  # until the last token, what was sent never ends a stop's start
        sent += item["text"]
        assert not any(sent.endswith(stop[:k]) for k in range(1, len(stop))), sent


@pytest.mark.timeout(120)
def test_an_end_of_sequence_token_ends_with_stop(lm_dir: Path, lm: Any, tmp_path: Path,
                                                 reference: Any) -> None:
    ids, completion, _ = reference(reference.tokenizer(PROMPT)["input_ids"], 4)
    eos = completion[2]
    ends = tiny_lm.with_eos(lm_dir, tmp_path / "ends", eos)  # generation_config lists it
    model = TransformersModel(ends, num_threads=1)
    model.load()
    items = list(model.predict(prompt=PROMPT, max_tokens=10, temperature=0))
    first = completion.index(eos)  # a word may come twice
    final = _check_shape(items)
    assert final["finish_reason"] == "stop"
    assert final["usage"]["completion_tokens"] == first + 1  # the end token counts
    expected = _run(lm, prompt=PROMPT, max_tokens=first, temperature=0)
    assert _text(items) == _text(expected)


@pytest.mark.timeout(120)
def test_sampling_with_a_seed_is_reproducible(lm: Any) -> None:
    def sample(seed: int, **extra: Any) -> list[dict[str, Any]]:
        return _run(lm, prompt=PROMPT, max_tokens=12, temperature=1.5, seed=seed, **extra)

    first = sample(7)
    assert sample(7) == first
    assert _check_shape(first)["usage"]["completion_tokens"] == 12
    assert any(sample(seed) != first for seed in (1, 2, 3))
    assert sample(7, top_p=0.5) == sample(7, top_p=0.5)
    # top_p so small that only the likeliest token is left: greedy, whatever the seed
    greedy = _run(lm, prompt=PROMPT, max_tokens=12, temperature=0)
    assert sample(3, top_p=1e-9) == greedy


@pytest.mark.timeout(120)
def test_the_context_bounds_the_prompt_and_the_completion(lm: Any, lm_dir: Path) -> None:
    long_prompt = " ".join(["cat"] * 59)  # with BOS: 60 of the 64 tokens
    items = _run(lm, prompt=long_prompt, max_tokens=10, temperature=0)
    assert _check_shape(items)["finish_reason"] == "length"
    assert items[-1]["usage"] == {"prompt_tokens": 60, "completion_tokens": 4}
    with pytest.raises(InputError, match=r"'prompt' is 64 tokens; this model's context is 64"):
        lm.predict(prompt=long_prompt + " dog dog dog dog")
    with pytest.raises(InputError, match=r"'messages' is \d+ tokens"):
        lm.predict(messages=[{"role": "user", "content": long_prompt + " dog dog"}])
    capped = TransformersModel(lm_dir, num_threads=1, max_new_tokens_limit=3, warmup=False)
    capped.load()
    assert list(capped.predict(prompt=PROMPT, max_tokens=50))[-1]["usage"][
        "completion_tokens"] == 3


BAD_REQUESTS = [
    ({}, "exactly one of 'prompt'"),
    ({"prompt": "a", "messages": CHAT}, "exactly one of 'prompt'"),
    ({"prompt": 3}, "'prompt' must be a string or a non-empty list of token ids"),
    ({"prompt": [1, -2]}, "'prompt' must be a string or a non-empty list of token ids"),
    ({"prompt": [1, 10 ** 6]}, "token id 1000000 of the prompt is outside"),
    ({"prompts": []}, "'prompts' must be a list of 1 to 32"),
    ({"prompts": ["a", 7]}, r"prompts\[1\] must be a string"),
    ({"messages": CHAT, "echo": True}, "'echo' is for 'prompt'"),
    ({"prompt": "a", "logprobs": 21}, "'logprobs' must be an integer from 0 to 20"),
    ({"prompt": "a", "echo": 1}, "'echo' must be true or false"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": "hello"}, "'messages' must be a non-empty list"),
    ({"messages": ["hi"]}, r"messages\[0\] must be an object"),
    ({"messages": [{"role": "robot", "content": "x"}]}, r"'role' of messages\[0\] must be one of"),
    ({"messages": [{"content": "x"}]}, r"'role' of messages\[0\]"),
    ({"messages": [CHAT[0], {"role": "user", "content": 5}]}, r"'content' of messages\[1\]"),
    ({"prompt": "a", "max_tokens": 0}, r"'max_tokens' must be an integer >= 1 \(0 only with"),
    ({"prompt": "a", "max_tokens": "5"}, "'max_tokens'"),
    ({"prompt": "a", "max_tokens": True}, "'max_tokens'"),
    ({"prompt": "a", "temperature": -0.5}, "'temperature' must be >= 0"),
    ({"prompt": "a", "temperature": "hot"}, "'temperature' must be a number"),
    ({"prompt": "a", "temperature": float("nan")}, "'temperature' must be a number"),
    ({"prompt": "a", "top_p": 0}, "'top_p' must be > 0 and <= 1"),
    ({"prompt": "a", "top_p": 1.5}, "'top_p'"),
    ({"prompt": "a", "stop": ""}, "'stop' must be"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "'stop' must be .* up to 4"),
    ({"prompt": "a", "stop": [1]}, "'stop'"),
    ({"prompt": "a", "seed": 1.5}, "'seed' must be an integer"),
    ({"prompt": "a", "n": 0}, "'n' must be an integer from 1 to 16"),
    ({"prompt": "a", "n": 17}, "'n' must be an integer from 1 to 16"),
    ({"prompt": "a", "n": "2"}, "'n' must be an integer"),
    ({"prompt": "a", "best_of": 2}, r"unknown field\(s\) 'best_of'"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fields, message", BAD_REQUESTS)
def test_bad_requests_are_refused_before_any_token(lm: Any, fields: dict[str, Any],
                                                   message: str) -> None:
    with pytest.raises(InputError, match=message):
        lm.predict(**fields)  # raised by predict() itself, not at the first next()


@pytest.mark.timeout(120)
def test_other_bad_calls(lm: Any) -> None:
    with pytest.raises(InputError, match="keyword fields"):
        lm.predict(5)
    with pytest.raises(InputError, match="one request at a time"):
        lm.predict_batch([{"prompt": "a"}])
    template, lm.tokenizer.chat_template = lm.tokenizer.chat_template, None
    try:
        with pytest.raises(InputError, match="no chat template.*send 'prompt'"):
            lm.predict(messages=CHAT)
    finally:
        lm.tokenizer.chat_template = template


def test_incremental_decoding_keeps_characters_split_over_tokens_whole() -> None:
    tokenizer = tiny_lm.byte_level_tokenizer()
    text = "héllo wörld 👋 日本語, the cat"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > len(text.split())  # characters really are split over tokens
    decoder = IncrementalDecoder(tokenizer, [])
    deltas = [decoder.add(i) for i in ids] + [decoder.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas  # some tokens completed no character and sent nothing
    # words after a prompt get the space they have in the whole text
    prompt, rest = tokenizer("the cat")["input_ids"], tokenizer(" sat on")["input_ids"]
    decoder = IncrementalDecoder(tokenizer, prompt)
    assert "".join(decoder.add(i) for i in rest) == " sat on"


def test_stop_buffer() -> None:
    buffer = StopBuffer(["END", "\n\n"])
    assert buffer.push("hello E") == ("hello ", False)  # "E" may start END
    assert buffer.push("N") == ("", False)
    assert buffer.push("d") == ("ENd", False)  # not END after all
    assert buffer.push(" bye\n") == (" bye", False)
    assert buffer.push("\nmore") == ("", True)
    buffer = StopBuffer(["stop here"])
    assert buffer.push("a sto") == ("a ", False) and buffer.flush() == "sto"
    assert StopBuffer([]).push("E") == ("E", False)


# -- embeddings with usage ----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_embeddings_with_usage(tmp_path: Path) -> None:
    path = tiny_lm.build_encoder(tmp_path / "encoder")
    assert infer_task(str(path)) == "feature-extraction"
    texts = ["the cat sat on the mat", "hello", "a big red house by the river"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tokens = sum(len(tokenizer(t)["input_ids"]) for t in texts)
    model = TransformersModel(path, num_threads=1)
    model.load()
    plain = model.predict_batch([texts])[0]
    # mixed forms in one batch, as concurrent callers would send them
    usage, one, listed, without = model.predict_batch(
        [{"texts": texts, "with_usage": True}, "hello", texts[:2], {"texts": texts[1:]}])
    assert usage == {"vectors": plain, "prompt_tokens": tokens}
    assert usage["prompt_tokens"] < 3 * len(tokenizer(texts[2])["input_ids"])  # no padding
    assert one == plain[1] and listed == plain[:2] and without == plain[1:]
    for bad, message in [({"texts": []}, "non-empty list"), ({"texts": ["a", 3]}, "item 1"),
                         ({"texts": ["a"], "with_usage": "yes"}, "'with_usage'"),
                         ({"texts": ["a"], "model": "x"}, "unknown field")]:
        with pytest.raises(InputError, match=message):
            model.predict_batch([bad])
    # through an ML process and the OpenAI embeddings route, which sends this very input
    from flask import Flask

    from ipcserve.flask import IPCServe

    app = Flask(__name__)
    ipc = IPCServe(app)
    ml = TransformersModel(path, num_threads=1, timeout=60)
    ipc.add_model(ml)
    ipc.start()
    try:
        assert ml(texts=texts, with_usage=True) == usage
        answer = app.test_client().post("/v1/embeddings",
                                        json={"model": "encoder", "input": texts})
        assert answer.status_code == 200, answer.get_json()
        body = answer.get_json()
        assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
        assert np.allclose([d["embedding"] for d in body["data"]], plain, atol=1e-6)
        # Over the model's context (64 tokens): a 400 naming the input, never a vector of
        # the text's first 64 tokens passed off as the whole text's.
        long = " ".join(["the cat sat on the mat"] * 12)
        answer = app.test_client().post("/v1/embeddings",
                                        json={"model": "encoder", "input": ["hello", long]})
        assert answer.status_code == 400, answer.get_json()
        assert "input 1 is 73 tokens long; this model takes at most 64" in \
            answer.get_json()["error"]["message"]
        # Token ids (the model's own, as /tokenize gives them) embed as their text does,
        # mixed with texts; ids beyond the vocabulary and over the context are 400s.
        ids = [tokenizer(t)["input_ids"] for t in texts]
        answer = app.test_client().post("/v1/embeddings", json={"model": "encoder",
                                                                "input": ids})
        assert answer.status_code == 200, answer.get_json()
        assert np.allclose([d["embedding"] for d in answer.get_json()["data"]], plain,
                           atol=1e-5)
        assert answer.get_json()["usage"]["prompt_tokens"] == tokens
        for bad, message in [([[1, len(tokenizer)]], f"token id {len(tokenizer)} is outside"),
                             ([[5] * 65], "input 0 is 65 tokens long")]:
            answer = app.test_client().post("/v1/embeddings",
                                            json={"model": "encoder", "input": bad})
            assert answer.status_code == 400 and message in \
                answer.get_json()["error"]["message"], answer.get_json()
        # dimensions: the first ones, back to length 1
        answer = app.test_client().post("/v1/embeddings", json={
            "model": "encoder", "input": texts[:1], "dimensions": 8})
        short = np.asarray(answer.get_json()["data"][0]["embedding"])
        assert short.shape == (8,) and np.isclose(np.linalg.norm(short), 1.0, atol=1e-5)
        assert np.allclose(short, np.asarray(plain[0][:8]) / np.linalg.norm(plain[0][:8]),
                           atol=1e-5)
    finally:
        assert ipc.drain(grace=5)
    assert multiprocessing.active_children() == []
    # max_length= asks for truncation: then the same text is cut, as asked.
    cut = TransformersModel(path, num_threads=1, max_length=8)
    cut.load()
    assert len(cut.predict_batch([[long]])[0][0]) == len(plain[0])


# -- serving by path ----------------------------------------------------------------------
def _export_mlp(path: Path) -> Path:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    program = torch.export.export(net, (torch.zeros(2, 4),),
                                  dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    torch.export.save(program, str(path))
    return path


@pytest.mark.timeout(120)
def test_build_model_from_a_path(lm_dir: Path, tmp_path: Path) -> None:
    from ipcserve.adapters.onnxrt import OnnxModel
    from ipcserve.adapters.pytorch import TorchModel

    config = Config(timeout=7.0)
    ml = build_model(str(lm_dir), config)
    assert isinstance(ml, TransformersModel) and ml.task == "text-generation"
    assert ml.name == "tiny-lm" and ml.config == config
    assert build_model(str(lm_dir), config, task="feature-extraction").task == \
        "feature-extraction"
    onnx = tmp_path / "digits-copy.onnx"
    shutil.copy(Path(__file__).parent.parent / "ipcserve" / "adapters" / "digits.onnx", onnx)
    ml = build_model(str(onnx), config)
    assert isinstance(ml, OnnxModel) and ml.name == "digits-copy" and ml.config == config
    ml = build_model(str(_export_mlp(tmp_path / "mlp.pt2")), config)
    assert isinstance(ml, TorchModel) and ml.name == "mlp" and ml.config == config
    for name in ("net.pt", "net.ts"):  # TorchScript: only loaded in the ML process
        (tmp_path / name).write_bytes(b"")
        assert isinstance(build_model(str(tmp_path / name), config), TorchModel)
    assert type(build_model("models:Doubler", config)).__name__ == "Doubler"  # as before

    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    for spec, task, message in [
            (str(tmp_path / "missing"), None, "does not exist"),
            (str(tmp_path / "notes.txt"), None, "is not a model file"),
            (str(tmp_path / "empty"), None, "without a config.json"),
            (str(onnx), "text-generation", "--task is for a transformers model directory"),
            ("digits", "text-generation", "--task is for"),
            (str(lm_dir), "translation", "task must be one of")]:
        with pytest.raises(ConfigError, match=message):
            build_model(spec, config, task=task)


# -- through a real ML process and a real server ------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_streams_through_an_ml_process(lm_dir: Path, lm: Any) -> None:
    request = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    local = _run(lm, **request)
    sampled = {seed: _run(lm, prompt=PROMPT, max_tokens=20, temperature=1.0, seed=seed)
               for seed in (1, 2)}
    with TransformersModel(lm_dir, num_threads=1, timeout=60) as ml:
        assert ml.batching is False
        with ml.stream((), request) as stream:
            assert list(stream) == local and stream.streaming is True
        assert ml.call((), request).value == local  # unary: the list of items
        assert ml(**request) == local

        def run(seed: int) -> list[dict[str, Any]]:
            return list(ml.stream((), {"prompt": PROMPT, "max_tokens": 20, "temperature": 1.0,
                                       "seed": seed}))

        with ThreadPoolExecutor(2) as pool:  # two streams take turns in one ML process
            assert dict(zip((1, 2), pool.map(run, (1, 2)))) == sampled
        with ml.stream((), {"prompt": PROMPT, "max_tokens": 500}) as stream:
            assert "text" in next(stream)  # leaving the with cancels the rest
        with pytest.raises(InputError, match="'top_p'"):
            ml(prompt=PROMPT, top_p=2)
        pid = ml.pids
        assert ml(**request) == local and ml.pids == pid
    assert multiprocessing.active_children() == []


def _ndjson(response: Any) -> Iterator[dict[str, Any]]:
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/x-ndjson")
    return (json.loads(line) for line in response.text.splitlines() if line)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_serve_a_model_directory_by_path(lm_dir: Path, lm: Any) -> None:
    import requests

    server = Server("--model", str(lm_dir), "--timeout", "60", start_timeout=150)
    try:
        assert server.url, server.output
        models = requests.get(f"{server.url}/v1/models", timeout=10).json()
        assert models["default"] == "tiny-lm"
        body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0}
        items = list(_ndjson(requests.post(f"{server.url}/predict", json=body, timeout=60)))
        assert items == _run(lm, **body)
        assert items[-1]["usage"]["completion_tokens"] == 3
        assert items[-1]["finish_reason"] == "length"
        bad = requests.post(f"{server.url}/predict", json={"prompt": PROMPT, "stop": 3},
                            timeout=60)
        assert bad.status_code == 400 and bad.json()["type"] == "InputError"
        assert "'stop'" in bad.json()["error"]

        # The OpenAI routes drive the same generator.
        chat = {"model": "tiny-lm", "messages": CHAT, "max_tokens": 4, "temperature": 0}
        expected = _run(lm, messages=CHAT, max_tokens=4, temperature=0)
        answer = requests.post(f"{server.url}/v1/chat/completions", json=chat, timeout=60)
        assert answer.status_code == 200, answer.text
        choice = answer.json()["choices"][0]
        assert choice["message"]["content"] == _text(expected)
        assert choice["finish_reason"] == "length"
        usage = expected[-1]["usage"]
        assert answer.json()["usage"] == {**usage, "total_tokens": sum(usage.values())}
        events = requests.post(f"{server.url}/v1/chat/completions", timeout=60, json={
            **chat, "stream": True, "stream_options": {"include_usage": True}}).text
        chunks = [json.loads(line[6:]) for line in events.splitlines()
                  if line.startswith("data: {")]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                       if c["choices"]) == _text(expected)
        assert chunks[-1]["usage"]["completion_tokens"] == 4 and events.endswith("[DONE]\n\n")
        completion = requests.post(f"{server.url}/v1/completions", timeout=60, json={
            "model": "tiny-lm", "prompt": PROMPT, "max_tokens": 3, "temperature": 0,
            "stop": items[1]["text"].strip()}).json()
        two = items[0]["text"] + items[1]["text"]
        assert completion["choices"][0]["text"] == two[:two.find(items[1]["text"].strip())]
        assert completion["choices"][0]["finish_reason"] == "stop"
    finally:
        assert server.stop() == 0, server.output
