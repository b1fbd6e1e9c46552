"""Comparing past runs without Qt: records -> one curve per run and chart, and the table.

The records are real: telemetry lines written by the workers' own
:class:`~workers.protocol.Emitter`, parsed back with :func:`~workers.protocol.parse_line`
and fed to a :class:`~app.run.runstate.RunState`, which writes ``record.json`` and
``telemetry.jsonl`` as a run does.  Expected values are worked out here from the lines
fed, not written down.
"""
from __future__ import annotations

import io
import json
import math

import pytest
import yaml

from app.devices.inventory import load_inventory
from app.run.jobs import prepare_run
from app.run.runstate import RunState
from app.workspace import history
from app.workspace.compare import TABLE_ROWS, CompareError, load_comparison, table, write_table_csv
from app.workspace.history import export_target, export_unavailable, rerun_of
from workers.config import RunSettings
from workers.protocol import Emitter, parse_line

STEPS = 4


def _write_run(runs_dir, run_id: str, parallelism: str, shares: list[int], plan_latency: list[float],
               pp: bool = False) -> tuple[RunState, list[dict]]:
    """A finished two-rank run; DP ranks each report their slice's loss, a pipeline only its last stage."""
    out = io.StringIO()
    em = [Emitter(run_id, r, f"d{r}", out) for r in range(2)]
    for r in range(2):
        em[r].emit("hello", world_size=2, parallelism=parallelism, model="tiny-gpt2", pid=10 + r)
    for it in range(STEPS):
        for r in range(2):
            loss = None if pp and r == 0 else 1.0 / (it + 1 + r)
            em[r].emit("step", step=it, samples=sum(shares), local_samples=shares[r], latency_s=0.01 * (r + 1),
                       latency_per_sample_s=0.001 * (r + 1) * (it + 1), energy_j=0.5 * (r + 1),
                       peak_mem_bytes=(100 + 50 * r) * 2**20, loss=loss)
        if it == 1 or it == STEPS - 1:
            em[1].emit("eval", step=it + 1, loss=0.7 - 0.1 * it, accuracy=0.5 + 0.1 * it, samples=8)
    for r in range(2):
        em[r].emit("done", steps=STEPS, samples=STEPS * sum(shares), wall_s=1.0)
    recs = [parse_line(line) for line in out.getvalue().splitlines()]
    plan = {"predictions": [{"name": f"d{r}", "latency_per_sample_s": v} for r, v in enumerate(plan_latency)]}
    state = RunState(run_id, ["d0", "d1"], {"settings": {"model": "tiny-gpt2", "parallelism": parallelism,
                                                         "steps": STEPS}},
                     run_dir=runs_dir / run_id, plan=plan)
    for rec in recs:
        state.feed(rec)
    state.finish("done")
    return state, recs


@pytest.fixture
def two_runs(tmp_path):
    dp = _write_run(tmp_path, "run-dp", "dp", [12, 4], [0.004, 0.003])
    pp = _write_run(tmp_path, "run-pp", "pp", [16, 16], [0.01, 0.02], pp=True)
    return tmp_path, dp, pp


