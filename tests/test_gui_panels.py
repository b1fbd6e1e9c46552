"""The control panel's panels, offscreen: ticks, drag to reorder, undo, plan preview, trust dialog.

No run is launched here (see ``test_gui_e2e.py``); devices are inventory entries, and only
the trust test talks to a real SSH endpoint (an in-process testbed device).
"""
from __future__ import annotations

import random
from pathlib import Path

import asyncssh
import pytest
import yaml

pytest.importorskip("PySide6")
pytest.importorskip("pyqtgraph")

from PySide6.QtCore import QEvent, QPointF, Qt  # noqa: E402
from PySide6.QtGui import QMouseEvent  # noqa: E402
from PySide6.QtTest import QTest  # noqa: E402
from PySide6.QtWidgets import QApplication, QStyle, QStyleOptionViewItem  # noqa: E402

from app.devices.ssh import fingerprint  # noqa: E402
from app.qt.qt_canvas import NODE_H, NODE_W  # noqa: E402
from app.qt.qt_main import QtMainWindow  # noqa: E402
from app.workspace.loop import AsyncLoop  # noqa: E402

pytestmark = pytest.mark.gui
PRESETS = ["jetson-nano", "laptop", "jetson-tx2", "jetson-nx"]


# ---------------------------------------------------------------- helpers


from tests.qtleaks import no_leaks  # noqa: E402,F401 -- autouse fixture


def write_inventory(path: Path, n: int, known_hosts: str | None = None,
                    presets: list[str] | None = None) -> Path:
    """``n`` inventory devices ``dev0..``; board presets cycle through ``presets`` (default PRESETS)."""
    presets = presets or PRESETS
    devices = [{"name": f"dev{i}", "host": f"127.0.{1 + i // 200}.{1 + i % 200}", "port": 22 + i,
                "labels": {"preset": presets[i % len(presets)]}} for i in range(n)]
    data = {"version": 1, "devices": devices}
    if known_hosts:
        data["known_hosts"] = known_hosts
    path.write_text(yaml.safe_dump(data))
    return path


def open_window(qtbot, tmp_path: Path, inventory: Path, **kw) -> QtMainWindow:
    w = QtMainWindow(inventory=inventory, runs_dir=tmp_path / "runs", check_devices=False, **kw)
    qtbot.addWidget(w)
    w.show()
    qtbot.waitExposed(w)
    return w


def close_window(w: QtMainWindow) -> None:
    w.close()
    QApplication.processEvents()


def click_check(qtbot, view, row: int) -> None:
    """Click the check box of ``row``, column 0, where the style draws it."""
    index = view.model().index(row, 0)
    opt = QStyleOptionViewItem()
    opt.initFrom(view)
    opt.rect = view.visualRect(index)
    opt.features |= QStyleOptionViewItem.HasCheckIndicator | QStyleOptionViewItem.HasDisplay
    opt.features |= QStyleOptionViewItem.HasDecoration
    rect = view.style().subElementRect(QStyle.SE_ItemViewItemCheckIndicator, opt, view)
    QTest.mouseClick(view.viewport(), Qt.LeftButton, Qt.NoModifier, rect.center())


def drag(view, start: QPointF, end: QPointF, steps: int = 6) -> None:
    """Press at ``start``, move in steps, release at ``end`` (scene coordinates)."""
    vp = view.viewport()
    a, b = QPointF(view.mapFromScene(start)), QPointF(view.mapFromScene(end))

    def send(kind: QEvent.Type, pos: QPointF, button: Qt.MouseButton, buttons: Qt.MouseButton) -> None:
        ev = QMouseEvent(kind, pos, QPointF(vp.mapToGlobal(pos.toPoint())), button, buttons, Qt.NoModifier)
        QApplication.sendEvent(vp, ev)

    send(QEvent.MouseButtonPress, a, Qt.LeftButton, Qt.LeftButton)
    for k in range(1, steps + 1):
        send(QEvent.MouseMove, a + (b - a) * (k / steps), Qt.NoButton, Qt.LeftButton)
    send(QEvent.MouseButtonRelease, b, Qt.LeftButton, Qt.NoButton)


def node_center(w: QtMainWindow, name: str) -> QPointF:
    return w.scene.item(name).pos() + QPointF(NODE_W / 2, NODE_H / 2)


def slot_center(w: QtMainWindow, index: int) -> QPointF:
    return w.scene.slot_pos(index) + QPointF(NODE_W / 2, NODE_H / 2)


