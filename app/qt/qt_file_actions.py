"""File dialogs of the main window: inventory, sessions, chart exports.

The dialogs only ask for a path: opening an inventory or a session is announced with a
signal the window handles; chart exports go straight to the charts view.
"""
from __future__ import annotations

from PySide6.QtCore import QObject, Signal
from PySide6.QtWidgets import QFileDialog, QWidget

from app.paths import edgetrain_home

from .qt_charts import QtLiveCharts


class QtFileActions(QObject):
    """Asks for paths over ``parent``.

    Signals
    -------
    inventory_chosen(str)      open this inventory
    session_open_chosen(str)   restore this session
    session_save_chosen(str)   save the session here
    message(str, int)          a status-bar message and how long to show it (ms)
    """

    inventory_chosen = Signal(str)
    session_open_chosen = Signal(str)
    session_save_chosen = Signal(str)
    message = Signal(str, int)

    def __init__(self, charts: QtLiveCharts, parent: QWidget) -> None:
        super().__init__(parent)
        self.charts, self.parent_widget = charts, parent

    def ask_inventory(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self.parent_widget, "Open inventory", str(edgetrain_home()),
                                              "YAML (*.yaml *.yml)")
        if path:
            self.inventory_chosen.emit(path)

    def ask_open_session(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self.parent_widget, "Open session", str(edgetrain_home()),
                                              "Session (*.yaml *.yml)")
        if path:
            self.session_open_chosen.emit(path)

    def ask_save_session(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self.parent_widget, "Save session",
                                              str(edgetrain_home() / "session.yaml"), "Session (*.yaml *.yml)")
        if path:
            self.session_save_chosen.emit(path)

    def ask_export_png(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self.parent_widget, "Export chart", "charts.png", "PNG (*.png)")
        if path:
            self.charts.export_png(path)
            self.message.emit(f"charts saved to {path}", 4000)

    def ask_export_csv(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self.parent_widget, "Export chart data", "charts.csv", "CSV (*.csv)")
        if path:
            rows = self.charts.export_csv(path)
            self.message.emit(f"{rows} points saved to {path}", 4000)
