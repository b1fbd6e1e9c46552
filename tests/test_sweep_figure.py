"""The sweep's figure (the paper's Fig. 5/6): grouped bars per model and cell, measured beside
predicted, OOM marked, written by ``edgetrain sweep`` as SVG and (with PySide6) PNG.

The first tests draw figures from cells built here (an OOM cell is cheap to state, slow to
provoke); the last runs ``edgetrain sweep`` as a user does, a separate process, on a
2-device local testbed: tiny-gpt2, DP and PP, two steps each.
"""
from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from app.run.figure import HEIGHT, METRICS, WIDTH, Axis, figure_svg, write_figure
from app.run.sweep import CellPrediction, SweepCell
from app.workspace.loop import AsyncLoop
from tests.test_e2e_spine import base_addr
from workers.config import RunSettings

ROOT = Path(__file__).resolve().parent.parent
NS = {"s": "http://www.w3.org/2000/svg"}
SETTINGS = RunSettings(model="tiny-gpt2", steps=2, batch_size=16, seq_len=32)


def _cell(label: str, model: str, lat: float | None, en: float | None, outcome: str = "done",
          pred_oom: bool = False) -> SweepCell:
    par = "dp" if label == "single" else label
    c = SweepCell(label, par, ["dev0"] if label == "single" else ["dev0", "dev1"], outcome=outcome, model=model,
                  latency_per_sample_s=lat, energy_per_sample_j=en)
    c.predicted = CellPrediction(latency_per_sample_s=0.9 * lat if lat else 0.02,
                                 energy_per_sample_j=1.1 * en if en else 0.5, oom=pred_oom,
                                 oom_devices=["dev1"] if pred_oom else [])
    return c


def _cells() -> list[SweepCell]:
    return [_cell("single", "tiny-gpt2", 0.004, 0.02), _cell("dp", "tiny-gpt2", 0.003, 0.025),
            _cell("pp", "tiny-gpt2", 0.005, 0.03),
            _cell("single", "gpt2-l", None, None, "oom", pred_oom=True),
            _cell("dp", "gpt2-l", None, None, "oom", pred_oom=True), _cell("pp", "gpt2-l", 0.4, 2.0)]


def _parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)


def _bars(root: ET.Element, kind: str, metric: str) -> list[ET.Element]:
    return [r for r in root.iterfind(".//s:rect", NS)
            if r.get("class") == f"bar {kind}" and r.get("data-metric") == metric]


def test_figure_has_a_bar_per_cell_measured_beside_predicted_in_both_panels():
    root = _parse(figure_svg(_cells(), "t", default_model="tiny-gpt2"))
    panels = root.findall(".//s:g[@class='panel']", NS)
    assert [p.get("data-metric") for p in panels] == [m.key for m in METRICS]
    for m in METRICS:
        measured = _bars(root, "measured", m.key)
        predicted = _bars(root, "predicted", m.key)
        # every cell that trained has its bar; the OOM cells have none
        assert sorted((b.get("data-model"), b.get("data-cell")) for b in measured) == sorted(
            [("tiny-gpt2", "single"), ("tiny-gpt2", "dp"), ("tiny-gpt2", "pp"), ("gpt2-l", "pp")])
        assert len(predicted) == 4
        for meas in measured:   # the predicted bar sits right beside its measured bar, as wide
            pred = next(p for p in predicted if (p.get("data-model"), p.get("data-cell")) ==
                        (meas.get("data-model"), meas.get("data-cell")))
            assert float(pred.get("x")) == pytest.approx(float(meas.get("x")) + float(meas.get("width")), abs=0.11)
            assert float(meas.get("height")) > 0
        # the taller value draws the taller bar (same panel, same scale)
        by = {(b.get("data-model"), b.get("data-cell")): b for b in measured}
        assert float(by[("gpt2-l", "pp")].get("height")) > float(by[("tiny-gpt2", "pp")].get("height"))
    # the legend names every cell label once, in order
    assert [s.get("data-cell") for s in root.iterfind(".//s:rect[@class='swatch']", NS)] == ["single", "dp", "pp"]
    texts = [t.text for t in root.iterfind(".//s:text", NS)]
    assert "tiny-gpt2" in texts and "gpt2-l" in texts


