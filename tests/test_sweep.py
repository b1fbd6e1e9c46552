"""The one-click study: every cell is a real run on the testbed; the report holds them all,
including a cell that runs out of memory."""
from __future__ import annotations

import asyncio
import csv

import pytest

from app.core.inventory import load_inventory
from app.core.jobs import RunSettings
from app.core.sweep import plan_cells, run_sweep, write_report
from app.core.testbed import Testbed
from tests.test_e2e_spine import base_addr

pytestmark = pytest.mark.slow


def test_sweep_runs_each_cell_and_reports(tmp_path):
    settings = RunSettings(model="tiny-gpt2", steps=2, batch_size=16, micro_batches=2)

    async def main():
        async with Testbed(tmp_path / "tb", n_devices=2, port=0, base_addr=base_addr()) as tb:
            inv = load_inventory(tb.inventory_path)
            cells = plan_cells(["dev0", "dev1"], ["dp", "pp"], single=True)
            return await run_sweep(inv, None, settings, cells, tmp_path / "runs")
    cells = asyncio.run(main())
    assert [c.label for c in cells] == ["single", "dp", "pp"]
    assert [c.outcome for c in cells] == ["done", "done", "done"]
    assert cells[0].devices == ["dev0"] and cells[2].devices == ["dev0", "dev1"]
    assert all(c.latency_per_sample_s and c.energy_per_sample_j for c in cells)
    assert all(c.energy_methods == ["estimated"] for c in cells)
    assert all((tmp_path / "runs" / c.run_id / "record.json").exists() for c in cells)
    md = write_report(cells, settings, tmp_path / "report")
    rows = list(csv.DictReader(open(tmp_path / "report" / "report.csv")))
    assert [r["cell"] for r in rows] == ["single", "dp", "pp"]
    assert rows[0]["vs_single"] == "1.00"
    assert "estimated" in md.read_text()
