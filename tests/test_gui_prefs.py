"""What the control panel remembers: layout, theme and the last session, in $EDGETRAIN_HOME."""
from __future__ import annotations

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pyqtgraph")

from PySide6.QtCore import Qt  # noqa: E402
from PySide6.QtGui import QPalette  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from app.qt.qt_prefs import (  # noqa: E402
    Theme,
    apply_theme,
    last_session_path,
    saved_theme,
    session_to_restore,
    settings_path,
    system_is_dark,
)
from tests.qtleaks import no_leaks  # noqa: E402,F401 -- autouse fixture
from tests.test_gui_panels import close_window, open_window, write_inventory  # noqa: E402

pytestmark = pytest.mark.gui


def _is_dark() -> bool:
    return QApplication.instance().palette().color(QPalette.Window).lightness() < 128


def test_layout_theme_and_last_session_survive_a_restart(qtbot, tmp_path):
    inv = write_inventory(tmp_path / "inv.yaml", 3)
    w = open_window(qtbot, tmp_path, inv)
    try:
        w.toggle_participant("dev2", True)
        w.toggle_participant("dev0", True)
        w.removeDockWidget(w.config_dock)             # the user moved the config dock left
        w.addDockWidget(Qt.LeftDockWidgetArea, w.config_dock)
        w.config_dock.show()
        w.prefs.theme_actions[Theme.DARK].trigger()   # View > Theme > Dark
        assert _is_dark()
        assert w.dockWidgetArea(w.config_dock) == Qt.LeftDockWidgetArea
    finally:
        close_window(w)
    assert settings_path().is_file() and last_session_path().is_file()
    assert saved_theme() is Theme.DARK

    # a plain start (no inventory, no session) reopens the last session
    assert session_to_restore(None, None) == last_session_path()
    assert session_to_restore(inv, None) is None          # an explicit inventory wins
    apply_theme(QApplication.instance(), Theme.LIGHT)
    w2 = open_window(qtbot, tmp_path, None, session=session_to_restore(None, None))
    try:
        assert w2.workspace.topology.participants == ["dev2", "dev0"]
        assert w2.dockWidgetArea(w2.config_dock) == Qt.LeftDockWidgetArea
        assert w2.prefs.theme is Theme.DARK and w2.prefs.theme_actions[Theme.DARK].isChecked()
        w2.prefs.theme_actions[Theme.SYSTEM].trigger()
        assert _is_dark() == system_is_dark()             # offscreen: the platform says "unknown" -> light
    finally:
        close_window(w2)
        apply_theme(QApplication.instance(), Theme.LIGHT)
    assert saved_theme() is Theme.SYSTEM


def test_a_corrupt_settings_file_is_ignored(qtbot, tmp_path):
    settings_path().parent.mkdir(parents=True, exist_ok=True)
    settings_path().write_bytes(b"\xff\xfe[General]\ngeometry=@ByteArray(garbage)\ntheme=purple\nlayout_version=3\n")
    assert saved_theme() is Theme.SYSTEM
    w = open_window(qtbot, tmp_path, write_inventory(tmp_path / "inv.yaml", 1))
    try:
        assert w.prefs.restore_layout() is False       # unusable geometry: the default layout stays
        assert w.dockWidgetArea(w.config_dock) == Qt.RightDockWidgetArea
    finally:
        close_window(w)


def test_gui_opens_a_running_testbed_not_a_stopped_ones(tmp_path):
    from app.cli.flags import testbed_inventory
    from app.cli.gui import start_inventory
    from app.cli.main import build_parser

    stale = testbed_inventory()               # a testbed that ran once and was stopped
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text("version: 1\ndevices: []\n")
    assert start_inventory(build_parser().parse_args(["gui"])) is None
    assert start_inventory(build_parser().parse_args(["gui", "--inventory", "x.yaml"])) == "x.yaml"
