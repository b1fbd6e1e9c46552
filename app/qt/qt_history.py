"""Run history: past runs from the runs directory, reopened as charts from their records."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QPushButton,
    QSplitter,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from app.workspace.history import RunInfo, iter_telemetry, list_runs, load_record
from app.workspace.series import SeriesStore, record_points

from .qt_charts import QtLiveCharts
from .qt_runviews import QtEventLog, QtRunSummary
from .qt_style import STATUS_COLOURS, device_colour

MARKER_KINDS = ("oom", "failure", "error")


def plan_references(plan: dict[str, Any] | None) -> list[tuple[str, dict[str, float | None]]]:
    """Per-device predicted chart values of a plan (the planner's plan JSON), as the charts plot them."""
    out: list[tuple[str, dict[str, float | None]]] = []
    plan = plan or {}
    batch = (plan.get("settings") or {}).get("batch_size") or 0
    for p in plan.get("predictions") or []:
        step = p.get("step_s")
        out.append((p["name"], {"latency": p.get("latency_per_sample_s"),
                                "energy": p.get("energy_per_sample_j"), "memory": p.get("peak_rss_bytes"),
                                "throughput": batch / step if batch and step else None}))
    return out


def apply_plan_references(charts: QtLiveCharts, plan: dict[str, Any] | None) -> None:
    """Draw a saved or live plan's predictions as dashed reference lines."""
    charts.clear_references()
    for name, v in plan_references(plan):
        charts.set_reference("latency", name, v["latency"] * 1e3 if v["latency"] else None)
        charts.set_reference("energy", name, v["energy"])
        charts.set_reference("memory", name, v["memory"] / 2**20 if v["memory"] else None)
        charts.set_reference("throughput", name, v["throughput"])


class QtRunViewer(QWidget):
    """A past run: its charts (from ``telemetry.jsonl``), summary and events, with exports."""

    def __init__(self, run_dir: Path | str, parent: QWidget | None = None) -> None:
        super().__init__(parent, Qt.Window)
        self.run_dir = Path(run_dir)
        self.record = load_record(self.run_dir)
        self.setWindowTitle(f"EdgeTrain — run {self.record.get('run_id', self.run_dir.name)}")
        records = list(iter_telemetry(self.run_dir))
        t0 = float(self.record.get("started") or (records[0]["t"] if records else 0.0))
        self.store = SeriesStore(capacity=max(4096, len(records) + 1))
        names = [d.get("device") for d in (self.record.get("summary") or {}).get("devices", [])]
        self.charts = QtLiveCharts(self.store, colour_of=lambda n: device_colour(names.index(n) if n in names else 0),
                                   live=False, parent=self)
        for rec in records:
            for series, dev, x, y in record_points(rec, t0):
                self.store.append(series, dev, x, y)
        self.events = QtEventLog(self)
        for ev in self.record.get("events") or []:
            self.events.add_event(ev)
            if ev.get("kind") in MARKER_KINDS:
                self.charts.add_marker(float(ev.get("t", t0)) - t0, ev["kind"], ev.get("device"), ev.get("message", ""))
        self.summary = QtRunSummary(self)
        if self.record.get("summary"):
            self.summary.show_summary(self.record["summary"])
        apply_plan_references(self.charts, self.record.get("plan"))
        self.charts.repaint_now()
        png, csv_ = QPushButton("Export chart PNG…", self), QPushButton("Export data CSV…", self)
        png.clicked.connect(self._export_png)
        csv_.clicked.connect(self._export_csv)
        bar = QHBoxLayout()
        bar.addStretch(1)
        bar.addWidget(png)
        bar.addWidget(csv_)
        tabs = QTabWidget(self)
        tabs.addTab(self.summary, "Summary")
        tabs.addTab(self.events, "Events")
        split = QSplitter(Qt.Vertical, self)
        split.addWidget(self.charts)
        split.addWidget(tabs)
        split.setSizes([500, 220])
        lay = QVBoxLayout(self)
        lay.addWidget(split, 1)
        lay.addLayout(bar)
        self.resize(1100, 800)

    def _export_png(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export chart", f"{self.run_dir.name}.png", "PNG (*.png)")
        if path:
            self.charts.export_png(path)

    def _export_csv(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export data", f"{self.run_dir.name}.csv", "CSV (*.csv)")
        if path:
            self.charts.export_csv(path)


class QtRunHistory(QWidget):
    """The runs directory's past runs, newest first; double-click (or Open) reopens one,
    Resume continues one from its last complete checkpoint."""

    open_requested = Signal(str)
    resume_requested = Signal(str)   # a run id

    def __init__(self, runs_dir: Callable[[], Path], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._runs_dir = runs_dir
        self.list = QListWidget(self)
        self.list.itemDoubleClicked.connect(lambda item: self.open_requested.emit(item.data(Qt.UserRole)))
        refresh, open_ = QPushButton("Refresh", self), QPushButton("Open charts", self)
        self.resume_button = QPushButton("Resume", self)
        self.resume_button.setToolTip("Continue the selected run from its last complete checkpoint, "
                                      "on the ticked devices (or its own)")
        refresh.clicked.connect(self.refresh)
        open_.clicked.connect(self._open_selected)
        self.resume_button.clicked.connect(self._resume_selected)
        bar = QHBoxLayout()
        bar.addWidget(refresh)
        bar.addWidget(open_)
        bar.addWidget(self.resume_button)
        bar.addStretch(1)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.list, 1)
        lay.addLayout(bar)
        self.runs: list[RunInfo] = []
        self.refresh()

    def refresh(self) -> None:
        self.runs = list_runs(self._runs_dir())
        self.list.clear()
        for info in self.runs:
            item = QListWidgetItem(f"{info.run_id}   {info.label}")
            item.setData(Qt.UserRole, str(info.path))
            item.setForeground(STATUS_COLOURS.get(info.outcome or "", QColor("#495057")))
            self.list.addItem(item)

    def _open_selected(self) -> None:
        item = self.list.currentItem()
        if item is None:
            QMessageBox.information(self, "Run history", "Select a run first.")
            return
        self.open_requested.emit(item.data(Qt.UserRole))

    def _resume_selected(self) -> None:
        item = self.list.currentItem()
        if item is None:
            QMessageBox.information(self, "Run history", "Select a run to resume first.")
            return
        self.resume_requested.emit(Path(item.data(Qt.UserRole)).name)