def test_one_curve_per_run_from_the_records(two_runs):
    runs_dir, (dp_state, dp_recs), (pp_state, pp_recs) = two_runs
    dp, pp = load_comparison([runs_dir / "run-dp", runs_dir / "run-pp"])
    assert [r.run_id for r in (dp, pp)] == ["run-dp", "run-pp"]
    for run, state, recs in ((dp, dp_state, dp_recs), (pp, pp_state, pp_recs)):
        steps = [r for r in recs if r["type"] == "step"]
        by_step = {i: [r for r in steps if r["step"] == i] for i in range(STEPS)}
        lat = run.curves["latency"]
        # per step: the slowest rank's latency (ms), when the last rank reported it
        assert lat.ys == [max(r["latency_per_sample_s"] for r in rs) * 1e3 for rs in by_step.values()]
        # x: seconds since the run's first step (completed when its last rank reported it)
        t0 = max(r["t"] for r in by_step[0])
        assert lat.xs == [max(r["t"] for r in rs) - t0 for rs in by_step.values()] and lat.xs[0] == 0.0
        # per step: the ranks' energy over the global samples, added up
        assert run.curves["energy"].ys == pytest.approx(
            [sum(r["energy_j"] / r["samples"] for r in rs) for rs in by_step.values()])
        # per rank: its peak, from the summary
        assert run.curves["memory"].xs == [0.0, 1.0]
        assert run.curves["memory"].ys == [d["peak_mem_bytes"] / 2**20 for d in state.summary()["devices"]]
        assert run.curves["eval_loss"].xs == [float(e.step) for e in state.evals]
        assert run.curves["eval_loss"].ys == [e.loss for e in state.evals]
        assert run.curves["loss"].xs == [float(i + 1) for i in range(STEPS)]
        s = state.summary()
        assert (run.latency_per_sample_s, run.energy_per_sample_j, run.throughput_sps) == \
            (s["latency_per_sample_s"], s["energy_per_sample_j"], s["throughput_sps"])
        assert (run.eval_loss, run.eval_accuracy, run.steps) == (s["eval_loss"], s["eval_accuracy"], s["steps"])
        assert run.peak_mem_bytes == max(d["peak_mem_bytes"] for d in s["devices"]) and run.peak_mem_device == "d1"
        assert run.predicted_latency_per_sample_s == max(p["latency_per_sample_s"]
                                                         for p in state.plan["predictions"])
        assert run.latency_error == pytest.approx(
            (s["latency_per_sample_s"] - run.predicted_latency_per_sample_s) / run.predicted_latency_per_sample_s)
    # DP: the global batch's loss is the ranks' slice losses weighted by their samples
    last = [r for r in dp_recs if r["type"] == "step" and r["step"] == STEPS - 1]
    assert dp.final_train_loss == pytest.approx(sum(r["loss"] * r["local_samples"] for r in last)
                                                / sum(r["local_samples"] for r in last))
    # a pipeline: only the last stage knows the loss
    assert pp.final_train_loss == [r["loss"] for r in pp_recs if r["type"] == "step" and r["rank"] == 1][-1]


def test_table_has_a_column_per_run(two_runs, tmp_path):
    runs_dir, (dp_state, _), _ = two_runs
    runs = load_comparison([runs_dir / "run-dp", runs_dir / "run-pp"])
    rows = dict(table(runs))
    assert list(rows) == [label for label, _ in TABLE_ROWS]
    assert all(len(cells) == 2 for cells in rows.values())
    s = dp_state.summary()
    assert rows["model"] == ["tiny-gpt2", "tiny-gpt2"] and rows["parallelism"] == ["dp", "pp"]
    assert rows["devices"][0] == "2: d0, d1" and rows["steps"][0] == f"{s['steps']}/{STEPS}"
    assert rows["outcome"] == ["done", "done"]
    assert rows["latency/sample (median, slowest device)"][0] == f"{s['latency_per_sample_s'] * 1e3:.3g} ms"
    assert rows["held-out loss / accuracy"][0].startswith(f"{s['eval_loss']:.4f} / {s['eval_accuracy'] * 100:.1f}%")
    assert f"({runs[0].latency_error:+.0%})" in rows["latency/sample predicted vs measured"][0]
    path = write_table_csv(runs, tmp_path / "t.csv")
    lines = path.read_text().splitlines()
    assert lines[0] == ",run-dp,run-pp" and len(lines) == 1 + len(TABLE_ROWS)


