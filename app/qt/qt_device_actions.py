"""The devices panel's actions: check, trust a host key, re-profile, add by hand (and a first run's).

Each action asks the :class:`~app.workspace.workspace.Workspace` to do the work: a
coroutine on the window's asyncio thread, its result handled on the GUI thread (through
:class:`app.qt.qt_bridge.QtFutures`).  Results name devices; a result for a device that
has left the list meanwhile is ignored.  Messages for the status bar go out as the
``message`` signal, so the actions need nothing of the window but a parent for dialogs.
"""
from __future__ import annotations

import concurrent.futures
from typing import TYPE_CHECKING

from PySide6.QtCore import QObject, Signal
from PySide6.QtWidgets import QMessageBox

from .qt_bridge import QtFutures
from .qt_dialogs import QtAddDeviceDialog, QtTrustDialog
from .qt_first_run import QtFirstRun

if TYPE_CHECKING:
    from app.workspace.loop import AsyncLoop
    from app.workspace.workspace import HostKeyOffer, Workspace

    from .qt_main import QtMainWindow


class QtDeviceActions(QObject):
    """Device actions on ``workspace``; dialogs open over ``parent`` (the main window).

    Attributes
    ----------
    first_run
        The actions that get a first device list (:class:`app.qt.qt_first_run.QtFirstRun`:
        local testbed, live mDNS discovery, save to inventory), which put themselves into
        ``parent``'s devices panel and menus.

    Signals
    -------
    message(str, int)   a status-bar message and how long to show it (ms; 0: until replaced)
    """

    message = Signal(str, int)

    def __init__(self, workspace: Workspace, loop: AsyncLoop, futures: QtFutures, parent: QtMainWindow) -> None:
        super().__init__(parent)
        self.ws, self.loop, self.futures, self.parent_widget = workspace, loop, futures, parent
        self.trust_dialog: QtTrustDialog | None = None
        self.add_dialog: QtAddDeviceDialog | None = None
        self.first_run = QtFirstRun(workspace, loop, futures, parent)

    def _say(self, text: str, ms: int = 6000) -> None:
        self.message.emit(text, ms)

    # ------------------------------------------------------------------ check
    def check(self, names: list[str] | None = None) -> concurrent.futures.Future | None:
        """Connect to the devices (strict host keys): online / offline / untrusted."""
        if not len(self.ws.devices) or not self.loop.running:
            return None
        fut = self.loop.submit(self.ws.check(names))
        self.futures.watch(fut, lambda f: self._say("device check done" if f.exception() is None
                                                    else f"device check failed: {f.exception()}"))
        return fut

    # ------------------------------------------------------------------ trust
    def trust(self, name: str) -> None:
        """Fetch the key the device presents now and show its type and fingerprint for approval."""
        if self.ws.devices.get(name) is None:
            return
        self._say(f"fetching the host key of {name}…")
        fut = self.loop.submit(self.ws.offer_host_key(name))

        def got(f: concurrent.futures.Future) -> None:
            exc = f.exception()
            if exc is not None:
                QMessageBox.warning(self.parent_widget, "Trust host key", f"{exc}" if name in str(exc)
                                    else f"{name}: {exc}")
                return
            offer = f.result()
            if offer is None or self.ws.devices.get(name) is None:
                return  # removed while we waited
            dlg = QtTrustDialog(name, offer.address, offer.fingerprint, offer.kind, self.parent_widget,
                                key_type=offer.key_type)
            dlg.accepted.connect(lambda: self._trusted(offer))
            dlg.finished.connect(dlg.deleteLater)
            self.trust_dialog = dlg
            dlg.open()

        self.futures.watch(fut, got)

    def _trusted(self, offer: HostKeyOffer) -> None:
        if self.ws.trust(offer):
            self._say(f"{offer.name}: {offer.key_type} host key trusted ({offer.fingerprint})")
            self.check([offer.name])

    # ------------------------------------------------------------------ profiles
    def reprofile(self, names: list[str]) -> None:
        """Measure the devices again (compute, memory, sensors, links)."""
        names = [n for n in names if self.ws.devices.get(n) is not None]
        if not names:
            return
        message = self.message

        def say(msg: str) -> None:  # runs on the asyncio thread: the signal is delivered queued
            try:
                message.emit(msg, 6000)
            except RuntimeError:
                pass  # the window is gone

        self._say(f"profiling {', '.join(names)}…", 0)
        fut = self.loop.submit(self.ws.measure(names, progress=say))

        def done(f: concurrent.futures.Future) -> None:
            exc = f.exception()
            if exc is not None:
                QMessageBox.warning(self.parent_widget, "Re-profile", str(exc))
                return
            profiles, links = f.result()
            self.ws.apply_profiles(profiles, links)
            self._say(f"profiled {len(profiles)} device(s)")

        self.futures.watch(fut, done)

    # ------------------------------------------------------------------ add
    def add_device(self) -> None:
        dlg = QtAddDeviceDialog(self.parent_widget)
        self.add_dialog = dlg

        def accepted() -> None:
            v = dlg.value()
            try:
                self.ws.add_manual(v.name, v.host, v.port, v.user, v.key, v.python)
            except ValueError as exc:
                QMessageBox.warning(self.parent_widget, "Add device", str(exc))
                return
            self.check([v.name])

        dlg.accepted.connect(accepted)
        dlg.finished.connect(dlg.deleteLater)
        dlg.open()
