"""Where the processes run: ``cpus`` and ``nice`` place a model's ML processes, ``web_cpus``
the web process, which then leaves the other CPUs to the models (issue 27: the web process
off the model's core). Read back from the real processes, as the kernel has them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from models import Placed
from server import Server

from ipcserve import Config, ConfigError

pytestmark = pytest.mark.timeout(120)


def _two_cpus() -> tuple[int, int]:
    cpus = sorted(os.sched_getaffinity(0))
    assert len(cpus) >= 2, f"these tests place processes on two CPUs; this one may use {cpus}"
    return cpus[0], cpus[1]


def test_cpu_lists_read_as_linux_writes_them() -> None:
    assert Config(cpus="0-1").cpus == (0, 1)
    assert Config.from_env(environ={"IPCSERVE_CPUS": "1,0,1"}).cpus == (0, 1)
    assert Config(cpus=[1]).cpus == Config(cpus=1).cpus == (1,)
    assert Config().cpus == ()
    for bad in ("a", "3-1", "-1", [True], str(os.cpu_count())):
        with pytest.raises(ConfigError, match="cpus"):
            Config(cpus=bad)
    for bad in (-1, 20, True):
        with pytest.raises(ConfigError, match="nice must be an integer from 0 to 19"):
            Config(nice=bad)


def test_an_ml_process_runs_on_its_cpus_at_its_niceness() -> None:
    _, second = _two_cpus()
    before = os.nice(0)
    with Placed(cpus=(second,), nice=5, workers=2) as ml:
        answers = [ml(None) for _ in range(4)]
        assert all(a == {"cpus": [second], "nice": min(19, before + 5)} for a in answers), answers
        for pid in ml.pids:  # both ML processes, as the kernel has them
            assert os.sched_getaffinity(pid) == {second}
    assert os.nice(0) == before and sorted(os.sched_getaffinity(0)) != [second]  # ours unchanged


def test_the_web_process_keeps_its_cpus_and_leaves_the_others_to_the_models() -> None:
    first, second = _two_cpus()
    server = Server("--model", "models:Placed", "--web-cpus", str(first), "--nice", "3")
    try:
        assert os.sched_getaffinity(server.proc.pid) == {first}
        assert os.getpriority(os.PRIO_PROCESS, server.proc.pid) == os.nice(0)  # not niced
        answer = requests.post(f"{server.url}/v1/models/placed/predict", json={}, timeout=10)
        placed = answer.json()
        rest = sorted(os.sched_getaffinity(0) - {first})
        assert placed["cpus"] == rest, placed  # the others, not the web process's
        assert placed["nice"] == min(19, os.nice(0) + 3)
    finally:
        assert server.stop() == 0
    assert any(f"web process on CPUs {first}" in line for line in server.output.splitlines())


@pytest.mark.parametrize("flags, words", [
    (["--web-cpus", "9999"], "--web-cpus must be CPU numbers"),
    (["--cpus", "9999"], "cpus: this machine has CPUs"),
    (["--nice", "20"], "nice must be an integer from 0 to 19")])
def test_cpus_the_machine_does_not_have_stop_the_server_at_start(flags: list[str],
                                                                words: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "ipcserve", "serve", "--port", "0", *flags],
                          capture_output=True, text=True, timeout=100)
    assert proc.returncode == 2, proc.stderr
    assert words in proc.stderr


def test_a_config_file_places_each_model(tmp_path: Path) -> None:
    """``[server] web_cpus`` and a model's own ``cpus``/``nice``: the model that sets none
    gets the CPUs the web process leaves; the one that sets them keeps its own."""
    from ipcserve.server import cli, config_file

    first, second = _two_cpus()
    path = tmp_path / "models.toml"
    path.write_text(f'[server]\nweb_cpus = "{first}"\n\n[models.rest]\nmodel = "digits"\n\n'
                    f'[models.own]\nmodel = "digits"\ncpus = "{first},{second}"\nnice = 5\n')
    args = cli._parser().parse_args(["serve", "--config", str(path)])
    plan = config_file.load(str(path))
    placed = {ml.name: ml.config for ml, _, _ in
              cli._models_of(cli.resolve(args, {}, file_values=plan.server), plan, args)}
    assert placed["rest"].cpus == tuple(sorted(os.sched_getaffinity(0) - {first}))
    assert placed["own"].cpus == (first, second) and placed["own"].nice == 5
