"""A first run with no devices: start the local testbed, discover devices, save them.

While the device list is empty the devices panel shows :class:`QtEmptyState`: a short
hint and two buttons.  *Start local testbed…* asks for 2 or 4 devices, alike or different
boards (:class:`QtTestbedDialog`), starts the testbed on a worker thread of the asyncio
loop (:class:`app.workspace.local_testbed.LocalTestbed`) and loads its inventory into the
window; the window stops it when it closes, but only if it started it.  *Discover devices*
asks which interfaces to browse (:class:`QtDiscoverDialog`) and runs live mDNS discovery
(:class:`app.workspace.live_discovery.LiveDiscovery`): devices appear and leave as they
advertise and withdraw.  *Save devices to inventory…* writes the list to a YAML inventory
(:func:`app.workspace.inventory_save.save_devices`).  :class:`QtFirstRun` holds the
actions and hooks itself into the window (see its docstring).
"""
from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from PySide6.QtCore import QEvent, QObject, Qt, QTimer
from PySide6.QtGui import QAction
from PySide6.QtWidgets import (
    QButtonGroup,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QPushButton,
    QRadioButton,
    QVBoxLayout,
    QWidget,
)

from app.paths import edgetrain_home
from app.workspace.inventory_save import save_devices
from app.workspace.live_discovery import LiveDiscovery, NetInterface, net_interfaces
from app.workspace.local_testbed import DEVICE_COUNTS, LocalTestbed, TestbedRequest, TestbedStarted, limits_text

from .qt_bridge import QtFutures

if TYPE_CHECKING:
    from app.workspace.loop import AsyncLoop
    from app.workspace.workspace import Workspace

    from .qt_main import QtMainWindow

HINT = ("<b>No devices yet.</b><br>Try EdgeTrain on this machine with a local testbed of emulated "
        "edge boards, find devices that advertise themselves on your network (mDNS), add one by hand, "
        "or open an inventory (File → Open inventory…).")


def _wrapped(text: str, parent: QWidget) -> QLabel:
    label = QLabel(text, parent)
    label.setWordWrap(True)
    label.setTextFormat(Qt.RichText)
    return label