def test_a_run_without_telemetry_or_record(tmp_path, two_runs):
    runs_dir, *_ = two_runs
    (runs_dir / "run-dp" / "telemetry.jsonl").unlink()
    (run,) = load_comparison([runs_dir / "run-dp"])
    assert len(run.curves["latency"]) == 0 and run.latency_per_sample_s is not None   # the column stays
    with pytest.raises(CompareError, match=r"nowhere.*record\.json.*cannot read"):
        load_comparison([tmp_path / "nowhere"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "record.json").write_text("{cut short")
    with pytest.raises(CompareError, match=r"bad.*record\.json.*not a valid run record"):
        load_comparison([bad])


def test_diverged_loss_is_left_out(tmp_path):
    state, recs = _write_run(tmp_path, "run-nan", "dp", [8, 8], [0.001, 0.001])
    lines = (tmp_path / "run-nan" / "telemetry.jsonl").read_text().splitlines()
    i = max(i for i, line in enumerate(lines) if '"type":"step"' in line and '"rank":1' in line)
    rec = json.loads(lines[i])
    rec["loss"] = math.nan   # rank 1 diverged on the last step
    lines[i] = json.dumps(rec)
    (tmp_path / "run-nan" / "telemetry.jsonl").write_text("\n".join(lines) + "\n")
    (run,) = load_comparison([tmp_path / "run-nan"])
    assert all(math.isfinite(v) for v in run.curves["loss"].ys) and len(run.curves["loss"]) == STEPS
    rank0 = [r["loss"] for r in recs if r["type"] == "step" and r["rank"] == 0][-1]
    assert run.final_train_loss == rank0   # the last step: only the rank whose loss is a number


def test_rerun_reads_the_runs_settings_and_devices(tmp_path):
    inv_path = tmp_path / "inv.yaml"
    inv_path.write_text(yaml.safe_dump({"version": 1, "devices": [
        {"name": f"dev{i}", "host": f"127.0.0.{i + 1}", "port": 22} for i in range(3)]}))
    settings = RunSettings(model="tiny-gpt2", parallelism="pp", steps=7, batch_size=16, eval_every=3)
    _, state = prepare_run(load_inventory(inv_path), ["dev2", "dev0"], settings, tmp_path / "runs")
    again = rerun_of(tmp_path / "runs", state.run_id)
    assert again.devices == ["dev2", "dev0"]
    assert again.settings.to_dict() == RunSettings.from_dict(state.config["settings"]).to_dict()
    assert (again.settings.model, again.settings.parallelism.value, again.settings.steps) == ("tiny-gpt2", "pp", 7)
    with pytest.raises(history.ResumeError, match="no run 'nope'"):
        rerun_of(tmp_path / "runs", "nope")


def test_export_target_never_writes_over_the_users_files(tmp_path, monkeypatch):
    assert export_target(tmp_path / "new", "r1") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert export_target(tmp_path / "empty", "r1") == tmp_path / "empty"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert export_target(tmp_path / "full", "r1") == tmp_path / "full" / "r1-model"
    assert export_unavailable() is None   # this machine has the worker dependencies
    monkeypatch.setattr(history, "EXPORT_MODULES", ("torch", "no_such_module_edgetrain"))
    why = export_unavailable()
    assert "no_such_module_edgetrain" in why and "torch," not in why and "Fix: install" in why


def test_steady_energy_per_sample_leaves_each_devices_first_step_out(tmp_path):
    """The planner predicts steady state; the first step (optimizer state, warm-up) of a short
    run holds most of its energy, so the comparable figure starts after it."""
    out = io.StringIO()
    em = [Emitter("r", r, f"d{r}", out) for r in range(2)]
    energies = {0: [9.0, 0.25, 0.5], 1: [7.0, 0.75, 1.0]}   # J per step; step 0 the expensive one
    for r in range(2):
        em[r].emit("hello", world_size=2, parallelism="dp", model="tiny-gpt2", pid=10 + r)
    for it in range(3):
        for r in range(2):
            em[r].emit("step", step=it, samples=16, local_samples=8, latency_s=0.1, latency_per_sample_s=0.01,
                       energy_j=energies[r][it], peak_mem_bytes=2**20, loss=1.0)
    state = RunState("r", ["d0", "d1"], {"settings": {"model": "tiny-gpt2", "parallelism": "dp", "steps": 3}},
                     run_dir=tmp_path / "r")
    recs = [parse_line(line) for line in out.getvalue().splitlines()]
    for rec in recs[:-2]:              # the last step not in yet
        state.feed(rec)
    later = sum(e for es in energies.values() for e in es[1:2])
    assert state.summary()["steady_energy_per_sample_j"] == pytest.approx(later / 16)
    for rec in recs[-2:]:
        state.feed(rec)
    s = state.summary()
    later = sum(e for es in energies.values() for e in es[1:])
    assert s["steady_energy_per_sample_j"] == pytest.approx(later / 32)
    assert s["energy_per_sample_j"] == pytest.approx(sum(map(sum, energies.values())) / 48)
    # a device with only its first step reported: no steady figure yet
    fresh = RunState("f", ["d0", "d1"], {"settings": {"steps": 3}}, run_dir=tmp_path / "f")
    for rec in recs[:4]:
        fresh.feed(rec)
    assert fresh.summary()["steady_energy_per_sample_j"] is None
