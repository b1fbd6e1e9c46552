"""A live run's progress, ETA and loss in the window, and one name for one memory quantity.

* the ETA computation (Qt-free): "—" until two steps, then the median of the recent step
  times times the steps left, the slowest device deciding, evaluations still to come added;
* the plan preview and the memory chart show the same quantity (predicted peak resident
  memory; the chart plots resident memory) under the same label, and the address space
  only for a device capped on it;
* a real short run (two testbed devices, tiny-gpt2, real SSH and workers): the loss chart
  gets train and held-out points, every device's progress bar reaches the run's steps, the
  ETA is a number while the run goes, and each device's row and reference lines carry the
  plan's predictions beside the measurements.
"""
from __future__ import annotations

import random
import re

import pytest
import yaml

pytest.importorskip("PySide6")
pytest.importorskip("pyqtgraph")

from app.qt.qt_charts import TITLES  # noqa: E402
from app.qt.qt_plan import PLAN_COLUMNS, fmt_bytes_pair  # noqa: E402
from app.qt.qt_progress import COLUMNS as PROGRESS_COLUMNS  # noqa: E402
from app.qt.qt_style import fmt_bytes  # noqa: E402
from app.testbed.local import Testbed  # noqa: E402
from app.workspace.loop import AsyncLoop  # noqa: E402
from app.workspace.preview import CapKind  # noqa: E402
from app.workspace.progress import NO_VALUE, RunProgress, fmt_duration  # noqa: E402
from app.workspace.series import MEMORY_LABEL  # noqa: E402
from tests.qtleaks import no_leaks  # noqa: E402,F401 -- autouse fixture
from tests.test_gui_e2e import RUN_TIMEOUT_MS  # noqa: E402
from tests.test_gui_e2e import open_window as open_run_window  # noqa: E402
from tests.test_gui_panels import close_window, open_window  # noqa: E402
from workers.config import RunSettings  # noqa: E402

pytestmark = pytest.mark.gui
PLAN = {"predictions": [{"name": "a", "latency_per_sample_s": 0.002, "energy_per_sample_j": 0.1,
                         "peak_rss_bytes": 700 * 2**20}]}


def step(dev: str, i: int, t: float, **kw) -> dict:
    return {"type": "step", "device": dev, "step": i, "t": t, "samples": 16, "latency_s": 0.05,
            "latency_per_sample_s": 0.05 / 16, "energy_j": 1.6, "rss_bytes": 600 * 2**20, **kw}


# ---------------------------------------------------------------- ETA, Qt-free


def test_eta_is_the_median_step_time_times_the_steps_left():
    p = RunProgress(["a", "b"], total_steps=10, plan=PLAN)
    assert p.eta_s() is None                                 # nothing done
    p.feed(step("a", 0, 100.0))
    p.feed(step("b", 0, 100.0))
    assert p.eta_s() is None and fmt_duration(p.eta_s()) == NO_VALUE   # one step each: "—"
    # a: 1 s per step with one 5 s outlier (the median ignores it); b: 2 s per step
    for i, t in enumerate([101.0, 102.0, 107.0, 108.0], start=1):
        p.feed(step("a", i, t))
    for i, t in enumerate([102.0, 104.0], start=1):
        p.feed(step("b", i, t))
    a, b = p.devices["a"], p.devices["b"]
    assert (a.steps, b.steps) == (5, 3) and a.step_s == 1.0 and b.step_s == 2.0
    assert a.eta_s() == 5 * 1.0 and b.eta_s() == 7 * 2.0
    assert p.eta_s() == 14.0 and p.steps == 3                # the slowest device decides
    assert fmt_duration(p.eta_s()) == "14 s"
    # sampled step records (telemetry_every = 3): the time between them is three steps'
    p.feed(step("b", 5, 110.0))                              # steps 3 -> 6 in 6 s
    assert b.step_times[-1] == 2.0
    # measurements beside the plan's predictions
    assert a.latency_per_sample_s == pytest.approx(0.05 / 16) and a.energy_per_sample_j == pytest.approx(0.1)
    assert a.peak_rss_bytes == 600 * 2**20 and a.predicted.peak_rss_bytes == 700 * 2**20
    assert b.predicted.latency_per_sample_s is None          # not in the plan: shown as "—"
    # a device that is done no longer counts; a failed one neither
    p.set_status("b", "failed")
    assert p.eta_s() == 5.0 and p.steps == 5
    p.finish("failed")
    assert p.eta_s() == 0.0


