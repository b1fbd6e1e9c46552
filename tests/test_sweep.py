"""The one-click study on a real testbed: every cell is an ordinary run over SSH, and the
report puts what the planner predicted next to what the run measured.

One sweep of tiny-gpt2 on three testbed devices, where ``dev2`` has a 1.2 GB address-space
cap: torch imports under it, but 128 samples of 128 tokens need more than that resident
(~1.3 GiB RSS measured on an uncapped device), so it is a real allocation failure, not a
near miss.  ``dev2`` is profiled for real first, so the planner knows its limit, as it would
after ``edgetrain profile``.  The cells: the one-device baseline on ``dev0``, DP over
``dev0`` and ``dev2`` (128 samples each: predicted and really out of memory), then DP and PP
on ``dev0``/``dev1`` (the sweep goes on).
"""
from __future__ import annotations

import asyncio
import csv
import json

import pytest

from app.devices.inventory import load_inventory
from app.devices.profile import profile_devices
from app.devices.ssh import KnownHosts
from app.run.sweep import SweepCell, plan_cells, run_sweep, write_report
from app.testbed.emulation import parse_size
from app.testbed.local import Testbed
from tests.test_e2e_spine import base_addr
from workers.config import RunSettings

pytestmark = pytest.mark.slow

CAPPED = "dev2"
CAP = "1.2G"
SETTINGS = RunSettings(model="tiny-gpt2", steps=2, batch_size=256, seq_len=128, micro_batches=2)


def _cells() -> list[SweepCell]:
    # the baseline and DP/PP on dev0, dev1, as the CLI plans them; the capped cell after
    # the baseline, so there is a cell after it
    cells = plan_cells(["dev0", "dev1"], ["dp", "pp"], single=True)
    cells.insert(1, SweepCell("dp-capped", "dp", ["dev0", CAPPED]))
    return cells


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Run the sweep once; the tests below read its cells, run records and report."""
    tmp = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as mp:
        # module scope comes before conftest's per-test EDGETRAIN_HOME: set one here, so the
        # profile cache the planner reads is this sweep's, never the user's
        mp.setenv("EDGETRAIN_HOME", str(tmp / "home"))
        return _run_sweep(tmp)


def _run_sweep(tmp):
    seen: list[str] = []

    async def main():
        async with Testbed(tmp / "tb", n_devices=3, port=0, base_addr=base_addr(),
                           mem_overrides={CAPPED: CAP}, cgroups=False) as tb:  # RLIMIT_AS: what it measures
            inv = load_inventory(tb.inventory_path)
            capped = [d for d in inv.devices if d.name == CAPPED]
            # a real measurement of the capped device (its RLIMIT_AS), into $EDGETRAIN_HOME/profiles
            profiles, _ = await profile_devices(capped, KnownHosts(inv.known_hosts_file()), pairs=False,
                                                bench_seconds=0.1, link_seconds=0.1)
            cells = await run_sweep(inv, None, SETTINGS, _cells(), tmp / "runs",
                                    on_cell=lambda c: seen.append(c.label))
            return profiles[0], cells
    profile, cells = asyncio.run(main())
    assert (tmp / "home" / "profiles" / f"{CAPPED}.json").is_file()    # this sweep's cache, not ~
    report = write_report(cells, SETTINGS, tmp / "report")
    rows = list(csv.DictReader((tmp / "report" / "report.csv").read_text().splitlines()))
    saved = json.loads((tmp / "report" / "sweep.json").read_text())
    records = {c.label: json.loads((tmp / "runs" / c.run_id / "record.json").read_text())
               for c in cells if c.run_id}
    return {"profile": profile, "cells": cells, "seen": seen, "report": report, "rows": rows, "saved": saved,
            "records": records}


def test_capped_device_is_predicted_and_really_out_of_memory(sweep):
    cells = {c.label: c for c in sweep["cells"]}
    assert sweep["profile"].mem_limit_bytes == parse_size(CAP)   # measured: the planner knows the cap
    oom = cells["dp-capped"]
    assert oom.outcome == "oom", oom.message
    assert CAPPED in oom.message and "out of memory" in oom.message
    assert f"limit {parse_size(CAP) / 2**30:.2f} GiB" in oom.message     # against this cap
    # the planner said so before it ran, naming the device
    assert oom.predicted.oom and oom.predicted.oom_devices == [CAPPED]
    rec = sweep["records"]["dp-capped"]
    assert rec["outcome"] == "oom"
    assert [e["device"] for e in rec["events"] if e["kind"] == "oom"][:1] == [CAPPED]
    assert [p["name"] for p in rec["plan"]["predictions"] if p["oom"]] == [CAPPED]
    row = next(r for r in sweep["rows"] if r["cell"] == "dp-capped")
    assert row["outcome"] == "oom"
    assert row["predicted_oom"] == f"yes: {CAPPED}"
    assert CAPPED in row["note"] and row["latency_ms_per_sample"] == "-" and row["vs_single"] == "-"


def test_sweep_goes_on_after_the_oom_cell(sweep):
    labels = [c.label for c in _cells()]
    assert sweep["seen"] == labels                  # every cell was run and announced, in order
    assert [c.label for c in sweep["cells"]] == labels
    after = sweep["cells"][labels.index("dp-capped") + 1:]
    assert after and all(c.outcome == "done" for c in after), [(c.label, c.message) for c in after]
    run_ids = [c.run_id for c in sweep["cells"]]
    assert None not in run_ids and len(set(run_ids)) == len(run_ids)   # each cell is its own run
    for c in after:
        rec = sweep["records"][c.label]
        assert rec["outcome"] == "done" and rec["summary"]["devices"]
        assert [d["device"] for d in rec["summary"]["devices"]] == c.devices
        assert not c.predicted.oom


def test_every_cell_carries_the_planners_prediction(sweep):
    """Predicted latency, energy and OOM next to the measured values, in report.csv and
    sweep.json; the predicted latency is the run record's plan (one cost model)."""
    rows = {r["cell"]: r for r in sweep["rows"]}
    saved = {c["label"]: c for c in sweep["saved"]["cells"]}
    assert list(rows) == list(saved) == [c.label for c in sweep["cells"]]
    for c in sweep["cells"]:
        totals = sweep["records"][c.label]["plan"]["totals"]
        pred_lat, pred_en = totals["median_latency_per_sample_s"], totals["energy_per_sample_j"]
        assert isinstance(pred_lat, float) and pred_lat > 0 and isinstance(pred_en, float) and pred_en > 0
        # sweep.json: the planner's numbers themselves
        p = saved[c.label]["predicted"]
        assert p["latency_per_sample_s"] == pred_lat, c.label
        assert p["energy_per_sample_j"] == pred_en, c.label
        assert p["oom"] == totals["oom"], c.label
        # report.csv: the same numbers, formatted, next to the measured ones
        row = rows[c.label]
        assert row["predicted_latency_ms"] == f"{pred_lat * 1e3:.3f}", (c.label, row)
        assert row["predicted_energy_j_per_sample"] == f"{pred_en:.4f}", (c.label, row)
        assert row["predicted_oom"] == (f"yes: {CAPPED}" if totals["oom"] else "no"), (c.label, row)
        assert row["run_id"] == c.run_id == saved[c.label]["run_id"]
        measured = sweep["records"][c.label]["summary"]
        if c.outcome == "done":
            assert row["latency_ms_per_sample"] == f"{measured['latency_per_sample_s'] * 1e3:.3f}", c.label
            # steady state (after the first step), the quantity the planner predicts: the
            # energy of the later steps is part of the whole run's, and the first step's is
            # not in it.  (Per sample the steady figure may be above the run's average when
            # the host slows a later step, so compare energies, not rates.)
            steady = measured["steady_energy_per_sample_j"]
            steps, samples = measured["steps"], measured["samples"]
            later_samples = samples - samples // steps
            assert steady and steps >= 2 and later_samples > 0, (c.label, measured)
            assert steady * later_samples < measured["energy_per_sample_j"] * samples, (c.label, measured)
            assert row["energy_j_per_sample"] == f"{steady:.4f}", c.label
            assert measured["energy_methods"] and row["energy_method"] == ",".join(measured["energy_methods"])
            assert saved[c.label]["latency_per_sample_s"] == measured["latency_per_sample_s"]


