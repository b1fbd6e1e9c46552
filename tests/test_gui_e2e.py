"""The control panel end to end, offscreen, on a local testbed (real SSH, real workers).

* a run launched from the window fills the latency and energy charts while it runs and
  shows its summary when it ends; the history reopens it;
* an emulated OOM (a device with a 1.2 GB address-space cap training GPT-2 small) shows a
  marker on the charts and an event-log row naming the device;
* closing the window during a run leaves no worker process on any device.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import psutil
import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pyqtgraph")


from app.qt.qt_main import QtMainWindow  # noqa: E402
from app.testbed.local import Testbed  # noqa: E402
from app.workspace.loop import AsyncLoop  # noqa: E402
from workers.config import RunSettings  # noqa: E402

pytestmark = [pytest.mark.gui, pytest.mark.slow]
RUN_TIMEOUT_MS = 240_000   # two cores shared with other work: be patient, fail loudly


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    """dev0, dev1 unlimited; dev2 capped so that torch imports but GPT-2 small cannot train."""
    loop = AsyncLoop("testbed-loop").start()
    base = f"127.{random.randint(40, 250)}.{random.randint(0, 250)}.1"
    tb = Testbed(tmp_path_factory.mktemp("tb"), n_devices=3, port=0, base_addr=base,
                 mem_overrides={"dev2": "1.2G"})
    loop.submit(tb.start()).result(30)
    yield tb
    loop.submit(tb.stop()).result(60)
    loop.stop()


from tests.qtleaks import no_leaks  # noqa: E402,F401 -- autouse fixture


def open_window(qtbot, tb: Testbed, tmp_path: Path, names: list[str], settings: RunSettings) -> QtMainWindow:
    w = QtMainWindow(inventory=tb.inventory_path, runs_dir=tmp_path / "runs", check_devices=False)
    qtbot.addWidget(w)
    w.show()
    qtbot.waitExposed(w)
    for n in names:
        w.toggle_participant(n, True)
    w.run_config.set_settings(settings)
    return w


def worker_processes(tb: Testbed) -> list[psutil.Process]:
    """Live processes started on the testbed's devices (their cwd is under its directory)."""
    out = []
    root = str(tb.dir)
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "workers.train" in " ".join(p.info["cmdline"] or []) and p.cwd().startswith(root) \
                    and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            continue
    return out


def live_chart_observer(w: QtMainWindow, total_steps: int):
    """A ``waitUntil`` callback recording the charts' point counts seen while the run is going.

    Each call reads the latency and energy point counts first, then the run state: the
    counts are kept only when, after they were read, the run was still running and no
    device had reached its last step (the run state is fed from the asyncio thread ahead
    of the charts, so those points were drawn before the run could have ended). The
    callback is true once two such observations show both series grown, or once the run
    is over (then the caller's assertion reports what was seen).
    """
    live: list[tuple[int, int, int]] = []   # (latency points, energy points, steps done) while going

    def grown() -> bool:
        return len(live) >= 2 and live[-1][0] > live[0][0] and live[-1][1] > live[0][1]

    def check() -> bool:
        lat, en = w.charts.point_count("latency"), w.charts.point_count("energy")
        state = w.run.state
        if not w.run.running or state is None:
            return True
        step = max((d.steps for d in state.devices.values()), default=0)
        if step < total_steps and lat and en and (not live or (lat, en) != live[-1][:2]):
            live.append((lat, en, step))
        return grown()

    check.live, check.grown = live, grown
    return check


def test_run_from_window_shows_live_points_and_summary(qtbot, testbed, tmp_path):
    steps = 30
    w = open_window(qtbot, testbed, tmp_path, ["dev0", "dev1"],
                    RunSettings(model="tiny-gpt2", parallelism="dp", steps=steps, batch_size=32, sync_every=2))
    w.launch_action.trigger()
    assert w.run.running and not w.launch_action.isEnabled()
    assert w.devices_panel.model.status(w.workspace.devices.get("dev0")) == "busy"
    # live: the latency and energy charts grow, in two observations, while the run is still
    # going (running, and no device at its last step): a run whose telemetry reached the
    # charts only at the end fails here, as soon as it ends
    observe = live_chart_observer(w, steps)
    qtbot.waitUntil(observe, timeout=RUN_TIMEOUT_MS)
    assert observe.grown(), f"no chart growth seen while the run was going: {observe.live} " \
                            f"(running={w.run.running}); events: {w.event_log.rows()}"
    qtbot.waitUntil(lambda: w.summary.summary is not None, timeout=RUN_TIMEOUT_MS)
    s = w.summary.summary
    assert s["outcome"] == "done", w.event_log.rows()
    assert s["steps"] == steps and s["energy_per_sample_j"] > 0
    assert "done" in w.summary.headline.text() and w.summary.table.rowCount() == 2
    assert w.workspace.topology.node("dev0").status == "done" and not w.run.running
    assert w.launch_action.isEnabled()
    qtbot.waitUntil(lambda: w.charts.point_count("latency") >= 30, timeout=5000)  # every step, both devices
    # references from the plan are drawn next to the measurements
    assert ("latency", "dev0") in w.charts.references()
    # exports
    png, csv_ = w.charts.export_png(tmp_path / "c.png"), tmp_path / "c.csv"
    assert png.stat().st_size > 1000 and w.charts.export_csv(csv_) >= 60
    # the history lists the run and reopens its charts from the record
    assert w.history.runs and w.history.runs[0].run_id == s["run_id"]
    viewer = w.open_run(str(w.history.runs[0].path))
    assert viewer is not None and viewer.charts.point_count("latency") >= 30
    assert viewer.summary.summary["outcome"] == "done"
    viewer.close()
    w.close()


