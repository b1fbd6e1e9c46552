"""Live charts: energy and latency per sample, throughput, memory per device; loss and accuracy.

Telemetry fills a :class:`app.workspace.series.SeriesStore` (ring buffers) as it arrives; one
``QTimer`` per view repaints at a fixed rate, calling ``setData`` only on the curves whose
ring changed since the last frame.  Nothing redraws per telemetry record.  OOM and
failure events are vertical markers on the shared time axis; the plan's predictions are
dashed horizontal reference lines in each device's colour.

The bottom row is over training steps, not time: the training loss of each step (one
curve per reporting device, in its colour) with the held-out loss (thick, dashed), and
the held-out accuracy.  Every rank that knows an evaluation reports the same numbers, so
the held-out curves are drawn in one style whatever the device: they overlap as one.
(No legend there: the loss plot's title names the dashed curve, and the latency plot's
legend names the device colours.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QColor
from PySide6.QtWidgets import QVBoxLayout, QWidget

from app.workspace.series import MEMORY_LABEL, SERIES, STEP_SERIES, SeriesStore

pg.setConfigOptions(antialias=False, useOpenGL=False, background="w", foreground="#343a40")

TITLES = {"energy": "Energy per sample", "latency": "Latency per sample",
          "throughput": "Throughput", "memory": f"{MEMORY_LABEL} per device",
          "loss": "Loss (cross-entropy; dashed: held-out)", "accuracy": "Held-out accuracy (%)"}
#: The plot each series is drawn on (time series: their own).
PLOT_OF = {"train_loss": "loss", "eval_loss": "loss", "accuracy": "accuracy"}
#: Held-out curves: one style for every device (see the module docstring), dark so no
#: device colour is mistaken for them; the loss plot's title says which is which.
EVAL_PENS = {"eval_loss": pg.mkPen("#212529", width=2, style=Qt.DashLine),
             "accuracy": pg.mkPen("#212529", width=2)}
STEP_PLOTS = ("loss", "accuracy")
MARKER_PENS = {"oom": pg.mkPen("#d32f2f", width=1), "failure": pg.mkPen("#e65100", width=1),
               "error": pg.mkPen("#e65100", width=1)}
LEGEND_MAX = 8


class _RingCurve(pg.PlotCurveItem):
    """A curve fed from a ring: x is sorted, values are finite, the pen is 1 px.

    pyqtgraph recomputes bounds with ``nanmin``/``nanmax`` and pixel padding for every
    ``setData``; with 64 curves at 20 Hz that is a third of a frame.  Knowing the data's
    shape, the bounds cost two array reductions and nothing else.
    """

    _fast: tuple[float, float, float, float] | None = None

    def set_ring_data(self, xs: np.ndarray, ys: np.ndarray) -> None:
        self._fast = (float(xs[0]), float(xs[-1]), float(ys.min()), float(ys.max())) if len(xs) else None
        self.setData(xs, ys, skipFiniteCheck=True)

    def dataBounds(self, ax: int, frac: float = 1.0, orthoRange=None):  # noqa: N802,N803 - pyqtgraph API
        if self._fast is not None and frac >= 1.0 and orthoRange is None:
            return self._fast[0:2] if ax == 0 else self._fast[2:4]
        return super().dataBounds(ax, frac, orthoRange)

    def pixelPadding(self) -> float:  # noqa: N802 - pyqtgraph API
        return 0.0  # half a pixel of a 1-px line; not worth a pixelVectors() per frame


class QtLiveCharts(QWidget):
    """Four time-series plots and two step plots over one :class:`SeriesStore`, repainted by a timer.

    Parameters
    ----------
    store
        Where the points are (the view reads, the owner appends).
    colour_of
        Colour of a device's curves.
    fps
        Repaint rate (Hz).
    live
        Start the repaint timer now (a history viewer paints once instead).
    """

    def __init__(self, store: SeriesStore | None = None, colour_of: Callable[[str], QColor] | None = None,
                 fps: float = 15.0, live: bool = True, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.store = store if store is not None else SeriesStore()
        self.colour_of = colour_of or (lambda name: QColor(pg.intColor(abs(hash(name)) % 16, 16)))
        self.layout_widget = pg.GraphicsLayoutWidget(self)
        self.layout_widget.ci.setSpacing(4)
        self.plots: dict[str, pg.PlotItem] = {}
        for i, series in enumerate(SERIES):
            plot = self.layout_widget.addPlot(row=i // 2, col=i % 2)
            plot.setTitle(f"{TITLES[series]} ({SERIES[series]})", size="9pt")
            plot.setLabel("bottom", "time since launch", units="s")
            plot.setMenuEnabled(False)
            plot.getViewBox().setMouseEnabled(x=False, y=False)
            plot.disableAutoRange()
            if i < 2:  # the x axis is shared: label it once, under the bottom row
                plot.getAxis("bottom").setStyle(showValues=False)
                plot.setLabel("bottom", "")
            self.plots[series] = plot
        for series in ("energy", "throughput", "memory"):
            self.plots[series].setXLink(self.plots["latency"])
        for row, name in enumerate(STEP_PLOTS):
            plot = self.layout_widget.addPlot(row=2, col=row)
            plot.setTitle(TITLES[name], size="9pt")
            plot.setLabel("bottom", "completed steps")
            plot.setMenuEnabled(False)
            plot.getViewBox().setMouseEnabled(x=False, y=False)
            plot.disableAutoRange()
            self.plots[name] = plot
        self.plots["accuracy"].setXLink(self.plots["loss"])
        self.legend = pg.LegendItem(offset=(-8, 8), labelTextSize="8pt", colCount=2,
                                    brush=pg.mkBrush(255, 255, 255, 210), pen=pg.mkPen("#ced4da"))
        self.legend.setParentItem(self.plots["latency"].getViewBox())
        self.curves: dict[tuple[str, str], _RingCurve] = {}
        self.markers: list[tuple[float, str, str]] = []
        self._marker_items: list[tuple[pg.PlotItem, pg.InfiniteLine]] = []
        self._refs: dict[tuple[str, str], pg.InfiniteLine] = {}
        self._seen = 0
        self.frames = 0
        self._reset_ranges()
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.layout_widget)
        self.timer = QTimer(self)
        self.timer.setInterval(int(1000 / fps))
        self.timer.timeout.connect(self.repaint_now)
        if live:
            self.timer.start()

    # ------------------------------------------------------------------ data -> curves
    def _curve(self, series: str, device: str) -> _RingCurve:
        key = (series, device)
        curve = self.curves.get(key)
        if curve is None:
            # PlotCurveItem, not PlotDataItem: no symbol/downsampling machinery per frame;
            # the rings already bound the points, and 1-px pens keep painting cheap
            pen = EVAL_PENS.get(series) or pg.mkPen(self.colour_of(device), width=1)
            curve = _RingCurve(pen=pen, skipFiniteCheck=True, antialias=False)
            self.plots[PLOT_OF.get(series, series)].addItem(curve)
            self.curves[key] = curve
            if series == "latency":
                if len(self.curves_of("latency")) <= LEGEND_MAX:
                    self.legend.addItem(curve, device)
                else:
                    self.legend.setVisible(False)  # too many devices: the device table carries the colours
        return curve

    def curves_of(self, series: str) -> list[str]:
        return [d for (s, d) in self.curves if s == series]

    def repaint_now(self) -> int:
        """One frame: push changed rings into their curves; returns how many changed.

        Ranges are set here, not by auto-range: x spans the data, y starts at 0 (every
        series is non-negative), and both move in coarse steps so the axes (costly to
        lay out) are rebuilt only now and then, not on every frame.
        """
        version = self.store.version
        changed = self.store.changed_since(self._seen)
        self._seen = version
        if not changed:
            return 0
        touched: set[str] = set()
        for key in changed:
            xs, ys = self.store.arrays(key.series, key.device)
            curve = self._curve(key.series, key.device)
            curve.set_ring_data(xs, ys)
            plot = PLOT_OF.get(key.series, key.series)
            if len(xs):
                top = curve._fast[3] if curve._fast else 0.0
                if np.isfinite(top) and top > self._y_max.get(plot, 0.0):
                    self._y_max[plot] = top
            touched.add(plot)
        self._update_ranges(touched)
        self.frames += 1
        return len(changed)

    def _update_ranges(self, touched: set[str]) -> None:
        """Axis ranges of the ``touched`` plots (and the shared x axes)."""
        bounds = [c._fast for (s, _d), c in self.curves.items() if c._fast is not None and s in SERIES]
        if bounds:
            lo = min(b[0] for b in bounds)
            hi = max(b[1] for b in bounds)
            # snap to a tick-sized step: the axis moves every few seconds, not every frame
            step = _nice_ceil(max(hi - lo, 1.0) / 8)
            lo_q = np.floor(lo / step) * step
            hi_q = (np.floor(hi / step) + 1) * step
            if (lo_q, hi_q) != self._x_range:
                self._x_range = (lo_q, hi_q)
                self.plots["latency"].setXRange(lo_q, hi_q, padding=0)
        steps = [c._fast[1] for (s, _d), c in self.curves.items() if c._fast is not None and s in STEP_SERIES]
        if steps:
            # from step 0, in coarse steps like the time axis
            hi = _nice_ceil(max(max(steps), 1.0) * 1.05)
            if hi != self._step_range:
                self._step_range = hi
                self.plots["loss"].setXRange(0.0, hi, padding=0)
        for plot in touched - {"accuracy"}:  # accuracy: always 0..100 %
            top = _nice_ceil(self._y_max.get(plot, 0.0) * 1.1) or 1.0
            if top != self._y_range.get(plot):
                self._y_range[plot] = top
                self.plots[plot].setYRange(0.0, top, padding=0)

    def point_count(self, series: str) -> int:
        """Points currently drawn in ``series`` (what a user sees)."""
        total = 0
        for (s, _d), curve in self.curves.items():
            if s == series and curve.xData is not None:
                total += len(curve.xData)
        return total

    # ------------------------------------------------------------------ markers, references
    def add_marker(self, t: float, kind: str, device: str | None, text: str = "") -> None:
        """A vertical line at ``t`` seconds on every plot (OOM, failure)."""
        self.markers.append((t, kind, device or ""))
        pen = MARKER_PENS.get(kind, pg.mkPen("#6c757d", width=1))
        label = f"{kind.upper()} {device or ''}".strip()
        for series, plot in self.plots.items():
            if series in STEP_PLOTS:
                continue  # their x axis is steps, not time
            line = pg.InfiniteLine(pos=t, angle=90, pen=pen, movable=False,
                                   label=label if series in ("latency", "memory") else None,
                                   labelOpts={"position": 0.9, "color": pen.color(), "fill": (255, 255, 255, 200)})
            line.setToolTip(text or label)
            plot.addItem(line, ignoreBounds=False)
            self._marker_items.append((plot, line))

    def set_reference(self, series: str, device: str, value: float | None) -> None:
        """The predicted value of ``series`` for ``device`` (``None`` removes it)."""
        key = (series, device)
        line = self._refs.get(key)
        if value is None:
            if line is not None:
                self.plots[series].removeItem(line)
                del self._refs[key]
            return
        if line is None:
            colour = QColor(self.colour_of(device))
            colour.setAlpha(170)
            line = pg.InfiniteLine(angle=0, movable=False, pen=pg.mkPen(colour, width=1, style=Qt.DashLine))
            what = f"peak {MEMORY_LABEL}" if series == "memory" else TITLES[series].lower()
            line.setToolTip(f"{device}: the plan's predicted {what}")
            self.plots[series].addItem(line, ignoreBounds=True)
            self._refs[key] = line
        line.setValue(value)
        # keep the prediction on screen even when the measurements stay far below it
        if value > self._y_max.get(series, 0.0):
            self._y_max[series] = value
            self._update_ranges({series})

    def clear_references(self) -> None:
        for (series, _d), line in list(self._refs.items()):
            self.plots[series].removeItem(line)
        self._refs.clear()

    def references(self) -> dict[tuple[str, str], float]:
        return {k: float(v.value()) for k, v in self._refs.items()}

    def clear(self) -> None:
        """Drop curves, markers and data (a new run starts)."""
        for (series, _d), curve in self.curves.items():
            self.plots[PLOT_OF.get(series, series)].removeItem(curve)
        self.curves.clear()
        self.legend.clear()
        self.legend.setVisible(True)
        for plot, line in self._marker_items:
            plot.removeItem(line)
        self._marker_items.clear()
        self.markers.clear()
        self.store.clear()
        self._seen = self.store.version
        self._reset_ranges()

    def _reset_ranges(self) -> None:
        self._x_range: tuple[float, float] | None = None
        self._step_range: float | None = None
        self._y_max: dict[str, float] = {}
        self._y_range: dict[str, float] = {}
        self.plots["accuracy"].setYRange(0.0, 100.0, padding=0)

    # ------------------------------------------------------------------ export
    def export_png(self, path: Path | str) -> Path:
        """The six plots as they look now, as a PNG."""
        self.repaint_now()
        path = Path(path)
        if not self.layout_widget.grab().save(str(path)):
            raise OSError(f"could not write {path}")
        return path

    def export_csv(self, path: Path | str) -> int:
        """Every point held (``series,device,t_s,value``); returns the number of rows."""
        return self.store.write_csv(path)

    def stop(self) -> None:
        self.timer.stop()

    def closeEvent(self, event) -> None:  # noqa: N802
        self.timer.stop()
        super().closeEvent(event)


def _nice_ceil(v: float) -> float:
    """The smallest of 1, 1.5, 2, 2.5, 3, 4, 5, 6, 8 x 10^k that is >= ``v`` (0 for v <= 0)."""
    if not v > 0 or not np.isfinite(v):
        return 0.0
    exp = np.floor(np.log10(v))
    for m in (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0):
        if m * 10 ** exp >= v * (1 - 1e-12):
            return float(m * 10 ** exp)
    return float(10 ** (exp + 1))


def last_values(store: SeriesStore, series: str) -> dict[str, float]:
    """The newest value of ``series`` per device (for summaries and tests)."""
    out = {}
    for dev in store.devices(series):
        xs, ys = store.arrays(series, dev)
        if len(ys):
            out[dev] = float(np.asarray(ys)[-1])
    return out
