"""The Study window, offscreen, on a 2-device local testbed (real SSH, real workers).

Opened from the main window's *Study…* action over the ticked participants: a 2-cell study
of tiny-gpt2 (DP, PP) runs on the window's asyncio thread; the progress bar reaches 2 of 2,
the table has both cells done with measured and predicted values, and the figure shows
the cells' bars (the SVG the widget draws, and pixels that are not blank).
"""
from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pyqtgraph")

from PySide6.QtCore import Qt  # noqa: E402
from PySide6.QtGui import QColor  # noqa: E402

from app.qt.qt_main import QtMainWindow  # noqa: E402
from app.testbed.local import Testbed  # noqa: E402
from app.workspace.loop import AsyncLoop  # noqa: E402
from tests.test_e2e_spine import base_addr  # noqa: E402

pytestmark = [pytest.mark.gui, pytest.mark.slow]
STUDY_TIMEOUT_MS = 300_000   # two cells on two shared cores: a hang guard, not a speed check
NS = {"s": "http://www.w3.org/2000/svg"}

from tests.qtleaks import no_leaks  # noqa: E402,F401 -- autouse fixture


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    loop = AsyncLoop("testbed-loop").start()
    tb = Testbed(tmp_path_factory.mktemp("tb"), n_devices=2, port=0, base_addr=base_addr())
    loop.submit(tb.start()).result(30)
    yield tb
    loop.submit(tb.stop()).result(60)
    loop.stop()


def open_window(qtbot, tb: Testbed, tmp_path) -> QtMainWindow:
    w = QtMainWindow(inventory=tb.inventory_path, runs_dir=tmp_path / "runs", check_devices=False)
    qtbot.addWidget(w)
    w.show()
    qtbot.waitExposed(w)
    for n in ("dev0", "dev1"):
        w.toggle_participant(n, True)
    return w


def test_study_runs_two_cells_and_shows_the_figure(qtbot, testbed, tmp_path):
    w = open_window(qtbot, testbed, tmp_path)
    study_action = next(a for a in w.menuBar().actions() if a.text() == "&Run").menu().actions()[-1]
    assert study_action.text() == "Study…"
    study_action.trigger()
    view = w.study
    qtbot.waitExposed(view)
    assert "dev0, dev1" in view.devices_label.text()
    assert not view.figure.has_figure()
    view.choose(["tiny-gpt2"], ["dp", "pp"], single=False, steps=2, batch_size=16, seq_len=32)
    seen: list[int] = []
    view.progress.valueChanged.connect(seen.append)
    with qtbot.waitSignal(view.finished, timeout=STUDY_TIMEOUT_MS) as blocker:
        qtbot.mouseClick(view.run_button, Qt.LeftButton)
        assert view.running and not view.run_button.isEnabled() and view.stop_button.isEnabled()
        assert not w.launch_action.isEnabled()     # one thing at a time on these devices
        assert [r[:4] for r in view.rows()] == [["tiny-gpt2", "dp", "dev0, dev1", "pending"],
                                               ["tiny-gpt2", "pp", "dev0, dev1", "pending"]]
    result = blocker.args[0]
    assert result is not None and not result.stopped
    rows = view.rows()
    assert [r[:4] for r in rows] == [["tiny-gpt2", "dp", "dev0, dev1", "done"],
                                     ["tiny-gpt2", "pp", "dev0, dev1", "done"]], rows
    for r in rows:   # measured and predicted latency and energy, all numbers
        assert all(float(v) > 0 for v in r[4:8]), r
    # progress: 0 of 2, then 1, then 2 of 2, as the cells finished
    assert view.progress.maximum() == 2 and view.progress.value() == 2 and seen[-2:] == [1, 2]
    assert view.progress.text() == "cell 2 of 2"
    assert view.run_button.isEnabled() and not view.stop_button.isEnabled() and w.launch_action.isEnabled()
    # the figure: the report's SVG, with both cells' bars, drawn in the widget
    assert view.figure.has_figure() and view.figure.svg_text == (result.out_dir / "figure.svg").read_text()
    root = ET.fromstring(view.figure.svg_text)
    bars = [r for r in root.iterfind(".//s:rect", NS) if r.get("class") == "bar measured"]
    assert sorted({b.get("data-cell") for b in bars}) == ["dp", "pp"]
    assert (result.out_dir / "report.md").is_file() and str(result.out_dir) in view.where.text()
    image = view.figure.grab().toImage()
    colours = {image.pixelColor(x, y).name() for x in range(0, image.width(), 7) for y in range(0, image.height(), 7)}
    assert QColor("#1f77b4").name() in colours     # a DP bar's blue is on screen
    view.close()
