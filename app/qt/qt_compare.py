"""Two or more past runs side by side: overlaid charts and a table with one column per run.

A view over :mod:`app.workspace.compare`: each run is one colour, one curve per chart
(latency and energy per sample over time, peak memory per device, training loss over
steps with the held-out loss dashed), and one column of the table.  The legend above the
charts names each colour's run: id, model, parallelism.  Nothing here is live: the
charts are drawn once from the records.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.workspace.compare import CHARTS, ComparedRun, load_comparison, table, write_table_csv

from .qt_style import device_colour

INK = "#343a40"   # axes and text, as the live charts draw them


class QtCompareView(QWidget):
    """Runs compared: :attr:`plots` by chart, :attr:`curves` ``[chart][run_id]``, :attr:`table`.

    Parameters
    ----------
    run_dirs
        The runs' record directories (``runs/<id>/``), in column order.

    Raises
    ------
    CompareError
        A run whose record cannot be read (the message names the file).
    """

    def __init__(self, run_dirs: Sequence[Path | str], parent: QWidget | None = None) -> None:
        super().__init__(parent, Qt.Window)
        self.runs: list[ComparedRun] = load_comparison(run_dirs)
        self.setWindowTitle("EdgeTrain — compare " + ", ".join(r.run_id for r in self.runs))
        self.layout_widget = pg.GraphicsLayoutWidget(self)
        self.layout_widget.setBackground("w")   # as the live charts, whatever pyqtgraph's global options
        self.layout_widget.ci.setSpacing(4)
        self.legend = pg.LegendItem(colCount=min(len(self.runs), 3), labelTextSize="9pt", labelTextColor=INK)
        self.layout_widget.addItem(self.legend, row=0, col=0, colspan=2)
        self.plots: dict[str, pg.PlotItem] = {}
        self.curves: dict[str, dict[str, pg.PlotDataItem]] = {chart: {} for chart in CHARTS}
        self.eval_curves: dict[str, pg.PlotDataItem] = {}
        for i, (chart, (title, unit, xlabel)) in enumerate(CHARTS.items()):
            plot = self.layout_widget.addPlot(row=1 + i // 2, col=i % 2)
            plot.setTitle(f"{title} ({unit})", size="9pt", color=INK)
            for side in ("left", "bottom"):
                plot.getAxis(side).setPen(INK)
                plot.getAxis(side).setTextPen(INK)
            plot.setLabel("bottom", xlabel)
            plot.setMenuEnabled(False)
            plot.showGrid(x=False, y=True, alpha=0.15)
            self.plots[chart] = plot
        for index, run in enumerate(self.runs):
            self._draw(index, run)
        ranks = max((len(r.curves["memory"]) for r in self.runs), default=0)
        self.plots["memory"].getAxis("bottom").setTicks([[(float(i), str(i)) for i in range(ranks)]])
        for chart, plot in self.plots.items():
            # every value compared is non-negative: y from 0, so the runs' levels compare by eye
            top = max((max(c.ys) for r in self.runs if (c := r.curves.get(chart)) is not None and c.ys), default=0.0)
            if chart == "loss":
                top = max([top] + [max(r.curves["eval_loss"].ys) for r in self.runs if r.curves["eval_loss"].ys])
            plot.enableAutoRange(x=True, y=False)
            plot.setYRange(0.0, top * 1.08 or 1.0, padding=0)
        self.table = QTableWidget(self)
        self._fill_table()
        png, csv_ = QPushButton("Export charts PNG…", self), QPushButton("Export table CSV…", self)
        png.clicked.connect(self._ask_png)
        csv_.clicked.connect(self._ask_csv)
        bar = QHBoxLayout()
        bar.addStretch(1)
        bar.addWidget(png)
        bar.addWidget(csv_)
        split = QSplitter(Qt.Vertical, self)
        split.addWidget(self.layout_widget)
        split.addWidget(self.table)
        split.setSizes([540, 330])
        lay = QVBoxLayout(self)
        lay.addWidget(split, 1)
        lay.addLayout(bar)
        self.resize(1200, 900)

    def _draw(self, index: int, run: ComparedRun) -> None:
        colour = device_colour(index)
        pen = pg.mkPen(colour, width=2)
        for chart in CHARTS:
            c = run.curves.get(chart)
            if c is None:
                continue
            # memory is a handful of ranks: points joined, so each device shows
            symbol = {"memory": "o"}.get(chart)
            item = pg.PlotDataItem(c.xs, c.ys, pen=pen, symbol=symbol, symbolSize=7, symbolBrush=colour,
                                   symbolPen=colour, name=run.label)
            self.plots[chart].addItem(item)
            self.curves[chart][run.run_id] = item
            if chart == "latency":
                self.legend.addItem(item, run.label)
        ev = run.curves.get("eval_loss")
        if ev is not None and len(ev):
            item = pg.PlotDataItem(ev.xs, ev.ys, pen=pg.mkPen(colour, width=2, style=Qt.DashLine), symbol="s",
                                   symbolSize=6, symbolBrush=colour, symbolPen=colour)
            self.plots["loss"].addItem(item)
            self.eval_curves[run.run_id] = item

    def _fill_table(self) -> None:
        rows = table(self.runs)
        t = self.table
        t.setRowCount(len(rows))
        t.setColumnCount(len(self.runs))
        t.setVerticalHeaderLabels([label for label, _ in rows])
        for col, run in enumerate(self.runs):
            head = QTableWidgetItem(run.run_id)
            head.setForeground(device_colour(col))
            head.setToolTip(run.label)
            t.setHorizontalHeaderItem(col, head)
        for row, (_label, cells) in enumerate(rows):
            for col, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setFlags(Qt.ItemIsEnabled | Qt.ItemIsSelectable)
                item.setToolTip(text)
                t.setItem(row, col, item)
        t.setWordWrap(False)
        t.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        t.verticalHeader().setSectionResizeMode(QHeaderView.Fixed)
        t.verticalHeader().setDefaultSectionSize(t.fontMetrics().height() + 8)

    def cell(self, label: str, run_id: str) -> str:
        """The table's text for the row ``label`` and the run ``run_id``."""
        row = next(i for i in range(self.table.rowCount()) if self.table.verticalHeaderItem(i).text() == label)
        col = next(i for i, r in enumerate(self.runs) if r.run_id == run_id)
        return self.table.item(row, col).text()

    def export_png(self, path: Path | str) -> Path:
        """The charts as they look now."""
        path = Path(path)
        if not self.layout_widget.grab().save(str(path)):
            raise OSError(f"could not write {path}")
        return path

    def _ask_png(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export charts", "compare.png", "PNG (*.png)")
        if path:
            self.export_png(path)

    def _ask_csv(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export table", "compare.csv", "CSV (*.csv)")
        if path:
            write_table_csv(self.runs, path)
