"""Launching and stopping a run from the GUI.

:class:`QtRunController` takes a run prepared by the workspace (files only, nothing is
contacted yet), runs ``Launcher.run()`` on the asyncio thread, and re-emits what the run
reports as queued Qt signals of plain data.  Stopping asks the launcher on its own loop;
the launcher then kills every remote worker by PID before the run's future completes.
"""
from __future__ import annotations

import concurrent.futures
import logging
from typing import TYPE_CHECKING

from PySide6.QtCore import QObject, Signal

from .qt_bridge import QtFutures, QtRunBridge

if TYPE_CHECKING:
    from app.run.launcher import Launcher
    from app.run.runstate import RunState
    from app.workspace.loop import AsyncLoop

log = logging.getLogger("edgetrain.qt.run")


class QtRunController(QObject):
    """One run at a time.

    Signals
    -------
    started(str)                run id; the run state is :attr:`state`
    record(dict)                a telemetry record
    device_changed(str, str)    device, status
    event(dict)                 a run event (``t``, ``device``, ``kind``, ``message``)
    restarted(str)              the run restarted on its survivors as this new run id; the
                                new run state is :attr:`state`
    finished(str, dict)         outcome and ``RunState.summary()``
    """

    started = Signal(str)
    record = Signal(object)
    device_changed = Signal(str, str)
    event = Signal(object)
    restarted = Signal(str)
    finished = Signal(str, object)

    def __init__(self, loop: AsyncLoop, futures: QtFutures, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.loop, self.futures = loop, futures
        self.state: RunState | None = None
        self.launcher: Launcher | None = None
        self._future: concurrent.futures.Future | None = None
        self._bridge: QtRunBridge | None = None

    @property
    def running(self) -> bool:
        return self._future is not None and not self._future.done()

    def start(self, launcher: Launcher, state: RunState, supervise=None) -> RunState:
        """Launch a prepared run (``Workspace.prepare_run``).

        With ``supervise`` (``Workspace.run_supervised``), a run that loses a device it
        cannot go on without in place restarts on the survivors, and this follows it.

        Raises
        ------
        RuntimeError
            A run is already in progress.
        """
        if self.running:
            raise RuntimeError("a run is already in progress; stop it first")
        if self._bridge is not None:
            self._bridge.detach()
            self._bridge.deleteLater()
        bridge = QtRunBridge(state, self)
        bridge.record.connect(self.record)
        bridge.device_changed.connect(self.device_changed)
        bridge.event.connect(self.event)
        self._bridge, self.state, self.launcher = bridge, state, launcher
        self._future = self.loop.submit(launcher.run() if supervise is None
                                        else supervise(launcher, state, self._follow))
        self.futures.watch(self._future, self._on_done)
        self.started.emit(state.run_id)
        return state

    def _follow(self, launcher: Launcher, state: RunState) -> None:
        """The run restarted on its survivors (on the asyncio thread)."""
        self.launcher, self.state = launcher, state
        if self._bridge is not None:
            self._bridge.follow(state)
        self.restarted.emit(state.run_id)

    def _on_done(self, fut: concurrent.futures.Future) -> None:
        state = self.state
        if state is None:
            return
        try:
            outcome = fut.result()
        except concurrent.futures.CancelledError:
            outcome = "stopped"
        except Exception as exc:  # noqa: BLE001 - LaunchError and friends: already in the events
            log.info("run %s ended with %s", state.run_id, exc)
            outcome = state.outcome or "failed"
        self.finished.emit(outcome, state.summary())

    def stop(self) -> None:
        """Ask the run to stop (returns at once; ``finished`` follows)."""
        launcher = self.launcher
        if launcher is not None and self.running and self.loop.running:
            self.loop.loop.call_soon_threadsafe(launcher.request_stop)

    def stop_and_wait(self, timeout: float = 30.0) -> bool:
        """Stop and block until the launcher has killed the workers (window closing).

        Returns whether the run ended within ``timeout`` seconds.
        """
        fut = self._future
        if fut is None or fut.done():
            return True
        self.stop()
        try:
            fut.result(timeout)
        except concurrent.futures.TimeoutError:
            log.warning("the run did not stop within %.0f s; cancelling it", timeout)
            fut.cancel()
            return False
        except Exception:  # noqa: BLE001 - the run's own failure; it is over either way
            pass
        return True

    def close(self) -> None:
        if self._bridge is not None:
            self._bridge.detach()