# ---------------------------------------------------------------- tests


def test_ticking_devices_changes_participants(qtbot, tmp_path):
    w = open_window(qtbot, tmp_path, write_inventory(tmp_path / "inv.yaml", 4))
    view = w.devices_panel.view
    assert w.devices_panel.model.rowCount() == 4
    for row in (2, 0, 3):
        click_check(qtbot, view, row)
    assert w.workspace.topology.participants == ["dev2", "dev0", "dev3"]
    assert w.devices_panel.model.data(view.model().index(2, 0), Qt.CheckStateRole) == Qt.Checked
    assert len(w.scene.items_by_id()) == 3
    click_check(qtbot, view, 0)                         # untick
    assert w.workspace.topology.participants == ["dev2", "dev3"]
    assert w.scene.item("dev0") is None
    w.undo.undo()                                       # ticks are undoable too: dev0 comes back in place
    assert w.workspace.topology.participants == ["dev2", "dev0", "dev3"]
    close_window(w)


def test_drag_reorders_and_ctrl_z_restores(qtbot, tmp_path):
    w = open_window(qtbot, tmp_path, write_inventory(tmp_path / "inv.yaml", 4))
    w.activateWindow()
    qtbot.waitUntil(lambda: QApplication.activeWindow() is w, timeout=3000)
    for n in ("dev0", "dev1", "dev2", "dev3"):
        w.toggle_participant(n, True)
    w.undo.clear()
    before = w.workspace.topology.participants
    drag(w.canvas, node_center(w, "dev0"), slot_center(w, 2))
    assert w.workspace.topology.participants == ["dev1", "dev2", "dev0", "dev3"]
    assert w.undo.count() == 1                           # one command per drag, pushed on release
    assert w.scene.item("dev0").pos() == w.scene.slot_pos(2)   # the scene mirrors the model
    QTest.keyClick(w, Qt.Key_Z, Qt.ControlModifier)
    assert w.workspace.topology.participants == before
    QTest.keyClick(w, Qt.Key_Z, Qt.ControlModifier | Qt.ShiftModifier)
    assert w.workspace.topology.participants == ["dev1", "dev2", "dev0", "dev3"]
    # a drop on its own slot changes nothing and pushes nothing
    drag(w.canvas, node_center(w, "dev3"), slot_center(w, 3) + QPointF(10, 5))
    assert w.undo.count() == 1 and w.scene.item("dev3").pos() == w.scene.slot_pos(3)
    close_window(w)


def test_plan_preview_follows_reorder(qtbot, tmp_path):
    w = open_window(qtbot, tmp_path, write_inventory(tmp_path / "inv.yaml", 4))
    s = w.run_config.settings()
    s.model, s.parallelism = "gpt2-s", "pp"
    w.run_config.set_settings(s)
    for n in ("dev0", "dev1", "dev2", "dev3"):
        w.toggle_participant(n, True)
    qtbot.waitUntil(lambda: w.plan_view.rows() == ["dev0", "dev1", "dev2", "dev3"] and not w.planner.busy,
                    timeout=10000)
    first = w.plan_view.preview
    assert w.workspace.topology.node("dev0").mem_pred_bytes and w.workspace.topology.node("dev0").mem_capacity_bytes == 4 * 2**30
    drag(w.canvas, node_center(w, "dev1"), slot_center(w, 0))   # the laptop becomes stage 1
    assert w.workspace.topology.participants[0] == "dev1"
    qtbot.waitUntil(lambda: w.plan_view.rows()[0] == "dev1" and not w.planner.busy, timeout=10000)
    second = w.plan_view.preview
    assert second is not first
    assert second.stages and second.devices[0].name == "dev1"
    assert w.workspace.topology.node("dev1").stage == 0 and w.workspace.topology.node("dev1").layers[0] == 0
    # the references on the charts follow the plan
    assert ("latency", "dev1") in w.charts.references()
    close_window(w)


