"""The control panel's Study: the paper's case study as one action, without Qt.

A study is a sweep (:mod:`app.run.sweep`) over the workspace's participants: every chosen
model × parallelism is an ordinary run, one after another.  :class:`Study` runs it on the
window's asyncio thread, announces each cell as plain data (the cell as a dict and the
figure so far, as SVG text) and writes the report and figure next to the run records.
The Qt view (:mod:`app.qt.qt_study`) shows what it announces; nothing here knows Qt.
"""
from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from app.devices.inventory import Inventory
from app.run.figure import describe, figure_svg, write_figure
from app.run.sweep import SweepCell, plan_cells, run_sweep, sweep_dir, write_report
from app.signals import Signal
from workers.config import RunSettings
from workers.presets import PRESETS

if TYPE_CHECKING:
    from app.run.launcher import Launcher
    from app.workspace.workspace import Workspace

#: What the Study view offers and ticks by default: the paper's four parallelisms and the
#: one-device baseline; the tiny presets (a study of them takes a minute, not an hour).
STUDY_PARALLELISMS = ("dp", "sp", "tp", "pp", "hybrid")
DEFAULT_PARALLELISMS = ("dp", "sp", "tp", "pp")
MODELS = tuple(PRESETS)
DEFAULT_MODELS = tuple(m for m in PRESETS if m.startswith("tiny-"))
FIGURE_TITLE = "EdgeTrain study: energy and latency per sample"


@dataclass
class StudyProgress:
    """Where a study is: ``done`` of ``total`` cells, and the one running now."""

    total: int = 0
    done: int = 0
    current: str = ""          # 'tiny-gpt2 · dp', empty between cells and at the end


@dataclass
class StudyResult:
    """A finished (or stopped) study: its cells and where its report and figure are."""

    out_dir: Path
    cells: list[SweepCell]
    report: Path
    figure: Path
    stopped: bool = False
    figure_text: str = field(default="", repr=False)


class Study:
    """A sweep over the workspace's participants, for the GUI.

    Parameters
    ----------
    workspace
        Its participants (in order) are the devices; run records go to its runs dir.

    Signals
    -------
    progress(StudyProgress)     a copy, on the asyncio thread
    cell_done(dict, str)        a finished cell (``dataclasses.asdict``) and the figure so far
    """

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace
        self.progress = Signal()
        self.cell_done = Signal()
        self.running = False
        self._stop = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._launcher: Launcher | None = None

    # ------------------------------------------------------------------ set-up (GUI thread)
    def devices(self) -> list[str]:
        """The participants, in stage order: the devices every cell runs on."""
        return list(self.workspace.topology.participants)

    def plan(self, models: Sequence[str], parallelisms: Sequence[str], single: bool = True) -> list[SweepCell]:
        """The study's cells, model-major (the figure's groups).

        Raises
        ------
        ValueError
            No participants, no model or no parallelism chosen.
        """
        names = self.devices()
        if not names:
            raise ValueError("no participants: tick the devices to study in the devices panel")
        if not models:
            raise ValueError("choose at least one model")
        if not parallelisms and not single:
            raise ValueError("choose at least one parallelism (or the one-device baseline)")
        return plan_cells(names, list(parallelisms), single=single, models=list(models))

    def inventory(self) -> Inventory:
        """The participants as an inventory, as :meth:`Workspace.prepare_run` builds it."""
        ws = self.workspace
        return Inventory(devices=[ws.devices.get(n).device for n in self.devices()], known_hosts=ws.known_hosts.path)

    # ------------------------------------------------------------------ the run (asyncio thread)
    async def run(self, settings: RunSettings, cells: list[SweepCell], inventory: Inventory,
                  out_dir: Path | None = None) -> StudyResult:
        """Run ``cells`` (from :meth:`plan`) on ``inventory`` (from :meth:`inventory`, taken
        on the GUI thread) one after another; write the report and figure.

        A stop (:meth:`request_stop`) ends the running cell at its next step and skips the rest.
        """
        self._loop = asyncio.get_running_loop()
        self._stop, self.running = False, True
        out_dir = out_dir or sweep_dir(self.workspace.runs_dir)
        done: list[SweepCell] = []
        self.progress.emit(StudyProgress(len(cells), 0, ""))

        def on_start(cell: SweepCell, launcher: Launcher) -> None:
            self._launcher = launcher
            self.progress.emit(StudyProgress(len(cells), len(done), f"{cell.model} · {cell.label}"))

        def on_cell(cell: SweepCell) -> None:
            self._launcher = None
            done.append(cell)
            svg = figure_svg(done, FIGURE_TITLE, describe(settings, done), default_model=settings.model)
            self.cell_done.emit(dataclasses.asdict(cell), svg)
            self.progress.emit(StudyProgress(len(cells), len(done), ""))

        try:
            await run_sweep(inventory, None, settings, cells, self.workspace.runs_dir, on_cell=on_cell,
                            on_start=on_start, should_stop=lambda: self._stop)
        finally:
            self.running, self._launcher = False, None
        report = write_report(cells, settings, out_dir)
        figure = write_figure(cells, settings, out_dir)
        return StudyResult(out_dir, cells, report, figure, stopped=self._stop,
                           figure_text=figure.read_text(encoding="utf-8"))

    # ------------------------------------------------------------------ stop (any thread)
    def request_stop(self) -> None:
        """Stop the study: the running cell ends at its next step, the rest are skipped."""
        self._stop = True
        loop = self._loop
        if loop is not None and self.running and not loop.is_closed():
            loop.call_soon_threadsafe(self._stop_current)

    def _stop_current(self) -> None:
        if self._launcher is not None:
            self._launcher.request_stop()