def test_eta_adds_the_evaluations_still_to_come():
    p = RunProgress.of_run(["a"], {"settings": {"steps": 20, "eval_every": 5}}, None)
    for i in range(4):
        p.feed(step("a", i, 10.0 + i))
    p.feed({"type": "eval", "device": "a", "step": 5, "loss": 0.6, "accuracy": 0.5, "samples": 8, "seconds": 3.0})
    # 16 steps left at 1 s; evaluations after steps 5, 10, 15, 20 still to come at 3 s
    assert p.eta_s() == 16 * 1.0 + 4 * 3.0
    assert fmt_duration(75) == "1 min 15 s" and fmt_duration(7500) == "2 h 05 min"


# ---------------------------------------------------------------- same quantity, same label


def test_preview_and_memory_chart_name_and_show_the_same_quantity(qtbot, tmp_path):
    # dev0: a testbed Nano capped on its address space (RLIMIT_AS); dev1: a testbed TX2 in
    # a memory cgroup; dev2: no profile, no preset (a generic device: its RAM)
    devices = [{"name": "dev0", "host": "127.0.1.1", "port": 22,
                "labels": {"preset": "jetson-nano", "testbed": "local", "mem_cap": "address-space"}},
               {"name": "dev1", "host": "127.0.1.2", "port": 22,
                "labels": {"preset": "jetson-tx2", "testbed": "local", "mem_cap": "cgroup"}},
               {"name": "dev2", "host": "127.0.1.3", "port": 22}]
    inv = tmp_path / "inv.yaml"
    inv.write_text(yaml.safe_dump({"version": 1, "devices": devices}))
    w = open_window(qtbot, tmp_path, inv)
    s = w.run_config.settings()
    s.model, s.parallelism = "gpt2-s", "pp"
    w.run_config.set_settings(s)
    for n in ("dev0", "dev1", "dev2"):
        w.toggle_participant(n, True)
    qtbot.waitUntil(lambda: w.plan_view.rows() == ["dev0", "dev1", "dev2"] and not w.planner.busy, timeout=10000)
    pv = w.plan_view.preview
    # one label: the preview's memory column, the memory chart's title, the progress column
    assert PLAN_COLUMNS[1] == MEMORY_LABEL == PROGRESS_COLUMNS[5]
    assert w.plan_view.table.horizontalHeaderItem(1).text() == MEMORY_LABEL
    assert w.charts.plots["memory"].titleLabel.text.startswith(TITLES["memory"])
    assert TITLES["memory"].startswith(MEMORY_LABEL)
    kinds = {}
    for row, name in enumerate(w.plan_view.rows()):
        d, mem = pv.device(name), pv.memory(name)
        kinds[name] = mem.cap_kind
        # one quantity: the preview's figure is the planner's peak resident memory, and the
        # memory chart's dashed line for the device is that same figure
        assert w.plan_view.cell(row, MEMORY_LABEL) == fmt_bytes(d.peak_rss_bytes)
        assert w.charts.references()[("memory", name)] == pytest.approx(d.peak_rss_bytes / 2**20)
        cap = w.plan_view.cell(row, "Cap")
        if mem.cap_kind is CapKind.ADDRESS_SPACE:
            # the virtual size, only here, named for what it is
            assert d.peak_virtual_bytes > d.peak_rss_bytes
            assert cap == f"{fmt_bytes_pair(d.peak_virtual_bytes, d.limit_bytes)}\naddress space"
        else:                                              # a physical cap: RSS is what must fit
            assert cap == f"{fmt_bytes(d.limit_bytes)}\n{mem.cap_kind.value}" and mem.address_space_bytes is None
    assert kinds == {"dev0": CapKind.ADDRESS_SPACE, "dev1": CapKind.CGROUP, "dev2": CapKind.RAM}
    close_window(w)


