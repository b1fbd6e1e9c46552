"""A live run's progress: one row per device, the run's ETA, and the plan beside each measurement.

:class:`QtRunProgress` follows a :class:`~app.qt.qt_run.QtRunController` on its own (started,
telemetry, status changes, a restart on the survivors, the end), so the main window only
places it.  The figures come from :class:`app.workspace.progress.RunProgress`; the view
repaints from a timer, at most a few times a second, not per telemetry record.

Each row: the device and its role (pipeline stage, DP rank), a bar of its steps out of the
run's, its last step time, its status, and latency per sample, energy per sample and peak
memory, each measured with the plan's prediction under it (the plan the run was launched
with; the charts draw the same predictions as dashed lines).  Memory is resident memory
(RSS), under the memory chart's own label.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from PySide6.QtCore import QTimer
from PySide6.QtGui import QBrush
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QLabel,
    QProgressBar,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.workspace.progress import NO_VALUE, DeviceProgress, RunProgress, fmt_duration
from app.workspace.series import MEMORY_LABEL

from .qt_style import STATUS_COLOURS

if TYPE_CHECKING:
    from app.run.runstate import RunState

    from .qt_run import QtRunController

COLUMNS = ("Device", "Steps", "Last step", "Latency", "Energy", MEMORY_LABEL, "Status")
TIPS = {
    "Device": "The device and its part of the run (pipeline stage, DP rank)",
    "Last step": "The worker's own time for its last reported step",
    "Latency": "Latency per sample: measured (median of the recent steps), and below it the plan's "
               "prediction (the dashed line on the latency chart)",
    "Energy": "This device's energy over the step's samples: measured (median of the recent steps), "
              "and below it the plan's prediction",
    MEMORY_LABEL: "Resident (physical) memory: the highest this run measured, and below it the plan's "
                  "predicted peak (the memory chart plots the same quantity)",
}
ROW_H = 36          # two lines: the measurement, and the plan's prediction under it
REFRESH_MS = 250
IDLE = "<b>Run progress</b> — no run yet: Launch (Ctrl+R) shows each device's steps and the ETA here"


def beside_plan(measured: float | None, predicted: float | None, scale: float, spec: str, unit: str) -> str:
    """Two lines, ``3.12 ms`` then ``plan 0.987``: the measurement, and the prediction in its unit."""
    def one(v: float | None) -> str:
        return NO_VALUE if v is None else format(v * scale, spec)
    return f"{one(measured)} {unit}\nplan {one(predicted)}"


def memory_beside_plan(measured: int | None, predicted: int | None) -> str:
    big = max(measured or 0, predicted or 0) >= 2**30
    return beside_plan(measured, predicted, 1 / 2**30 if big else 1 / 2**20, ".2f" if big else ".0f",
                       "GiB" if big else "MiB")


class QtRunProgress(QWidget):
    """Per-device progress and the ETA of the controller's run.

    Parameters
    ----------
    run
        The window's run controller; its signals feed this view.
    """

    def __init__(self, run: QtRunController, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.run = run
        self.model: RunProgress | None = None
        self.headline = QLabel(IDLE, self)
        self.headline.setWordWrap(True)
        self.table = QTableWidget(0, len(COLUMNS), self)
        self.table.setHorizontalHeaderLabels(COLUMNS)
        for col, tip in TIPS.items():
            self.table.horizontalHeaderItem(COLUMNS.index(col)).setToolTip(tip)
        self.table.verticalHeader().setVisible(False)
        self.table.verticalHeader().setDefaultSectionSize(ROW_H)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.setSelectionMode(QAbstractItemView.NoSelection)
        self.table.setShowGrid(False)
        hdr = self.table.horizontalHeader()
        hdr.setSectionResizeMode(QHeaderView.ResizeToContents)
        hdr.setSectionResizeMode(1, QHeaderView.Stretch)
        hdr.setMinimumSectionSize(40)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.setSpacing(2)
        lay.addWidget(self.headline)
        lay.addWidget(self.table, 1)
        self._dirty = False
        self._started = self._ended = 0.0
        self.timer = QTimer(self)
        self.timer.setInterval(REFRESH_MS)
        self.timer.timeout.connect(self._tick)
        run.started.connect(lambda _id: self.start(run.state))
        run.restarted.connect(lambda _id: self.start(run.state))
        run.record.connect(self.feed)
        run.device_changed.connect(self.set_status)
        run.finished.connect(lambda outcome, _s: self.finish(outcome))

    # ------------------------------------------------------------------ feeding
    def start(self, state: RunState | None) -> None:
        """Show the run of ``state`` from its beginning (a launch, or a restart on survivors)."""
        if state is None:
            return
        self.model = RunProgress.of_run(list(state.devices), state.config, state.plan)
        for name, dev in state.devices.items():
            self.model.set_status(name, dev.status)
            self.model.devices[name].role = dev.role
        self._started = state.started
        rows = len(self.model.devices)
        self.table.setRowCount(rows)
        for r in range(rows):
            bar = QProgressBar(self.table)
            bar.setFormat("%v / %m")
            bar.setMaximumHeight(ROW_H // 2)
            self.table.setCellWidget(r, 1, bar)
        self._refresh()
        self.timer.start()

    def feed(self, rec: dict) -> None:
        if self.model is not None and self.model.feed(rec):
            self._dirty = True

    def set_status(self, name: str, status: str) -> None:
        if self.model is not None and self.model.set_status(name, status):
            self._dirty = True

    def finish(self, outcome: str) -> None:
        if self.model is None:
            return
        self.model.finish(outcome)
        self._ended = time.time()
        self.timer.stop()
        self._refresh()

    # ------------------------------------------------------------------ painting
    def _tick(self) -> None:
        if self._dirty:
            self._refresh()

    def _refresh(self) -> None:
        self._dirty = False
        m = self.model
        if m is None:
            return
        self.headline.setText(self.headline_text())
        for r, dev in enumerate(m.devices.values()):
            bar = self.table.cellWidget(r, 1)
            if isinstance(bar, QProgressBar):
                bar.setMaximum(max(1, m.total))
                bar.setValue(min(dev.steps, m.total))
            self._set_row(r, dev)

    def _set_row(self, r: int, dev: DeviceProgress) -> None:
        p = dev.predicted
        cells = {0: f"{dev.name}\n{dev.role}" if dev.role else dev.name,
                 2: NO_VALUE if dev.last_step_s is None else f"{dev.last_step_s * 1e3:.3g} ms",
                 3: beside_plan(dev.latency_per_sample_s, p.latency_per_sample_s, 1e3, ".3g", "ms"),
                 4: beside_plan(dev.energy_per_sample_j, p.energy_per_sample_j, 1.0, ".3g", "J"),
                 5: memory_beside_plan(dev.peak_rss_bytes, p.peak_rss_bytes),
                 6: dev.status}
        for c, text in cells.items():
            item = self.table.item(r, c)
            if item is None:
                item = QTableWidgetItem()
                self.table.setItem(r, c, item)
            item.setText(text)
            if c == 6:
                colour = STATUS_COLOURS.get(dev.status)
                item.setForeground(QBrush(colour) if colour is not None else QBrush())

    def headline_text(self) -> str:
        """``Run progress — step 12 / 30 · 0.41 s/step · ETA 7 s`` (the ETA ``—`` until known)."""
        m = self.model
        if m is None:
            return IDLE
        step_s = m.step_s()
        pace = f" · {step_s:.3g} s/step" if step_s is not None else ""
        if m.outcome is not None:
            tail = f" · {m.outcome} after {fmt_duration(self._ended - self._started)}"
        else:
            tail = f" · ETA {self.eta_text()}"
        return f"<b>Run progress</b> — step {m.steps} / {m.total}{pace}{tail}"

    def eta_text(self) -> str:
        """The run's ETA as shown: ``—`` until every training device has done two steps."""
        return fmt_duration(self.model.eta_s()) if self.model is not None else NO_VALUE

    def steps_shown(self) -> dict[str, tuple[int, int]]:
        """``device -> (value, maximum)`` of each row's progress bar (what a user sees)."""
        out = {}
        for r in range(self.table.rowCount()):
            bar = self.table.cellWidget(r, 1)
            name = list(self.model.devices)[r] if self.model is not None else str(r)
            if isinstance(bar, QProgressBar):
                out[name] = (bar.value(), bar.maximum())
        return out
