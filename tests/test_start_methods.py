"""ipcserve under each Python's default start method, and when the default is forkserver
(Python 3.14's Linux default)."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import textwrap

import pytest
from models import Doubler
from server import ROOT


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_the_interpreters_default_start_method_serves() -> None:
    method = multiprocessing.get_context().get_start_method()  # without setting it
    with Doubler(start_method=method) as ml:
        assert ml(21) == 42 and ml.status["workers"][0]["state"] == "ready"


@pytest.mark.timeout(60)
def test_a_forkserver_default_changes_nothing() -> None:
    script = textwrap.dedent("""
        import multiprocessing, sys
        sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
        from models import Doubler

        if __name__ == "__main__":
            multiprocessing.set_start_method("forkserver")  # as Python 3.14 does on Linux
            with Doubler() as ml:                              # ipcserve's own default: spawn
                assert ml(2) == 4
            with Doubler(start_method=multiprocessing.get_start_method()) as ml:
                assert ml(3) == 6
            print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(ROOT)], capture_output=True,
                          text=True, timeout=50)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