def test_auto_arrange_is_one_undoable_command(qtbot, tmp_path):
    # The slowest board (a Nano: one thread, 4 GiB) holds the second stage (index 1) and a
    # TX2 the last: the planner predicts another order to be more than 5% faster for pp over > 2 devices
    # (make_plan's proposal rule), so Auto-arrange has a real reordering to apply.
    inv = write_inventory(tmp_path / "inv.yaml", 4, presets=["laptop", "jetson-nano", "laptop", "jetson-tx2"])
    w = open_window(qtbot, tmp_path, inv)
    s = w.run_config.settings()
    s.model, s.parallelism = "distilbert", "pp"
    w.run_config.set_settings(s)
    for n in ("dev0", "dev1", "dev2", "dev3"):
        w.toggle_participant(n, True)
    before = w.workspace.topology.participants
    assert before == ["dev0", "dev1", "dev2", "dev3"]
    # the plan of exactly this order (not of a partial tick sequence) has arrived
    qtbot.waitUntil(lambda: not w.planner.busy and w.planner.latest is not None
                    and [d.name for d in w.planner.latest.devices] == before, timeout=10000)
    pv = w.planner.latest
    assert pv.plan is not None and pv.plan.proposed_order, pv.recommendation
    suggested = pv.suggested_order
    assert suggested == pv.plan.proposed_order and sorted(suggested) == sorted(before)
    assert suggested != before, "the set-up must make the planner propose another order"
    w.undo.clear()
    w.auto_arrange()
    assert w.workspace.topology.participants == suggested
    assert w.undo.count() == 1 and w.undo.canUndo()      # one command for the whole reordering
    assert [w.scene.item(n).pos() for n in suggested] == [w.scene.slot_pos(i) for i in range(4)]
    w.undo.undo()                                         # one step back restores the user's order
    assert w.workspace.topology.participants == before and not w.undo.canUndo()
    assert [w.scene.item(n).pos() for n in before] == [w.scene.slot_pos(i) for i in range(4)]
    w.undo.redo()
    assert w.workspace.topology.participants == suggested
    # applying it again is a no-op: nothing new is pushed
    qtbot.waitUntil(lambda: not w.planner.busy and w.planner.latest is not None
                    and [d.name for d in w.planner.latest.devices] == suggested, timeout=10000)
    w.auto_arrange()
    assert w.undo.count() == 1 and w.workspace.topology.participants == suggested
    close_window(w)


def test_64_devices_build_and_reorder(qtbot, tmp_path):
    w = open_window(qtbot, tmp_path, write_inventory(tmp_path / "inv.yaml", 64))
    assert w.devices_panel.model.rowCount() == 64
    w.workspace.topology.set_participants([f"dev{i}" for i in range(64)])
    qtbot.waitUntil(lambda: len(w.plan_view.rows()) == 64 and not w.planner.busy, timeout=20000)
    assert len(w.scene.items_by_id()) == 64
    drag(w.canvas, node_center(w, "dev5"), slot_center(w, 0))
    assert w.workspace.topology.participants[0] == "dev5" and w.workspace.topology.participants[1] == "dev0"
    w.undo.undo()
    assert w.workspace.topology.participants[5] == "dev5"
    close_window(w)


def test_results_for_gone_devices_are_dropped(qtbot, tmp_path):
    w = open_window(qtbot, tmp_path, write_inventory(tmp_path / "inv.yaml", 2))
    w.toggle_participant("dev0", True)
    w.toggle_participant("dev0", False)
    # run results and plan results naming a device that has no item any more
    w._on_device_status("dev0", "running")
    w._on_device_status("ghost", "oom")
    w._on_event({"t": 0.0, "device": "ghost", "kind": "oom", "message": "ghost: out of memory"})
    w._on_record({"type": "step", "device": "ghost", "t": 1.0, "samples": 4, "latency_s": 0.1,
                  "latency_per_sample_s": 0.025})
    w.workspace.topology.set_prediction("dev0", 1, 2, True)
    w.devices_panel.model.on_changed("ghost")
    w.workspace.devices.remove("dev1")
    qtbot.waitUntil(lambda: w.devices_panel.model.rowCount() == 1, timeout=3000)
    w.charts.repaint_now()
    assert w.scene.item("dev0") is None and w.event_log.rows()[-1][0] == "ghost"
    close_window(w)


def test_session_save_and_restore(qtbot, tmp_path):
    inv = write_inventory(tmp_path / "inv.yaml", 3)
    w = open_window(qtbot, tmp_path, inv)
    for n in ("dev2", "dev0"):
        w.toggle_participant(n, True)
    s = w.run_config.settings()
    s.parallelism, s.batch_size, s.micro_batches = "pp", 48, 6
    w.run_config.set_settings(s)
    path = w.save_session(tmp_path / "ses.yaml")
    close_window(w)
    w2 = open_window(qtbot, tmp_path, inv, session=path)
    assert w2.workspace.topology.participants == ["dev2", "dev0"]
    got = w2.run_config.settings()
    assert (got.parallelism, got.batch_size, got.micro_batches) == ("pp", 48, 6)
    close_window(w2)


