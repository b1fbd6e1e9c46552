"""Can Qt start here?  ``edgetrain gui --check`` and the set-up script's library list.

Qt aborts the whole process (``could not load the Qt platform plugin "xcb"``) when its
platform plugin lacks a system library or finds no display, so these checks look from
outside first: whether PySide6 is installed (without importing it), which libraries
``ldd`` cannot find for the platform plugin and the Qt libraries the GUI loads, and
whether the platform has a display to talk to.  Only when they pass does
:func:`probe_qt` start a ``QGuiApplication`` (no window), in a child process, so an
abort there is reported instead of ending this one.

``python -m app.cli.qtcheck --apt-packages`` prints the Debian/Ubuntu packages that
would provide the missing libraries (``packaging/setup.sh`` installs them as root).
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

GUI_PACKAGES = ("PySide6", "pyqtgraph")
GUI_EXTRA_FIX = "pip install 'edgetrain[gui]'"
XVFB_FIX = "run under xvfb-run (a virtual X display): xvfb-run -a edgetrain gui"

#: The Debian/Ubuntu package of each system library that PySide6's platform plugin and
#: Qt libraries link against (from ``ldd`` and ``dpkg -S`` on Debian 12; the same names on
#: Ubuntu 22.04+, where apt picks the t64 package for a renamed one).
LIB_PACKAGES: dict[str, str] = {
    "libGL.so.1": "libgl1", "libEGL.so.1": "libegl1", "libGLX.so.0": "libglx0",
    "libGLdispatch.so.0": "libglvnd0", "libOpenGL.so.0": "libopengl0",
    "libxkbcommon.so.0": "libxkbcommon0", "libxkbcommon-x11.so.0": "libxkbcommon-x11-0",
    "libxcb.so.1": "libxcb1", "libxcb-cursor.so.0": "libxcb-cursor0", "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-util.so.1": "libxcb-util1", "libxcb-image.so.0": "libxcb-image0",
    "libxcb-keysyms.so.1": "libxcb-keysyms1", "libxcb-randr.so.0": "libxcb-randr0",
    "libxcb-render-util.so.0": "libxcb-render-util0", "libxcb-render.so.0": "libxcb-render0",
    "libxcb-shm.so.0": "libxcb-shm0", "libxcb-sync.so.1": "libxcb-sync1", "libxcb-xfixes.so.0": "libxcb-xfixes0",
    "libxcb-shape.so.0": "libxcb-shape0", "libxcb-xkb.so.1": "libxcb-xkb1", "libxcb-xinerama.so.0": "libxcb-xinerama0",
    "libxcb-glx.so.0": "libxcb-glx0", "libxcb-xinput.so.0": "libxcb-xinput0",
    "libX11.so.6": "libx11-6", "libX11-xcb.so.1": "libx11-xcb1", "libXau.so.6": "libxau6",
    "libXdmcp.so.6": "libxdmcp6", "libfontconfig.so.1": "libfontconfig1", "libfreetype.so.6": "libfreetype6",
    "libdbus-1.so.3": "libdbus-1-3", "libglib-2.0.so.0": "libglib2.0-0", "libgthread-2.0.so.0": "libglib2.0-0",
    "libpng16.so.16": "libpng16-16", "libexpat.so.1": "libexpat1", "libz.so.1": "zlib1g",
    "libzstd.so.1": "libzstd1", "libbrotlidec.so.1": "libbrotli1", "libbrotlicommon.so.1": "libbrotli1",
    "libpcre2-8.so.0": "libpcre2-8-0", "libbsd.so.0": "libbsd0", "libmd.so.0": "libmd0",
    "libsystemd.so.0": "libsystemd0", "libcap.so.2": "libcap2", "libgcrypt.so.20": "libgcrypt20",
    "libgpg-error.so.0": "libgpg-error0", "liblzma.so.5": "liblzma5", "liblz4.so.1": "liblz4-1",
    "libstdc++.so.6": "libstdc++6", "libgcc_s.so.1": "libgcc-s1",
    "libwayland-client.so.0": "libwayland-client0", "libwayland-cursor.so.0": "libwayland-cursor0",
    "libwayland-egl.so.1": "libwayland-egl1",
}
#: Qt libraries the GUI loads besides the platform plugin (Core, Gui, Widgets, Svg).
QT_LIBS = ("libQt6Core.so.6", "libQt6Gui.so.6", "libQt6Widgets.so.6", "libQt6Svg.so.6")
_NOT_FOUND = re.compile(r"^\s*(\S+)\s+=>\s+not found", re.M)


@dataclass(frozen=True)
class Finding:
    """One thing checked: what was found and, when it is a problem, the fix."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


