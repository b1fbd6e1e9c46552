"""Crossing from the asyncio thread (and zeroconf's) to the GUI thread.

The core models announce changes with Qt-free :class:`app.signals.Signal` objects,
often on the asyncio loop's thread.  The bridges here re-emit them as Qt signals that
carry plain data (dicts, names).  A bridge lives on the GUI thread, so a signal emitted
from another thread is delivered *queued*: slots always run on the GUI thread.  Receivers
look their objects up by id when the signal arrives; a result for something that is gone
is dropped.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Callable

from PySide6.QtCore import QObject, Qt, Signal, Slot

if TYPE_CHECKING:
    from app.devices.discovery import DeviceList
    from app.run.runstate import RunEvent, RunState

log = logging.getLogger("edgetrain.qt")


class QtRunBridge(QObject):
    """Re-emits a :class:`RunState`'s signals as queued Qt signals.

    Signals
    -------
    record(dict)                  a telemetry record (a copy)
    device_changed(str, str)      device name, new status
    event(dict)                   a :class:`RunEvent` as a dict
    finished(str)                 the outcome
    """

    record = Signal(object)
    device_changed = Signal(str, str)
    event = Signal(object)
    finished = Signal(str)

    def __init__(self, state: RunState, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.state = state
        self._slots = [(state.record, self._on_record), (state.device_changed, self._on_device),
                       (state.event, self._on_event), (state.finished, self._on_finished)]
        for sig, slot in self._slots:
            sig.connect(slot)

    # these run on whatever thread feeds the state (the asyncio loop's)
    def _on_record(self, rec: dict) -> None:
        self.record.emit(dict(rec))

    def _on_device(self, name: str) -> None:
        dev = self.state.devices.get(name)
        self.device_changed.emit(name, dev.status if dev else "")

    def _on_event(self, ev: RunEvent) -> None:
        self.event.emit(dataclasses.asdict(ev))

    def _on_finished(self, outcome: str) -> None:
        self.finished.emit(outcome)

    def detach(self) -> None:
        """Stop listening to the state (a later run gets its own bridge)."""
        for sig, slot in self._slots:
            sig.disconnect(slot)
        self._slots = []

    def follow(self, state: RunState) -> None:
        """Listen to ``state`` instead (a run restarted on the survivors; any thread).  Its
        re-plan, announced before anyone listened, is re-emitted."""
        self.detach()
        self.state = state
        self._slots = [(state.record, self._on_record), (state.device_changed, self._on_device),
                       (state.event, self._on_event), (state.finished, self._on_finished)]
        for sig, slot in self._slots:
            sig.connect(slot)
        for ev in list(state.events):
            if ev.kind == "replan":
                self._on_event(ev)


class QtDeviceListBridge(QObject):
    """Re-emits :class:`DeviceList` changes (any thread) as queued Qt signals of names."""

    added = Signal(str)
    changed = Signal(str)
    removed = Signal(str)

    def __init__(self, devices: DeviceList, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.devices = devices
        self._slots = [(devices.added, lambda e: self.added.emit(e.name)),
                       (devices.changed, lambda e: self.changed.emit(e.name)),
                       (devices.removed, lambda name: self.removed.emit(name))]
        for sig, slot in self._slots:
            sig.connect(slot)

    def detach(self) -> None:
        for sig, slot in self._slots:
            sig.disconnect(slot)
        self._slots = []


class QtFutures(QObject):
    """Delivers the results of :class:`concurrent.futures.Future` objects on the GUI thread.

    ``watch(fut, callback)`` calls ``callback(fut)`` on the GUI thread once ``fut`` is
    done.  If this object is deleted first (its window closed), the result is dropped.
    """

    _done = Signal(object)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._callbacks: dict[int, tuple[concurrent.futures.Future, Callable[[Any], None]]] = {}
        self._next = 0
        self._closed = False
        self._done.connect(self._deliver, Qt.QueuedConnection)

    def watch(self, fut: concurrent.futures.Future, callback: Callable[[concurrent.futures.Future], None]) -> None:
        self._next += 1
        token = self._next
        self._callbacks[token] = (fut, callback)

        def done(_f: concurrent.futures.Future) -> None:
            if not self._closed:
                try:
                    self._done.emit(token)
                except RuntimeError:  # the QObject is already deleted: nobody wants this
                    pass

        fut.add_done_callback(done)

    @Slot(object)
    def _deliver(self, token: int) -> None:
        item = self._callbacks.pop(token, None)
        if item is None:
            return
        fut, callback = item
        try:
            callback(fut)
        except Exception:  # noqa: BLE001 - one broken callback must not break the GUI
            log.exception("callback for %r failed", fut)

    @property
    def pending(self) -> int:
        return len(self._callbacks)

    def close(self) -> None:
        """Drop every pending callback (the window is going away)."""
        self._closed = True
        self._callbacks.clear()
