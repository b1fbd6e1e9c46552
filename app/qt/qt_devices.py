"""The devices panel: the live device list, a profile summary, a tick per participant.

:class:`QtDeviceTableModel` reads :class:`app.devices.discovery.DeviceList` (through the
queued :class:`~app.qt.qt_bridge.QtDeviceListBridge`), the devices' profiles and the
:class:`~app.workspace.topology.Topology` (for the ticks).  Ticking a device does not change the
topology itself: the panel emits :attr:`QtDevicesPanel.participant_toggled` and the
window pushes an undoable command.  Buttons only emit requests; the window runs them on
the asyncio thread.  The *Source* column says where each device came from (inventory,
mDNS, manual); while the list is empty the panel shows an empty state in place of the
table (:meth:`QtDevicesPanel.set_empty_state`, filled by :mod:`app.qt.qt_first_run`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from PySide6.QtCore import (
    QAbstractTableModel,
    QItemSelectionModel,
    QModelIndex,
    QPersistentModelIndex,
    QPoint,
    Qt,
    Signal,
)
from PySide6.QtGui import QBrush
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from app.workspace.topology import Topology

from .qt_style import STATUS_COLOURS, device_colour, fmt_bytes

if TYPE_CHECKING:
    from app.devices.discovery import DeviceList, DiscoveredDevice

COLUMNS = ("Device", "Status", "Source", "CPU / GPU", "Memory", "GFLOP/s", "Power")
#: How the source column names where a device came from, in this order.
SOURCE_NAMES = {"inventory": "inventory", "manual": "manual", "mdns": "mDNS"}


def profile_cells(prof: Any, labels: dict[str, str] | None = None) -> tuple[str, str, str, str]:
    """CPU/GPU, memory, GFLOP/s and power-sensor text of a ``DeviceProfile`` (or ``None``)."""
    if prof is None:
        preset = (labels or {}).get("preset")
        return (f"not profiled ({preset})" if preset else "not profiled"), "–", "–", "–"
    gpu = getattr(prof, "gpu", None)
    compute = f"{prof.arch} ×{prof.threads}" + (f" + {gpu.name}" if gpu else "")
    mem = fmt_bytes(prof.mem_limit_bytes or prof.mem_total_bytes)
    gf = f"{prof.gflops_fp32:.0f}" if prof.gflops_fp32 else "–"
    return compute, mem, gf, str(prof.power_source or "–")


def source_text(entry: DiscoveredDevice) -> str:
    """``inventory``, ``mDNS``, ``manual`` or a combination (``inventory + mDNS``)."""
    order = list(SOURCE_NAMES)
    srcs = sorted(entry.sources, key=lambda s: order.index(s) if s in order else len(order))
    text = " + ".join(SOURCE_NAMES.get(s, s) for s in srcs) or "?"
    return text + " (candidate)" if entry.candidate else text


class QtDeviceTableModel(QAbstractTableModel):
    """One row per device of the list; column 0 is checkable (participant or not)."""

    toggled = Signal(str, bool)

    def __init__(self, devices: DeviceList, topology: Topology, parent=None) -> None:
        super().__init__(parent)
        self.devices, self.topology = devices, topology
        self.profiles: dict[str, Any] = {}
        self.busy: set[str] = set()
        self._names: list[str] = [e.name for e in devices.entries()]
        self._conns = [(topology.node_added, self._on_membership), (topology.node_removed, self._on_membership)]
        for sig, slot in self._conns:
            sig.connect(slot)

    def detach(self) -> None:
        for sig, slot in self._conns:
            sig.disconnect(slot)
        self._conns = []

    # ------------------------------------------------------------------ reading
    def names(self) -> list[str]:
        return list(self._names)

    def row_of(self, name: str) -> int:
        return self._names.index(name) if name in self._names else -1

    def colour_index(self, name: str) -> int:
        """Stable colour slot of a device (its row, which only grows at the end)."""
        row = self.row_of(name)
        return row if row >= 0 else abs(hash(name)) % 16

    def status(self, entry: DiscoveredDevice) -> str:
        return "busy" if entry.name in self.busy else entry.status

    def rowCount(self, parent: QModelIndex | QPersistentModelIndex = QModelIndex()) -> int:  # noqa: N802
        return 0 if parent.isValid() else len(self._names)

    def columnCount(self, parent: QModelIndex | QPersistentModelIndex = QModelIndex()) -> int:  # noqa: N802
        return 0 if parent.isValid() else len(COLUMNS)

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.DisplayRole) -> Any:  # noqa: N802
        if orientation == Qt.Horizontal and role == Qt.DisplayRole:
            return COLUMNS[section]
        return None

    def data(self, index: QModelIndex | QPersistentModelIndex, role: int = Qt.DisplayRole) -> Any:
        if not index.isValid() or index.row() >= len(self._names):
            return None
        name = self._names[index.row()]
        entry = self.devices.get(name)
        if entry is None:
            return None
        col = index.column()
        if role == Qt.CheckStateRole and col == 0:
            return Qt.Checked if name in self.topology else Qt.Unchecked
        if role == Qt.DisplayRole:
            if col == 0:
                return name
            if col == 1:
                return self.status(entry)
            if col == 2:
                return source_text(entry)
            return profile_cells(self.profiles.get(name), entry.device.labels)[col - 3]
        if role == Qt.DecorationRole and col == 0:
            return device_colour(self.colour_index(name))
        if role == Qt.ForegroundRole and col == 1:
            return QBrush(STATUS_COLOURS.get(self.status(entry), STATUS_COLOURS["unknown"]))
        if role == Qt.ToolTipRole:
            tip = f"{name} — {entry.device.user}@{entry.device.address} (from {source_text(entry)})"
            prof = self.profiles.get(name)
            if prof is not None:
                tip += (f"\n{prof.cpu_model}, {prof.cores} cores, {prof.threads} threads; "
                        f"memory limit {fmt_bytes(prof.mem_limit_bytes)} of {fmt_bytes(prof.mem_total_bytes)}; "
                        f"power: {prof.power_source}")
            return tip + (f"\n{entry.detail}" if entry.detail else "")
        if role == Qt.TextAlignmentRole and col == 5:
            return int(Qt.AlignRight | Qt.AlignVCenter)
        return None

    def flags(self, index: QModelIndex | QPersistentModelIndex) -> Qt.ItemFlag:
        base = Qt.ItemIsEnabled | Qt.ItemIsSelectable
        if index.column() == 0:
            base |= Qt.ItemIsUserCheckable
        return base

    def setData(self, index: QModelIndex | QPersistentModelIndex, value: Any, role: int = Qt.EditRole) -> bool:  # noqa: N802
        if role != Qt.CheckStateRole or index.column() != 0 or not index.isValid():
            return False
        name = self._names[index.row()]
        on = Qt.CheckState(value) == Qt.Checked if not isinstance(value, bool) else value
        if on != (name in self.topology):
            self.toggled.emit(name, on)  # the window turns this into an undoable command
        return True

    # ------------------------------------------------------------------ updates
    def on_added(self, name: str) -> None:
        if name in self._names or self.devices.get(name) is None:
            return
        row = len(self._names)
        self.beginInsertRows(QModelIndex(), row, row)
        self._names.append(name)
        self.endInsertRows()

    def on_changed(self, name: str) -> None:
        row = self.row_of(name)
        if row >= 0:
            self.dataChanged.emit(self.index(row, 0), self.index(row, len(COLUMNS) - 1))

    def on_removed(self, name: str) -> None:
        row = self.row_of(name)
        if row < 0:
            return
        self.beginRemoveRows(QModelIndex(), row, row)
        self._names.pop(row)
        self.endRemoveRows()

    def _on_membership(self, name: str) -> None:
        self.on_changed(name)

    def set_profiles(self, profiles: dict[str, Any]) -> None:
        self.profiles = dict(profiles)
        if self._names:
            self.dataChanged.emit(self.index(0, 0), self.index(len(self._names) - 1, len(COLUMNS) - 1))

    def set_busy(self, names: set[str]) -> None:
        changed = self.busy ^ set(names)
        self.busy = set(names)
        for name in changed:
            self.on_changed(name)


class QtDevicesPanel(QWidget):
    """The table plus the device actions.

    Signals
    -------
    participant_toggled(str, bool)   a tick changed (not applied yet)
    add_requested()                  "Add device…"
    trust_requested(str)             "Trust host key…" for the selected device (shows type and fingerprint)
    reprofile_requested(list)        "Re-profile" the selected devices (all if none)
    check_requested()                "Check" reachability and host keys
    context_requested(str, QPoint)   a right-click on a device (its name, the global position)
    """

    participant_toggled = Signal(str, bool)
    add_requested = Signal()
    trust_requested = Signal(str)
    reprofile_requested = Signal(list)
    check_requested = Signal()
    context_requested = Signal(str, QPoint)

    def __init__(self, devices: DeviceList, topology: Topology, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.model = QtDeviceTableModel(devices, topology, self)
        self.model.toggled.connect(self.participant_toggled)
        self.view = QTableView(self)
        self.view.setModel(self.model)
        self.view.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.view.setSelectionMode(QAbstractItemView.ExtendedSelection)
        self.view.verticalHeader().setVisible(False)
        self.view.verticalHeader().setDefaultSectionSize(22)
        self.view.setAlternatingRowColors(True)
        self.view.setShowGrid(False)
        hdr = self.view.horizontalHeader()
        hdr.setSectionResizeMode(QHeaderView.ResizeToContents)
        hdr.setStretchLastSection(True)
        self.view.setTextElideMode(Qt.ElideRight)
        self.view.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)  # columns elide; tooltips carry it all
        self.view.setWordWrap(False)
        self.view.setContextMenuPolicy(Qt.CustomContextMenu)
        self.view.customContextMenuRequested.connect(self._on_context)
        self.count_label = QLabel(self)
        self.buttons: dict[str, QPushButton] = {}
        row = QHBoxLayout()
        for key, text, slot in (("add", "Add device…", self.add_requested.emit),
                                ("trust", "Trust host key…", self.request_trust),
                                ("profile", "Re-profile", self.request_reprofile),
                                ("check", "Check", self.check_requested.emit)):
            b = QPushButton(text, self)
            b.clicked.connect(slot)
            self.buttons[key] = b
            row.addWidget(b)
        row.addStretch(1)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addWidget(self.count_label)
        lay.addWidget(self.view, 1)
        lay.addLayout(row)
        for sig in (self.model.rowsInserted, self.model.rowsRemoved):
            sig.connect(self._update_count)
        topology.order_changed.connect(self._on_order)
        self._topology = topology
        self.empty_state: QWidget | None = None
        self._update_count()

    def detach(self) -> None:
        self._topology.order_changed.disconnect(self._on_order)
        self.model.detach()

    def _on_order(self, _ids: list[str]) -> None:
        self._update_count()

    def _update_count(self, *_: Any) -> None:
        n = self.model.rowCount()
        self.count_label.setText(f"{n} device(s), {len(self._topology)} selected as participants")
        if self.empty_state is not None:
            self.empty_state.setVisible(n == 0)
            self.view.setVisible(n > 0)
            self.count_label.setVisible(n > 0)

    def set_empty_state(self, widget: QWidget) -> None:
        """Show ``widget`` in place of the table while the list is empty (a first run's hint)."""
        self.empty_state = widget
        self.layout().insertWidget(1, widget, 1)
        self._update_count()

    def _on_context(self, pos: QPoint) -> None:
        index = self.view.indexAt(pos)
        names = self.model.names()
        if index.isValid() and index.row() < len(names):
            self.context_requested.emit(names[index.row()], self.view.viewport().mapToGlobal(pos))

    def selected_names(self) -> list[str]:
        rows = sorted({i.row() for i in self.view.selectionModel().selectedRows()})
        names = self.model.names()
        return [names[r] for r in rows if r < len(names)]

    def select(self, name: str) -> None:
        """Make ``name`` the only selected row (whatever modifier keys are down)."""
        row = self.model.row_of(name)
        if row >= 0:
            index = self.model.index(row, 0)
            sel = self.view.selectionModel()
            sel.setCurrentIndex(index, QItemSelectionModel.ClearAndSelect | QItemSelectionModel.Rows)

    def request_trust(self) -> None:
        sel = self.selected_names()
        if sel:
            self.trust_requested.emit(sel[0])

    def request_reprofile(self) -> None:
        self.reprofile_requested.emit(self.selected_names() or self.model.names())

    def connect_bridge(self, added: Signal, changed: Signal, removed: Signal) -> None:
        """Follow a :class:`QtDeviceListBridge` (queued, GUI thread)."""
        added.connect(self.model.on_added)
        changed.connect(self.model.on_changed)
        removed.connect(self.model.on_removed)
