"""Starting the GUI: the QApplication, the style, the icon, the main window."""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import psutil
from PySide6.QtCore import QSize, QTimer, qVersion
from PySide6.QtGui import QIcon
from PySide6.QtWidgets import QApplication

from app.paths import asset_path

from .qt_main import QtMainWindow
from .qt_prefs import apply_theme, saved_theme, session_to_restore
from .qt_style import apply_app_style

#: Set to a number of seconds: print one line once the main window is on screen, keep it
#: that long, then close (the packaging checks' proof that the window appears).
SMOKE_ENV = "EDGETRAIN_SMOKE"
ICON_SIZES = (48, 128, 256)


def app_icon() -> QIcon:
    """EdgeTrain's icon (``assets/edgetrain-<size>.png``); empty if the assets are missing."""
    icon = QIcon()
    for size in ICON_SIZES:
        path = asset_path(f"edgetrain-{size}.png")
        if path is not None:
            icon.addFile(str(path), QSize(size, size))
    return icon


def _application() -> QApplication:
    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("EdgeTrain")
    # lets a Wayland compositor or a dock match the window to edgetrain.desktop
    app.setDesktopFileName("edgetrain")
    app.setWindowIcon(app_icon())
    return app


def probe_platform() -> str:
    """Start Qt without opening a window; what it started on (``gui --check``'s last step)."""
    app = _application()
    screen = app.primaryScreen()
    size = f", screen {screen.size().width()}x{screen.size().height()}" if screen is not None else ""
    return f"platform {app.platformName()}{size}, Qt {qVersion()}"


def seconds_since_process_start() -> float:
    """How long this process has run: its start time (``/proc/self/stat``, in clock ticks
    since boot) against the boot-time clock, to 10 ms; elsewhere psutil's, to ~1 s."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, AttributeError, ValueError, IndexError):
        return time.time() - psutil.Process().create_time()


def _watch_for_smoke(app: QApplication, window: QtMainWindow, hold_s: float) -> QTimer:
    """Print when ``window`` is exposed on the display, then close it after ``hold_s``."""
    timer = QTimer(window)

    def tick() -> None:
        handle = window.windowHandle()
        if handle is None or not handle.isExposed():
            return
        timer.stop()
        startup = seconds_since_process_start()
        # CPU time too: wall time on a loaded machine says more about the load than the app
        print(f"{SMOKE_ENV} window shown: platform={app.platformName()} title={window.windowTitle()!r} "
              f"startup_s={startup:.2f} cpu_s={time.process_time():.2f}", flush=True)
        QTimer.singleShot(int(hold_s * 1000), window.close)

    timer.timeout.connect(tick)
    timer.start(10)
    return timer


def run_gui(inventory: Path | str | None = None, session: Path | str | None = None,
            runs_dir: Path | str | None = None) -> int:
    """Open the control panel and run Qt's event loop until the window closes.

    Ctrl+C and SIGTERM close the window like its close button does: a run in progress is
    stopped and its workers killed before the process exits.
    """
    app = _application()
    apply_app_style(app)
    apply_theme(app, saved_theme())
    # no inventory or session asked for: the last session, as the window was closed
    window = QtMainWindow(inventory=inventory, session=session_to_restore(inventory, session), runs_dir=runs_dir)
    window.show()
    smoke = os.environ.get(SMOKE_ENV, "")
    if smoke:
        # the timer's parent is the window: it lives as long as the window does
        _watch_for_smoke(app, window, float(smoke) if smoke.replace(".", "", 1).isdigit() else 0.0)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: window.close())
    # Python runs signal handlers only between bytecodes: wake the interpreter now and then
    # while Qt's C++ event loop has the main thread
    wake = QTimer()
    wake.timeout.connect(lambda: None)
    wake.start(250)
    try:
        return app.exec()
    finally:
        wake.stop()
        if not window.closed:
            window.close()