def pyside_dir() -> Path | None:
    """PySide6's package folder, found without importing it (an import can abort)."""
    try:
        spec = importlib.util.find_spec("PySide6")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def platform_name(env: Mapping[str, str]) -> str:
    """The Qt platform plugin a start would use: ``QT_QPA_PLATFORM``'s first choice, else
    Qt's default on Linux (Wayland in a Wayland session without X, otherwise xcb)."""
    chosen = (env.get("QT_QPA_PLATFORM") or "").split(";")[0].split(":")[0].strip()
    if chosen:
        return chosen
    if env.get("WAYLAND_DISPLAY") and not env.get("DISPLAY"):
        return "wayland"
    return "xcb"


def missing_libraries(files: list[Path]) -> list[str]:
    """Libraries ``ldd`` reports as not found for any of ``files`` (sorted, no repeats)."""
    missing: set[str] = set()
    for f in files:
        if not f.is_file():
            continue
        out = subprocess.run(["ldd", str(f)], capture_output=True, text=True, timeout=30)
        missing.update(_NOT_FOUND.findall(out.stdout))
    return sorted(missing)


def apt_packages(missing: list[str]) -> list[str]:
    """The Debian/Ubuntu packages that provide ``missing`` system libraries (known ones)."""
    return sorted({LIB_PACKAGES[lib] for lib in missing if lib in LIB_PACKAGES})


def apt_line(packages: list[str]) -> str:
    """The command a user runs to install ``packages`` (``sudo`` unless root)."""
    sudo = "" if os.geteuid() == 0 else "sudo "
    return f"{sudo}apt-get install -y {' '.join(packages)}"


def plugin_files(qt_dir: Path, platform: str) -> list[Path]:
    """The platform plugin and the Qt libraries whose dependencies must all resolve."""
    return [qt_dir / "plugins" / "platforms" / f"libq{platform}.so"] + [qt_dir / "lib" / n for n in QT_LIBS]


def library_finding(qt_dir: Path, platform: str) -> Finding:
    """Whether every library of the platform plugin (and Qt's own) is found."""
    files = plugin_files(qt_dir, platform)
    if not files[0].is_file():
        return Finding("libraries", False, f"PySide6 has no '{platform}' platform plugin ({files[0]})",
                       "set QT_QPA_PLATFORM to xcb, wayland or offscreen")
    if shutil.which("ldd") is None:
        return Finding("libraries", True, "ldd is not available: the plugin's libraries were not checked")
    missing = missing_libraries(files)
    if not missing:
        return Finding("libraries", True, f"{files[0].name} and the Qt libraries find every library they need")
    qt_own = [m for m in missing if m.startswith(("libQt6", "libpyside6", "libshiboken6"))]
    system = [m for m in missing if m not in qt_own]
    fixes = []
    if qt_own:
        fixes.append("PySide6 is incomplete: pip install --force-reinstall 'edgetrain[gui]'")
    pkgs = apt_packages(system)
    if pkgs:
        fixes.append(apt_line(pkgs))
    unknown = [m for m in system if m not in LIB_PACKAGES]
    if unknown:
        fixes.append(f"install the system packages that provide {', '.join(unknown)}")
    return Finding("libraries", False, f"{files[0].name} cannot find {', '.join(missing)}", "; ".join(fixes))


