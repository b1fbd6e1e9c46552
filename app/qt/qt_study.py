"""The Study window: the paper's case study (every model × parallelism) from the control panel.

:class:`QtStudyWindow` views an :class:`~app.workspace.study.Study`: the user ticks models
and parallelisms, presses *Run study*, and the sweep runs on the window's asyncio thread
over the participants.  Each finished cell arrives as a queued signal of plain data (the
cell as a dict, the figure so far as SVG text): the progress bar, the table and the figure
update on the GUI thread.  *Stop* ends the running cell at its next step and skips the rest.
"""
from __future__ import annotations

import concurrent.futures
import logging
from typing import TYPE_CHECKING, Any, Sequence

from PySide6.QtCore import QByteArray, QObject, QRectF, QSize, Qt, Signal
from PySide6.QtGui import QAction, QColor, QPainter, QPaintEvent
from PySide6.QtSvg import QSvgRenderer
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.workspace.study import (
    DEFAULT_MODELS,
    DEFAULT_PARALLELISMS,
    MODELS,
    STUDY_PARALLELISMS,
    Study,
    StudyProgress,
    StudyResult,
)
from workers.config import RunSettings

from .qt_style import STATUS_COLOURS

if TYPE_CHECKING:
    from app.workspace.loop import AsyncLoop
    from app.workspace.workspace import Workspace

    from .qt_bridge import QtFutures
    from .qt_run import QtRunController

log = logging.getLogger("edgetrain.qt.study")


