"""The plan preview: per-device memory, latency and energy per sample, OOM flags, advice.

:class:`QtPlanner` recomputes the plan off the GUI thread: a change (settings, order,
profiles) restarts a short debounce timer; when it fires, :func:`app.workspace.preview.compute_preview`
runs on a one-thread executor and its result comes back through a queued signal.  Each
request carries a generation number, so a result that a newer change has overtaken is
dropped instead of shown.  :class:`QtPlanView` only displays a :class:`PlanPreview`.
"""
from __future__ import annotations

import concurrent.futures
import logging
from typing import Any, Callable

from PySide6.QtCore import QObject, Qt, QTimer, Signal, Slot
from PySide6.QtGui import QBrush
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.workspace.preview import CapKind, MemoryFigures, PlanPreview, compute_preview
from app.workspace.series import MEMORY_LABEL

from .qt_style import MEM_BAR_COLOURS, MEM_COLOURS, fmt_bytes, fmt_ms, fmt_num

log = logging.getLogger("edgetrain.qt.plan")


class QtPlanner(QObject):
    """Debounced, threaded plan computation.

    Parameters
    ----------
    inputs
        Called on the GUI thread when a computation starts; returns the keyword
        arguments of :func:`compute_preview` (snapshots: the worker must not see later edits).
    debounce_ms
        Quiet time after the last change before planning.

    Signals
    -------
    updated(PlanPreview)   a fresh preview (GUI thread)
    """

    updated = Signal(object)
    _result = Signal(int, object)

    def __init__(self, inputs: Callable[[], dict[str, Any]],
                 debounce_ms: int = 120, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._inputs = inputs
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(debounce_ms)
        self._timer.timeout.connect(self._start)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = \
            concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgetrain-plan")
        self._generation = 0
        self.completed = 0
        self.latest: PlanPreview | None = None
        self._result.connect(self._on_result, Qt.QueuedConnection)

    @property
    def busy(self) -> bool:
        return self._timer.isActive() or self.completed < self._generation

    def request(self) -> None:
        """Something changed: plan again once the changes stop for a moment."""
        if self._executor is not None:
            self._timer.start()

    def _start(self) -> None:
        if self._executor is None:
            return
        self._generation += 1
        gen = self._generation
        fut = self._executor.submit(compute_preview, **self._inputs())

        def done(f: concurrent.futures.Future) -> None:
            try:
                res = f.result()
            except Exception as exc:  # noqa: BLE001 - compute_preview should not raise; be safe
                res = PlanPreview(error=str(exc), recommendation=f"Planning failed: {exc}")
            try:
                self._result.emit(gen, res)
            except RuntimeError:
                pass  # the planner object is gone (window closed)

        fut.add_done_callback(done)

    @Slot(int, object)
    def _on_result(self, gen: int, res: PlanPreview) -> None:
        self.completed = max(self.completed, gen)
        if gen != self._generation:
            return  # overtaken by a newer change
        self.latest = res
        self.updated.emit(res)

    def close(self) -> None:
        """Stop the timer and the worker thread (pending results are dropped)."""
        self._timer.stop()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


#: The memory column names the quantity exactly as the memory chart does (predicted peak
#: of the same resident memory); the cap, and what enforces it, is a column of its own.
PLAN_COLUMNS = ("Device", MEMORY_LABEL, "Cap", "Latency", "Energy")
MEMORY_TIP = (f"{MEMORY_LABEL}: predicted peak resident (physical) memory, the quantity the memory chart "
              "plots.\nCap: the device's limit, and below it what enforces it: RAM, a cgroup, or the "
              "address space (RLIMIT_AS on a testbed device without root, which caps the virtual size: "
              "then the predicted address space stands before the cap, and that is what must fit). "
              "Red: out of memory predicted.")


class QtPlanView(QWidget):
    """Shows a :class:`PlanPreview`: totals, the recommendation and one row per device.

    When the plan runs out of memory and some knobs would make it fit, *Apply* asks
    (``apply_requested``, with the settings fields to change) to set them."""

    apply_requested = Signal(dict)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.headline = QLabel("No plan yet.", self)
        self.headline.setStyleSheet("font-weight: bold;")
        self.recommendation = QLabel(self)
        self.recommendation.setWordWrap(True)
        self.apply_button = QPushButton("Apply the settings that fit", self)
        self.apply_button.setVisible(False)
        self.apply_button.clicked.connect(self._apply)
        self.source = QLabel(self)
        self.source.setStyleSheet("color: #6c757d;")
        self.table = QTableWidget(0, len(PLAN_COLUMNS), self)
        self.table.setHorizontalHeaderLabels(PLAN_COLUMNS)
        self.table.verticalHeader().setVisible(False)
        self.table.verticalHeader().setDefaultSectionSize(22)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.setSelectionMode(QAbstractItemView.NoSelection)
        self.table.setShowGrid(False)
        hdr = self.table.horizontalHeader()
        hdr.setSectionResizeMode(QHeaderView.ResizeToContents)
        hdr.setStretchLastSection(True)
        # the cap and its kind on two lines: the table fits the narrow dock
        self.table.setWordWrap(True)
        self.table.verticalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.table.setToolTip(MEMORY_TIP + "\nLatency and energy: per sample.")
        for col in (1, 2):
            self.table.horizontalHeaderItem(col).setToolTip(MEMORY_TIP)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addWidget(self.headline)
        lay.addWidget(self.recommendation)
        lay.addWidget(self.apply_button, 0, Qt.AlignLeft)
        lay.addWidget(self.table, 1)
        lay.addWidget(self.source)
        self.preview: PlanPreview | None = None

    def rows(self) -> list[str]:
        """Device names in the order shown."""
        return [self.table.item(r, 0).text() for r in range(self.table.rowCount())]

    def show_preview(self, pv: PlanPreview) -> None:
        self.preview = pv
        if pv.devices:
            self.headline.setText(f"Predicted: {fmt_ms(pv.total('latency_per_sample_s'))} and "
                                  f"{fmt_num(pv.total('energy_per_sample_j'), '.3g', 'J')} per sample"
                                  + ("  —  OOM predicted" if pv.any_oom else ""))
        else:
            self.headline.setText("No plan.")
        self.headline.setStyleSheet("font-weight: bold;" + (" color: #c62828;" if pv.any_oom else ""))
        self.recommendation.setText(pv.recommendation + (f"\n{pv.error}" if pv.error else ""))
        fix = pv.fit_changes
        self.apply_button.setVisible(fix is not None)
        if fix is not None:
            self.apply_button.setToolTip("Sets " + ", ".join(f"{k} = {v}" for k, v in fix.items())
                                         + " in the run configuration")
        self.source.setText("Source: EdgeTrain planner (profiles or board presets; dashed lines on the charts)"
                            if pv.plan is not None else "")
        self.source.setWordWrap(True)
        self.table.setRowCount(len(pv.devices))
        for r, d in enumerate(pv.devices):
            mem = pv.memory(d.name)
            cells = (d.name, fmt_bytes(mem.peak_rss_bytes), cap_text(mem), fmt_ms(d.latency_per_sample_s),
                     fmt_num(d.energy_per_sample_j, ".3g", "J"))
            for c, text in enumerate(cells):
                item = self.table.item(r, c)
                if item is None:
                    item = QTableWidgetItem()
                    self.table.setItem(r, c, item)
                item.setText(text)
                # the cap cell carries the verdict: how full the cap is, and OOM in red
                item.setBackground(QBrush(MEM_COLOURS[mem.level]) if c == 2 else QBrush())
                item.setForeground(QBrush(MEM_BAR_COLOURS["oom"]) if c == 2 and mem.oom else QBrush())

    def _apply(self) -> None:
        fix = self.preview.fit_changes if self.preview is not None else None
        if fix:
            self.apply_requested.emit(fix)

    def cell(self, row: int, column: str) -> str:
        """The text of ``row``'s cell under the header ``column`` (tests, screenshots)."""
        return self.table.item(row, PLAN_COLUMNS.index(column)).text()


def cap_text(mem: MemoryFigures) -> str:
    """A device's cap and what enforces it; under an address-space cap, the predicted
    address space first, since that is what the cap limits."""
    if mem.cap_kind is CapKind.NONE or not mem.cap_bytes:
        return CapKind.NONE.value
    oom = " · OOM" if mem.oom else ""
    if mem.cap_kind is CapKind.ADDRESS_SPACE:
        return f"{fmt_bytes_pair(mem.address_space_bytes, mem.cap_bytes)}\n{mem.cap_kind.value}{oom}"
    return f"{fmt_bytes(mem.cap_bytes)}\n{mem.cap_kind.value}{oom}"


def fmt_bytes_pair(a: float | None, b: float | None, sep: str = " / ") -> str:
    """``"3.1 / 4 GiB"``: two sizes in the unit of the larger, ``—`` for one not known."""
    big = max(a or 0, b or 0) >= 2**30
    scale, spec, unit = (2**30, ".3g", "GiB") if big else (2**20, ".0f", "MiB")
    return sep.join("—" if v is None else format(v / scale, spec) for v in (a, b)) + f" {unit}"
