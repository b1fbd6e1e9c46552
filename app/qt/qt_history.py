"""Run history: past runs from the runs directory, reopened as charts from their records,
compared side by side, run again, resumed, or their trained model exported."""
from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from PySide6.QtCore import QEvent, QObject, Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QGridLayout,
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

from app.workspace.compare import CompareError
from app.workspace.history import (
    Exported,
    ResumeError,
    RunInfo,
    export_run_model,
    export_target,
    export_unavailable,
    iter_telemetry,
    list_runs,
    load_record,
    rerun_of,
)
from app.workspace.series import SeriesStore, record_points

from .qt_charts import QtLiveCharts
from .qt_compare import QtCompareView
from .qt_runviews import QtEventLog, QtRunSummary
from .qt_style import STATUS_COLOURS, device_colour

if TYPE_CHECKING:
    from .qt_main import QtMainWindow

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
    """The runs directory's past runs, newest first.

    Double-click (or Open) reopens one; select two or more (Ctrl/Shift-click) to Compare
    them; Re-run starts a new run with one's settings on its devices, Resume continues it
    from its last complete checkpoint, Export model… writes its trained model to a
    directory.  The actions are signals; :class:`QtHistoryActions` carries them out.
    """

    open_requested = Signal(str)      # a run's record directory
    resume_requested = Signal(str)    # a run id
    rerun_requested = Signal(str)     # a run id
    export_requested = Signal(str)    # a run id
    compare_requested = Signal(list)  # record directories, oldest first

    def __init__(self, runs_dir: Callable[[], Path], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._runs_dir = runs_dir
        self.list = QListWidget(self)
        self.list.setSelectionMode(QAbstractItemView.ExtendedSelection)
        self.list.itemDoubleClicked.connect(lambda item: self.open_requested.emit(item.data(Qt.UserRole)))
        self.list.itemSelectionChanged.connect(self._update_buttons)
        refresh, self.open_button = QPushButton("Refresh", self), QPushButton("Open charts", self)
        self.compare_button = QPushButton("Compare", self)
        self.compare_button.setToolTip("Overlay the selected runs' charts and tabulate them side by side "
                                       "(select two or more with Ctrl- or Shift-click)")
        self.rerun_button = QPushButton("Re-run", self)
        self.rerun_button.setToolTip("Start a new run with the selected run's settings on its devices")
        self.resume_button = QPushButton("Resume", self)
        self.resume_button.setToolTip("Continue the selected run from its last complete checkpoint, "
                                      "on the ticked devices (or its own)")
        self.export_button = QPushButton("Export model…", self)
        self.export_why = export_unavailable()   # None: this machine can export
        self.export_button.setToolTip(self.export_why or "Write the selected run's trained model (its newest "
                                      "complete checkpoint) to a directory as a Hugging Face model")
        refresh.clicked.connect(self.refresh)
        self.open_button.clicked.connect(self._open_selected)
        self.compare_button.clicked.connect(self._compare_selected)
        self.rerun_button.clicked.connect(lambda: self._one("rerun", self.rerun_requested))
        self.resume_button.clicked.connect(lambda: self._one("resume", self.resume_requested))
        self.export_button.clicked.connect(lambda: self._one("export", self.export_requested))
        # two rows of three: one row of six made the Run dock (and so the window's right
        # column) too wide for the charts beside it
        bar = QGridLayout()
        for i, b in enumerate((refresh, self.open_button, self.compare_button, self.rerun_button,
                               self.resume_button, self.export_button)):
            bar.addWidget(b, i // 3, i % 3)
        bar.setColumnStretch(3, 1)
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
        self._update_buttons()

    def selected_paths(self) -> list[str]:
        """The selected runs' record directories, in list order (newest first)."""
        return [self.list.item(i).data(Qt.UserRole) for i in range(self.list.count())
                if self.list.item(i).isSelected()]

    def select(self, run_ids: list[str]) -> None:
        """Select exactly these runs (the others are deselected)."""
        for i, info in enumerate(self.runs):
            self.list.item(i).setSelected(info.run_id in run_ids)

    def _update_buttons(self) -> None:
        n = len(self.selected_paths())
        self.compare_button.setEnabled(n >= 2)
        for b in (self.open_button, self.rerun_button, self.resume_button):
            b.setEnabled(n == 1)
        self.export_button.setEnabled(n == 1 and self.export_why is None)

    def _open_selected(self) -> None:
        paths = self.selected_paths()
        if len(paths) != 1:
            QMessageBox.information(self, "Run history", "Select one run first.")
            return
        self.open_requested.emit(paths[0])

    def _compare_selected(self) -> None:
        paths = self.selected_paths()
        if len(paths) < 2:
            QMessageBox.information(self, "Run history", "Select two or more runs to compare "
                                                         "(Ctrl- or Shift-click).")
            return
        self.compare_requested.emit(paths[::-1])   # oldest first: the columns read as the runs happened

    def _one(self, what: str, signal: Signal) -> None:
        paths = self.selected_paths()
        if len(paths) != 1:
            QMessageBox.information(self, "Run history", f"Select one run to {what} first.")
            return
        signal.emit(Path(paths[0]).name)


class QtHistoryActions(QObject):
    """The main window's side of the history: compare windows, re-run and model export.

    Re-run puts the run's settings in the run form and its devices, in rank order, on the
    canvas, then launches as the Launch button does (same plan preview, same record).
    Export runs on the window's asyncio thread and reports in the status bar.  The compare
    windows close with the main window.
    """

    def __init__(self, window: QtMainWindow) -> None:
        super().__init__(window)
        self.window = window
        self.compare_views: list[QtCompareView] = []
        self.exports: list[Exported] = []
        self._export: concurrent.futures.Future | None = None
        h = window.history
        h.compare_requested.connect(self.compare)
        h.rerun_requested.connect(self.rerun)
        h.export_requested.connect(self.ask_export)
        window.installEventFilter(self)

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt API
        if obj is self.window and event.type() == QEvent.Close:
            self.close()
        return False

    def compare(self, run_dirs: list[str]) -> QtCompareView | None:
        try:
            view = QtCompareView(run_dirs)
        except CompareError as exc:
            QMessageBox.warning(self.window, "Compare runs", str(exc))
            return None
        view.setAttribute(Qt.WA_DeleteOnClose)
        view.destroyed.connect(lambda _=None, v=view: self.compare_views.remove(v) if v in self.compare_views
                               else None)
        self.compare_views.append(view)
        view.show()
        return view

    def rerun(self, run_id: str) -> bool:
        """Launch a new run like ``run_id``; ``False`` (with a message) when it cannot start."""
        w = self.window
        if w.run.running:
            QMessageBox.information(w, "Re-run", "A run is in progress; stop it first.")
            return False
        try:
            again = rerun_of(w.workspace.runs_dir, run_id)
        except ResumeError as exc:  # names the record file and the fix
            QMessageBox.warning(w, "Re-run", str(exc))
            return False
        missing = [n for n in again.devices if w.workspace.devices.get(n) is None]
        if missing:
            QMessageBox.warning(w, "Re-run", f"device(s) {', '.join(missing)} of run {run_id} are not in the "
                                             "device list. Fix: open the inventory that has them (File → "
                                             "Open inventory…)")
            return False
        if w.workspace.topology.participants != again.devices:
            w.workspace.topology.set_participants(again.devices)
            w.undo.clear()   # the undo history was about the participants just replaced
        w.run_config.set_settings(again.settings)
        w.launch()
        if w.run.running:
            w.statusBar().showMessage(f"re-running {run_id} as {w.run.state.run_id}", 8000)
        return w.run.running

    def ask_export(self, run_id: str) -> None:
        chosen = QFileDialog.getExistingDirectory(self.window, f"Export the trained model of {run_id} to")
        if chosen:
            self.export(run_id, export_target(chosen, run_id))

    def export(self, run_id: str, out_dir: Path) -> concurrent.futures.Future | None:
        """Export ``run_id``'s model to ``out_dir`` on the asyncio thread (one at a time)."""
        w = self.window
        if self._export is not None and not self._export.done():
            QMessageBox.information(w, "Export model", "An export is in progress; wait for it to end.")
            return None
        w.statusBar().showMessage(f"exporting the model of {run_id} to {out_dir}…")
        self._export = fut = w.loop.submit(export_run_model(w.workspace.runs_dir, run_id, out_dir))
        w.futures.watch(fut, self._exported)
        return fut

    def _exported(self, fut: concurrent.futures.Future) -> None:
        try:
            done = fut.result()
        except Exception as exc:  # noqa: BLE001 - ResumeError, SSH errors: the message says what to do
            self.window.statusBar().showMessage("export failed", 8000)
            QMessageBox.warning(self.window, "Export model", str(exc))
            return
        self.exports.append(done)
        self.window.statusBar().showMessage(f"run {done.run_id}: model of step {done.step} ({done.kind} "
                                            f"checkpoint) exported to {done.out_dir}", 15000)

    def close(self) -> None:
        for v in list(self.compare_views):
            v.close()
