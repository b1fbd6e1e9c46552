"""A first run of the control panel with no devices: the empty state, the local testbed,
live mDNS discovery, trust on first use, saving the list to an inventory.

Real parts throughout: the testbed daemon of ``edgetrain testbed up`` (its processes are
checked gone after the window closes), zeroconf advertisers and browsers on loopback, an
in-process testbed device for SSH host keys.  Waits end on the event; their timeouts only
catch hangs.
"""
from __future__ import annotations

import random
import secrets
import socket
import threading
from pathlib import Path

import asyncssh
import psutil
import pytest
import yaml

pytest.importorskip("PySide6")
pytest.importorskip("pyqtgraph")

from PySide6.QtCore import Qt  # noqa: E402
from PySide6.QtTest import QTest  # noqa: E402
from PySide6.QtWidgets import QApplication, QDialogButtonBox  # noqa: E402

from app.devices.discovery import EDGETRAIN_TYPE, advertise  # noqa: E402
from app.devices.inventory import InventoryError, load_inventory  # noqa: E402
from app.devices.ssh import fingerprint  # noqa: E402
from app.qt.qt_main import QtMainWindow  # noqa: E402
from app.testbed import cgroups  # noqa: E402
from app.testbed.daemon import testbed_info as running_testbed  # noqa: E402
from app.workspace.inventory_save import save_devices  # noqa: E402
from app.workspace.local_testbed import TestbedRequest  # noqa: E402
from app.workspace.loop import AsyncLoop  # noqa: E402
from tests.qtleaks import no_leaks  # noqa: E402,F401 -- autouse fixture

pytestmark = pytest.mark.gui
LO = "127.0.0.1"
HANG_MS = 90_000  # only a hang takes this long


def random_base() -> str:
    """A loopback /24 of its own: tests (and other jobs) run side by side."""
    return f"127.{random.randint(40, 250)}.{random.randint(0, 250)}.1"


def open_window(qtbot, tmp_path: Path, **kw) -> QtMainWindow:
    w = QtMainWindow(runs_dir=tmp_path / "runs", **kw)
    qtbot.addWidget(w)
    w.show()
    qtbot.waitExposed(w)
    return w


def close_window(w: QtMainWindow) -> None:
    w.close()
    QApplication.processEvents()


def column(w: QtMainWindow, name: str, col: int) -> str:
    model = w.devices_panel.model
    return model.data(model.index(model.row_of(name), col))


def mine(w: QtMainWindow, tok: str) -> list[str]:
    return [n for n in w.devices_panel.model.names() if tok in n]


def advertise_all(names: list[str], base: str) -> list:
    """Advertise ``names`` on loopback side by side (each probes its names for ~1.5 s)."""
    out: list = [None] * len(names)

    def one(i: int) -> None:
        out[i] = advertise(names[i], f"{base[:-1]}{i + 1}", 2200 + i, [LO], {"user": "edge"},
                           types=(EDGETRAIN_TYPE,))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(out), "an advertiser failed to register"
    return out


def answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------- tests


