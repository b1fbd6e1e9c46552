"""Loss and held-out accuracy in the GUI: real telemetry lines -> run state -> charts and summary.

Records are written by the workers' own :class:`~workers.protocol.Emitter` and read back
with :func:`~workers.protocol.parse_line`, fed to a :class:`RunState`, and reach the main
window through the same queued bridge a live run uses (offscreen, real widgets).
"""
from __future__ import annotations

import io
import math

import numpy as np
import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pyqtgraph")

from app.qt.qt_bridge import QtRunBridge  # noqa: E402
from app.qt.qt_charts import EVAL_PENS, QtLiveCharts  # noqa: E402
from app.run.runstate import RunState  # noqa: E402
from app.workspace.series import SeriesStore, record_points  # noqa: E402
from tests.qtleaks import no_leaks  # noqa: E402,F401 -- autouse fixture
from tests.test_gui_panels import close_window, open_window, write_inventory  # noqa: E402
from workers.protocol import Emitter, parse_line  # noqa: E402

pytestmark = pytest.mark.gui

# Train loss per step on the last pipeline stage (dev1); dev0 is stage 0 (loss None).
TRAIN = [0.71, 0.69, 0.66, 0.62, 0.60, 0.55]
# (completed steps, loss, accuracy, samples): after step 3 and after the last step
EVALS = [(3, 0.64, 0.5625, 32), (6, 0.52, 0.8125, 32)]


def telemetry() -> list[dict]:
    """A two-stage pipeline's records, as lines on the workers' stdout and parsed back."""
    out = io.StringIO()
    em = [Emitter("run1", r, f"dev{r}", out) for r in range(2)]
    for r in range(2):
        em[r].emit("hello", world_size=2, parallelism="pp", model="tiny-gpt2", pid=100 + r)
    pending = list(EVALS)
    for it, loss in enumerate(TRAIN):
        for r in range(2):
            em[r].emit("step", step=it, samples=16, latency_s=0.1, latency_per_sample_s=0.1 / 16,
                       loss=loss if r == 1 else None, role=f"stage {r}/2")
        if pending and pending[0][0] == it + 1:
            step, loss_e, acc, n = pending.pop(0)
            em[1].emit("eval", step=step, loss=loss_e, accuracy=acc, samples=n, role="stage 1/2")
    em[1].emit("eval", step=6, loss=0.52, accuracy=0.8125, samples=32)     # a duplicate: kept once
    for r in range(2):
        em[r].emit("done", steps=len(TRAIN), samples=16 * len(TRAIN), wall_s=1.0)
    return [parse_line(line) for line in out.getvalue().splitlines()]


def test_record_points_over_steps():
    recs = telemetry()
    pts = [p for rec in recs for p in record_points(rec, recs[0]["t"])]
    train = [(x, y) for s, d, x, y in pts if s == "train_loss"]
    assert train == [(float(i + 1), v) for i, v in enumerate(TRAIN)]            # x: completed steps
    assert all(d == "dev1" for s, d, _x, _y in pts if s in ("train_loss", "eval_loss", "accuracy"))
    assert [(x, y) for s, _d, x, y in pts if s == "eval_loss"][:2] == [(3.0, 0.64), (6.0, 0.52)]
    assert [(x, y) for s, _d, x, y in pts if s == "accuracy"][:2] == [(3.0, 56.25), (6.0, 81.25)]
    nan = {**recs[-3], "loss": math.nan}                                         # a diverged model
    assert [s for s, *_ in record_points(nan, 0)] == ["accuracy"]


def test_charts_and_summary_show_loss_and_accuracy(qtbot, tmp_path):
    w = open_window(qtbot, tmp_path, write_inventory(tmp_path / "inv.yaml", 2))
    state = RunState("run1", ["dev0", "dev1"], {"settings": {"steps": len(TRAIN)}}, run_dir=tmp_path / "run1")
    bridge = QtRunBridge(state, w)
    bridge.record.connect(w.run.record)          # the path a live run's records take
    w._t0 = state.started
    for rec in telemetry():
        state.feed(rec)
    charts = w.charts
    qtbot.waitUntil(lambda: charts.store.count("accuracy") == 3, timeout=3000)
    charts.repaint_now()
    curve = charts.curves[("train_loss", "dev1")]
    assert curve.xData.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0] and curve.yData.tolist() == TRAIN
    assert ("train_loss", "dev0") not in charts.curves                     # stage 0 knows no loss
    ev = charts.curves[("eval_loss", "dev1")]
    assert ev.xData.tolist() == [3.0, 6.0, 6.0] and ev.yData.tolist() == [0.64, 0.52, 0.52]
    acc = charts.curves[("accuracy", "dev1")]
    assert acc.yData.tolist() == [56.25, 81.25, 81.25]
    assert ev.opts["pen"] == EVAL_PENS["eval_loss"]                          # held-out: one style
    # the loss and accuracy plots carry their curves; the axes show every point
    assert curve in charts.plots["loss"].items and acc in charts.plots["accuracy"].items
    (x0, x1), (y0, y1) = charts.plots["loss"].viewRange()
    assert x0 == 0.0 and x1 >= 6.0 and y0 == 0.0 and y1 >= max(TRAIN)
    assert charts.plots["accuracy"].viewRange()[1] == [0.0, 100.0]
    assert charts.point_count("train_loss") == len(TRAIN)
    # markers stay on the time plots
    charts.add_marker(0.5, "oom", "dev0")
    assert {p for p, _line in charts._marker_items}.isdisjoint({charts.plots["loss"], charts.plots["accuracy"]})
    # the run state keeps one evaluation per step; the summary view shows the last
    state.finish("done")
    s = state.summary()
    assert [(e["step"], e["accuracy"]) for e in s["evals"]] == [(3, 0.5625), (6, 0.8125)]
    assert (s["eval_step"], s["eval_loss"], s["eval_accuracy"]) == (6, 0.52, 0.8125)
    w._on_finished("done", s)
    label = w.summary.evaluation
    assert not label.isHidden() and "81.2%" in label.text() and "0.5200" in label.text()
    assert "after step 6" in label.text() and "2 evaluations" in label.text()
    w.summary.clear()
    assert w.summary.evaluation.isHidden()
    bridge.detach()
    close_window(w)


def test_clear_and_history_charts(qtbot):
    store = SeriesStore()
    charts = QtLiveCharts(store, live=False)
    qtbot.addWidget(charts)
    for rec in telemetry():
        for series, dev, x, y in record_points(rec, 0.0):
            store.append(series, dev, x, y)
    assert charts.repaint_now() > 0
    np.testing.assert_array_equal(charts.curves[("accuracy", "dev1")].xData, [3.0, 6.0, 6.0])
    charts.clear()
    assert not charts.curves
    assert not charts.plots["loss"].listDataItems()
    charts.stop()
