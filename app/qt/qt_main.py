"""The control panel's main window: devices, topology canvas, run settings, plan, charts.

The window shows a Qt-free :class:`~app.workspace.workspace.Workspace` (device list,
participants in stage order, profiles, links) and owns the Qt-only parts: the undo stack,
the asyncio thread, the timers.  The panels are views over the workspace's models.
Everything that touches the network (checks, host keys, profiling, runs) is submitted to
the asyncio thread and comes back through queued signals.  Device actions live in
:mod:`app.qt.qt_device_actions`, file dialogs in :mod:`app.qt.qt_file_actions`.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtGui import QAction, QCloseEvent, QKeySequence, QUndoStack
from PySide6.QtWidgets import QDockWidget, QLabel, QMainWindow, QMessageBox, QSplitter, QTabWidget, QWidget

from app.workspace.loop import AsyncLoop
from app.workspace.preview import PlanPreview, compute_preview
from app.workspace.series import SeriesStore, record_points
from app.workspace.session import Session
from app.workspace.workspace import Workspace

from .qt_bridge import QtDeviceListBridge, QtFutures
from .qt_canvas import QtTopologyScene, QtTopologyView
from .qt_charts import QtLiveCharts
from .qt_commands import QtMoveNodeCommand, QtSetOrderCommand, QtSetParticipantCommand
from .qt_device_actions import QtDeviceActions
from .qt_devices import QtDevicesPanel
from .qt_drill import QtDrill
from .qt_file_actions import QtFileActions
from .qt_history import QtHistoryActions, QtRunHistory, QtRunViewer, apply_plan_references
from .qt_menus import _action, build_menus
from .qt_plan import QtPlanner, QtPlanView
from .qt_prefs import QtPrefs
from .qt_progress import QtRunProgress
from .qt_run import QtRunController
from .qt_runconfig import QtRunConfigPanel
from .qt_runviews import QtEventLog, QtRunSummary, QtTimeline
from .qt_style import device_colour, fmt_ms, titled

log = logging.getLogger("edgetrain.qt")
MARKER_KINDS = ("oom", "failure", "error")


class QtMainWindow(QMainWindow):
    """EdgeTrain's control panel.

    Parameters
    ----------
    inventory
        Inventory file to load at start (optional).
    session
        Session file to restore at start (optional; wins over ``inventory``).
    runs_dir
        Where run records go (default ``$EDGETRAIN_HOME/runs``).
    loop
        An :class:`AsyncLoop` to use; by default the window starts its own and stops it
        when it closes.
    check_devices
        Check reachability and host keys of the devices after loading them.
    """

    def __init__(self, inventory: Path | str | None = None, session: Path | str | None = None,
                 runs_dir: Path | str | None = None, loop: AsyncLoop | None = None,
                 check_devices: bool = True) -> None:
        super().__init__()
        self.setWindowTitle("EdgeTrain — control panel")
        self.loop = loop or AsyncLoop().start()
        self._own_loop = loop is None
        self.check_devices = check_devices
        self.futures = QtFutures(self)
        self.workspace = Workspace(runs_dir)
        self.undo = QUndoStack(self)
        self.store = SeriesStore()
        self._t0 = 0.0
        self._closed = False
        self.viewers: list[QtRunViewer] = []
        self._menu = None   # the open context menu (kept alive while it shows)
        self.prefs = QtPrefs(self)
        self._build_views()
        build_menus(self)
        self._wire()
        self.resize(1400, 900)
        self.prefs.restore_layout()
        if session:
            self.open_session(session)
        elif inventory:
            self.load_inventory(inventory)
        self._on_settings_changed()

    # ------------------------------------------------------------------ construction
    def _build_views(self) -> None:
        ws = self.workspace
        self.devices_panel = QtDevicesPanel(ws.devices, ws.topology, self)
        self.device_bridge = QtDeviceListBridge(ws.devices, self)
        self.devices_panel.connect_bridge(self.device_bridge.added, self.device_bridge.changed,
                                          self.device_bridge.removed)
        self.scene = QtTopologyScene(ws.topology, colour_of=self.colour_of, bandwidth_of=ws.bandwidth, parent=self)
        self.scene.tooltip_of = self._node_tooltip
        self.canvas = QtTopologyView(self.scene, self)
        self.run_config = QtRunConfigPanel(parent=self)
        self.plan_view = QtPlanView(self)
        self.planner = QtPlanner(self._plan_inputs, parent=self)
        self.charts = QtLiveCharts(self.store, colour_of=self.colour_of, parent=self)
        self.event_log = QtEventLog(self)
        self.timeline = QtTimeline(self)
        self.summary = QtRunSummary(self)
        self.history = QtRunHistory(lambda: ws.runs_dir, self)
        self.run = QtRunController(self.loop, self.futures, self)
        self.progress = QtRunProgress(self.run, self)   # follows the run by itself
        self.device_actions = QtDeviceActions(ws, self.loop, self.futures, self)
        self.drill = QtDrill(self.run, self.loop, self.futures, ws.testbed_dirs, self)
        self.file_actions = QtFileActions(self.charts, self)
        self.run_label = QLabel("idle", self)
        self.statusBar().addPermanentWidget(self.run_label)

        self.canvas_box = titled("Topology — drag a node to change the stage order", self.canvas, self)
        center = QSplitter(Qt.Vertical, self)
        center.addWidget(self.canvas_box)
        center.addWidget(titled("Live telemetry — dashed: predicted", self.charts, self))
        center.setSizes([300, 560])
        self.setCentralWidget(center)

        left = QSplitter(Qt.Vertical, self)
        left.addWidget(titled("Devices", self.devices_panel, self))
        left.addWidget(titled("Plan preview", self.plan_view, self))
        left.setSizes([420, 400])
        self.left_dock = self._dock("Devices and plan", left, Qt.LeftDockWidgetArea)
        self.config_dock = self._dock("Run configuration", self.run_config, Qt.RightDockWidgetArea)
        self.bottom_tabs = QTabWidget(self)
        self.bottom_tabs.addTab(self.progress, "Progress")
        self.bottom_tabs.addTab(self.event_log, "Event log")
        self.bottom_tabs.addTab(self.timeline, "Recovery")
        self.bottom_tabs.addTab(self.summary, "Run summary")
        self.bottom_tabs.addTab(self.history, "History")
        self.bottom_dock = self._dock("Run", self.bottom_tabs, Qt.RightDockWidgetArea)
        self.resizeDocks([self.left_dock, self.config_dock], [440, 340], Qt.Horizontal)
        self.resizeDocks([self.config_dock, self.bottom_dock], [400, 420], Qt.Vertical)

    def _dock(self, title: str, widget: QWidget, area: Qt.DockWidgetArea) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(title)
        dock.setWidget(widget)
        dock.setFeatures(QDockWidget.DockWidgetMovable | QDockWidget.DockWidgetFloatable)
        self.addDockWidget(area, dock)
        return dock

    def _action(self, text: str, slot, shortcut: QKeySequence | str | None = None, tip: str = "") -> QAction:
        return _action(self, text, slot, shortcut, tip)

    def _wire(self) -> None:
        self.devices_panel.participant_toggled.connect(self.toggle_participant)
        self.devices_panel.add_requested.connect(self.device_actions.add_device)
        self.devices_panel.trust_requested.connect(self.device_actions.trust)
        self.devices_panel.reprofile_requested.connect(self.device_actions.reprofile)
        self.devices_panel.check_requested.connect(self.device_actions.check)
        self.scene.move_requested.connect(self.move_node)
        self.scene.context_requested.connect(self.device_menu)
        self.devices_panel.context_requested.connect(self.device_menu)
        self.drill.message.connect(self.statusBar().showMessage)
        self.run.restarted.connect(self._on_restarted)
        self.run_config.settings_changed.connect(self._on_settings_changed)
        self.plan_view.apply_requested.connect(self.apply_fit)
        self.workspace.topology.order_changed.connect(self._on_order_changed)
        self.workspace.profiles_changed.connect(self._on_profiles_changed)
        self.planner.updated.connect(self._on_plan)
        self.run.record.connect(self._on_record)
        self.run.device_changed.connect(self._on_device_status)
        self.run.event.connect(self._on_event)
        self.run.finished.connect(self._on_finished)
        self.history.open_requested.connect(self.open_run)
        self.history.resume_requested.connect(self.resume_run)
        self.history_actions = QtHistoryActions(self)   # compare, re-run, export model
        self.device_actions.message.connect(self.statusBar().showMessage)
        self.file_actions.message.connect(self.statusBar().showMessage)
        self.file_actions.inventory_chosen.connect(self.load_inventory)
        self.file_actions.session_open_chosen.connect(self.open_session)
        self.file_actions.session_save_chosen.connect(self._save_session_to)

    # ------------------------------------------------------------------ lookups for views
    def colour_of(self, name: str):
        return device_colour(self.devices_panel.model.colour_index(name))

    def _node_tooltip(self, node) -> str:
        prof = self.workspace.profiles.get(node.id)
        gf = f"{prof.gflops_fp32:.0f} GFLOP/s" if prof and prof.gflops_fp32 else "not profiled"
        return f"{node.id} — {node.role}\n{node.shard}\n{gf}"

    # ------------------------------------------------------------------ inventory, session
    def load_inventory(self, path: Path | str) -> bool:
        """Add the inventory's devices to the list (errors go to a message box)."""
        try:
            self.workspace.load_inventory(path)
        except ValueError as exc:  # InventoryError: names the file, the entry and the fix
            QMessageBox.warning(self, "Inventory", str(exc))
            return False
        if self.check_devices:
            self.device_actions.check()
        return True

    def _on_profiles_changed(self) -> None:
        self.devices_panel.model.set_profiles(self.workspace.profiles)
        self.scene.refresh()
        self.planner.request()

    def session(self) -> Session:
        return self.workspace.session(self.run_config.settings())

    def save_session(self, path: Path | str) -> Path:
        return self.workspace.save_session(path, self.run_config.settings())

    def _save_session_to(self, path: str) -> None:
        self.save_session(path)
        self.statusBar().showMessage(f"session saved to {path}", 4000)

    def open_session(self, path: Path | str) -> bool:
        try:
            ses, missing = self.workspace.open_session(path)
        except ValueError as exc:  # SessionError / InventoryError: both name the file
            QMessageBox.warning(self, "Session", str(exc))
            return False
        self.run_config.set_settings(ses.settings)
        self.undo.clear()
        if self.check_devices:
            self.device_actions.check()
        if missing:
            self.statusBar().showMessage(f"session devices not found: {', '.join(missing)}", 8000)
        return True

    # ------------------------------------------------------------------ gestures -> commands
    def toggle_participant(self, name: str, on: bool) -> None:
        if self._order_locked():
            return
        if on != (name in self.workspace.topology):
            self.undo.push(QtSetParticipantCommand(self.workspace.topology, name, on))

    def move_node(self, name: str, old: int, new: int) -> None:
        if not self.run.running:
            self.undo.push(QtMoveNodeCommand(self.workspace.topology, name, old, new))

    def undo_step(self) -> None:
        if self._order_locked():
            return
        self.undo.undo()

    def redo_step(self) -> None:
        if self._order_locked():
            return
        self.undo.redo()

    def _order_locked(self) -> bool:
        """During a run the ranks are fixed: gestures on the topology are refused."""
        if self.run.running:
            self.statusBar().showMessage("The order and participants are fixed while a run is in progress.", 4000)
            return True
        return False

    def auto_arrange(self) -> None:
        pv = self.planner.latest
        parts = self.workspace.topology.participants
        if pv is None or sorted(pv.suggested_order) != sorted(parts):
            self.statusBar().showMessage("No suggestion for the current participants yet.", 4000)
            return
        if pv.suggested_order != parts and not self.run.running:
            self.undo.push(QtSetOrderCommand(self.workspace.topology, pv.suggested_order))

    # ------------------------------------------------------------------ plan
    def _plan_inputs(self) -> dict[str, Any]:
        return self.workspace.plan_inputs(self.run_config.settings())

    def _on_settings_changed(self) -> None:
        s = self.run_config.settings()
        self.workspace.topology.configure(parallelism=s.parallelism, n_layers=self.workspace.n_layers(s))
        self.planner.request()

    def apply_fit(self, changes: dict[str, Any]) -> None:
        """Set the knobs the planner says make the run fit (the preview then re-plans)."""
        if not self.run.running:
            self.run_config.set_settings(replace(self.run_config.settings(), **changes))

    def _on_order_changed(self, _ids: list[str]) -> None:
        self.planner.request()

    def _on_plan(self, pv: PlanPreview) -> None:
        self.plan_view.show_preview(pv)
        if sorted(d.name for d in pv.devices) == sorted(self.workspace.topology.participants) and pv.stages:
            self.workspace.topology.configure(stages=pv.stages)
        for d in pv.devices:
            self.workspace.topology.set_prediction(d.name, d.capped_peak_bytes, d.limit_bytes, d.oom)
        if not self.run.running:
            apply_plan_references(self.charts, pv.plan.to_dict() if pv.plan is not None else None)

    # ------------------------------------------------------------------ runs
    def launch(self) -> None:
        """Start a run on the participants in their current order."""
        if self.run.running:
            return
        names = self.workspace.topology.participants
        if not names:
            QMessageBox.information(self, "Launch", "Tick at least one device in the devices panel.")
            return
        pv = self.planner.latest
        if pv is None or self.planner.busy:
            # launch right after an edit: plan now (tens of ms) so the run, its record and the
            # reference lines all use the plan for exactly these settings and this order
            pv = compute_preview(**self._plan_inputs())
            self._on_plan(pv)
        # the record keeps the plan the user saw
        plan = pv.plan.to_dict() if pv is not None and pv.plan is not None else None
        try:
            state = self.run.start(*self.workspace.prepare_run(self.run_config.settings(), plan),
                                   supervise=self.workspace.run_supervised)
        except (RuntimeError, ValueError, KeyError, OSError) as exc:
            QMessageBox.warning(self, "Launch", str(exc))
            return
        self._show_running(state, plan)

    def resume_run(self, run_id: str) -> None:
        """Continue a past run from its last complete checkpoint (the history's Resume)."""
        if self.run.running:
            QMessageBox.information(self, "Resume", "A run is in progress; stop it first.")
            return
        self.run_label.setText(f"resuming {run_id}: looking for its checkpoint…")

        def done(fut) -> None:
            try:
                state = self.run.start(*fut.result(), supervise=self.workspace.run_supervised)
            except Exception as exc:  # noqa: BLE001 - ResumeError and SSH errors say what to do
                self.run_label.setText(f"resume of {run_id} failed")
                QMessageBox.warning(self, "Resume", str(exc))
                return
            self._show_running(state, state.plan)
        self.futures.watch(self.loop.submit(self.workspace.prepare_resume(run_id)), done)

    def _show_running(self, state, plan: dict | None) -> None:
        names = list(state.devices)
        self._t0 = state.started
        self.charts.clear()
        if plan is not None:
            apply_plan_references(self.charts, plan)
        self.event_log.clear()
        self.timeline.clear()
        self.summary.clear()
        self.bottom_tabs.setCurrentWidget(self.progress)
        for n in names:
            self.workspace.topology.set_status(n, "pending")
        self.devices_panel.model.set_busy(set(names))
        self.scene.set_locked(True)
        self.run_config.setEnabled(False)   # the running job's settings cannot change under it
        self.launch_action.setEnabled(False)
        self.stop_action.setEnabled(True)
        self.run_label.setText(f"run {state.run_id}: starting")

    def stop_run(self) -> None:
        self.run.stop()
        self.run_label.setText("stopping…")

    def _on_record(self, rec: dict) -> None:
        for series, dev, x, y in record_points(rec, self._t0):
            self.store.append(series, dev, x, y)
        if rec.get("type") == "step" and self.run.state is not None:
            state = self.run.state
            step = max(d.steps for d in state.devices.values())
            lat = rec.get("latency_per_sample_s")
            self.run_label.setText(f"run {state.run_id}: step {step}/{state.config['settings']['steps']}  "
                                   f"latency/sample {fmt_ms(lat)}")

    def _on_device_status(self, name: str, status: str) -> None:
        self.workspace.topology.set_status(name, status)  # ignored when the node is gone

    def _on_event(self, ev: dict) -> None:
        self.event_log.add_event(ev)
        if self.timeline.add_event(ev) and not self._closed:
            self.bottom_tabs.setCurrentWidget(self.timeline)
        if ev.get("kind") in MARKER_KINDS and ev.get("device"):
            self.charts.add_marker(float(ev["t"]) - self._t0, ev["kind"], ev["device"], ev.get("message", ""))

    def _on_restarted(self, run_id: str) -> None:
        """The run lost a device it could not go on without and restarted on the survivors."""
        self.run_label.setText(f"run {run_id}: restarted on the survivors")
        if self.run.state is not None:
            self.devices_panel.model.set_busy(set(self.run.state.devices))

    def device_menu(self, name: str, pos) -> None:
        """A device's context menu: trust, re-profile, and the failure drill during a run."""
        extra = [self._action("Trust host key…", lambda: self.device_actions.trust(name)),
                 self._action("Re-profile", lambda: self.device_actions.reprofile([name]))]
        self._menu = self.drill.menu(name, self, extra)
        self._menu.popup(pos)

    def _on_finished(self, outcome: str, summary: dict) -> None:
        self.summary.show_summary(summary)
        if not self._closed:
            self.bottom_tabs.setCurrentWidget(self.summary)
        self.devices_panel.model.set_busy(set())
        self.scene.set_locked(False)
        self.run_config.setEnabled(True)
        self.launch_action.setEnabled(True)
        self.stop_action.setEnabled(False)
        self.run_label.setText(f"run {summary.get('run_id')}: {outcome}")
        self.history.refresh()

    def open_run(self, run_dir: str) -> QtRunViewer | None:
        try:
            viewer = QtRunViewer(run_dir)
        except (OSError, ValueError) as exc:
            QMessageBox.warning(self, "Run history", f"Cannot open {run_dir}: {exc}")
            return None
        viewer.setAttribute(Qt.WA_DeleteOnClose)
        viewer.destroyed.connect(lambda _=None, v=viewer: self.viewers.remove(v) if v in self.viewers else None)
        self.viewers.append(viewer)
        viewer.show()
        return viewer

    # ------------------------------------------------------------------ closing
    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802
        """Stop the run (killing every worker), then the timers and the asyncio thread."""
        if not self._closed:
            self._closed = True
            if self.run.running:
                self.run_label.setText("stopping the run…")
                self.run.stop_and_wait(timeout=30.0)
            self.prefs.save(self.save_session)
            self.shutdown()
        super().closeEvent(event)

    @property
    def closed(self) -> bool:
        """Whether the window has been closed (its run stopped, its threads ended)."""
        return self._closed

    def shutdown(self) -> None:
        self.study.shutdown()
        self.planner.close()
        self.charts.stop()
        self.futures.close()
        self.run.close()
        self.device_bridge.detach()
        self.scene.detach()
        self.devices_panel.detach()
        for v in list(self.viewers):
            v.close()
        if self._own_loop:
            self.loop.stop()
