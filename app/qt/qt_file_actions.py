"""File dialogs of the main window: inventory, sessions, chart exports."""
from __future__ import annotations

from typing import TYPE_CHECKING

from PySide6.QtCore import QObject
from PySide6.QtWidgets import QFileDialog

from app.core.jobs import edgetrain_home

if TYPE_CHECKING:
    from .qt_main import QtMainWindow


class QtFileActions(QObject):
    """Asks for a path, then calls the window (which does the work and reports errors)."""

    def __init__(self, window: QtMainWindow) -> None:
        super().__init__(window)
        self.w = window

    def ask_inventory(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self.w, "Open inventory", str(edgetrain_home()),
                                              "YAML (*.yaml *.yml)")
        if path:
            self.w.load_inventory(path)

    def ask_open_session(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self.w, "Open session", str(edgetrain_home()),
                                              "Session (*.yaml *.yml)")
        if path:
            self.w.open_session(path)

    def ask_save_session(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self.w, "Save session", str(edgetrain_home() / "session.yaml"),
                                              "Session (*.yaml *.yml)")
        if path:
            self.w.save_session(path)
            self.w.statusBar().showMessage(f"session saved to {path}", 4000)

    def ask_export_png(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self.w, "Export chart", "charts.png", "PNG (*.png)")
        if path:
            self.w.charts.export_png(path)
            self.w.statusBar().showMessage(f"charts saved to {path}", 4000)

    def ask_export_csv(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self.w, "Export chart data", "charts.csv", "CSV (*.csv)")
        if path:
            rows = self.w.charts.export_csv(path)
            self.w.statusBar().showMessage(f"{rows} points saved to {path}", 4000)
