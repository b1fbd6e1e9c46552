"""``edgetrain gui --check``: whether Qt can start here, and the fix when it cannot.

The checks run as the user runs them (``python -m app.cli gui --check`` in a child
process, so a Qt abort could not take pytest down), in this machine's environment and in
crafted ones: no display, a display nobody serves, a platform plugin whose libraries are
missing, no PySide6 at all.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import qtcheck

ROOT = Path(__file__).resolve().parent.parent


def _env(**changes: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    for k, v in changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def _edgetrain(env: dict[str, str], *args: str, wrap: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*wrap, sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_check_passes_offscreen():
    out = _edgetrain(_env(QT_QPA_PLATFORM="offscreen"), "gui", "--check")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FAIL" not in out.stdout
    assert "ok    qt-start   Qt started (platform offscreen" in out.stdout
    assert "Qt can start" in out.stdout


@pytest.mark.skipif(shutil.which("xvfb-run") is None, reason="needs xvfb-run (packaging/setup.sh installs it as root)")
def test_check_passes_on_a_real_x_server():
    out = _edgetrain(_env(QT_QPA_PLATFORM=None, WAYLAND_DISPLAY=None), "gui", "--check", wrap=("xvfb-run", "-a"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok    libraries  libqxcb.so" in out.stdout
    assert "ok    qt-start   Qt started (platform xcb" in out.stdout


def test_no_display_is_reported_with_the_fix():
    env = _env(DISPLAY=None, WAYLAND_DISPLAY=None, QT_QPA_PLATFORM="xcb")
    out = _edgetrain(env, "gui", "--check")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAIL  display    no display: DISPLAY is not set" in out.stdout
    assert "fix: run under xvfb-run" in out.stdout
    assert "qt-start" not in out.stdout        # Qt is not started when it would abort
    # and the GUI itself says the same instead of aborting in Qt
    gui = _edgetrain(env, "gui")
    assert gui.returncode == 2, gui.stderr
    assert "cannot open here" in gui.stderr and "xvfb-run" in gui.stderr


def test_a_display_nobody_serves_is_reported():
    out = _edgetrain(_env(DISPLAY=":987", QT_QPA_PLATFORM="xcb"), "gui", "--check")
    assert out.returncode == 1
    assert "DISPLAY=:987, but no X server answers there" in out.stdout


def test_missing_gui_extra_is_reported(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoGui:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('PySide6', 'pyqtgraph'):\n"
        "            raise ModuleNotFoundError(name, name=name)\n"
        "sys.meta_path.insert(0, _NoGui())\n")
    env = _env(QT_QPA_PLATFORM="offscreen")
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)])
    out = _edgetrain(env, "gui", "--check")
    assert out.returncode == 1
    assert "FAIL  packages   PySide6 and pyqtgraph not installed" in out.stdout
    assert "fix: pip install 'edgetrain[gui]'" in out.stdout


def test_missing_libraries_are_named_with_the_fix(tmp_path):
    # the real plugin, moved away from the Qt libraries its RUNPATH points at: ldd cannot
    # find them, as on an install whose Qt part is broken
    qt = qtcheck.pyside_dir() / "Qt"
    plugin = tmp_path / "Qt" / "plugins" / "platforms"
    plugin.mkdir(parents=True)
    shutil.copy(qt / "plugins" / "platforms" / "libqxcb.so", plugin)
    f = qtcheck.library_finding(tmp_path / "Qt", "xcb")
    assert not f.ok
    assert "libqxcb.so cannot find" in f.detail and "libQt6XcbQpa.so.6" in f.detail
    assert "pip install --force-reinstall" in f.fix
    # a platform PySide6 does not have
    f = qtcheck.library_finding(qt, "nosuchplatform")
    assert not f.ok and "no 'nosuchplatform' platform plugin" in f.detail


HIDE_LIBRARY = """\
set -e
for f in "$NAME" "$REAL"; do          # overlay whiteouts: the files read as absent
  [ -c "$UPPER/$f" ] || mknod "$UPPER/$f" c 0 0
