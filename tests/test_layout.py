"""The architecture, checked from the source: the three floors and their one-way imports, no
import circle, no private name used across modules, one request lifecycle, and indexes
(the module map, the test index) that cannot go stale. No process is started here."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ipcserve"
SURFACES = ("native", "openai", "v2", "v2_grpc", "status", "openapi")


def _modules() -> dict[str, Path]:
    """``{"ipcserve.http.serving": path, ...}`` for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _package_of(name: str) -> str:
    return name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]


def _resolve(module: str, node: ast.ImportFrom) -> list[str]:
    """The ipcserve modules an ``from ... import`` names (a package's submodules included)."""
    if node.level:
        base = _package_of(module).split(".")
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("ipcserve"):
        return []
    submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
    # "from . import worker" imports the submodule; the package counts only for names that
    # are not submodules of it ("from .. import __version__").
    whole = target in MODULES and len(submodules) < len(node.names)
    return ([target] if whole else []) + submodules


def _imports(module: str) -> Iterator[tuple[str, ast.AST]]:
    """Every ipcserve module ``module`` imports, at any depth (a function's lazy import too)."""
    tree = ast.parse(MODULES[module].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for target in _resolve(module, node):
                yield target, node
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    yield alias.name, node


GRAPH = {m: sorted({t for t, _ in _imports(m) if t != m}) for m in MODULES}


def _floor(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else "top"


def test_no_import_circle() -> None:
    # Tarjan's strongly connected components over every import, lazy ones included.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in MODULES:
        if module not in index:
            visit(module)
    assert not circles, circles


@pytest.mark.parametrize("floor, may_import", [
    ("engine", {"engine"}),
    ("http", {"engine", "http", "top"}),
    ("adapters", {"engine", "adapters"}),
    ("server", {"engine", "http", "server", "adapters", "top"}),
])
def test_the_floors_import_downwards_only(floor: str, may_import: set[str]) -> None:
    wrong = [(m, t) for m in MODULES if _floor(m) == floor for t in GRAPH[m]
             if _floor(t) not in may_import and t != "ipcserve"]
    # "ipcserve" itself is imported only for __version__.
    assert not wrong, wrong


def test_a_surface_imports_the_core_never_another_surface() -> None:
    surfaces = {f"ipcserve.http.{s}" for s in SURFACES}
    wrong = [(m, t) for m in surfaces for t in GRAPH[m] if t in surfaces]
    assert not wrong, wrong
    assert "ipcserve.http.extension" not in {t for m in MODULES for t in GRAPH[m]
                                             if _floor(m) == "http"}


def _private_attributes(tree: ast.AST) -> set[str]:
    """The private attribute names a module gives its objects: methods, class attributes,
    ``obj._x = ...``. (Its module-level private names are reached only through the module,
    which the import check covers.)"""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(item.name)
                elif isinstance(item, (ast.Assign, ast.AnnAssign)):
                    targets = item.targets if isinstance(item, ast.Assign) else [item.target]
                    names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_private_name_crosses_a_module_boundary() -> None:
    trees = {m: ast.parse(p.read_text()) for m, p in MODULES.items()}
    defined = {m: _private_attributes(t) for m, t in trees.items()}
    anywhere = set().union(*defined.values())
    wrong = []
    for module, tree in trees.items():
        imported_modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and _resolve(module, node):
                for alias in node.names:
                    if alias.name.startswith("_") and alias.name != "__version__":
                        wrong.append(f"{module}: imports {alias.name}")
                    if any(t.endswith("." + alias.name) for t in _resolve(module, node)):
                        imported_modules.add(alias.asname or alias.name)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") \
                    or node.attr.startswith("__"):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in imported_modules:
                wrong.append(f"{module}: {node.value.id}.{node.attr}")
            elif node.attr in anywhere and node.attr not in defined[module]:
                wrong.append(f"{module}: .{node.attr} (defined in another ipcserve module)")
    assert not wrong, wrong


def test_the_request_lifecycle_exists_once() -> None:
    # The arrival stamp, the disconnect probe, the admission, the deadline, the metrics:
    # one place in the HTTP layer reads or does each.
    markers = {"RECEIVED_KEY": "serving", "DISCONNECTED_KEY": "serving", "ml.admit(": "serving",
               "metrics.observe(": "serving", "cancel_if=": "serving", "config.timeout": "serving"}
    http = {p.stem: p.read_text() for p in (PACKAGE / "http").glob("*.py")}
    for marker, home in markers.items():
        found = sorted(stem for stem, text in http.items() if marker in text)
        assert found == [home], (marker, found)


def test_every_module_is_in_the_module_map() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text[text.index("## Module map"):]
    mapped = set(re.findall(r"`(ipcserve/[\w/]+\.py)`", section))
    files = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")}
    assert files - mapped == set(), "missing from docs/architecture.md's module map"
    assert mapped - files == set(), "in the module map but gone"


def test_every_test_file_is_in_the_test_index() -> None:
    text = (ROOT / "tests" / "README.md").read_text()
    listed = set(re.findall(r"`(test_\w+\.py)`", text))
    files = {p.name for p in (ROOT / "tests").glob("test_*.py")}
    assert files - listed == set(), "missing from tests/README.md"
    assert listed - files == set(), "in tests/README.md but gone"


def test_version_flag() -> None:
    import ipcserve

    out = subprocess.run([sys.executable, "-m", "ipcserve", "--version"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == f"ipcserve {ipcserve.__version__}"


def test_the_files_the_readme_sends_exist() -> None:
    """A `curl --data-binary @FILE` or config path in the README's commands is in the repo
    (the first screen used to send a digit.png nobody had made)."""
    text = (ROOT / "README.md").read_text()
    sent = re.findall(r"@([\w./-]+\.\w+)", text) + re.findall(r"--config ([\w./-]+)", text)
    assert sent, "the README sends no file any more: update this test"
    for path in sent:
        assert (ROOT / path).is_file(), path


def test_boolean_settings_are_bare_switches_too() -> None:
    from ipcserve.server import cli

    parser = cli._parser()
    for flag, name in (("--require-api-key", "require_api_key"),
                       ("--detect-disconnects", "detect_disconnects")):
        assert getattr(parser.parse_args(["serve", flag]), name) is True
        assert getattr(parser.parse_args(["serve", flag, "off"]), name) is False
        assert getattr(parser.parse_args(["serve"]), name) is None  # then env, file, default
