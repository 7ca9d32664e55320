"""The documentation site: the generated reference pages are what the code says, and the
Sphinx build of docs/ passes with warnings as errors (a broken link or heading anchor, a page
in no table of contents, a docstring autodoc cannot read all fail it).

The build needs ``ipcserve[docs]`` (Sphinx, MyST, Furo: Python 3.11 and later), so those
tests are slow-tier and run on 3.11 with the rest of the slow tests.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _build(source: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sphinx", "-q", "-W", "--keep-going", "-b", "html",
                           str(source), str(out)], capture_output=True, text=True, timeout=240,
                          cwd=ROOT)


def _needs_sphinx() -> None:
    for module in ("sphinx", "myst_parser", "furo"):
        if importlib.util.find_spec(module) is None:
            pytest.fail(f"{module} is not installed: pip install -e '.[docs]'")


@pytest.mark.timeout(120)
def test_the_generated_references_are_what_the_code_says() -> None:
    done = subprocess.run([sys.executable, "scripts/gen_reference.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr + done.stdout


@pytest.mark.timeout(60)
def test_the_route_reference_lists_every_route_and_the_cli_reference_every_flag() -> None:
    from ipcserve.http.extension import ROUTES
    from ipcserve.engine.config import SETTINGS

    routes = (DOCS / "reference" / "routes.md").read_text()
    for route in ROUTES:
        if route.documented:
            assert f"`{route.rule}`" in routes, route.rule
    cli = (DOCS / "reference" / "cli.md").read_text()
    for setting in SETTINGS:
        assert f"`{setting.flag}`" in cli and f"`{setting.env}`" in cli, setting.name


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_site_builds_with_warnings_as_errors(tmp_path: Path) -> None:
    _needs_sphinx()
    done = _build(DOCS, tmp_path / "html")
    assert done.returncode == 0, done.stderr[-4000:]
    # The generated references are rendered from the code: autodoc read the docstrings.
    python = (tmp_path / "html" / "reference" / "python.html").read_text()
    for anchor in ("ipcserve.MLProcess.call", "ipcserve.Config", "ipcserve.flask.IPCServe",
                   "ipcserve.server.serve", "ipcserve.WorkerCrashedError"):
        assert f'id="{anchor}"' in python, anchor
    # Every hand-written page became a page of the site.
    for page in DOCS.glob("*.md"):
        assert (tmp_path / "html" / f"{page.stem}.html").exists(), page.name


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_broken_anchor_fails_the_build(tmp_path: Path) -> None:
    """-W is what makes the site trustworthy: prove a dead link would stop CI."""
    _needs_sphinx()
    source = tmp_path / "docs"
    shutil.copytree(DOCS, source, ignore=shutil.ignore_patterns("_build"))
    page = source / "quickstart.md"
    page.write_text(page.read_text() + "\nSee [the settings](configuration.md#no-such-heading).\n")
    done = _build(source, tmp_path / "html")
    assert done.returncode != 0
    assert re.search(r"quickstart\.md:\d+: WARNING: .*no-such-heading", done.stderr), done.stderr
