"""The failure drill from the control panel, on a 4-device testbed (real SSH, real workers).

During a DP run, a device's context menu slows one device down (a real cgroup CPU quota)
and kills another's worker.  The run goes on without it: the Recovery tab shows
failure → detected → re-planned → resumed with their times, the canvas greys the lost
device out, and every survivor finishes all its steps.
"""
from __future__ import annotations

import os
import random

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pyqtgraph")

from app.qt.qt_main import QtMainWindow  # noqa: E402
from app.testbed.local import Testbed  # noqa: E402
from app.workspace.drill import Fault  # noqa: E402
from app.workspace.loop import AsyncLoop  # noqa: E402
from tests.qtleaks import no_leaks  # noqa: E402,F401 -- autouse fixture
from workers.config import RunSettings  # noqa: E402

pytestmark = [pytest.mark.gui, pytest.mark.slow]
RUN_TIMEOUT_MS = 240_000
DETECT_S = 5.0


def _drill_action(w: QtMainWindow, name: str, fault: Fault):
    menu = w.drill.menu(name, w)
    sub = next(a.menu() for a in menu.actions() if a.menu() is not None)
    act = next(a for a in sub.actions() if a.data() == fault.value)
    return menu, act


def _cgroup_of(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        return f.read()


def test_drill_kill_shows_the_recovery_timeline(qtbot, tmp_path):
    loop = AsyncLoop("testbed-loop").start()
    tb = Testbed(tmp_path / "tb", n_devices=4, port=0, base_addr=f"127.{random.randint(40, 250)}.{random.randint(0, 250)}.1")
    loop.submit(tb.start()).result(30)
    try:
        w = QtMainWindow(inventory=tb.inventory_path, runs_dir=tmp_path / "runs", check_devices=False)
        qtbot.addWidget(w)
        w.show()
        qtbot.waitExposed(w)
        for n in ("dev0", "dev1", "dev2", "dev3"):
            w.toggle_participant(n, True)
        steps = 40
        w.run_config.set_settings(RunSettings(model="tiny-gpt2", parallelism="dp", steps=steps, batch_size=48,
                                              sync_every=1, checkpoint_every=0, checkpoint_minutes=0, eval_every=0))
        # no run: every drill is disabled and says why
        menu, act = _drill_action(w, "dev2", Fault.KILL)
        assert not act.isEnabled() and "no run" in act.toolTip()
        menu.deleteLater()
        w.launch_action.trigger()
        qtbot.waitUntil(lambda: w.run.state is not None and all(
            d.steps >= 3 and d.pid for d in w.run.state.devices.values()), timeout=RUN_TIMEOUT_MS)
        state = w.run.state
        # the asyncssh testbed has no cable to cut: the entry is disabled with the reason
        menu, cut = _drill_action(w, "dev2", Fault.CUT_LINK)
        assert not cut.isEnabled() and "namespace testbed" in cut.toolTip()
        if os.geteuid() == 0:
            _, slow = _drill_action(w, "dev3", Fault.SLOW)
            assert slow.isEnabled()
            slow.trigger()
            qtbot.waitUntil(lambda: "edgetrain-drill" in _cgroup_of(state.devices["dev3"].pid), timeout=20_000)
        _, kill = _drill_action(w, "dev2", Fault.KILL)
        assert kill.isEnabled(), kill.toolTip()
        kill.trigger()
        qtbot.waitUntil(lambda: w.summary.summary is not None, timeout=RUN_TIMEOUT_MS)
        s = w.summary.summary
        assert s["outcome"] == "done", w.event_log.rows()
        phases = w.timeline.phases()
        assert [p for _, p, _ in phases] == ["failure", "detected", "re-planned", "resumed"], w.event_log.rows()
        after = {p: t for _, p, t in phases}
        assert after["detected"] <= DETECT_S and after["detected"] <= after["re-planned"] <= after["resumed"]
        assert w.timeline.table.rowCount() == 4 and w.timeline.table.item(0, 4).text() == "dev2"
        assert w.workspace.topology.node("dev2").status == "lost"
        devs = {d["device"]: d for d in s["devices"]}
        assert all(devs[n]["steps"] == steps and devs[n]["status"] == "done" for n in ("dev0", "dev1", "dev3"))
        kinds = [k for _, k, _ in w.event_log.rows()]
        assert "drill" in kinds and "lost" in kinds and "replan" in kinds and "resumed" in kinds
        w.close()
    finally:
        loop.submit(tb.stop()).result(60)
        loop.stop()
