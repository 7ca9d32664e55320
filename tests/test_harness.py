"""The test harness itself (tests/conftest.py): a test that runs out of time fails with every
thread's stack, and no child process of it is left running."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

_HUNG_TEST = textwrap.dedent('''
    import multiprocessing
    import os
    import threading

    import pytest
    from models import Blocker


    @pytest.mark.timeout(8)
    def test_hangs() -> None:
        ctx = multiprocessing.get_context("spawn")
        entered, release = ctx.Event(), ctx.Event()
        with Blocker(entered, release) as ml:
            # A helper thread waits on an ML process that never answers ...
            helper = threading.Thread(target=ml, args=("block",), kwargs={"timeout": 600},
                                      name="stuck-helper")
            helper.start()
            assert entered.wait(5)
            with open(os.environ["HUNG_PID_FILE"], "w") as f:
                f.write(str(ml.pids[0]))
            threading.Event().wait()  # ... and the main thread waits forever: the bug to catch
''')


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(90)
def test_a_hung_test_fails_with_all_stacks_and_no_children_left(tmp_path: Path) -> None:
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_hung.py").write_text(_HUNG_TEST)
    pid_file = tmp_path / "pid"
    env = dict(os.environ, HUNG_PID_FILE=str(pid_file),
               PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout-method=signal",
         "-W", "error", "-W", "ignore::DeprecationWarning:multiprocessing.*", str(tmp_path / "test_hung.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=75)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "1 failed" in out, out
    assert "Timeout: the test ran for more than 8.0s" in out, out
    # faulthandler's dump: the main thread in the test, the helper inside the caller's wait.
    assert "Stacks of all threads when it timed out (faulthandler)" in out, out
    assert re.search(r'File ".*test_hung\.py", line \d+ in test_hangs', out), out
    assert re.search(r'File ".*channel\.py", line \d+ in _wait', out), out
    worker = int(pid_file.read_text())
    killed = re.search(r"Killed child processes \[([\d, ]*)\]", out)
    assert killed and worker in [int(p) for p in killed.group(1).split(",") if p.strip()], out
    assert not _alive(worker)
