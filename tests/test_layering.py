"""The layering contract: who may import whom, no cycles, small modules, no hidden imports.

The rules are data (:data:`ALLOWED`), checked against the import graph read from the
source with ``ast``: module-level imports, imports inside functions and relative imports
alike.  Imports under ``if TYPE_CHECKING:`` are for annotations only and create no
dependency.  The checkers are plain functions of a graph, so the tests below also show
that they reject a crafted violation and a crafted cycle.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QT = ("PySide6", "PyQt5", "PyQt6", "pyqtgraph", "shiboken6", "qtpy")
OURS = ("app", "workers")
MAX_LINES = 500

#: Plain shared modules: any part of the controller may import them; they import none of ours.
SHARED = {"app.paths", "app.signals", "app.boards", "app.extras"}
#: The standard-library-only part of ``workers`` that the controller imports (no torch).
CONTRACT = {"workers", "workers.config", "workers.presets", "workers.protocol", "workers.probe",
            "workers.qnli", "workers.lifeline", "workers.checkpoint_manifest", "workers.energy",
            "workers.energy_meters", "workers.energy_sensors"}
BASE = SHARED | CONTRACT
#: For each part (a package, or a shared module), the parts it may import.
ALLOWED: dict[str, set[str]] = {
    "app.paths": set(), "app.signals": set(), "app.boards": set(), "app.extras": set(),
    "app.planner": {"app.planner"} | BASE,
    "app.devices": {"app.devices"} | BASE,
    "app.testbed": {"app.testbed", "app.devices"} | BASE,
    "app.run": {"app.run", "app.devices", "app.planner"} | BASE,
    "app.workspace": {"app.workspace", "app.run", "app.devices", "app.planner", "app.testbed"} | BASE,
    "app.qt": {"app.qt", "app.workspace"} | BASE,
    "app.cli": {"app.cli", "app.run", "app.devices", "app.planner", "app.testbed"} | BASE,
    "workers": set(),
}
#: Imports inside a function, each with its reason.  Anything else of ours imported in a
#: function is a defect: it hides a dependency (often a cycle) from readers and tools.
LAZY_OK = {
    ("app.cli.gui", "app.qt.qt_app"): "PySide6 is the optional [gui] extra; other commands start without it",
    ("app.cli.sweep", "app.qt.qt_figure"): "the sweep figure's PNG needs PySide6 (the optional [gui] extra); "
                                           "without it the sweep writes the SVG only",
}
#: Parts whose lazy imports of their own modules are by design (workers import torch-heavy
#: modules phase by phase, so an out-of-memory at load is attributed to its phase, and the
#: probe diagnoses a device that has no torch).
LAZY_PARTS = {"workers"}


@dataclass(frozen=True)
class Import:
    source: str       # importing module
    target: str       # imported module (resolved, absolute)
    lazy: bool        # inside a function
    line: int


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    if node.level:
        base = module.split(".") if is_pkg else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    # ``from pkg import mod`` imports a module when pkg/mod.py exists
    out = []
    for alias in node.names:
        cand = f"{prefix}.{alias.name}"
        if _is_module(cand):
            out.append(cand)
        else:
            out.append(prefix)
    return out


def _is_module(name: str) -> bool:
    p = ROOT.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports_of(path: Path) -> list[Import]:
    """Every import in ``path`` (resolved), skipping ``if TYPE_CHECKING:`` blocks."""
    module = module_name(path)
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for sub in child.orelse:
                    visit(sub, lazy)
                continue
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend(Import(module, a.name, lazy, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                out.extend(Import(module, t, lazy, child.lineno) for t in _resolve(module, is_pkg, child))
            visit(child, inner)

    visit(tree, False)
    return out


def source_files() -> list[Path]:
    return sorted(p for d in OURS for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)


def all_imports() -> list[Import]:
    return sorted({imp for p in source_files() for imp in imports_of(p)}, key=lambda i: (i.source, i.line, i.target))


def part_of(module: str) -> str | None:
    """The part of the layering a module belongs to (longest matching key of ALLOWED)."""
    for key in sorted(ALLOWED, key=len, reverse=True):
        if module == key or module.startswith(key + "."):
            return key
    return None


def _allowed_target(target: str, own: str, allowed: set[str]) -> bool:
    """A part may import itself; contract modules are allowed one by one, packages whole."""
    if target == own or target.startswith(own + "."):
        return True
    return any(target == a or (a not in CONTRACT and target.startswith(a + ".")) for a in allowed)


def rule_violations(imports: list[Import]) -> list[str]:
    """Imports of our own code that the rules forbid (empty when the layering holds)."""
    bad = []
    for imp in imports:
        if imp.target.split(".")[0] not in OURS:
            continue
        if (imp.source, imp.target) in LAZY_OK:
            continue
        src = part_of(imp.source)
        if src is None:
            bad.append(f"{imp.source}: not in any part of the layering (add it to ALLOWED)")
            continue
        if not _allowed_target(imp.target, src, ALLOWED[src]):
            bad.append(f"{imp.source}:{imp.line} imports {imp.target}, which {src} may not import")
        if imp.lazy and src not in LAZY_PARTS and (imp.source, imp.target) not in LAZY_OK:
            bad.append(f"{imp.source}:{imp.line} imports {imp.target} inside a function (hidden dependency)")
    return bad


def cycles(imports: list[Import]) -> list[list[str]]:
    """Strongly connected groups of more than one module of ours (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        if imp.target.split(".")[0] in OURS and imp.target != imp.source:
            graph.setdefault(imp.source, set()).add(imp.target)
            graph.setdefault(imp.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


# --------------------------------------------------------------------------- the checks

def test_every_import_follows_the_layering():
    assert rule_violations(all_imports()) == []


def test_no_import_cycles():
    # package __init__ modules hold only a docstring, so a package import adds no edge
    assert cycles(all_imports()) == []


def test_only_the_qt_package_imports_qt():
    bad = [f"{i.source} imports {i.target}" for i in all_imports()
           if i.target.split(".")[0] in QT and not i.source.startswith("app.qt")]
    assert bad == []


def test_workers_never_import_the_controller():
    assert [i for i in all_imports() if i.source.startswith("workers") and i.target.split(".")[0] == "app"] == []


def test_modules_stay_small():
    big = [f"{p.relative_to(ROOT)}: {n} lines" for p in source_files()
           if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert big == []


def test_no_import_error_guard_around_our_own_modules():
    """``try: import ours / except ImportError`` hides real bugs (a missing name reads as
    'feature not installed')."""
    bad = []
    for path in source_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Try):
                continue
            catches = {n.id for h in node.handlers for n in ast.walk(h.type or ast.Name("BaseException"))
                       if isinstance(n, ast.Name)}
            if not catches & {"ImportError", "ModuleNotFoundError"}:
                continue
            for stmt in node.body:
                for sub in ast.walk(stmt):
                    if isinstance(sub, ast.ImportFrom) and (sub.level or (sub.module or "").split(".")[0] in OURS):
                        bad.append(f"{path.relative_to(ROOT)}:{sub.lineno}")
                    elif isinstance(sub, ast.Import) and any(a.name.split(".")[0] in OURS for a in sub.names):
                        bad.append(f"{path.relative_to(ROOT)}:{sub.lineno}")
    assert bad == []


def test_every_package_says_what_it_holds():
    for init in (ROOT / "app").glob("*/__init__.py"):
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init.relative_to(ROOT)} needs a one-line docstring"


def test_controller_imports_without_qt_or_torch():
    # catches what the static scan cannot see (imports made by third-party code)
    mods = sorted(module_name(p) for p in source_files()
                  if module_name(p).startswith("app.") and not module_name(p).startswith(("app.qt", "app.cli.__main__")))
    code = ("import importlib, sys\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(QT) | {'torch'}!r}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- the checks can fail

def test_rule_check_rejects_a_crafted_violation():
    crafted = [Import("app.planner.plan", "app.run.jobs", False, 1),         # planner reaching up
               Import("app.devices.ssh", "app.qt.qt_main", True, 2),         # lazy, and a forbidden part
               Import("app.run.jobs", "app.planner.plan", False, 3),         # allowed
               Import("workers.train", "app.run.jobs", False, 4)]            # workers never import app
    bad = rule_violations(crafted)
    assert any("app.planner.plan:1 imports app.run.jobs" in b for b in bad)
    assert any("app.devices.ssh:2 imports app.qt.qt_main, which" in b for b in bad)
    assert any("app.devices.ssh:2 imports app.qt.qt_main inside a function" in b for b in bad)
    assert any("workers.train:4" in b for b in bad)
    assert not any("app.run.jobs:3" in b for b in bad)


def test_cycle_check_finds_a_crafted_cycle():
    crafted = [Import("app.run.jobs", "app.planner.plan", False, 1),
               Import("app.planner.plan", "app.devices.profile", True, 1),
               Import("app.devices.profile", "app.run.jobs", False, 1),
               Import("app.devices.ssh", "app.devices.inventory", False, 1)]
    assert cycles(crafted) == [["app.devices.profile", "app.planner.plan", "app.run.jobs"]]


def test_scanner_sees_relative_lazy_imports(tmp_path, monkeypatch):
    """A relative import inside a function (``from ..qt.x import y``) is resolved and
    reported like any other."""
    pkg = tmp_path / "app" / "run"
    pkg.mkdir(parents=True)
    (tmp_path / "app" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (tmp_path / "app" / "qt").mkdir()
    (tmp_path / "app" / "qt" / "__init__.py").write_text("")
    (tmp_path / "app" / "qt" / "qt_main.py").write_text("")
    src = pkg / "sneaky.py"
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..qt import qt_main\n"
                   "def f():\n    from ..qt.qt_main import Window\n    return Window\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = imports_of(src)
    assert found == [Import("app.run.sneaky", "typing", False, 1), Import("app.run.sneaky", "app.qt.qt_main", True, 5)]
    assert any("inside a function" in b for b in rule_violations(found))
