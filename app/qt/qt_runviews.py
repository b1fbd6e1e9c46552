"""Views of one run besides the charts: the event log, the recovery timeline and the summary."""
from __future__ import annotations

import time
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtGui import QBrush
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QLabel,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.workspace.incidents import Incidents

from .qt_style import EVENT_COLOURS, STATUS_COLOURS, fmt_bytes, fmt_ms, fmt_num

MAX_EVENTS = 5000


def _table(columns: tuple[str, ...], parent: QWidget) -> QTableWidget:
    t = QTableWidget(0, len(columns), parent)
    t.setHorizontalHeaderLabels(columns)
    t.verticalHeader().setVisible(False)
    t.verticalHeader().setDefaultSectionSize(21)
    t.setEditTriggers(QAbstractItemView.NoEditTriggers)
    t.setSelectionBehavior(QAbstractItemView.SelectRows)
    t.setShowGrid(False)
    t.setAlternatingRowColors(True)
    hdr = t.horizontalHeader()
    hdr.setSectionResizeMode(QHeaderView.ResizeToContents)
    hdr.setStretchLastSection(True)
    return t


class QtEventLog(QWidget):
    """Time, device, kind and message of every run event (OOM and failures in colour)."""

    COLUMNS = ("Time", "Device", "Kind", "Message")

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.table = _table(self.COLUMNS, self)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.table)

    def add_event(self, ev: dict[str, Any]) -> None:
        """Append one event (``t``, ``device``, ``kind``, ``message``)."""
        t = self.table
        if t.rowCount() >= MAX_EVENTS:
            t.removeRow(0)  # a very chatty run keeps the newest events
        row = t.rowCount()
        t.insertRow(row)
        stamp = time.strftime("%H:%M:%S", time.localtime(ev.get("t") or time.time()))
        kind = str(ev.get("kind") or "info")
        colour = EVENT_COLOURS.get(kind, EVENT_COLOURS["info"])
        for col, text in enumerate((stamp, ev.get("device") or "–", kind, str(ev.get("message") or ""))):
            item = QTableWidgetItem(text)
            if col == 3:
                item.setToolTip(text)
            if kind != "info":
                item.setForeground(QBrush(colour))
            t.setItem(row, col, item)
        t.scrollToBottom()

    def rows(self) -> list[tuple[str, str, str]]:
        """``(device, kind, message)`` of every row (tests, exports)."""
        t = self.table
        return [(t.item(r, 1).text(), t.item(r, 2).text(), t.item(r, 3).text()) for r in range(t.rowCount())]

    def clear(self) -> None:
        self.table.setRowCount(0)


class QtTimeline(QWidget):
    """The recovery timeline of the run: failure → detected → re-planned → resumed, per
    incident, each with its time after the incident began (:mod:`app.run.timeline`)."""

    COLUMNS = ("#", "Phase", "After", "Time", "Device", "What")

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.table = _table(self.COLUMNS, self)
        self.hint = QLabel("No device has left this run. During a run, right-click a device → "
                           "Failure drill to see how the run recovers.", self)
        self.hint.setWordWrap(True)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.hint)
        lay.addWidget(self.table, 1)
        self.incidents = Incidents()

    def add_event(self, ev: dict[str, Any]) -> bool:
        """Take one run event; returns whether the timeline changed."""
        if not self.incidents.add(ev):
            return False
        marks = self.incidents.marks
        t = self.table
        t.setRowCount(len(marks))
        for row, m in enumerate(marks):
            cells = (str(m.incident), m.phase, f"+{m.after_s:.1f} s",
                     time.strftime("%H:%M:%S", time.localtime(m.t)), m.device or "–", m.message)
            for col, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setToolTip(m.message)
                t.setItem(row, col, item)
        self.hint.setVisible(not marks)
        return True

    def phases(self) -> list[tuple[int, str, float]]:
        """``(incident, phase, seconds after it began)`` of every row (tests)."""
        return [(m.incident, m.phase, m.after_s) for m in self.incidents.marks]

    def clear(self) -> None:
        self.incidents.clear()
        self.table.setRowCount(0)
        self.hint.setVisible(True)


def _rejected_text(s: dict[str, Any]) -> str:
    """"rejected telemetry: 3 lines (dev1: 2 not finite, 1 rank)" from a summary."""
    per = s.get("rejected_telemetry") or {}
    detail = "; ".join(f"{dev}: " + ", ".join(f"{n} {why}" for why, n in sorted(reasons.items()))
                       for dev, reasons in sorted(per.items()))
    return f"rejected telemetry: {s['rejected_telemetry_lines']} lines" + (f" ({detail})" if detail else "")


