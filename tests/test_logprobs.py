"""Log-probabilities, echo, token-id prompts, several prompts, ``n`` and ``best_of`` on the
OpenAI routes, checked against the same tiny causal LM computed in this process with
transformers (one forward pass over the whole sequence, ``log_softmax`` of its logits).

These are what evaluation harnesses send to score multiple-choice tasks: ``echo: true``,
``logprobs: N``, ``max_tokens: 0``, prompts as lists of token-id lists; they read
``tokens``, ``token_logprobs`` and ``top_logprobs`` over the prompt and the completion.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
requests = pytest.importorskip("requests")

import tiny_lm  # noqa: E402
from server import Server  # noqa: E402

pytestmark = pytest.mark.timeout(240)
TOL = 1e-4
PROMPTS = ["the cat sat on the mat", "once upon a time the dog went up the road", "hello"]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_lm.build_causal_lm(tmp_path_factory.mktemp("logprobs") / "tiny-lm")


@pytest.fixture(scope="module")
def reference(lm_dir: Path) -> Any:
    """(tokenizer, log_softmax of every position for a list of token ids)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    model = AutoModelForCausalLM.from_pretrained(lm_dir).eval()

    def rows(ids: list[int]) -> Any:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return tokenizer, rows


@pytest.fixture(scope="module")
def server(lm_dir: Path) -> Iterator[Server]:
    server = Server("--model", str(lm_dir), "--timeout", "60", start_timeout=150)
    assert server.url, server.output
    yield server
    assert server.stop() == 0, server.output


def _post(server: Server, route: str, **body: Any) -> requests.Response:
    return requests.post(f"{server.url}{route}", json={"model": "tiny-lm", **body}, timeout=60)


def _ids(tokens: list[str]) -> list[int]:
    assert all(t.startswith("token_id:") for t in tokens), tokens
    return [int(t.split(":")[1]) for t in tokens]


def _check_against(rows: Any, ids: list[int], logprobs: dict[str, Any], top: int,
                   first_is_none: bool) -> None:
    """Every position's logprob and its top alternatives equal the in-process ones."""
    for j, (lp, alts) in enumerate(zip(logprobs["token_logprobs"], logprobs["top_logprobs"])):
        if j == 0 and first_is_none:
            assert lp is None and alts is None
            continue
        row = rows[j - 1]
        assert lp == pytest.approx(float(row[ids[j]]), abs=TOL), (j, ids[j])
        best = torch.topk(row, top)
        expected = {f"token_id:{i}": float(v) for i, v in zip(best.indices.tolist(),
                                                               best.values.tolist())}
        got = dict(alts)
        got.pop(f"token_id:{ids[j]}") if f"token_id:{ids[j]}" not in expected else None
        assert set(got) == set(expected), j
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, abs=TOL)


def test_echo_scores_token_id_prompts_as_transformers_does(server: Server, reference: Any
                                                           ) -> None:
    """An evaluation harness's loglikelihood request: several prompts as token ids,
    max_tokens 0, echo, logprobs 5; tokens come back as token ids."""
    tokenizer, rows = reference
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    answer = _post(server, "/v1/completions", prompt=prompts, max_tokens=0, echo=True,
                   logprobs=5, return_tokens_as_token_ids=True)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for choice, ids, text in zip(body["choices"], prompts, PROMPTS):
        logprobs = choice["logprobs"]
        assert _ids(logprobs["tokens"]) == ids
        assert choice["finish_reason"] == "length"
        assert choice["text"] == tokenizer.decode(ids)
        _check_against(rows(ids), ids, logprobs, 5, first_is_none=True)
        assert logprobs["text_offset"][0] == 0
        assert logprobs["text_offset"] == sorted(logprobs["text_offset"])
    assert body["usage"] == {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": 0,
                             "total_tokens": sum(map(len, prompts))}


def test_greedy_completion_with_echo_matches_transformers(server: Server, reference: Any
                                                          ) -> None:
    tokenizer, rows = reference
    prompt = PROMPTS[1]
    ids = tokenizer(prompt)["input_ids"]
    expected = list(ids)
    for _ in range(5):  # greedy, one whole forward pass per token
        expected.append(int(rows(expected)[-1].argmax()))
    answer = _post(server, "/v1/completions", prompt=prompt, max_tokens=5, temperature=0,
                   echo=True, logprobs=3, return_tokens_as_token_ids=True)
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    assert _ids(choice["logprobs"]["tokens"]) == expected
    _check_against(rows(expected), expected, choice["logprobs"], 3, first_is_none=True)
    whole = tokenizer.decode(expected, skip_special_tokens=True)
    assert whole.startswith(prompt) and choice["text"] == prompt + whole[len(prompt):]
    assert choice["finish_reason"] == "length"
    # Streamed, the chunks carry the same tokens and log-probabilities, in order.
    chunks = _events(_post_stream(server, prompt=prompt, max_tokens=5, temperature=0,
                                  echo=True, logprobs=3, return_tokens_as_token_ids=True))
    streamed = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
    text = ""
    for chunk in chunks:
        for c in chunk["choices"]:
            text += c["text"]
            for key in streamed:
                streamed[key] += (c["logprobs"] or {}).get(key, [])
    assert text == choice["text"]
    assert streamed["tokens"] == choice["logprobs"]["tokens"]
    assert streamed["token_logprobs"][1:] == pytest.approx(
        choice["logprobs"]["token_logprobs"][1:], abs=TOL)


