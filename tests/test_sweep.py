"""The one-click study: every cell is a real run on the testbed; the report holds them all,
including a cell that runs out of memory."""
from __future__ import annotations

import asyncio
import csv

import pytest

from app.devices.inventory import load_inventory
from app.run.sweep import plan_cells, run_sweep, write_report
from app.testbed.local import Testbed
from tests.test_e2e_spine import base_addr
from workers.config import RunSettings

pytestmark = pytest.mark.slow


def test_every_parallelism_runs_over_ssh_and_is_reported(tmp_path):
    """Each of dp, sp, tp, pp and hybrid (2 stages x 2 replicas) through the launcher on
    four testbed devices, plus the one-device baseline."""
    settings = RunSettings(model="tiny-gpt2", steps=2, batch_size=16, micro_batches=2)
    names = ["dev0", "dev1", "dev2", "dev3"]

    async def main():
        async with Testbed(tmp_path / "tb", n_devices=4, port=0, base_addr=base_addr()) as tb:
            inv = load_inventory(tb.inventory_path)
            cells = plan_cells(names, ["dp", "sp", "tp", "pp", "hybrid"], single=True)
            return await run_sweep(inv, None, settings, cells, tmp_path / "runs")
    cells = asyncio.run(main())
    assert [c.label for c in cells] == ["single", "dp", "sp", "tp", "pp", "hybrid"]
    assert [c.outcome for c in cells] == ["done"] * 6, [c.message for c in cells]
    assert cells[0].devices == ["dev0"] and cells[4].devices == names
    import json
    roles = {c.label: [d["role"] for d in json.loads((tmp_path / "runs" / c.run_id / "record.json").read_text())
                       ["summary"]["devices"]] for c in cells}
    assert roles["tp"][0].startswith("shard") and roles["sp"][0].startswith("seq")
    assert roles["pp"][3].startswith("stage") and "replica" in roles["hybrid"][0]
    assert all(c.latency_per_sample_s and c.energy_per_sample_j for c in cells)
    assert all(c.energy_methods == ["estimated"] for c in cells)
    assert all((tmp_path / "runs" / c.run_id / "record.json").exists() for c in cells)
    md = write_report(cells, settings, tmp_path / "report")
    rows = list(csv.DictReader(open(tmp_path / "report" / "report.csv")))
    assert [r["cell"] for r in rows] == ["single", "dp", "sp", "tp", "pp", "hybrid"]
    assert rows[0]["vs_single"] == "1.00"
    assert "estimated" in md.read_text()