def test_start_testbed_from_the_empty_state_then_stop_it_at_close(qtbot, tmp_path):
    w = open_window(qtbot, tmp_path)   # no inventory, no testbed: the first run
    fr = w.device_actions.first_run
    panel = w.devices_panel
    assert panel.model.rowCount() == 0 and fr.empty.isVisible() and not panel.view.isVisible()
    assert "No devices yet" in fr.empty.hint.text()
    fr.testbed.base_addr = random_base()
    qtbot.mouseClick(fr.empty.testbed_button, Qt.LeftButton)
    dlg = fr.testbed_dialog
    assert dlg is not None and dlg.isVisible()
    assert "stops it when this window closes" in dlg.info.text()   # who stops the testbed, said up front
    dlg.count_buttons[2].click()
    dlg.board_buttons[True].click()
    assert dlg.boards_label.text() == "2 devices: jetson-nano, jetson-nx"
    dlg.start_button.click()
    assert not fr.empty.testbed_button.isEnabled()   # starting, off the GUI thread
    qtbot.waitUntil(lambda: panel.model.rowCount() == 2, timeout=HANG_MS)
    res = fr.started
    assert res is not None and res.started and res.owned
    info = res.info
    assert [d.preset for d in info.devices] == ["jetson-nano", "jetson-nx"]
    assert all(d.mem_cap == "cgroup" for d in info.devices) == (cgroups.unavailable_reason() is None)  # as root
    names = panel.model.names()
    assert names == [d.name for d in info.devices] and w.workspace.inventory_path == info.inventory_path
    assert all(column(w, n, 2) == "inventory" for n in names)
    assert panel.view.isVisible() and not fr.empty.isVisible() and fr.empty.testbed_button.isEnabled()
    # the window checks the devices it loaded: the testbed's host keys come with its inventory
    qtbot.waitUntil(lambda: all(w.workspace.devices.get(n).status == "online" for n in names), timeout=HANG_MS)
    # the boards are measured once they are up (this host's speed is no preset's), then cached
    qtbot.waitUntil(lambda: set(w.workspace.profiles) == set(names), timeout=HANG_MS)
    assert all(w.workspace.profiles[n].gflops_fp32 for n in names)
    # the plan preview is the planner's own plan for these boards
    w.toggle_participant(names[0], True)
    qtbot.waitUntil(lambda: w.planner.latest is not None and bool(w.planner.latest.devices), timeout=HANG_MS)
    assert w.planner.latest.plan is not None and "EdgeTrain planner" in w.plan_view.source.text()
    daemon = psutil.Process(info.pid)
    close_window(w)
    assert running_testbed(info.dir) is None and fr.testbed.owned is None
    assert not daemon.is_running()
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(info.dir) in " ".join(p.info["cmdline"] or [])]
    assert left == [], f"testbed processes left running: {left}"
    assert not any(answers(d.host, d.port) for d in info.devices)


def test_mdns_devices_appear_and_leave_live(qtbot, tmp_path):
    w = open_window(qtbot, tmp_path, check_devices=False)
    fr = w.device_actions.first_run
    qtbot.mouseClick(fr.empty.discover_button, Qt.LeftButton)
    dlg = fr.discover_dialog
    assert dlg is not None and dlg.isVisible() and LO in dlg.items
    dlg.tick_only([LO])   # the test's advertisers are on loopback; nothing goes out on the LAN
    dlg.discover_button.click()
    assert fr.discovery.running and fr.discovery.interfaces == [LO]
    assert fr.empty.discover_button.text() == "Stop discovery"
    tok = secrets.token_hex(3)
    keep, leave = f"gui-{tok}-a", f"gui-{tok}-b"
    advs = advertise_all([keep, leave], random_base())
    try:
        qtbot.waitUntil(lambda: sorted(mine(w, tok)) == [keep, leave], timeout=HANG_MS)
        assert not fr.empty.isVisible()
        for n in (keep, leave):
            # seen, but never trusted by being discovered: its host key is still to be checked
            assert column(w, n, 1) == "untrusted" and column(w, n, 2) == "mDNS"
            assert w.workspace.devices.get(n).device.user == "edge"
        w.toggle_participant(keep, True)   # a participant stays listed (offline) when withdrawn
        for adv in advs:
            adv.close()
        qtbot.waitUntil(lambda: mine(w, tok) == [keep] and column(w, keep, 1) == "offline", timeout=HANG_MS)
    finally:
        for adv in advs:
            adv.close()
    fr.discover_action.trigger()   # Devices → Stop discovery
    assert not fr.discovery.running and fr.discover_action.text() == "Discover devices"
    close_window(w)