def test_trust_dialog_shows_fingerprint(qtbot, tmp_path):
    from app.testbed.local import Testbed

    tb_loop = AsyncLoop("testbed-loop").start()
    base = f"127.{random.randint(40, 250)}.{random.randint(0, 250)}.1"
    tb = Testbed(tmp_path / "tb", n_devices=1, port=0, base_addr=base)
    tb_loop.submit(tb.start()).result(30)
    try:
        # an inventory whose trusted domain is empty: the device's key is unknown
        inv = yaml.safe_load(tb.inventory_path.read_text())
        inv["known_hosts"] = str(tmp_path / "empty_known_hosts")
        inv["devices"][0]["key"] = str(tb.client_key_path)
        (tmp_path / "inv.yaml").write_text(yaml.safe_dump(inv))
        w = open_window(qtbot, tmp_path, tmp_path / "inv.yaml")
        w.device_actions.check()
        qtbot.waitUntil(lambda: w.workspace.devices.get("dev0").status == "untrusted", timeout=15000)
        w.devices_panel.select("dev0")
        w.devices_panel.buttons["trust"].click()
        qtbot.waitUntil(lambda: w.device_actions.trust_dialog is not None
                        and w.device_actions.trust_dialog.isVisible(), timeout=15000)
        dlg = w.device_actions.trust_dialog
        expected = fingerprint(asyncssh.read_private_key(str(tb.devices[0].host_key)))
        assert expected.startswith("SHA256:")
        assert dlg.fingerprint_label.text() == expected
        dlg.trust_button.click()
        assert expected.split(":", 1)[1] and w.workspace.known_hosts.lookup(tb.devices[0].host, tb.devices[0].port)
        qtbot.waitUntil(lambda: w.workspace.devices.get("dev0").status == "online", timeout=15000)
        close_window(w)
    finally:
        tb_loop.submit(tb.stop()).result(30)
        tb_loop.stop()


def test_gui_subcommand(monkeypatch, capsys):
    from app.cli.gui import cmd_gui
    from app.cli.main import build_parser

    args = build_parser().parse_args(["gui", "--inventory", "x.yaml"])
    assert args.func is cmd_gui and args.inventory == "x.yaml"
    for var in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(var, raising=False)
    assert cmd_gui(args) == 2                       # no display: a message, not a crash
    assert "no display" in capsys.readouterr().err


def test_an_oom_preview_says_what_would_fit_and_applies_it(qtbot, tmp_path):
    """GPT2-L pipelined over four 4 GB Nanos runs out of memory as set; the preview says which
    knobs fit (as `edgetrain plan` does), Apply sets them, and the new plan fits."""
    inv = tmp_path / "inv.yaml"
    inv.write_text(yaml.safe_dump({"version": 1, "devices": [
        {"name": f"nano{i}", "host": f"127.0.3.{1 + i}", "labels": {"preset": "jetson-nano", "mem_cap": "cgroup"}}
        for i in range(4)]}))
    w = open_window(qtbot, tmp_path, inv)
    s = w.run_config.settings()
    s.model, s.parallelism, s.batch_size, s.seq_len = "gpt2-l", "pp", 128, 32
    w.run_config.set_settings(s)
    for i in range(4):
        w.toggle_participant(f"nano{i}", True)

    def planned(pred) -> bool:
        pv = w.plan_view.preview
        return not w.planner.busy and pv is not None and len(pv.devices) == 4 and pred(pv)

    qtbot.waitUntil(lambda: planned(lambda pv: pv.any_oom), timeout=30000)
    pv = w.plan_view.preview
    fix = pv.fit_changes
    assert fix and w.plan_view.apply_button.isVisible()
    assert "To fit: PP with" in w.plan_view.recommendation.text()
    assert pv.plan.suggestion["text"] in w.plan_view.recommendation.text()
    qtbot.mouseClick(w.plan_view.apply_button, Qt.LeftButton)
    now = w.run_config.settings()
    for key, value in fix.items():
        got = getattr(now, key)
        assert getattr(got, "value", got) == value, (key, got, value)
    qtbot.waitUntil(lambda: planned(lambda p: p is not pv and not p.any_oom), timeout=30000)
    assert not w.plan_view.apply_button.isVisible()
    close_window(w)
