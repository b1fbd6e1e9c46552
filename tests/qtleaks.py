"""Leak check shared by the GUI tests: no window and no EdgeTrain thread may outlive a test
(Qt state leaking between tests is a known source of segfaults)."""
from __future__ import annotations

import gc
import threading

import pytest
from PySide6.QtCore import QEvent
from PySide6.QtWidgets import QApplication, QDialog, QMainWindow


@pytest.fixture(autouse=True)
def no_leaks(qapp):
    """Every test leaves no window, no running timer's owner, no asyncio/planner thread."""
    yield
    QApplication.processEvents()
    QApplication.sendPostedEvents(None, QEvent.DeferredDelete)   # what deleteLater() queued
    gc.collect()
    left = [w for w in QApplication.topLevelWidgets() if isinstance(w, (QMainWindow, QDialog))]
    for w in left:
        w.close()
        w.deleteLater()
    QApplication.sendPostedEvents(None, QEvent.DeferredDelete)
    assert left == [], f"top-level windows left behind: {left}"
    threads = [t.name for t in threading.enumerate() if t.name.startswith("edgetrain-")]
    assert threads == [], f"threads left running: {threads}"
