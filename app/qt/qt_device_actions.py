"""The devices panel's actions: check, trust a host key, re-profile, add by hand.

Each action submits a coroutine to the window's asyncio thread and handles the result
on the GUI thread (through :class:`app.qt.qt_bridge.QtFutures`).  Results name devices;
a result for a device that has left the list meanwhile is ignored.
"""
from __future__ import annotations

import concurrent.futures
import logging
from typing import TYPE_CHECKING

from PySide6.QtCore import QObject
from PySide6.QtWidgets import QMessageBox

from app.core.ssh import SSHError, fetch_host_key, fingerprint

from .qt_dialogs import QtAddDeviceDialog, QtTrustDialog

if TYPE_CHECKING:
    from .qt_main import QtMainWindow

log = logging.getLogger("edgetrain.qt.devices")


class QtDeviceActions(QObject):
    """Runs device actions for ``window`` (which owns the models and the loop)."""

    def __init__(self, window: QtMainWindow) -> None:
        super().__init__(window)
        self.w = window
        self.trust_dialog: QtTrustDialog | None = None
        self.add_dialog: QtAddDeviceDialog | None = None

    def _say(self, text: str, ms: int = 6000) -> None:
        self.w.statusBar().showMessage(text, ms)

    # ------------------------------------------------------------------ check
    def check(self, names: list[str] | None = None) -> concurrent.futures.Future | None:
        """Connect to the devices (strict host keys): online / offline / untrusted."""
        if not len(self.w.devices) or not self.w.loop.running:
            return None
        fut = self.w.loop.submit(self.w.devices.check(self.w.known_hosts, names))
        self.w.futures.watch(fut, lambda f: self._say("device check done" if f.exception() is None
                                                      else f"device check failed: {f.exception()}"))
        return fut

    # ------------------------------------------------------------------ trust
    def trust(self, name: str) -> None:
        """Fetch the key the device presents now and show its fingerprint for approval."""
        entry = self.w.devices.get(name)
        if entry is None:
            return
        dev = entry.device
        self._say(f"fetching the host key of {name}…")
        fut = self.w.loop.submit(fetch_host_key(dev))

        def got(f: concurrent.futures.Future) -> None:
            if self.w.devices.get(name) is None:
                return  # removed while we waited
            exc = f.exception()
            if exc is not None:
                QMessageBox.warning(self.w, "Trust host key", str(exc) if isinstance(exc, SSHError)
                                    else f"{name}: {exc}")
                return
            key = f.result()
            kind = "changed" if self.w.known_hosts.lookup(dev.host, dev.port) else "unknown"
            if any(k == key for k in self.w.known_hosts.lookup(dev.host, dev.port)):
                kind = "trusted"
            dlg = QtTrustDialog(name, dev.address, fingerprint(key), "unknown" if kind == "trusted" else kind,
                                self.w)
            if kind == "trusted":
                dlg.setWindowTitle(f"Host key of {name} (already trusted)")
            dlg.accepted.connect(lambda: self._trusted(name, key, kind))
            dlg.finished.connect(dlg.deleteLater)
            self.trust_dialog = dlg
            dlg.open()

        self.w.futures.watch(fut, got)

    def _trusted(self, name: str, key, kind: str) -> None:
        entry = self.w.devices.get(name)
        if entry is None:
            return
        if kind != "trusted":
            dev = entry.device
            self.w.known_hosts.trust(dev.host, dev.port, key, replace=(kind == "changed"))
        self._say(f"{name}: host key trusted ({fingerprint(key)})")
        self.check([name])

    # ------------------------------------------------------------------ profiles
    def load_cached_profiles(self) -> None:
        try:
            from app.core.profile import load_cached_profiles
        except ImportError:
            return
        names = [e.name for e in self.w.devices.entries()]
        self.w.profiles.update(load_cached_profiles(names))
        try:
            from app.core.profile import ProfileCache
            for key, val in ProfileCache().load_links().items():
                a, _, b = key.partition("->")
                if val.get("mbps"):
                    self.w.link_mbps[(a, b)] = float(val["mbps"])
        except (ImportError, OSError, ValueError, AttributeError):
            pass  # no cached links: the canvas says "? Mbit/s"
        self._profiles_changed()

    def _profiles_changed(self) -> None:
        self.w.devices_panel.model.set_profiles(self.w.profiles)
        self.w.scene.refresh()
        self.w.planner.request()

    def reprofile(self, names: list[str]) -> None:
        """Measure the devices again (compute, memory, sensors, links)."""
        try:
            from app.core.profile import profile_devices
        except ImportError:
            self._say("profiling is not available in this installation")
            return
        devices = [e.device for n in names if (e := self.w.devices.get(n)) is not None]
        if not devices:
            return
        progress = self.w.progress

        def say(msg: str) -> None:  # runs on the asyncio thread: cross with a queued signal
            try:
                progress.emit(msg)
            except RuntimeError:
                pass  # the window is gone

        self._say(f"profiling {', '.join(d.name for d in devices)}…", 0)
        fut = self.w.loop.submit(profile_devices(devices, self.w.known_hosts, refresh=True, progress=say))

        def done(f: concurrent.futures.Future) -> None:
            exc = f.exception()
            if exc is not None:
                QMessageBox.warning(self.w, "Re-profile", str(exc))
                return
            profiles, links = f.result()
            for p in profiles:
                if self.w.devices.get(p.name) is not None:
                    self.w.profiles[p.name] = p
            self.w.links = links
            for i, a in enumerate(links.names):
                for j, b in enumerate(links.names):
                    if links.bandwidth_mbps[i][j]:
                        self.w.link_mbps[(a, b)] = float(links.bandwidth_mbps[i][j])
            self._profiles_changed()
            self._say(f"profiled {len(profiles)} device(s)")

        self.w.futures.watch(fut, done)

    # ------------------------------------------------------------------ add
    def add_device(self) -> None:
        dlg = QtAddDeviceDialog(self.w)
        self.add_dialog = dlg

        def accepted() -> None:
            v = dlg.value()
            try:
                self.w.devices.add_manual(v.name, v.host, v.port, v.user, v.key, v.python)
            except ValueError as exc:
                QMessageBox.warning(self.w, "Add device", str(exc))
                return
            self.check([v.name])

        dlg.accepted.connect(accepted)
        dlg.finished.connect(dlg.deleteLater)
        dlg.open()