done
mount -t overlay overlay -o "lowerdir=$LIBDIR,upperdir=$UPPER,workdir=$WORK" "$LIBDIR"
exec "$@"
"""


def _resolved(lib: str) -> Path | None:
    plugin = qtcheck.pyside_dir() / "Qt" / "plugins" / "platforms" / "libqxcb.so"
    for line in subprocess.run(["ldd", str(plugin)], capture_output=True, text=True).stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == lib and parts[2].startswith("/"):
            return Path(parts[2])
    return None


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("xvfb-run") is None,
                    reason="hiding a system library in a private mount namespace needs root, unshare and xvfb-run")
def test_a_missing_system_library_is_named_with_the_apt_line(tmp_path):
    """Issue 14 as it happened: libxcb-cursor0 missing, Qt's xcb plugin cannot load and Qt
    aborts the process.  Here the library is hidden from this test's processes only (an
    overlay in their own mount namespace); the check names it and the package, and
    ``edgetrain gui`` explains instead of aborting."""
    lib = _resolved("libxcb-cursor.so.0")
    if lib is None:
        pytest.skip("libqxcb.so does not link libxcb-cursor.so.0 here")
    (tmp_path / "up").mkdir()
    (tmp_path / "work").mkdir()
    (tmp_path / "hide.sh").write_text(HIDE_LIBRARY)
    env = _env(QT_QPA_PLATFORM=None, WAYLAND_DISPLAY=None, UPPER=str(tmp_path / "up"), WORK=str(tmp_path / "work"),
               LIBDIR=str(lib.parent), NAME=lib.name, REAL=lib.resolve().name)
    wrap = ("unshare", "--mount", "--propagation", "private", "bash", str(tmp_path / "hide.sh"), "xvfb-run", "-a")
    out = _edgetrain(env, "gui", "--check", wrap=wrap)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAIL  libraries  libqxcb.so cannot find libxcb-cursor.so.0" in out.stdout
    assert "apt-get install -y libxcb-cursor0" in out.stdout
    gui = _edgetrain(env, "gui", wrap=wrap)
    assert gui.returncode == 2, gui.stdout + gui.stderr        # not 134: Qt's abort
    assert "libxcb-cursor0" in gui.stderr
    # the set-up script's list of packages to install
    apt = subprocess.run([*wrap[:-2], sys.executable, "-m", "app.cli.qtcheck", "--apt-packages"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert apt.stdout.split() == ["libxcb-cursor0"], apt.stderr


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="needs dpkg (Debian/Ubuntu) to check the package names")
def test_library_table_matches_the_packages_that_ship_them():
    """Every system library the xcb plugin uses here is in the table, under the package
    that dpkg says installed it: the apt line names real packages."""
    qt = qtcheck.pyside_dir() / "Qt"
    resolved: dict[str, str] = {}
    for f in qtcheck.plugin_files(qt, "xcb"):
        for line in subprocess.run(["ldd", str(f)], capture_output=True, text=True).stdout.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[1] == "=>" and parts[2].startswith("/") and "PySide6" not in parts[2]:
                resolved[parts[0]] = parts[2]
    assert "libxcb-cursor.so.0" in resolved          # the library issue 14 was about
    skip = {"libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1"}   # libc6: always there
    candidates = {lib: {path, os.path.realpath(path), path.replace("/usr/lib/", "/lib/", 1)}
                  for lib, path in resolved.items() if lib not in skip}
    # one dpkg call for every path ("pkg:arch[, pkg2:arch]: /path" per line it knows)
    out = subprocess.run(["dpkg", "-S", *sorted(set().union(*candidates.values()))], capture_output=True, text=True)
    owner_of: dict[str, set[str]] = {}
    for line in out.stdout.splitlines():
        pkgs, path = line.rsplit(": ", 1)
        owner_of.setdefault(path, set()).update(o.strip().split(":")[0] for o in pkgs.split(","))
    assert set().union(*(owner_of.get(p, set()) for p in candidates["libxcb-cursor.so.0"])) == {"libxcb-cursor0"}
    wrong = []
    for lib, paths in sorted(candidates.items()):
        owners = set().union(*(owner_of.get(p, set()) for p in paths))
        if lib not in qtcheck.LIB_PACKAGES or (owners and qtcheck.LIB_PACKAGES[lib] not in owners):
            wrong.append(f"{lib}: table {qtcheck.LIB_PACKAGES.get(lib)}, dpkg {sorted(owners)}")
    assert wrong == []


def test_apt_line_for_missing_system_libraries():
    pkgs = qtcheck.apt_packages(["libxcb-cursor.so.0", "libEGL.so.1", "libxcb-cursor.so.0", "libunknown.so.9"])
    assert pkgs == ["libegl1", "libxcb-cursor0"]
    assert qtcheck.apt_line(pkgs).endswith("apt-get install -y libegl1 libxcb-cursor0")
