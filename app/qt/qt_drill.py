"""The failure drill in the control panel: a device's context menu makes it fail on purpose.

Right-click a device (in the devices panel or on the topology canvas) during a run:
*Failure drill* offers kill, freeze, cut its link and slow it down
(:mod:`app.workspace.drill`).  Each entry is enabled only when it can be done now, and a
disabled one says why in its tooltip.  The drill runs on the asyncio thread over the
run's own connection; what it did, or why it could not, comes back as a status message.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from PySide6.QtCore import QObject, Signal
from PySide6.QtGui import QAction
from PySide6.QtWidgets import QMenu, QWidget

from app.workspace.drill import Fault, inject, unavailable

from .qt_bridge import QtFutures

if TYPE_CHECKING:
    from app.workspace.loop import AsyncLoop

    from .qt_run import QtRunController


class QtDrill(QObject):
    """Builds a device's drill menu and carries its actions out.

    Signals
    -------
    message(str, int)   a status-bar message and how long to show it (ms)
    """

    message = Signal(str, int)

    def __init__(self, run: QtRunController, loop: AsyncLoop, futures: QtFutures,
                 tier_dirs: Callable[[], list[Path]], parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.run, self.loop, self.futures, self.tier_dirs = run, loop, futures, tier_dirs

    def actions(self, name: str, parent: QWidget) -> list[QAction]:
        """One action per fault for device ``name``; disabled (with the reason) when not possible."""
        out = []
        launcher = self.run.launcher if self.run.running else None
        for fault in Fault:
            act = QAction(fault.label, parent)
            act.setData(fault.value)
            why = unavailable(launcher, name, fault, self.tier_dirs())
            act.setEnabled(why is None)
            act.setToolTip(why or f"{fault.label} on device '{name}'; the run should detect it and recover")
            act.triggered.connect(lambda _=False, f=fault: self.drill(name, f))
            out.append(act)
        return out

    def menu(self, name: str, parent: QWidget, extra: list[QAction] | None = None) -> QMenu:
        """A device's context menu: ``extra`` actions, then the *Failure drill* submenu."""
        menu = QMenu(parent)
        for act in extra or []:
            menu.addAction(act)
        if extra:
            menu.addSeparator()
        sub = menu.addMenu("Failure drill")
        sub.setToolTipsVisible(True)
        for act in self.actions(name, sub):
            sub.addAction(act)
        return menu

    def drill(self, name: str, fault: Fault):
        """Do ``fault`` to ``name`` now; returns the future (None when no run is going)."""
        launcher = self.run.launcher
        if launcher is None or not self.run.running or not self.loop.running:
            self.message.emit("no run in progress: a drill needs a running run", 6000)
            return None
        self.message.emit(f"drill: {fault.label.lower()} on {name}…", 0)
        fut = self.loop.submit(inject(launcher, name, fault, self.tier_dirs()))

        def done(f) -> None:
            exc = f.exception()
            self.message.emit(f"drill failed: {exc}" if exc is not None else f"drill: {f.result()}", 8000)
        self.futures.watch(fut, done)
        return fut
