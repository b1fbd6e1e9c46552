"""Frame time of the live charts: 16 devices x 4 series at 20 Hz, 60 s of data on screen.

Each frame does what the chart timer does in a run: one new telemetry point per device
and series lands in the ring buffers, then the view pushes the changed rings into their
curves (``setData``) and the widget paints synchronously.  The plot window holds 60 s of
20 Hz data (1,200 points per curve, 64 curves) and is full before timing starts.

    QT_QPA_PLATFORM=offscreen .venv/bin/python bench/gui_frame.py [--frames 400]

Prints the median and p95 frame time; the target is p95 <= 25 ms.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PySide6.QtWidgets import QApplication  # noqa: E402

from app.qt.qt_charts import QtLiveCharts  # noqa: E402
from app.qt.qt_style import apply_app_style, device_colour  # noqa: E402
from app.workspace.series import SERIES, SeriesStore  # noqa: E402

RATE_HZ = 20.0
WINDOW_S = 60.0


def value(series: str, dev: int, t: float) -> float:
    base = {"energy": 0.05, "latency": 2.0, "throughput": 400.0, "memory": 900.0}[series]
    return base * (1 + 0.1 * dev) * (1 + 0.2 * math.sin(t * 0.7 + dev))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=16)
    ap.add_argument("--frames", type=int, default=400)
    ap.add_argument("--size", default="1400x900")
    ap.add_argument("--png", help="save the last frame here (to look at it)")
    args = ap.parse_args()
    app = QApplication.instance() or QApplication([])
    apply_app_style(app)
    capacity = int(WINDOW_S * RATE_HZ)
    store = SeriesStore(capacity=capacity)
    names = [f"dev{i}" for i in range(args.devices)]
    charts = QtLiveCharts(store, colour_of=lambda n: device_colour(names.index(n)), live=False)
    w, h = (int(x) for x in args.size.split("x"))
    charts.resize(w, h)
    charts.show()
    t = 0.0
    for _ in range(capacity):  # 60 s of data already on screen
        for d, name in enumerate(names):
            for s in SERIES:
                store.append(s, name, t, value(s, d, t))
        t += 1 / RATE_HZ
    charts.repaint_now()
    charts.layout_widget.viewport().repaint()
    app.processEvents()
    times = []
    for i in range(args.frames + 20):
        t0 = time.perf_counter()
        for d, name in enumerate(names):
            for s in SERIES:
                store.append(s, name, t, value(s, d, t))
        charts.repaint_now()
        app.processEvents()  # the update request setData posted: one paint of all four plots
        dt = time.perf_counter() - t0
        t += 1 / RATE_HZ
        if i >= 20:  # warm-up frames: caches, first layouts
            times.append(dt * 1e3)
    times.sort()
    p95 = times[int(0.95 * (len(times) - 1))]
    med = statistics.median(times)
    curves = len(charts.curves)
    points = sum(len(c.xData) for c in charts.curves.values())
    print(f"gui_frame: {args.devices} devices x {len(SERIES)} series, {curves} curves, "
          f"{points} points on screen ({WINDOW_S:.0f} s at {RATE_HZ:.0f} Hz), {len(times)} frames, "
          f"{w}x{h} {os.environ.get('QT_QPA_PLATFORM')}")
    print(f"frame time: median {med:.2f} ms, p95 {p95:.2f} ms, max {times[-1]:.2f} ms "
          f"(target p95 <= 25 ms: {'OK' if p95 <= 25 else 'MISSED'})")
    if args.png:
        charts.export_png(args.png)
    charts.stop()
    charts.close()
    charts.deleteLater()
    app.processEvents()
    return 0 if p95 <= 25 else 1


if __name__ == "__main__":
    sys.exit(main())