class QtSvgFigure(QWidget):
    """An SVG figure drawn as large as fits, keeping its aspect ratio (``QSvgWidget``
    stretches it), on white; a hint in grey until there is one."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.renderer = QSvgRenderer(self)
        self.svg_text = ""
        self.setMinimumSize(420, 180)

    def set_svg(self, text: str) -> None:
        self.svg_text = text
        self.renderer.load(QByteArray(text.encode("utf-8")))
        self.update()

    def has_figure(self) -> bool:
        return bool(self.svg_text) and self.renderer.isValid()

    def sizeHint(self) -> QSize:  # noqa: N802
        return QSize(900, 380)

    def paintEvent(self, _event: QPaintEvent) -> None:  # noqa: N802
        p = QPainter(self)
        p.fillRect(self.rect(), QColor("#ffffff"))
        if not self.has_figure():
            p.setPen(QColor("#6c757d"))
            p.drawText(self.rect(), Qt.AlignCenter, "Run a study: its figure appears here, cell by cell.")
            return
        p.setRenderHint(QPainter.Antialiasing)
        size = self.renderer.defaultSize().scaled(self.size(), Qt.KeepAspectRatio)
        x, y = (self.width() - size.width()) / 2, (self.height() - size.height()) / 2
        self.renderer.render(p, QRectF(x, y, size.width(), size.height()))


class QtStudyBridge(QObject):
    """Re-emits a :class:`Study`'s announcements (asyncio thread) as queued Qt signals.

    Signals
    -------
    progress(int, int, str)   total, done, the cell running now ('' between cells)
    cell_done(dict, str)      a finished cell and the figure so far (SVG text)
    """

    progress = Signal(int, int, str)
    cell_done = Signal(object, str)

    def __init__(self, study: Study, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._slots = [(study.progress, self._on_progress), (study.cell_done, self._on_cell)]
        for sig, slot in self._slots:
            sig.connect(slot)
        self.study = study

    def _on_progress(self, p: StudyProgress) -> None:
        self.progress.emit(p.total, p.done, p.current)

    def _on_cell(self, cell: dict, svg: str) -> None:
        self.cell_done.emit(cell, svg)

    def detach(self) -> None:
        for sig, slot in self._slots:
            sig.disconnect(slot)
        self._slots = []


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v * 1e3:.3g}"


def _mj(v: float | None) -> str:
    return "–" if v is None else f"{v * 1e3:.3g}"


class QtStudyWindow(QWidget):
    """The Study: choose models and parallelisms, run them all, see the paper's figure.

    Parameters
    ----------
    workspace
        Its participants are the devices the study runs on.
    loop, futures
        The window's asyncio thread and its result delivery.
    run
        The window's run controller: a study does not start while a run is going.
    parent
        The main window (this is a separate top-level window it owns).
    locks
        Actions disabled while the study runs (the window's Launch).
    """

    COLUMNS = ("Model", "Cell", "Devices", "Outcome", "Latency ms/sample", "predicted",
               "Energy mJ/sample", "predicted", "Note")
    finished = Signal(object)   # the StudyResult, or None when the study failed

    def __init__(self, workspace: Workspace, loop: AsyncLoop, futures: QtFutures,
                 run: QtRunController | None = None, parent: QWidget | None = None,
                 locks: Sequence[QAction] = ()) -> None:
        super().__init__(parent, Qt.Window)
        self.setWindowTitle("EdgeTrain — study: every model × parallelism")
        self.study = Study(workspace)
        self.loop, self.futures, self.run, self.locks = loop, futures, run, tuple(locks)
        self.bridge = QtStudyBridge(self.study, self)
        self.result: StudyResult | None = None
        self._future: concurrent.futures.Future | None = None
        self._rows: dict[tuple[str, str], int] = {}
        self._build()
        self.bridge.progress.connect(self._on_progress)
        self.bridge.cell_done.connect(self._on_cell)
        self.resize(1320, 820)

    # ------------------------------------------------------------------ construction
    def _build(self) -> None:
        self.model_boxes = {m: QCheckBox(m, self) for m in MODELS}
        models = QGroupBox("Models", self)
        grid = QGridLayout(models)
        for i, (m, box) in enumerate(self.model_boxes.items()):
            box.setChecked(m in DEFAULT_MODELS)
            grid.addWidget(box, i % 4, i // 4)
        self.single_box = QCheckBox("single (one-device baseline)", self)
        self.single_box.setChecked(True)
        self.par_boxes = {p: QCheckBox(p, self) for p in STUDY_PARALLELISMS}
        pars = QGroupBox("Parallelisms", self)
        grid = QGridLayout(pars)
        grid.addWidget(self.single_box, 0, 0, 1, 3)
        for i, (p, box) in enumerate(self.par_boxes.items()):
            box.setChecked(p in DEFAULT_PARALLELISMS)
            grid.addWidget(box, 1 + i // 3, i % 3)
        self.steps = self._spin(1, 10_000, 5)
        self.batch = self._spin(1, 4096, 32)
        self.seq = self._spin(8, 4096, 32)
        form_box = QGroupBox("Each cell", self)
        form = QFormLayout(form_box)
        form.addRow("Steps", self.steps)
        form.addRow("Batch size", self.batch)
        form.addRow("Sequence length", self.seq)
        self.devices_label = QLabel(self)
        self.devices_label.setWordWrap(True)
        self.run_button = QPushButton("▶ Run study", self)
        self.stop_button = QPushButton("■ Stop", self)
        self.stop_button.setEnabled(False)
        self.run_button.clicked.connect(self.start)
        self.stop_button.clicked.connect(self.stop)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.stop_button)
        self.progress = QProgressBar(self)
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("cell %v of %m")
        self.current = QLabel("No study yet.", self)
        self.current.setWordWrap(True)
        self.where = QLabel(self)
        self.where.setWordWrap(True)
        self.where.setTextInteractionFlags(Qt.TextSelectableByMouse)

        controls = QWidget(self)
        lay = QVBoxLayout(controls)
        lay.setContentsMargins(6, 6, 6, 6)
        for w in (models, pars, form_box, self.devices_label):
            lay.addWidget(w)
        lay.addLayout(buttons)
        for w in (self.progress, self.current, self.where):
            lay.addWidget(w)
        lay.addStretch(1)
        controls.setFixedWidth(300)

        self.figure = QtSvgFigure(self)
        self.table = QTableWidget(0, len(self.COLUMNS), self)
        self.table.setHorizontalHeaderLabels(self.COLUMNS)
        self.table.verticalHeader().setVisible(False)
        self.table.verticalHeader().setDefaultSectionSize(21)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setAlternatingRowColors(True)
        self.table.setShowGrid(False)
        hdr = self.table.horizontalHeader()
        hdr.setSectionResizeMode(QHeaderView.ResizeToContents)
        hdr.setStretchLastSection(True)
        right = QSplitter(Qt.Vertical, self)
        right.addWidget(self.figure)
        right.addWidget(self.table)
        right.setStretchFactor(0, 3)
        right.setStretchFactor(1, 2)
        right.setSizes([480, 300])
        outer = QHBoxLayout(self)
        outer.setContentsMargins(4, 4, 4, 4)
        outer.addWidget(controls)
        outer.addWidget(right, 1)

    def _spin(self, lo: int, hi: int, value: int) -> QSpinBox:
        s = QSpinBox(self)
        s.setRange(lo, hi)
        s.setValue(value)
        return s

    # ------------------------------------------------------------------ choices
    def models(self) -> list[str]:
        return [m for m, b in self.model_boxes.items() if b.isChecked()]

    def parallelisms(self) -> list[str]:
        return [p for p, b in self.par_boxes.items() if b.isChecked()]

    def choose(self, models: Sequence[str], parallelisms: Sequence[str], single: bool = True,
               steps: int | None = None, batch_size: int | None = None, seq_len: int | None = None) -> None:
        """Set the form (what a user ticks), e.g. from a test or a script."""
        for m, b in self.model_boxes.items():
            b.setChecked(m in models)
        for p, b in self.par_boxes.items():
            b.setChecked(p in parallelisms)
        self.single_box.setChecked(single)
        for spin, v in ((self.steps, steps), (self.batch, batch_size), (self.seq, seq_len)):
            if v is not None:
                spin.setValue(v)

    def settings(self) -> RunSettings:
        models = self.models()
        return RunSettings(model=models[0] if models else RunSettings.model, steps=self.steps.value(),
                           batch_size=self.batch.value(), seq_len=self.seq.value(), micro_batches=2,
                           checkpoint_every=0, checkpoint_minutes=0.0, eval_every=0)

    def open_study(self) -> None:
        """Show the window (the main window's *Study…* action)."""
        self._show_devices()
        self.show()
        self.raise_()
        self.activateWindow()

    def _show_devices(self) -> None:
        names = self.study.devices()
        self.devices_label.setText(f"On the participants: {', '.join(names)}" if names else
                                   "No participants: tick devices in the main window's devices panel.")

    # ------------------------------------------------------------------ run, stop
    @property
    def running(self) -> bool:
        return self._future is not None and not self._future.done()

    def start(self) -> bool:
        """Run the chosen cells; returns whether the study started."""
        self._show_devices()
        if self.running:
            return False
        if self.run is not None and self.run.running:
            QMessageBox.information(self, "Study", "A run is in progress on these devices; stop it first.")
            return False
        try:
            cells = self.study.plan(self.models(), self.parallelisms(), self.single_box.isChecked())
            inventory = self.study.inventory()
        except (ValueError, AttributeError) as exc:  # AttributeError: a participant left the list
            QMessageBox.information(self, "Study", str(exc))
            return False
        self.result = None
        self.table.setRowCount(0)
        self._rows = {}
        for c in cells:
            self._set_row({"model": c.model, "label": c.label, "devices": c.devices, "outcome": "pending",
                           "predicted": {}, "message": ""})
        self.figure.set_svg("")
        self.progress.setRange(0, len(cells))
        self.progress.setValue(0)
        self.where.setText("")
        self._future = self.loop.submit(self.study.run(self.settings(), cells, inventory))
        self.futures.watch(self._future, self._on_done)
        self._lock(True)
        self.current.setText(f"starting {len(cells)} cells…")
        return True

    def stop(self) -> None:
        """End the running cell at its next step and skip the rest (``finished`` follows)."""
        if self.running:
            self.study.request_stop()
            self.current.setText("stopping: the running cell ends at its next step…")

    def _lock(self, on: bool) -> None:
        self.run_button.setEnabled(not on)
        self.stop_button.setEnabled(on)
        for w in (*self.model_boxes.values(), *self.par_boxes.values(), self.single_box,
                  self.steps, self.batch, self.seq):
            w.setEnabled(not on)
        for act in self.locks:
            act.setEnabled(not on)

    # ------------------------------------------------------------------ updates (GUI thread)
    def _on_progress(self, total: int, done: int, current: str) -> None:
        self.progress.setRange(0, max(1, total))
        self.progress.setValue(done)
        if current:
            row = self._rows.get(tuple(current.split(" · ", 1)))
            if row is not None:
                self._item(row, 3, "running")
            self.current.setText(f"running {current} on {', '.join(self.study.devices())} "
                                 f"(cell {done + 1} of {total})")

    def _on_cell(self, cell: dict, svg: str) -> None:
        self._set_row(cell)
        self.figure.set_svg(svg)

    def _on_done(self, fut: concurrent.futures.Future) -> None:
        self._lock(False)
        try:
            result: StudyResult | None = fut.result()
        except concurrent.futures.CancelledError:
            result = None
            self.current.setText("The study was cancelled.")
        except Exception as exc:  # noqa: BLE001 - shown to the user; the cells say the rest
            log.exception("study failed")
            result = None
            self.current.setText(f"The study failed: {exc}")
        if result is not None:
            self.result = result
            self.figure.set_svg(result.figure_text)
            ok = sum(c.outcome == "done" for c in result.cells)
            self.current.setText(f"{'Stopped' if result.stopped else 'Done'}: {ok} of {len(result.cells)} "
                                 f"cells trained.")
            self.where.setText(f"Report and figure: {result.out_dir}")
        self.finished.emit(result)

    def _set_row(self, c: dict[str, Any]) -> None:
        key = (c["model"], c["label"])
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = self.table.rowCount()
            self.table.insertRow(row)
        pred = c.get("predicted") or {}
        values = (c["model"], c["label"], ", ".join(c["devices"]), c["outcome"],
                  _ms(c.get("latency_per_sample_s")), _ms(pred.get("latency_per_sample_s")),
                  _mj(c.get("energy_per_sample_j")), _mj(pred.get("energy_per_sample_j")),
                  ("predicted OOM: " + ", ".join(pred.get("oom_devices") or []) + ". " if pred.get("oom") else "")
                  + (c.get("message") or "")[:200])
        for col, v in enumerate(values):
            self._item(row, col, v)

    def _item(self, row: int, col: int, text: str) -> None:
        item = QTableWidgetItem(text)
        if col in (4, 5, 6, 7):
            item.setTextAlignment(Qt.AlignRight | Qt.AlignVCenter)
        if col == 3 and text in STATUS_COLOURS:
            item.setForeground(STATUS_COLOURS[text])
        self.table.setItem(row, col, item)

    def rows(self) -> list[list[str]]:
        """The table's text, row by row (for tests and scripts)."""
        t = self.table
        return [[(t.item(r, c).text() if t.item(r, c) else "") for c in range(t.columnCount())]
                for r in range(t.rowCount())]

    # ------------------------------------------------------------------ closing
    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop a running study and wait (bounded) for its workers to end (window closing)."""
        fut = self._future
        if fut is not None and not fut.done():
            self.study.request_stop()
            try:
                fut.result(timeout)
            except concurrent.futures.TimeoutError:
                log.warning("the study did not stop within %.0f s; cancelling it", timeout)
                fut.cancel()
            except Exception:  # noqa: BLE001 - the study's own failure; it is over either way
                pass
        self.bridge.detach()
        self.close()