def _post_stream(server: Server, **body: Any) -> requests.Response:
    answer = requests.post(f"{server.url}/v1/completions", stream=True, timeout=60,
                           json={"model": "tiny-lm", "stream": True, **body})
    assert answer.status_code == 200, answer.text
    return answer


def _events(answer: requests.Response) -> list[dict[str, Any]]:
    events = [line[len(b"data: "):] for line in answer.iter_lines() if line]
    assert events[-1] == b"[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_n_and_best_of_choices_score_as_transformers(server: Server, reference: Any) -> None:
    """Sampled choices: each one's token logprobs are the model's; best_of keeps the n
    likeliest, best first."""
    tokenizer, rows = reference
    prompt = PROMPTS[0]
    ids = tokenizer(prompt)["input_ids"]
    answer = _post(server, "/v1/completions", prompt=prompt, max_tokens=6, temperature=1.0,
                   seed=11, n=2, best_of=5, logprobs=1, return_tokens_as_token_ids=True)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    scores = []
    for choice in body["choices"]:
        made = _ids(choice["logprobs"]["tokens"])
        assert len(made) == 6
        whole = rows(ids + made)
        for j, (token, lp) in enumerate(zip(made, choice["logprobs"]["token_logprobs"])):
            assert lp == pytest.approx(float(whole[len(ids) - 1 + j][token]), abs=TOL)
        scores.append(sum(choice["logprobs"]["token_logprobs"]))
    assert scores[0] >= scores[1]
    # All five were made (and counted), the best two returned; every one of the five scores
    # no better than the second best, but the best.
    assert body["usage"]["completion_tokens"] == 5 * 6
    every = _post(server, "/v1/completions", prompt=prompt, max_tokens=6, temperature=1.0,
                  seed=11, n=5, logprobs=0).json()["choices"]
    totals = sorted((sum(c["logprobs"]["token_logprobs"]) for c in every), reverse=True)
    assert scores == pytest.approx(totals[:2], abs=TOL)
    plain = _post(server, "/v1/completions", prompt=prompt, max_tokens=6, temperature=1.0,
                  seed=11, n=2, best_of=5).json()["choices"]
    assert [c["logprobs"] for c in plain] == [None, None]  # not asked for: not sent
    assert [c["text"] for c in plain] == [c["text"] for c in body["choices"]]


def test_chat_logprobs_with_the_openai_client(server: Server, reference: Any) -> None:
    import openai

    tokenizer, rows = reference
    messages = [{"role": "user", "content": "hello world"}]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    whole = client.chat.completions.create(model="tiny-lm", messages=messages, max_tokens=4,
                                           temperature=0, logprobs=True, top_logprobs=2)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens == 4
    assert "".join(t.token for t in content).split() == whole.choices[0].message.content.split()
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    first = rows(ids)[-1]
    assert content[0].logprob == pytest.approx(float(first.max()), abs=TOL)
    assert [t.logprob for t in content[0].top_logprobs] == pytest.approx(
        torch.topk(first, 2).values.tolist(), abs=TOL)
    assert content[0].bytes == list(content[0].token.encode())
    streamed = []
    for chunk in client.chat.completions.create(
            model="tiny-lm", messages=messages, max_tokens=4, temperature=0, logprobs=True,
            top_logprobs=2, stream=True):
        for choice in chunk.choices:
            if choice.logprobs and choice.logprobs.content:
                streamed += choice.logprobs.content
    assert [t.token for t in streamed] == [t.token for t in content]


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hello", "logprobs": 21}, "logprobs"),
    ({"prompt": "hello", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hello", "n": 3, "best_of": 2}, "best_of"),
    ({"prompt": "hello", "best_of": 2, "stream": True}, "best_of"),
    ({"prompt": [[1, 2], "x", 3]}, "prompt"),
    ({"prompt": [], "echo": True}, "prompt"),
    ({"prompt": ["x"] * 33}, "prompt"),
    ({"prompt": "hello", "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "echo": True}, "echo"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": 3}, "logprobs"),
])
def test_bad_fields_are_400_naming_them(server: Server, body: dict[str, Any], param: str
                                        ) -> None:
    route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    answer = _post(server, route, **body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param, answer.text


def test_a_token_id_outside_the_vocabulary_is_a_400(server: Server, reference: Any) -> None:
    tokenizer, _ = reference
    answer = _post(server, "/v1/completions", prompt=[3, len(tokenizer)], max_tokens=1)
    assert answer.status_code == 400, answer.text
    assert f"token id {len(tokenizer)}" in answer.json()["error"]["message"]
    ok = _post(server, "/v1/completions", prompt=[3, len(tokenizer) - 1], max_tokens=1)
    assert ok.status_code == 200, ok.text