def test_trust_on_first_use_shows_key_type_and_fingerprint(qtbot, tmp_path):
    from app.testbed.local import Testbed

    tb_loop = AsyncLoop("testbed-loop").start()
    tb = Testbed(tmp_path / "tb", n_devices=1, port=0, base_addr=random_base())
    tb_loop.submit(tb.start()).result(60)
    try:
        w = open_window(qtbot, tmp_path)   # EdgeTrain's own known_hosts: empty
        dev = tb.devices[0]
        w.device_actions.add_device()      # a device added by hand
        add = w.device_actions.add_dialog
        add.name.setText("board")
        add.host.setText(dev.host)
        add.port.setValue(dev.port)
        add.key.setText(str(tb.client_key_path))
        add.findChild(QDialogButtonBox).button(QDialogButtonBox.Ok).click()
        qtbot.waitUntil(lambda: w.workspace.devices.get("board") is not None
                        and w.workspace.devices.get("board").status == "untrusted", timeout=HANG_MS)
        expected = fingerprint(asyncssh.read_private_key(str(dev.host_key)))

        def open_trust():
            w.device_actions.trust_dialog = None
            w.devices_panel.select("board")
            w.devices_panel.buttons["trust"].click()
            qtbot.waitUntil(lambda: w.device_actions.trust_dialog is not None
                            and w.device_actions.trust_dialog.isVisible(), timeout=HANG_MS)
            return w.device_actions.trust_dialog

        dlg = open_trust()
        assert dlg.key_type_label.text() == "ssh-ed25519"
        assert dlg.fingerprint_label.text() == expected and expected.startswith("SHA256:")
        QTest.keyClick(dlg, Qt.Key_Return)   # Enter is Cancel: no key is trusted without the button
        assert not dlg.isVisible() and dlg.result() == 0
        QApplication.processEvents()
        assert w.workspace.known_hosts.lookup(dev.host, dev.port) == []
        assert w.workspace.devices.get("board").status == "untrusted"
        dlg = open_trust()
        dlg.trust_button.click()
        assert [fingerprint(k) for k in w.workspace.known_hosts.lookup(dev.host, dev.port)] == [expected]
        qtbot.waitUntil(lambda: w.workspace.devices.get("board").status == "online", timeout=HANG_MS)
        close_window(w)
    finally:
        tb_loop.submit(tb.stop()).result(30)
        tb_loop.stop()


def test_save_discovered_and_hand_added_devices_to_an_inventory(qtbot, tmp_path):
    w = open_window(qtbot, tmp_path, check_devices=False)
    fr = w.device_actions.first_run
    tok = secrets.token_hex(3)
    w.workspace.add_manual(f"hand-{tok}", "127.0.33.7", 2022, user="pi")
    assert fr.start_discovery([LO])
    (adv,) = advertise_all([f"seen-{tok}"], random_base())
    try:
        qtbot.waitUntil(lambda: f"seen-{tok}" in mine(w, tok), timeout=HANG_MS)
    finally:
        adv.close()
    fr.discovery.stop()
    # the file already holds a device of its own: it is kept
    path = tmp_path / "saved" / "inventory.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({"version": 1, "devices": [{"name": "kept", "host": "127.0.33.9"}]}))
    listed = {d.name: d for d in w.workspace.devices.devices()}
    fr.save_action.trigger()   # File → Save devices to inventory…
    dlg = fr.save_dialog
    assert dlg is not None and dlg.isVisible()
    dlg.selectFile(str(path))
    dlg.accept()
    back = load_inventory(path)
    assert sorted(d.name for d in back.devices) == sorted([*listed, "kept"])
    for d in back.devices:
        if d.name in listed:
            assert (d.host, d.port, d.user) == (listed[d.name].host, listed[d.name].port, listed[d.name].user)
    assert back.known_hosts is not None and back.known_hosts == w.workspace.known_hosts.path
    close_window(w)
    w2 = open_window(qtbot, tmp_path, inventory=path, check_devices=False)
    assert sorted(w2.devices_panel.model.names()) == sorted([*listed, "kept"])
    assert all(column(w2, n, 2) == "inventory" for n in w2.devices_panel.model.names())
    close_window(w2)


def test_save_never_overwrites_a_file_that_is_not_an_inventory(tmp_path):
    from app.devices.inventory import Device

    notes = tmp_path / "notes.yaml"
    notes.write_text("my notes: keep me\n")
    with pytest.raises(InventoryError, match="not an EdgeTrain inventory.*choose another file"):
        save_devices([Device("a", "127.0.0.2")], notes)
    assert notes.read_text() == "my notes: keep me\n"
    with pytest.raises(InventoryError, match="no devices to save"):
        save_devices([], tmp_path / "x.yaml")
    with pytest.raises(InventoryError, match="'bad name!'"):   # checked before anything is written
        save_devices([Device("bad name!", "127.0.0.2")], tmp_path / "y.yaml")
    assert not (tmp_path / "y.yaml").exists()


def test_testbed_requests_pick_boards():
    assert TestbedRequest(2).device_presets() == ["jetson-nano"] * 2
    assert TestbedRequest(4, heterogeneous=True).device_presets() == ["jetson-nano", "jetson-nano",
                                                                      "jetson-tx2", "jetson-nx"]
    assert TestbedRequest(2, heterogeneous=True).device_presets() == ["jetson-nano", "jetson-nx"]
