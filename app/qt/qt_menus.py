"""The main window's actions, toolbar and menus (shortcuts: Ctrl+R launch, Ctrl+. stop)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from PySide6.QtCore import Qt
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QToolBar, QWidget

from .qt_study import QtStudyWindow

if TYPE_CHECKING:
    from .qt_main import QtMainWindow


def _action(parent: QWidget, text: str, slot, shortcut: QKeySequence | str | None = None, tip: str = "") -> QAction:
    """A QAction of ``parent`` that calls ``slot``, with an optional shortcut and tip."""
    act = QAction(text, parent)
    act.triggered.connect(slot)
    if shortcut is not None:
        act.setShortcut(QKeySequence(shortcut))
    if tip:
        act.setToolTip(tip)
        act.setStatusTip(tip)
    return act


def build_menus(w: "QtMainWindow") -> None:
    """Create ``w``'s actions (as its attributes: ``launch_action``, ``stop_action``,
    ``undo_action``, ``redo_action``, ``arrange_action``; and ``w.study``), its toolbar and
    its menus."""
    # own actions (not createUndoAction): a fixed label keeps the toolbar from jumping;
    # the command's text goes into the tooltip
    w.undo_action = _action(w, "Undo", w.undo_step, QKeySequence.Undo)
    w.redo_action = _action(w, "Redo", w.redo_step, "Ctrl+Shift+Z")
    w.redo_action.setShortcuts([QKeySequence("Ctrl+Shift+Z"), QKeySequence("Ctrl+Y")])
    w.undo_action.setEnabled(False)
    w.redo_action.setEnabled(False)
    w.undo.canUndoChanged.connect(w.undo_action.setEnabled)
    w.undo.canRedoChanged.connect(w.redo_action.setEnabled)
    w.undo.undoTextChanged.connect(lambda t: w.undo_action.setToolTip(f"Undo {t}" if t else "Undo"))
    w.undo.redoTextChanged.connect(lambda t: w.redo_action.setToolTip(f"Redo {t}" if t else "Redo"))
    w.launch_action = _action(w, "▶ Launch", w.launch, "Ctrl+R", "Start a run on the participants")
    w.stop_action = _action(w, "■ Stop", w.stop_run, "Ctrl+.", "Stop the run (workers are killed)")
    w.stop_action.setEnabled(False)
    w.arrange_action = _action(w, "Auto-arrange", w.auto_arrange, None,
                                       "Apply the planner's suggested stage order")
    w.study = QtStudyWindow(w.workspace, w.loop, w.futures, w.run, w, (w.launch_action,))
    study = _action(w, "Study…", w.study.open_study, "Ctrl+Shift+S", "Every model × parallelism, one figure")
    open_inv = _action(w, "Open inventory…", w.file_actions.ask_inventory, "Ctrl+I")
    open_ses = _action(w, "Open session…", w.file_actions.ask_open_session, QKeySequence.Open)
    save_ses = _action(w, "Save session…", w.file_actions.ask_save_session, QKeySequence.Save)
    png = _action(w, "Export chart PNG…", w.file_actions.ask_export_png)
    csv_ = _action(w, "Export chart CSV…", w.file_actions.ask_export_csv)
    quit_ = _action(w, "Quit", w.close, QKeySequence.Quit)
    for act in (w.undo_action, w.redo_action, w.launch_action, w.stop_action):
        act.setShortcutContext(Qt.ApplicationShortcut)
        w.addAction(act)
    bar = QToolBar("Main", w)
    bar.setObjectName("main-toolbar")
    bar.setMovable(False)
    bar.setToolButtonStyle(Qt.ToolButtonTextOnly)
    for act in (w.launch_action, w.stop_action, None, w.undo_action, w.redo_action,
                w.arrange_action, None, open_inv, open_ses, save_ses, None, png, csv_):
        bar.addSeparator() if act is None else bar.addAction(act)
    w.addToolBar(bar)
    menus = w.menuBar()
    for title, acts in (("&File", (open_inv, open_ses, save_ses, None, png, csv_, None, quit_)),
                        ("&Edit", (w.undo_action, w.redo_action)),
                        ("&Run", (w.launch_action, w.stop_action, w.arrange_action, None, study))):
        menu = menus.addMenu(title)
        for act in acts:
            menu.addSeparator() if act is None else menu.addAction(act)
    dev_menu = menus.addMenu("&Devices")
    for text, slot in (("Add device…", w.device_actions.add_device),
                       ("Trust host key…", w.devices_panel.request_trust),
                       ("Re-profile", w.devices_panel.request_reprofile),
                       ("Check", w.device_actions.check)):
        dev_menu.addAction(_action(w, text, slot))
    w.prefs.add_menu(menus)
