"""API keys: unusable keys are refused at start; keys compare as UTF-8 bytes."""

from __future__ import annotations

import http.client
import subprocess
import sys
import urllib.parse

import pytest
from flask import Flask
from server import ROOT, Server

from ipcserve import ConfigError
from ipcserve.flask import IPCServe


@pytest.mark.parametrize("key, words", [("", "empty"), ("   ", "empty"),
                                        (" s3cret", "whitespace"), ("s3cret ", "whitespace"),
                                        ("s3\tcret", "control")])
def test_unusable_keys_stop_the_server_at_start(key: str, words: str) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "app.py"), "--port", "0", "--api-key", key],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "invalid setting" in proc.stderr and words in proc.stderr
    assert "serving" not in proc.stderr


def test_unusable_keys_are_refused_by_init_app() -> None:
    app = Flask(__name__)
    app.config["IPCSERVE_API_KEY"] = ""
    with pytest.raises(ConfigError, match="empty"):
        IPCServe(app)


def _get(url: str, authorization: bytes | None) -> int:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.putrequest("GET", "/v1/models")
        if authorization is not None:
            conn.putheader("Authorization", authorization)  # raw bytes, as curl sends them
        conn.endheaders()
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.mark.timeout(60)
def test_a_non_ascii_key_sent_as_utf8_is_accepted() -> None:
    key = "clé-secrète-ü"
    server = Server(env={"IPCSERVE_API_KEY": key})
    try:
        assert _get(server.url, b"Bearer " + key.encode("utf-8")) == 200
        assert _get(server.url, b"Bearer " + key.encode("latin-1")) == 401
        assert _get(server.url, b"Bearer cle-secrete-u") == 401
        assert _get(server.url, None) == 401
    finally:
        assert server.stop() == 0, server.output
