"""Colours, fonts and number formats shared by the views (one place, so they agree).

A device has one colour everywhere: its canvas node stripe, its chart curves and its
plan row.  Memory levels and statuses map to a small fixed palette.
"""
from __future__ import annotations

from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QApplication, QHBoxLayout, QLabel, QVBoxLayout, QWidget

# Tableau-like qualitative palette: distinct on white, readable at 1 px.
_DEVICE_COLOURS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd",
)

MEM_COLOURS = {
    "ok": QColor("#e8f5e9"), "warning": QColor("#fff3cd"), "oom": QColor("#f8d7da"), "unknown": QColor("#f1f3f5"),
}
MEM_BAR_COLOURS = {
    "ok": QColor("#43a047"), "warning": QColor("#f0a500"), "oom": QColor("#d32f2f"), "unknown": QColor("#adb5bd"),
}
STATUS_COLOURS = {
    "online": QColor("#2e7d32"), "offline": QColor("#9e9e9e"), "untrusted": QColor("#c62828"),
    "busy": QColor("#1565c0"), "unknown": QColor("#757575"), "running": QColor("#1565c0"),
    "done": QColor("#2e7d32"), "failed": QColor("#c62828"), "oom": QColor("#c62828"),
    "stopped": QColor("#757575"), "connecting": QColor("#6a1b9a"), "starting": QColor("#6a1b9a"),
    "pending": QColor("#757575"),
}
EVENT_COLOURS = {"oom": QColor("#d32f2f"), "failure": QColor("#e65100"), "error": QColor("#e65100"),
                 "info": QColor("#495057"), "done": QColor("#2e7d32")}


def device_colour(index: int) -> QColor:
    """Colour of the device at ``index`` in the device list (stable while the list is)."""
    return QColor(_DEVICE_COLOURS[index % len(_DEVICE_COLOURS)])


def fmt_bytes(n: float | None) -> str:
    if not n:
        return "–"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.0f} MiB"


def fmt_num(v: float | None, spec: str = ".3g", unit: str = "") -> str:
    return "–" if v is None else format(v, spec) + (f" {unit}" if unit else "")


def fmt_ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:.3g} ms"


def apply_app_style(app: QApplication) -> None:
    """Fusion with a light palette: the same look offscreen, under Xvfb and on desktops."""
    app.setStyle("Fusion")
    pal = QPalette()
    pal.setColor(QPalette.Window, QColor("#f5f6f8"))
    pal.setColor(QPalette.Base, QColor("#ffffff"))
    pal.setColor(QPalette.AlternateBase, QColor("#f3f5f7"))
    pal.setColor(QPalette.Button, QColor("#eceef1"))
    pal.setColor(QPalette.Highlight, QColor("#2f6fb5"))
    pal.setColor(QPalette.HighlightedText, QColor("#ffffff"))
    pal.setColor(QPalette.ToolTipBase, QColor("#ffffe1"))
    app.setPalette(pal)
    font = app.font()
    if font.pointSize() > 0 and font.pointSize() < 9:
        font.setPointSize(9)
        app.setFont(font)


def titled(title: str, widget: QWidget, parent: QWidget, extra: QWidget | None = None) -> QWidget:
    """``widget`` under a bold ``title`` (and ``extra`` at the title's right)."""
    box = QWidget(parent)
    lay = QVBoxLayout(box)
    lay.setContentsMargins(2, 2, 2, 2)
    lay.setSpacing(2)
    label = QLabel(f"<b>{title}</b>", box)
    if extra is not None:
        row = QHBoxLayout()
        row.addWidget(label)
        row.addStretch(1)
        row.addWidget(extra)
        lay.addLayout(row)
    else:
        lay.addWidget(label)
    lay.addWidget(widget, 1)
    return box