def test_vs_single_is_measured_latency_over_the_baselines(sweep):
    cells = {c.label: c for c in sweep["cells"]}
    rows = {r["cell"]: r for r in sweep["rows"]}
    base = cells["single"]
    assert base.outcome == "done" and base.devices == ["dev0"] and base.latency_per_sample_s
    others = [c for c in sweep["cells"] if c.label != "single" and c.outcome == "done"]
    assert len(others) >= 2
    for c in others:
        ratio = c.latency_per_sample_s / base.latency_per_sample_s
        assert rows[c.label]["vs_single"] == f"{ratio:.2f}", (c.label, rows[c.label], ratio)
    assert rows["single"]["vs_single"] == f"{base.latency_per_sample_s / base.latency_per_sample_s:.2f}"


def test_markdown_report_shows_the_csv_rows(sweep):
    lines = sweep["report"].read_text().splitlines()
    table = [ln for ln in lines if ln.startswith("| ")]
    header = [h.strip() for h in table[0].strip("|").split("|")]
    body = [[v.strip() for v in ln.strip("|").split("|")] for ln in table[1:]]
    assert [b[header.index("cell")] for b in body] == [r["cell"] for r in sweep["rows"]]
    for b, r in zip(body, sweep["rows"]):
        for col in ("outcome", "latency_ms_per_sample", "vs_single", "predicted_latency_ms",
                    "predicted_energy_j_per_sample", "predicted_oom"):
            assert b[header.index(col)] == r[col], (col, r["cell"])