def test_oom_cells_are_marked_in_red_instead_of_a_bar():
    root = _parse(figure_svg(_cells(), default_model="tiny-gpt2"))
    marks = [t for t in root.iterfind(".//s:text", NS) if t.get("class") == "oom"]
    assert all(t.text == "OOM" and t.get("fill") == "#d62728" for t in marks)
    # measured and predicted, in both panels, for the two cells that ran out of memory
    got = sorted((t.get("data-model"), t.get("data-cell"), t.get("data-kind"), t.get("data-metric")) for t in marks)
    want = sorted((("gpt2-l", c, k, m.key) for c in ("single", "dp") for k in ("measured", "predicted")
                   for m in METRICS))
    assert got == want


def test_a_failed_cell_says_why_and_wide_ranges_go_log():
    cells = _cells() + [_cell("tp", "tiny-gpt2", None, None, "failed")]
    root = _parse(figure_svg(cells, default_model="tiny-gpt2"))
    missing = [t for t in root.iterfind(".//s:text", NS) if t.get("class") == "missing"
               and t.get("data-kind") == "measured"]
    assert {t.text for t in missing} == {"failed"}
    # 3 ms to 0.4 s latency: more than two decades, so the latency panel is a log scale
    panels = {p.get("data-metric"): p for p in root.iterfind(".//s:g[@class='panel']", NS)}
    assert panels["latency_per_sample_s"].get("data-log") == "true"
    assert Axis.fit([1.0, 5.0]).log is False and Axis.fit([1.0, 500.0]).log is True
    assert Axis.fit([3.0, 7.0]).ticks[-1] >= 7.0


def test_png_of_the_figure(tmp_path, request):
    pytest.importorskip("PySide6")
    request.getfixturevalue("qapp")   # pytest-qt's QApplication first: svg_to_png would make a bare one
    from app.qt.qt_figure import svg_to_png

    svg = write_figure(_cells(), SETTINGS, tmp_path)
    png = svg_to_png(svg)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])    # IHDR: twice the SVG's size
    root = _parse(svg.read_text())
    assert (width, height) == (2 * int(root.get("width")), 2 * int(root.get("height")))


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    from app.testbed.local import Testbed

    loop = AsyncLoop("testbed-loop").start()
    tb = Testbed(tmp_path_factory.mktemp("tb"), n_devices=2, port=0, base_addr=base_addr())
    loop.submit(tb.start()).result(30)
    yield tb
    loop.submit(tb.stop()).result(60)
    loop.stop()


@pytest.mark.slow
def test_edgetrain_sweep_writes_the_figure(testbed, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ}
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "sweep", "--inventory", str(testbed.inventory_path),
         "--models", "tiny-gpt2", "--parallelisms", "dp,pp", "--no-single", "--steps", "2",
         "--batch-size", "16", "--seq-len", "32", "--eval-every", "0", "--checkpoint-every", "0",
         "--out", str(out), "--runs-dir", str(tmp_path / "runs")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    svg = out / "figure.svg"
    root = _parse(svg.read_text())
    for m in METRICS:
        bars = _bars(root, "measured", m.key)
        assert sorted(b.get("data-cell") for b in bars) == ["dp", "pp"], proc.stderr
        assert all(b.get("data-model") == "tiny-gpt2" and float(b.get("data-value")) > 0 for b in bars)
        assert sorted(b.get("data-cell") for b in _bars(root, "predicted", m.key)) == ["dp", "pp"]
    # the CLI names the figure files it wrote
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("figure: "))
    try:
        import PySide6  # noqa: F401
    except ImportError:
        assert line == f"figure: {svg} (SVG only: PNG needs PySide6, pip install 'edgetrain[gui]')"
        return
    png = out / "figure.png"
    assert line == f"figure: {svg} and {png}"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (2 * WIDTH, 2 * HEIGHT)
    assert re.search(r"\| dp \| tiny-gpt2 \| 2 \| done \|", proc.stdout), proc.stdout