class QtRunSummary(QWidget):
    """The run's totals and one row per device (from ``RunState.summary()`` or a record)."""

    COLUMNS = ("Device", "Rank", "Role", "Status", "Steps", "Latency/sample", "Samples/s", "Energy",
               "Method", "Peak memory")

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.headline = QLabel("No run yet.", self)
        self.headline.setStyleSheet("font-weight: bold;")
        self.totals = QLabel(self)
        self.evaluation = QLabel(self)   # the last held-out evaluation (hidden without one)
        self.evaluation.setVisible(False)
        self.durable = QLabel(self)      # checkpoints, and where the trained model is
        self.durable.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.durable.setWordWrap(True)
        self.table = _table(self.COLUMNS, self)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addWidget(self.headline)
        lay.addWidget(self.totals)
        lay.addWidget(self.evaluation)
        lay.addWidget(self.durable)
        lay.addWidget(self.table, 1)
        self.summary: dict[str, Any] | None = None

    def show_summary(self, s: dict[str, Any]) -> None:
        self.summary = s
        outcome = s.get("outcome") or "running"
        self.headline.setText(f"Run {s.get('run_id', '?')}: {outcome} — {s.get('steps', 0)} steps, "
                              f"{s.get('samples', 0)} samples in {s.get('wall_s') or 0:.1f} s")
        colour = STATUS_COLOURS.get(outcome)
        self.headline.setStyleSheet("font-weight: bold;" + (f" color: {colour.name()};" if colour else ""))
        methods = ", ".join(s.get("energy_methods") or []) or "none"
        self.totals.setText(f"throughput {fmt_num(s.get('throughput_sps'), '.1f', 'samples/s')}   "
                            f"latency/sample {fmt_ms(s.get('latency_per_sample_s'))}   "
                            f"energy/sample {fmt_num(s.get('energy_per_sample_j'), '.4f', 'J')} ({methods})")
        self._show_evaluation(s)
        done = [c for c in s.get("checkpoints") or [] if c.get("complete")]
        parts = []
        if done:
            parts.append(f"checkpoints: {len(done)}, last at step {done[-1].get('step')} "
                         f"({done[-1].get('kind')}); Resume in History continues from it")
        if s.get("model_dir"):
            parts.append(f"trained model: {s['model_dir']}")
        if s.get("rejected_telemetry_lines"):
            parts.append(_rejected_text(s))
        self.durable.setText("<br>".join(parts))
        self.durable.setVisible(bool(parts))
        devs = s.get("devices") or []
        self.table.setRowCount(len(devs))
        for r, d in enumerate(devs):
            cells = (d.get("device"), str(d.get("rank", "")), d.get("role") or "–", d.get("status") or "",
                     str(d.get("steps", "")), fmt_ms(d.get("latency_per_sample_s")),
                     fmt_num(d.get("local_throughput_sps"), ".1f"), fmt_num(d.get("energy_j"), ".2f", "J"),
                     d.get("energy_method") or "–", fmt_bytes(d.get("peak_mem_bytes")))
            for c, text in enumerate(cells):
                item = QTableWidgetItem(str(text))
                if c == 3 and d.get("status") in STATUS_COLOURS:
                    item.setForeground(QBrush(STATUS_COLOURS[d["status"]]))
                self.table.setItem(r, c, item)

    def _show_evaluation(self, s: dict[str, Any]) -> None:
        evals = s.get("evals") or []
        if s.get("eval_accuracy") is None or not evals:
            self.evaluation.setVisible(False)
            self.evaluation.setText("")
            return
        self.evaluation.setText(f"held-out accuracy <b>{s['eval_accuracy']:.1%}</b>   "
                                f"loss {fmt_num(s.get('eval_loss'), '.4f')}   after step {s.get('eval_step')} "
                                f"({evals[-1].get('samples')} samples; {len(evals)} evaluations)")
        self.evaluation.setVisible(True)

    def clear(self) -> None:
        self.summary = None
        self.evaluation.setVisible(False)
        self.evaluation.setText("")
        self.durable.setVisible(False)
        self.durable.setText("")
        self.headline.setText("No run yet.")
        self.headline.setStyleSheet("font-weight: bold;")
        self.totals.setText("")
        self.table.setRowCount(0)
