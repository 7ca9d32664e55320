"""One settings table drives env vars, CLI flags, app.config keys and the docs."""

from __future__ import annotations

import concurrent.futures
import re
from pathlib import Path

import pytest
from conftest import spawn_events
from flask import Flask
from models import Blocker, Doubler

from ipcserve import Config, ConfigError
from ipcserve.server.cli import _parser, resolve
from ipcserve.engine.config import SETTINGS, settings_of
from ipcserve.flask import IPCServe

DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
_ROW = re.compile(r"^\|\s*`(\w+)`\s*\|\s*`(IPCSERVE_\w+)`\s*\|\s*`(--[\w-]+)`\s*\|\s*`([^`]*)`\s*\|")


def _doc_default(value: object) -> str:
    return "none" if value is None else repr(value)


def test_every_engine_setting_is_a_config_field_and_back() -> None:
    assert [s.name for s in settings_of("engine")] == list(Config.__dataclass_fields__)
    assert {s.layer for s in SETTINGS} == {"engine", "http", "server"}
    assert len({s.name for s in SETTINGS}) == len(SETTINGS)


def test_docs_list_every_setting_with_its_env_var_flag_and_default() -> None:
    rows = {m.group(1): m.groups()[1:] for m in map(_ROW.match, DOCS.read_text().splitlines()) if m}
    expected = {s.name: (s.env, s.flag, _doc_default(s.default)) for s in SETTINGS}
    assert rows == expected


def test_every_setting_is_a_cli_flag() -> None:
    help_text = _parser()._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    for setting in SETTINGS:
        assert setting.flag in help_text, setting.flag
        assert setting.env in help_text.replace("\n", " ").replace("  ", ""), setting.env


def test_flag_beats_env_var_beats_default() -> None:
    parser = _parser()
    env = {"IPCSERVE_MAX_BATCH_WAIT": "0.25", "IPCSERVE_TIMEOUT": "7", "IPCSERVE_PORT": "9000"}
    values = resolve(parser.parse_args(["serve", "--timeout", "3"]), env)
    assert values["timeout"] == 3.0  # flag
    assert values["max_batch_wait"] == 0.25 and values["port"] == 9000  # env
    assert values["workers"] == 1 and values["host"] == "127.0.0.1"  # defaults
    assert resolve(parser.parse_args(["serve", "--max-batch-wait", "0.5"]), {})["max_batch_wait"] == 0.5
    with pytest.raises(ConfigError, match="IPCSERVE_WORKERS must be int"):
        resolve(parser.parse_args(["serve"]), {"IPCSERVE_WORKERS": "two"})


def test_engine_settings_in_app_config_apply_unless_given_as_keywords() -> None:
    app = Flask(__name__)
    app.config["IPCSERVE_TIMEOUT"] = "0.5"
    app.config["IPCSERVE_MAX_BATCH_SIZE"] = 4
    ipc = IPCServe(app)
    plain, keyword = Doubler(name="plain"), Doubler(name="keyword", timeout=9.0)
    ipc.add_model(plain)
    ipc.add_model(keyword)
    assert plain.config.timeout == 0.5 and plain.config.max_batch_size == 4
    assert keyword.config.timeout == 9.0 and keyword.config.max_batch_size == 4


@pytest.mark.timeout(30)
def test_app_config_timeout_is_the_http_deadline() -> None:
    entered, release = spawn_events()
    app = Flask(__name__)
    app.config["IPCSERVE_TIMEOUT"] = 0.3
    ipc = IPCServe(app)
    ipc.add_model(Blocker(entered, release))
    ipc.start()
    try:
        client = app.test_client()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(client.post, "/predict", json={"x": "block"})
            assert entered.wait(10)
            response = fut.result(10)
            release.set()
            assert response.status_code == 504
    finally:
        ipc.drain(grace=1)


@pytest.mark.timeout(30)
def test_a_json_field_named_timeout_reaches_the_model() -> None:
    app = Flask(__name__)
    ipc = IPCServe(app)
    ipc.add_model(Doubler())
    ipc.start()
    try:
        response = app.test_client().post("/predict", json={"timeout": 3})
        assert response.status_code == 200 and response.get_json() == {"timeout": 6}
    finally:
        assert ipc.drain(grace=1)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("spec, words", [
    ("no_such_package.models:Model",
     "cannot import 'no_such_package.models:Model': No module named 'no_such_package'"),
    ("json:NoSuchModel", "cannot import 'json:NoSuchModel': module 'json' has no 'NoSuchModel'")])
def test_a_model_spec_that_does_not_import_is_an_invalid_setting(spec: str, words: str) -> None:
    """Exit 2 with a line naming the problem, as every other bad setting, not a traceback."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "ipcserve", "serve", "--port", "0",
                           "--model", spec], capture_output=True, text=True, timeout=100)
    assert proc.returncode == 2, proc.stderr
    assert "invalid setting" in proc.stderr and words in proc.stderr
    assert "Traceback" not in proc.stderr
    if spec.startswith("no_such"):
        assert "PYTHONPATH" in proc.stderr


def test_the_docs_name_every_route_that_needs_no_key() -> None:
    from ipcserve.http import routes
    from ipcserve.http.extension import ROUTES

    row = next(line for line in DOCS.read_text().splitlines() if line.startswith("| `api_key`"))
    for path in routes.open_paths(ROUTES):
        assert f"`{path}`" in row, path
