"""Time to first token and tokens/s for 1 and 8 concurrent streams: ``python benchmarks/streams.py``.

Serves the tiny random causal LM of the tests (tests/tiny_lm.py: a 2-layer Llama, hidden
size 32, built and saved to a temp dir; nothing downloaded) with the real
``python -m ipcserve serve --model <dir>`` on 127.0.0.1, and streams chat completions with the
official ``openai`` client. Every stream asks for ``--tokens`` tokens (greedy, no stop).
Reports, per concurrency, the median over ``--repeats`` rounds of: time to first token
(median over the streams of a round), tokens/s per stream, and total tokens/s.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
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
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
_LISTENING = re.compile(r"serving .* on (http://\S+) ")


def start(model_dir: Path) -> tuple[subprocess.Popen[str], str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "ipcserve", "serve", "--port", "0", "--model",
                             str(model_dir), "--timeout", "60"], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, bufsize=0)
    assert proc.stderr is not None
    deadline = time.monotonic() + 120
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


def one_stream(client: Any, model: str, tokens: int) -> tuple[float, float, int]:
    """(time to first token, seconds in all, completion tokens) of one streamed chat."""
    t0 = time.perf_counter()
    first = None
    count = 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "once upon a time"}],
        max_tokens=tokens, temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - t0
        if chunk.usage is not None:
            count = chunk.usage.completion_tokens
    return first or float("nan"), time.perf_counter() - t0, count


def round_of(client: Any, model: str, streams: int, tokens: int) -> dict[str, float]:
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        t0 = time.perf_counter()
        results = list(pool.map(lambda _: one_stream(client, model, tokens), range(streams)))
        wall = time.perf_counter() - t0
    return {"ttft_ms": statistics.median(r[0] for r in results) * 1000,
            "tokens_per_s_per_stream": statistics.median(r[2] / r[1] for r in results),
            "tokens_per_s_total": sum(r[2] for r in results) / wall,
            "tokens": sum(r[2] for r in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import openai
    from tiny_lm import build_causal_lm

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_causal_lm(Path(tmp) / "tiny-llama")
        proc, url = start(model_dir)
        try:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
            model = client.models.list().data[0].id
            one_stream(client, model, 4)  # warm up
            rows = []
            for streams in (1, 8):
                rounds = [round_of(client, model, streams, args.tokens) for _ in range(args.repeats)]
                row = {key: round(statistics.median(r[key] for r in rounds), 2) for key in rounds[0]}
                row["streams"] = streams
                rows.append(row)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    print(f"tiny Llama (2 layers, hidden 32), {args.tokens} tokens per stream, greedy; "
          f"medians of {args.repeats} rounds\n")
    print("| concurrent streams | time to first token | tokens/s per stream | tokens/s in all |")
    print("|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['streams']} | {row['ttft_ms']:.1f} ms | {row['tokens_per_s_per_stream']:.0f} "
              f"| {row['tokens_per_s_total']:.0f} |")
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
