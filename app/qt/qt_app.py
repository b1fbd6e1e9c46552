"""Starting the GUI: the QApplication, the style, the main window."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication

from .qt_main import QtMainWindow
from .qt_style import apply_app_style


def run_gui(inventory: Path | str | None = None, session: Path | str | None = None,
            runs_dir: Path | str | None = None) -> int:
    """Open the control panel and run Qt's event loop until the window closes.

    Ctrl+C and SIGTERM close the window like its close button does: a run in progress is
    stopped and its workers killed before the process exits.
    """
    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("EdgeTrain")
    apply_app_style(app)
    window = QtMainWindow(inventory=inventory, session=session, runs_dir=runs_dir)
    window.show()
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


def has_display() -> bool:
    """Whether a window can open (a display, or an explicit Qt platform)."""
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
                or os.environ.get("QT_QPA_PLATFORM"))