class QtTestbedDialog(QDialog):
    """2 or 4 devices, homogeneous or heterogeneous boards; says who stops the testbed."""

    def __init__(self, testbed_dir: Path, running: bool, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Start local testbed")
        self.count_buttons = {n: QRadioButton(f"{n} devices", self) for n in DEVICE_COUNTS}
        self.board_buttons = {False: QRadioButton("homogeneous (every device a Jetson Nano)", self),
                              True: QRadioButton("heterogeneous (Jetson Nano, TX2 and NX boards)", self)}
        counts, boards = QVBoxLayout(), QVBoxLayout()
        # one exclusive group each (radio buttons of one parent are otherwise one group)
        for group, buttons, lay in ((QButtonGroup(self), self.count_buttons, counts),
                                    (QButtonGroup(self), self.board_buttons, boards)):
            for b in buttons.values():
                group.addButton(b)
                lay.addWidget(b)
        self.count_buttons[DEVICE_COUNTS[0]].setChecked(True)
        self.board_buttons[False].setChecked(True)
        for b in [*self.count_buttons.values(), *self.board_buttons.values()]:
            b.toggled.connect(self._update)
        self.boards_label = QLabel(self)
        self.boards_label.setStyleSheet("color: #6c757d;")
        form = QFormLayout()
        form.addRow("Devices", counts)
        form.addRow("Boards", boards)
        form.addRow("", self.boards_label)
        where = (f"<b>A testbed is already running in {testbed_dir}</b>: its devices are loaded, and it keeps "
                 "running after this window closes (stop it with <tt>edgetrain testbed down</tt>)."
                 if running else
                 f"Each device is an SSH server on a loopback address of this machine (files in "
                 f"{testbed_dir}). {limits_text()}<br><b>EdgeTrain starts this testbed, so it stops it when "
                 "this window closes.</b> A testbed started with <tt>edgetrain testbed up</tt> is never "
                 "stopped by the window.")
        self.info = _wrapped(where, self)
        buttons = QDialogButtonBox(self)
        self.start_button = buttons.addButton("Start" if not running else "Load its devices",
                                              QDialogButtonBox.AcceptRole)
        buttons.addButton(QDialogButtonBox.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.info)
        lay.addWidget(buttons)
        self.setMinimumWidth(480)
        self._update()

    def value(self) -> TestbedRequest:
        n = next(n for n, b in self.count_buttons.items() if b.isChecked())
        return TestbedRequest(n, heterogeneous=self.board_buttons[True].isChecked())

    def _update(self, *_: object) -> None:
        self.boards_label.setText(self.value().describe())


class QtDiscoverDialog(QDialog):
    """Which of this machine's interfaces to browse for mDNS devices (LAN ones pre-ticked)."""

    def __init__(self, interfaces: list[NetInterface], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Discover devices")
        intro = _wrapped("EdgeTrain lists devices that advertise <tt>_edgetrain._tcp</tt> over mDNS, and SSH "
                         "hosts as candidates, on the interfaces ticked here only. Devices appear and leave "
                         "the list as they advertise and withdraw. Discovery never trusts a device: its host "
                         "key is shown for you to check first.", self)
        self.list = QListWidget(self)
        self.items: dict[str, QListWidgetItem] = {}
        for iface in interfaces:
            item = QListWidgetItem(iface.label(), self.list)
            item.setFlags(Qt.ItemIsEnabled | Qt.ItemIsUserCheckable)
            item.setCheckState(Qt.Checked if iface.suggested else Qt.Unchecked)
            item.setData(Qt.UserRole, iface.address)
            self.items[iface.address] = item
        self.error = QLabel("" if interfaces else "This machine has no IPv4 interface that is up.", self)
        self.error.setStyleSheet("color: #c62828;")
        buttons = QDialogButtonBox(self)
        self.discover_button = buttons.addButton("Discover", QDialogButtonBox.AcceptRole)
        buttons.addButton(QDialogButtonBox.Cancel)
        buttons.accepted.connect(self._accept)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addWidget(intro)
        lay.addWidget(self.list, 1)
        lay.addWidget(self.error)
        lay.addWidget(buttons)
        self.setMinimumWidth(420)

    def tick_only(self, addresses: list[str]) -> None:
        """Tick exactly these interface addresses."""
        for addr, item in self.items.items():
            item.setCheckState(Qt.Checked if addr in addresses else Qt.Unchecked)

    def value(self) -> list[str]:
        return [a for a, item in self.items.items() if item.checkState() == Qt.Checked]

    def _accept(self) -> None:
        if not self.value():
            self.error.setText("Tick at least one interface.")
            return
        self.accept()


class QtEmptyState(QWidget):
    """The devices panel while it has no device: a hint and the two ways to get devices."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.hint = _wrapped(HINT, self)
        self.status = QLabel(self)
        self.status.setWordWrap(True)
        self.status.setStyleSheet("color: #1565c0;")
        self.testbed_button = QPushButton("Start local testbed…", self)
        self.discover_button = QPushButton("Discover devices", self)
        row = QHBoxLayout()
        row.addWidget(self.testbed_button)
        row.addWidget(self.discover_button)
        row.addStretch(1)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(8, 12, 8, 8)
        lay.addWidget(self.hint)
        lay.addLayout(row)
        lay.addWidget(self.status)
        lay.addStretch(1)


class QtFirstRun(QObject):
    """The first-run actions of ``window``: local testbed, live discovery, save to inventory.

    Created with the window's device actions (:class:`app.qt.qt_device_actions.QtDeviceActions`),
    so the window needs no wiring of its own: the empty state goes into its devices panel
    now, the actions into its Devices menu (and *Save devices to inventory…* into its File
    menu) once the window has built its menus, and closing the window stops discovery and
    a testbed it started (a run on that testbed is stopped first).

    Attributes
    ----------
    testbed, discovery
        The Qt-free controllers (tests may point the testbed at another address).
    testbed_dialog, discover_dialog, save_dialog
        The dialog last opened (for tests; ``None`` before).
    started
        The last testbed start's outcome.
    """

    def __init__(self, workspace: Workspace, loop: AsyncLoop, futures: QtFutures, window: QtMainWindow) -> None:
        super().__init__(window)
        self.ws, self.loop, self.futures, self.window = workspace, loop, futures, window
        self.testbed = LocalTestbed()
        self.discovery = LiveDiscovery(workspace.devices, keep=lambda name: name in workspace.topology)
        self.testbed_dialog: QtTestbedDialog | None = None
        self.discover_dialog: QtDiscoverDialog | None = None
        self.save_dialog: QFileDialog | None = None
        self.started: TestbedStarted | None = None
        self._shut = False
        self.empty = QtEmptyState(window.devices_panel)
        self.empty.testbed_button.clicked.connect(self.ask_testbed)
        self.empty.discover_button.clicked.connect(self.toggle_discovery)
        window.devices_panel.set_empty_state(self.empty)
        self.testbed_action = self._action("Start local testbed…", self.ask_testbed,
                                           "Emulated edge boards on this machine (2 or 4 devices)")
        self.discover_action = self._action("Discover devices", self.toggle_discovery,
                                            "Browse mDNS on the interfaces you pick; devices appear live")
        self.save_action = self._action("Save devices to inventory…", self.ask_save,
                                        "Write the listed devices to an inventory YAML, to load later")
        window.installEventFilter(self)
        QTimer.singleShot(0, self, self._add_to_menus)  # the window builds its menus after its views

    def _action(self, text: str, slot: Callable[[], object], tip: str) -> QAction:
        act = QAction(text, self.window)
        act.triggered.connect(slot)
        act.setToolTip(tip)
        act.setStatusTip(tip)
        return act

    def _add_to_menus(self) -> None:
        menus = {a.text(): a.menu() for a in self.window.menuBar().actions() if a.menu() is not None}
        devices, file_ = menus.get("&Devices"), menus.get("&File")
        if devices is not None:
            devices.addSeparator()
            devices.addActions([self.testbed_action, self.discover_action, self.save_action])
        if file_ is not None:  # right after "Open inventory…"
            acts = file_.actions()
            at = next((i + 1 for i, a in enumerate(acts) if a.text().startswith("Open inventory")), len(acts))
            file_.insertAction(acts[at] if at < len(acts) else None, self.save_action)

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802
        if obj is self.window and event.type() == QEvent.Close:
            self.shutdown()  # before the window's own close handling stops the asyncio loop
        return False

    def _say(self, text: str, ms: int = 8000) -> None:
        self.window.statusBar().showMessage(text, ms)

    # ------------------------------------------------------------------ testbed
    def ask_testbed(self) -> None:
        dlg = QtTestbedDialog(self.testbed.dir, self.testbed.running() is not None, self.window)
        self.testbed_dialog = dlg
        dlg.accepted.connect(lambda: self.start_testbed(dlg.value()))
        dlg.finished.connect(dlg.deleteLater)
        dlg.open()

    def start_testbed(self, request: TestbedRequest) -> concurrent.futures.Future | None:
        """Start (or find) the testbed off the GUI thread, then load its inventory."""
        if self.testbed.starting or self._shut:
            return None
        self._starting(f"Starting the local testbed ({request.describe()})…")
        fut = self.loop.submit(self.testbed.start_async(request))
        self.futures.watch(fut, self._testbed_done)
        return fut

    def _starting(self, text: str | None) -> None:
        self.empty.status.setText(text or "")
        self.testbed_action.setEnabled(text is None)
        self.empty.testbed_button.setEnabled(text is None)
        if text:
            self._say(text, 0)

    def _testbed_done(self, fut: concurrent.futures.Future) -> None:
        self._starting(None)
        exc = fut.exception()
        if exc is not None:
            self._say("the local testbed did not start")
            QMessageBox.warning(self.window, "Local testbed", str(exc))
            return
        self.started = res = fut.result()
        if not self.window.load_inventory(res.info.inventory_path):
            return
        boards = ", ".join(d.preset for d in res.info.devices)
        tail = "it stops when this window closes" if res.owned else "it keeps running after this window closes"
        self._say(f"local testbed {'started' if res.started else 'already running'}: {boards}; {tail}. "
                  "Tick devices to plan a run.", 15000)
        # the boards compute with this host's cores, whose speed no preset knows: measure
        # them once (cached), so the preview predicts from measured speeds
        missing = [d.name for d in res.info.devices if d.name not in self.window.workspace.profiles]
        if missing:
            self.window.device_actions.reprofile(missing)

    # ------------------------------------------------------------------ discovery
    def toggle_discovery(self) -> None:
        """Stop browsing if it runs, else ask for the interfaces and start."""
        if self.discovery.running:
            self.discovery.stop()
            self._discovering()
            return
        dlg = QtDiscoverDialog(net_interfaces(), self.window)
        self.discover_dialog = dlg
        dlg.accepted.connect(lambda: self.start_discovery(dlg.value()))
        dlg.finished.connect(dlg.deleteLater)
        dlg.open()

    def start_discovery(self, interfaces: list[str]) -> bool:
        """Browse mDNS on these interface addresses (errors go to a message box)."""
        if self._shut:
            return False
        try:
            self.discovery.start(interfaces)
        except (OSError, ValueError) as exc:
            QMessageBox.warning(self.window, "Discover devices", str(exc))
            return False
        self._discovering()
        return True

    def _discovering(self) -> None:
        on = self.discovery.running
        where = ", ".join(self.discovery.interfaces)
        text = "Stop discovery" if on else "Discover devices"
        self.discover_action.setText(text)
        self.empty.discover_button.setText(text)
        self.empty.status.setText(f"Browsing mDNS on {where}: devices appear here as they advertise." if on else "")
        self._say(f"mDNS discovery on {where}" if on else "mDNS discovery stopped")

    # ------------------------------------------------------------------ save
    def ask_save(self) -> None:
        dlg = QFileDialog(self.window, "Save devices to inventory", str(edgetrain_home() / "inventory.yaml"),
                          "Inventory (*.yaml *.yml)")
        dlg.setAcceptMode(QFileDialog.AcceptSave)
        dlg.setDefaultSuffix("yaml")
        # "replace it?" would be wrong: an existing inventory is merged into, any other file refused
        dlg.setOption(QFileDialog.DontConfirmOverwrite)
        dlg.setLabelText(QFileDialog.Accept, "Save")
        self.save_dialog = dlg
        dlg.fileSelected.connect(self.save)
        dlg.finished.connect(dlg.deleteLater)
        dlg.open()

    def save(self, path: str) -> bool:
        """Write the listed devices (not mDNS candidates) to the inventory ``path``."""
        try:
            res = save_devices(self.ws.devices.devices(), path, self.ws.known_hosts.path)
        except (ValueError, OSError) as exc:  # InventoryError names the file, the device and the fix
            QMessageBox.warning(self.window, "Save devices to inventory", str(exc))
            return False
        kept = f", kept {len(res.kept)} other entr{'y' if len(res.kept) == 1 else 'ies'}" if res.kept else ""
        self._say(f"saved {len(res.saved)} device(s) to {res.path}{kept}; open it later with "
                  "File → Open inventory…", 10000)
        return True

    # ------------------------------------------------------------------ closing
    def shutdown(self) -> None:
        """Stop browsing, and the testbed if this window started it (once).

        A testbed still starting is waited for; a run on the testbed is stopped first, so
        its workers are killed by the launcher, not by the testbed going away.
        """
        if self._shut:
            return
        self._shut = True
        self.discovery.stop()
        if self.testbed.owned is not None or self.testbed.starting:
            if self.window.run.running:
                self.window.run.stop_and_wait(timeout=30.0)
            if self.testbed.stop():
                self._say("local testbed stopped")
