"""Rejected telemetry reaches the GUI: the run summary view and the event log show it."""
from __future__ import annotations

import json
from dataclasses import asdict

import pytest

pytest.importorskip("PySide6")

from app.qt.qt_runviews import QtEventLog, QtRunSummary  # noqa: E402
from app.run.runstate import RunState  # noqa: E402
from app.run.telemetry import TelemetryParser  # noqa: E402
from tests.qtleaks import no_leaks  # noqa: E402,F401 -- autouse fixture

pytestmark = pytest.mark.gui


def test_summary_and_event_log_show_rejected_lines(qtbot):
    state = RunState("r", ["dev0", "dev1"], {})
    log = QtEventLog()
    qtbot.addWidget(log)
    state.event.connect(lambda ev: log.add_event(asdict(ev)))
    parser = TelemetryParser.for_run(state)
    base = {"v": 1, "type": "step", "run": "r", "device": "dev1", "t": 1.8e9, "step": 0, "samples": 8,
            "latency_per_sample_s": 0.01}
    parser.feed("dev1", json.dumps({**base, "rank": 1, "latency_s": float("nan")}))
    parser.feed("dev1", json.dumps({**base, "rank": 1, "latency_s": float("nan")}))
    parser.feed("dev1", json.dumps({**base, "rank": 0, "latency_s": 0.1}))
    view = QtRunSummary()
    qtbot.addWidget(view)
    view.show_summary(state.summary())
    text = view.durable.text()
    assert view.durable.isVisibleTo(view)
    assert "rejected telemetry: 3 lines (dev1: 2 not finite, 1 rank)" in text
    rows = log.rows()
    assert [(d, k) for d, k, _ in rows] == [("dev1", "telemetry"), ("dev1", "telemetry")]
    assert "'latency_s' is nan" in rows[0][2] and "started as rank 1" in rows[1][2]
    view.show_summary({**state.summary(), "rejected_telemetry_lines": 0})
    assert "rejected" not in view.durable.text()