# ---------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    loop = AsyncLoop("testbed-loop").start()
    base = f"127.{random.randint(40, 250)}.{random.randint(0, 250)}.1"
    tb = Testbed(tmp_path_factory.mktemp("tb"), n_devices=2, port=0, base_addr=base)
    loop.submit(tb.start()).result(30)
    yield tb
    loop.submit(tb.stop()).result(60)
    loop.stop()


@pytest.mark.slow
def test_live_run_shows_loss_progress_eta_and_predictions(qtbot, testbed, tmp_path):
    steps, eval_every = 24, 6
    w = open_run_window(qtbot, testbed, tmp_path, ["dev0", "dev1"],
                        RunSettings(model="tiny-gpt2", parallelism="dp", steps=steps, batch_size=32,
                                    eval_every=eval_every))
    assert "no run yet" in w.progress.headline.text()
    w.launch_action.trigger()
    assert w.run.running and w.progress.eta_text() == NO_VALUE
    assert w.bottom_tabs.currentWidget() is w.progress and w.progress.isVisible()
    # while the run goes (running, no device at its last step): the headline's ETA and the
    # loss chart's drawn points
    seen: list[tuple[str, int, int]] = []

    def observe() -> bool:
        m, text = w.progress.model, w.progress.headline.text()
        if not w.run.running:
            return True
        if m is not None and m.steps < steps:
            seen.append((text, w.charts.point_count("train_loss"), w.charts.point_count("eval_loss")))
        return False

    qtbot.waitUntil(observe, timeout=RUN_TIMEOUT_MS)
    etas = [text for text, _t, _e in seen if re.search(r"ETA \d", text)]
    assert etas, f"no ETA shown while the run went: {seen[-3:]}; events: {w.event_log.rows()}"
    assert re.search(r"ETA (\d+ s|\d+ min \d\d s)", etas[0]), etas
    assert max(t for _x, t, _e in seen) > 0, "no training loss drawn while the run went"
    assert max(e for _x, _t, e in seen) > 0, "no held-out loss drawn while the run went"
    qtbot.waitUntil(lambda: w.summary.summary is not None, timeout=RUN_TIMEOUT_MS)
    assert w.summary.summary["outcome"] == "done", w.event_log.rows()
    # every device's bar at the run's steps; the run is over, so is its ETA
    assert w.progress.steps_shown() == {"dev0": (steps, steps), "dev1": (steps, steps)}
    assert "step 24 / 24" in w.progress.headline_text() and "done after" in w.progress.headline_text()
    # the loss chart: a training loss point per step and the held-out evaluations
    qtbot.waitUntil(lambda: w.charts.point_count("eval_loss") >= steps // eval_every, timeout=5000)
    assert w.charts.point_count("train_loss") >= steps
    assert w.charts.curves[("train_loss", "dev0")] in w.charts.plots["loss"].items
    # the plan's prediction beside each measurement: a dashed line per device on the
    # latency, energy and memory charts, and "measured / predicted" in each progress row
    plan = {p["name"]: p for p in w.run.state.plan["predictions"]}
    refs = w.charts.references()
    t = w.progress.table
    for row, name in enumerate(("dev0", "dev1")):
        p = plan[name]
        assert refs[("latency", name)] == pytest.approx(p["latency_per_sample_s"] * 1e3)
        assert refs[("energy", name)] == pytest.approx(p["energy_per_sample_j"])
        assert refs[("memory", name)] == pytest.approx(p["peak_rss_bytes"] / 2**20)
        dev = w.progress.model.devices[name]
        assert dev.latency_per_sample_s > 0 and dev.energy_per_sample_j > 0 and dev.peak_rss_bytes > 0
        # the row's memory is the memory chart's quantity: the highest point of its curve
        _xs, ys = w.charts.store.arrays("memory", name)
        assert max(ys) == pytest.approx(dev.peak_rss_bytes / 2**20)
        assert t.item(row, 0).text().startswith(name) and t.item(row, 6).text() == "done"
        for col in (3, 4, 5):                          # the measurement, the plan's under it
            measured, predicted = t.item(row, col).text().split("\n")
            assert NO_VALUE not in measured and re.fullmatch(r"plan \d[\d.e+-]*", predicted), predicted
        assert t.item(row, 2).text().endswith(" ms")
    w.close()
