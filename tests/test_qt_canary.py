"""Canary for the PySide6 pin: 6.12.0 on Python 3.11 drops a reference to None on every
void C++ call and aborts the interpreter after a few thousand paints (FEASIBILITY.md).
If an upgrade brings that back, this fails instead of the GUI crashing mid-run."""
from __future__ import annotations

import sys

import pytest

QtGui = pytest.importorskip("PySide6.QtGui")


def test_void_calls_do_not_leak_none_references(qapp):
    image = QtGui.QImage(64, 64, QtGui.QImage.Format.Format_ARGB32)
    painter = QtGui.QPainter(image)
    pen = QtGui.QPen(QtGui.QColor(10, 20, 30))
    before = sys.getrefcount(None)
    for i in range(10_000):
        painter.setPen(pen)                 # void C++ calls
        painter.drawLine(0, i % 64, 63, 63 - i % 64)
    after = sys.getrefcount(None)
    painter.end()
    # a small drift from unrelated allocations is fine; the bug loses one per call
    assert after >= before - 100, f"None refcount fell by {before - after} over 10k calls"

