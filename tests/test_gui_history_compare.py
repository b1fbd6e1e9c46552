"""The history after runs, offscreen: compare two runs, re-run one, export its model.

Two real short runs (tiny-gpt2 on two testbed devices: real SSH, real workers; one DP,
one pipeline) are made once with the launcher, as the window does, and their records are
reused: the history lists them; selecting both and pressing Compare shows one curve per
run in each chart and a two-column table whose values are the records' own; Re-run starts
a run with the same model, parallelism and devices (its workers say so); Export model… writes a Hugging Face
directory next to (never over) the user's files.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pyqtgraph")

from PySide6.QtCore import Qt  # noqa: E402
from PySide6.QtTest import QTest  # noqa: E402
from PySide6.QtWidgets import QFileDialog  # noqa: E402

from app.devices.inventory import load_inventory  # noqa: E402
from app.qt.qt_main import QtMainWindow  # noqa: E402
from app.run.jobs import prepare_run  # noqa: E402
from app.testbed.local import Testbed  # noqa: E402
from app.workspace import history  # noqa: E402
from app.workspace.loop import AsyncLoop  # noqa: E402
from tests.qtleaks import no_leaks  # noqa: E402,F401 -- autouse fixture
from workers.config import RunSettings  # noqa: E402

pytestmark = [pytest.mark.gui, pytest.mark.slow]
RUN_TIMEOUT_S = 240   # two cores shared with other work: be patient, fail loudly
STEPS = 6


@pytest.fixture(scope="module")
def past_runs(tmp_path_factory):
    """A testbed of two devices and two finished runs on it (DP, then a two-stage pipeline)."""
    loop = AsyncLoop("testbed-loop").start()
    base = f"127.{random.randint(40, 250)}.{random.randint(0, 250)}.1"
    root = tmp_path_factory.mktemp("history")
    tb = Testbed(root / "tb", n_devices=2, port=0, base_addr=base)
    loop.submit(tb.start()).result(30)
    runs_dir = root / "runs"
    inv = load_inventory(tb.inventory_path)
    ids = []
    try:
        for par in ("dp", "pp"):
            settings = RunSettings(model="tiny-gpt2", parallelism=par, steps=STEPS, batch_size=16, seq_len=32,
                                   micro_batches=2, sync_every=1, eval_every=3)
            launcher, state = prepare_run(inv, ["dev0", "dev1"], settings, runs_dir)
            outcome = loop.submit(launcher.run()).result(RUN_TIMEOUT_S)
            assert outcome == "done", [e.message for e in state.events]
            ids.append(state.run_id)
        yield {"tb": tb, "runs_dir": runs_dir, "ids": ids}
    finally:
        loop.submit(tb.stop()).result(60)
        loop.stop()


def record(runs_dir: Path, run_id: str) -> dict:
    return json.loads((runs_dir / run_id / "record.json").read_text())


def telemetry_steps(runs_dir: Path, run_id: str) -> set[int]:
    lines = (runs_dir / run_id / "telemetry.jsonl").read_text().splitlines()
    return {r["step"] for r in map(json.loads, lines) if r["type"] == "step"}


def open_window(qtbot, tb: Testbed, runs_dir: Path) -> QtMainWindow:
    w = QtMainWindow(inventory=tb.inventory_path, runs_dir=runs_dir, check_devices=False)
    qtbot.addWidget(w)
    w.show()
    qtbot.waitExposed(w)
    w.bottom_tabs.setCurrentWidget(w.history)
    return w


def click_runs(qtbot, w: QtMainWindow, run_ids: list[str]) -> None:
    """Click the first run, Ctrl-click the others (the history's multi-selection)."""
    lst = w.history.list
    for i, rid in enumerate(run_ids):
        row = next(j for j, r in enumerate(w.history.runs) if r.run_id == rid)
        rect = lst.visualItemRect(lst.item(row))
        QTest.mouseClick(lst.viewport(), Qt.LeftButton, Qt.ControlModifier if i else Qt.NoModifier, rect.center())
    assert sorted(Path(p).name for p in w.history.selected_paths()) == sorted(run_ids)


def test_compare_two_runs_from_the_history(qtbot, past_runs):
    runs_dir, ids = past_runs["runs_dir"], past_runs["ids"]
    w = open_window(qtbot, past_runs["tb"], runs_dir)
    assert {r.run_id for r in w.history.runs} == set(ids)
    click_runs(qtbot, w, [ids[0]])
    assert not w.history.compare_button.isEnabled() and w.history.rerun_button.isEnabled()
    click_runs(qtbot, w, ids)
    assert w.history.compare_button.isEnabled() and not w.history.rerun_button.isEnabled()
    w.history.compare_button.click()
    assert len(w.history_actions.compare_views) == 1
    view = w.history_actions.compare_views[0]
    qtbot.waitExposed(view)
    shown = [r.run_id for r in view.runs]
    recs = {rid: record(runs_dir, rid) for rid in ids}
    assert shown == sorted(ids, key=lambda rid: recs[rid]["started"])   # oldest first
    # one curve per run in every chart, with the run's own data
    for chart in ("latency", "energy", "memory", "loss"):
        assert sorted(view.curves[chart]) == sorted(ids), chart
        assert view.curves[chart][ids[0]].opts["pen"].color() != view.curves[chart][ids[1]].opts["pen"].color()
    for rid in ids:
        s = recs[rid]["summary"]
        xs, ys = view.curves["latency"][rid].getData()
        assert len(xs) == len(telemetry_steps(runs_dir, rid)) == s["steps"] == STEPS
        assert (ys > 0).all() and xs[0] == 0.0 and (xs[1:] >= xs[:-1]).all()   # from the first step on
        assert len(view.curves["energy"][rid].getData()[0]) == STEPS
        mem = view.curves["memory"][rid].getData()[1].tolist()
        assert mem == [d["peak_mem_bytes"] / 2**20 for d in sorted(s["devices"], key=lambda d: d["rank"])]
        assert view.curves["loss"][rid].getData()[0].tolist() == [float(i + 1) for i in range(STEPS)]
        ev = view.eval_curves[rid].getData()
        assert ev[0].tolist() == [float(e["step"]) for e in s["evals"]] and ev[1].tolist() == [e["loss"] for e in s["evals"]]
    legend = [label.text for _sample, label in view.legend.items]
    for rid in ids:
        settings = recs[rid]["config"]["settings"]
        assert any(rid in t and settings["model"] in t and settings["parallelism"] in t for t in legend), legend
    # the table: a column per run, its values the records' own
    assert view.table.columnCount() == 2
    assert [view.table.horizontalHeaderItem(c).text() for c in range(2)] == shown
    for rid in ids:
        rec, s = recs[rid], recs[rid]["summary"]
        run = next(r for r in view.runs if r.run_id == rid)
        assert view.cell("model", rid) == rec["config"]["settings"]["model"]
        assert view.cell("parallelism", rid) == rec["config"]["settings"]["parallelism"]
        assert view.cell("devices", rid) == f"2: {', '.join(rec['config']['job']['devices'])}"
        assert view.cell("steps", rid) == f"{s['steps']}/{rec['config']['settings']['steps']}"
        assert view.cell("outcome", rid) == rec["outcome"] == "done"
        assert (run.latency_per_sample_s, run.energy_per_sample_j, run.throughput_sps) == \
            (s["latency_per_sample_s"], s["energy_per_sample_j"], s["throughput_sps"])
        assert view.cell("latency/sample (median, slowest device)", rid) == f"{s['latency_per_sample_s'] * 1e3:.3g} ms"
        assert view.cell("energy/sample", rid).startswith(f"{s['energy_per_sample_j']:.3g} J")
        assert view.cell("throughput", rid) == f"{s['throughput_sps']:.4g} samples/s"
        assert run.peak_mem_bytes == max(d["peak_mem_bytes"] for d in s["devices"])
        assert view.cell("held-out loss / accuracy", rid) == \
            f"{s['eval_loss']:.4f} / {s['eval_accuracy'] * 100:.1f}% (step {s['eval_step']})"
        assert view.cell("final train loss", rid) == f"{run.final_train_loss:.4f}"
        predicted = max(p["latency_per_sample_s"] for p in rec["plan"]["predictions"])
        assert view.cell("latency/sample predicted vs measured", rid).startswith(
            f"{predicted * 1e3:.3g} ms vs {s['latency_per_sample_s'] * 1e3:.3g} ms")
    # a pipeline's loss is its last stage's
    pp = next(r for r in view.runs if r.parallelism == "pp")
    lines = (runs_dir / pp.run_id / "telemetry.jsonl").read_text().splitlines()
    last = [r["loss"] for r in map(json.loads, lines) if r["type"] == "step" and r.get("loss") is not None]
    assert pp.final_train_loss == last[-1]
    w.close()   # closes the compare window too
    assert not view.isVisible()


def test_rerun_starts_a_run_like_the_selected_one(qtbot, past_runs, tmp_path):
    runs_dir = tmp_path / "runs"
    shutil.copytree(past_runs["runs_dir"], runs_dir)
    old = record(runs_dir, past_runs["ids"][1])                 # the pipeline run
    w = open_window(qtbot, past_runs["tb"], runs_dir)
    w.toggle_participant("dev1", True)                          # another selection on the canvas
    click_runs(qtbot, w, [old["run_id"]])
    w.history.rerun_button.click()
    assert w.run.running, w.event_log.rows()
    state = w.run.state
    assert state.run_id != old["run_id"] and list(state.devices) == old["config"]["job"]["devices"]
    for key in ("model", "parallelism", "steps", "batch_size", "micro_batches", "eval_every"):
        assert state.config["settings"][key] == old["config"]["settings"][key], key
    assert w.workspace.topology.participants == old["config"]["job"]["devices"]
    # the workers themselves say what they run (their hello), then the run is stopped: the
    # training itself is the launcher's, tested elsewhere
    hellos: list[dict] = []
    w.run.record.connect(lambda rec: hellos.append(rec) if rec.get("type") == "hello" else None)
    qtbot.waitUntil(lambda: len(hellos) == 2, timeout=RUN_TIMEOUT_S * 1000)
    assert {(h["model"], h["parallelism"], h["world_size"]) for h in hellos} == {("tiny-gpt2", "pp", 2)}
    w.stop_run()
    qtbot.waitUntil(lambda: w.summary.summary is not None, timeout=RUN_TIMEOUT_S * 1000)
    assert len(w.history.runs) == 3 and w.history.runs[0].run_id == state.run_id
    assert (w.history.runs[0].model, w.history.runs[0].parallelism) == ("tiny-gpt2", "pp")
    w.close()


def test_export_model_from_the_history(qtbot, past_runs, tmp_path, monkeypatch):
    runs_dir, rid = past_runs["runs_dir"], past_runs["ids"][0]
    chosen = tmp_path / "models"
    chosen.mkdir()
    (chosen / "notes.txt").write_text("the user's file")
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: str(chosen))
    w = open_window(qtbot, past_runs["tb"], runs_dir)
    click_runs(qtbot, w, [rid])
    assert w.history.export_button.isEnabled()
    w.history.export_button.click()
    qtbot.waitUntil(lambda: len(w.history_actions.exports) > 0, timeout=RUN_TIMEOUT_S * 1000)
    done = w.history_actions.exports[0]
    out = chosen / f"{rid}-model"       # the chosen directory was not empty: a new folder in it
    assert done.out_dir == out and done.step == STEPS
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    note = json.loads((out / "edgetrain.json").read_text())
    assert (note["run_id"], note["step"], note["parallelism"], note["world_size"]) == (rid, STEPS, "dp", 2)
    assert (chosen / "notes.txt").read_text() == "the user's file"
    assert str(out) in w.statusBar().currentMessage()
    w.close()


def test_export_is_disabled_without_the_worker_dependencies(qtbot, past_runs, monkeypatch):
    monkeypatch.setattr(history, "EXPORT_MODULES", ("torch", "no_such_module_edgetrain"))
    w = open_window(qtbot, past_runs["tb"], past_runs["runs_dir"])
    click_runs(qtbot, w, [past_runs["ids"][0]])
    assert not w.history.export_button.isEnabled() and w.history.resume_button.isEnabled()
    assert "no_such_module_edgetrain" in w.history.export_button.toolTip()
    assert "install" in w.history.export_button.toolTip()
    w.close()