def test_oom_shows_marker_and_event_naming_device(qtbot, testbed, tmp_path):
    w = open_window(qtbot, testbed, tmp_path, ["dev0", "dev2"],
                    RunSettings(model="gpt2-s", parallelism="dp", steps=3, batch_size=8, seq_len=32))
    w.launch()
    qtbot.waitUntil(lambda: w.summary.summary is not None, timeout=RUN_TIMEOUT_MS)
    assert w.summary.summary["outcome"] == "oom", w.event_log.rows()
    assert any(kind == "oom" and dev == "dev2" for _t, kind, dev in w.charts.markers)
    rows = [r for r in w.event_log.rows() if r[1] == "oom"]
    assert rows and rows[0][0] == "dev2" and "dev2" in rows[0][2] and "out of memory" in rows[0][2]
    assert w.workspace.topology.node("dev2").status == "oom"
    w.close()


def test_closing_window_mid_run_stops_every_worker(qtbot, testbed, tmp_path):
    w = open_window(qtbot, testbed, tmp_path, ["dev0", "dev1"],
                    RunSettings(model="tiny-gpt2", parallelism="dp", steps=100_000, batch_size=32))
    w.launch()
    qtbot.waitUntil(lambda: w.run.state is not None
                    and all(d.steps >= 2 and d.pid for d in w.run.state.devices.values()), timeout=RUN_TIMEOUT_MS)
    pids = [d.pid for d in w.run.state.devices.values()]
    assert len(worker_processes(testbed)) == 2
    t0 = time.monotonic()
    w.close()                                  # blocks until the launcher has killed the workers
    took = time.monotonic() - t0
    deadline = time.monotonic() + 10
    while worker_processes(testbed) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert worker_processes(testbed) == []
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert took < 30


def test_stop_then_resume_from_history_brings_the_model_home(qtbot, testbed, tmp_path):
    steps = 40
    w = open_window(qtbot, testbed, tmp_path, ["dev0", "dev1"],
                    RunSettings(model="tiny-gpt2", parallelism="dp", steps=steps, batch_size=32, sync_every=1,
                                checkpoint_every=0, eval_every=10))
    assert w.run_config.settings().eval_every == 10 and w.run_config.settings().checkpoint_every == 0
    w.launch_action.trigger()
    qtbot.waitUntil(lambda: w.run.state is not None and
                    min(d.steps for d in w.run.state.devices.values()) >= 3, timeout=RUN_TIMEOUT_MS)
    w.stop_action.trigger()            # Stop: the devices checkpoint, then end
    qtbot.waitUntil(lambda: w.summary.summary is not None, timeout=RUN_TIMEOUT_MS)
    first = w.summary.summary
    assert first["outcome"] == "stopped", w.event_log.rows()
    assert "checkpoints: 1" in w.summary.durable.text() and w.summary.durable.isVisible()
    stopped_at = first["checkpoints"][-1]["step"]
    assert 3 <= stopped_at < steps and first["checkpoints"][-1]["kind"] == "stop"
    # History → select the stopped run → Resume
    w.history.refresh()
    row = next(i for i, r in enumerate(w.history.runs) if r.run_id == first["run_id"])
    w.history.list.setCurrentRow(row)
    w.summary.clear()
    w.history.resume_button.click()
    qtbot.waitUntil(lambda: w.summary.summary is not None, timeout=RUN_TIMEOUT_MS)
    s = w.summary.summary
    assert s["outcome"] == "done", w.event_log.rows()
    assert s["run_id"] != first["run_id"] and s["steps"] == steps
    assert any("resuming run " + first["run_id"] in m for _, _, m in w.event_log.rows())
    model = Path(s["model_dir"])
    assert (model / "config.json").is_file() and (model / "model.safetensors").is_file()
    assert "trained model: " + str(model) in w.summary.durable.text()
    assert s["eval_accuracy"] is not None and s["eval_step"] == steps
    w.close()
