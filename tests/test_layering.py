"""The layering contract: app/core and workers import no Qt; workers never import app."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QT = ("PySide6", "PyQt5", "PyQt6", "pyqtgraph", "shiboken6", "qtpy")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for mod in imported_modules(path):
            if mod.split(".")[0] in forbidden:
                bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    return bad


def test_core_imports_no_qt():
    assert offenders("app/core", QT) == []


def test_workers_import_no_qt_and_no_app():
    assert offenders("workers", QT + ("app",)) == []


def test_importing_core_at_runtime_pulls_in_no_qt():
    # catches indirect imports the static scan cannot see
    mods = [p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
            for p in (ROOT / "app" / "core").glob("*.py") if p.name != "__init__.py"]
    code = ("import importlib, sys\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            f"bad = [m for m in sys.modules if m.split('.')[0] in {QT!r}]\n"
            "print('QT:', bad)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "QT: []" in out.stdout