def _x_server_answers(display: str, timeout: float = 1.0) -> bool:
    """Whether an X server listens at ``display`` (``:N``, ``host:N``, ``unix/:N``)."""
    m = re.match(r"^(?:unix/)?([^:]*):(\d+)(?:\.\d+)?$", display)
    if not m:
        return False
    host, num = m.group(1), int(m.group(2))
    if host not in ("", "unix"):
        try:
            socket.create_connection((host, 6000 + num), timeout=timeout).close()
        except OSError:
            return False
        return True
    # a local server listens on a socket file, an abstract socket of the same name, or both
    for address in (f"/tmp/.X11-unix/X{num}", f"\0/tmp/.X11-unix/X{num}"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            try:
                s.connect(address)
            except OSError:
                continue
            return True
    return False


def display_finding(env: Mapping[str, str], platform: str) -> Finding:
    """Whether the chosen platform has a display (offscreen and friends need none)."""
    if platform == "xcb":
        display = env.get("DISPLAY", "")
        if not display:
            return Finding("display", False, "no display: DISPLAY is not set, and the xcb platform needs an X server",
                           f"{XVFB_FIX}; or, for no window at all, QT_QPA_PLATFORM=offscreen")
        if not _x_server_answers(display):
            return Finding("display", False, f"DISPLAY={display}, but no X server answers there",
                           f"start the X session, fix DISPLAY, or {XVFB_FIX}")
        return Finding("display", True, f"X server at DISPLAY={display}")
    if platform == "wayland":
        if not env.get("WAYLAND_DISPLAY"):
            return Finding("display", False, "no display: WAYLAND_DISPLAY is not set, and the wayland platform needs a compositor",
                           f"log in to a Wayland session, or unset QT_QPA_PLATFORM and {XVFB_FIX}")
        return Finding("display", True, f"Wayland compositor WAYLAND_DISPLAY={env['WAYLAND_DISPLAY']}")
    return Finding("display", True, f"the {platform} platform needs no display")


def package_finding() -> Finding:
    """Whether the GUI extra is installed (found, not imported)."""
    missing = []
    for mod in GUI_PACKAGES:
        try:
            if importlib.util.find_spec(mod) is None:
                missing.append(mod)
        except (ImportError, ValueError):
            missing.append(mod)
    if missing:
        return Finding("packages", False, f"{' and '.join(missing)} not installed", GUI_EXTRA_FIX)
    return Finding("packages", True, "PySide6 and pyqtgraph are installed")


def self_command() -> list[str]:
    """How to run ``edgetrain`` again as a child: the bundle's executable, or this Python."""
    if getattr(sys, "frozen", False):
        return [sys.executable]
    return [sys.executable, "-m", "app.cli"]


def probe_qt(env: Mapping[str, str], timeout: float = 60.0) -> Finding:
    """Start a ``QGuiApplication`` (no window) in a child process: the final word."""
    root = str(Path(__file__).resolve().parents[2])
    child_env = dict(env)
    # the child imports ``app`` from this source tree even when it is not installed
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(self_command() + ["gui", "--qt-probe"], env=child_env, cwd=root,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Finding("qt-start", False, f"starting Qt did not finish in {timeout:.0f} s",
                       "check the display (a remote X server can hang)")
    took = time.monotonic() - t0
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    if proc.returncode == 0 and lines and lines[-1].startswith("qt-probe ok"):
        return Finding("qt-start", True, f"Qt started ({lines[-1].removeprefix('qt-probe ok ')}) in {took:.1f} s")
    why = next((ln for ln in lines if "could not" in ln.lower() or "error" in ln.lower()),
               lines[-1] if lines else f"exit status {proc.returncode}")
    return Finding("qt-start", False, f"Qt did not start: {why.strip()}",
                   f"run with QT_DEBUG_PLUGINS=1 for details; {GUI_EXTRA_FIX}")


def diagnose(env: Mapping[str, str] | None = None, probe: bool = True) -> list[Finding]:
    """Everything that decides whether the GUI can start, in order; stops at the first
    missing piece that makes the later checks meaningless."""
    env = os.environ if env is None else env
    findings = [package_finding()]
    qt_dir = pyside_dir()
    if not findings[0].ok or qt_dir is None:
        return findings
    platform = platform_name(env)
    findings.append(Finding("platform", True, f"Qt platform '{platform}' "
                            + ("(QT_QPA_PLATFORM)" if env.get("QT_QPA_PLATFORM") else "(Qt's default here)")))
    findings.append(library_finding(qt_dir / "Qt", platform))
    findings.append(display_finding(env, platform))
    if probe and all(f.ok for f in findings):
        findings.append(probe_qt(env))
    return findings


def print_findings(findings: list[Finding], out=None) -> None:
    """One line per finding, its fix below it; then the verdict."""
    out = out or sys.stdout
    for f in findings:
        print(f"{'ok  ' if f.ok else 'FAIL'}  {f.name:<10} {f.detail}", file=out)
        if f.fix and not f.ok:
            print(f"      {'':<10} fix: {f.fix}", file=out)
    if all(f.ok for f in findings):
        print("Qt can start: edgetrain gui will open its window.", file=out)
    else:
        print("Qt cannot start yet: apply the fixes above.", file=out)


def missing_apt_packages() -> list[str]:
    """Packages to install so the xcb platform (the desktop default) finds its libraries."""
    qt_dir = pyside_dir()
    if qt_dir is None or shutil.which("ldd") is None:
        return []
    return apt_packages(missing_libraries(plugin_files(qt_dir / "Qt", "xcb")))


def main(argv: list[str] | None = None) -> int:
    """``python -m app.cli.qtcheck [--apt-packages]``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--apt-packages"]:
        print(" ".join(missing_apt_packages()))
        return 0
    findings = diagnose()
    print_findings(findings)
    return 0 if all(f.ok for f in findings) else 1


if __name__ == "__main__":
    sys.exit(main())
