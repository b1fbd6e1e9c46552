"""Out of memory on an emulated device: a real allocation failure under the device's
memory cap, reported as an ``oom`` event naming the device and the phase; the run ends
and no worker process is left."""
from __future__ import annotations

import asyncio
import time

import pytest

from app.devices.inventory import load_inventory
from app.run.jobs import prepare_run
from app.testbed.local import Testbed
from tests.test_e2e_spine import base_addr, gone
from workers.config import RunSettings

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("settings, phase", [
    # 124M params: the weights alone overflow a 1.5 GiB address space while loading
    (RunSettings(model="gpt2-s", steps=2, batch_size=8), "load"),
    # tiny weights, but 2048 samples x 128 tokens of attention scores do not fit
    (RunSettings(model="tiny-gpt2", steps=2, batch_size=4096, seq_len=128), "forward"),
])
def test_oom_is_reported_with_device_and_phase(tmp_path, settings, phase):
    async def main():
        # the address-space fallback (no root): a catchable allocation failure with its phase;
        # tests/test_cgroup_boards.py has the physical cap and the kernel's OOM kill
        async with Testbed(tmp_path / "tb", n_devices=2, port=0, base_addr=base_addr(),
                           mem_overrides={"dev1": "1.5G"}, cgroups=False) as tb:
            inv = load_inventory(tb.inventory_path)
            launcher, state = prepare_run(inv, None, settings, tmp_path / "runs")
            t0 = time.monotonic()
            outcome = await asyncio.wait_for(launcher.run(), 60)
            return outcome, time.monotonic() - t0, state
    outcome, took, state = asyncio.run(main())
    assert outcome == "oom"
    assert took < 30
    dev1 = state.devices["dev1"]
    assert dev1.status == "oom"
    ooms = [e for e in state.events if e.kind == "oom"]
    assert ooms and ooms[0].device == "dev1"
    assert f"during {phase}" in ooms[0].message and "limit 1.50 GiB" in ooms[0].message
    assert state.devices["dev0"].status in ("stopped", "failed")
    assert all(gone(d.pid) for d in state.devices.values() if d.pid)
    rec = (state.run_dir / "record.json").read_text()
    assert '"outcome": "oom"' in rec and "dev1: out of memory" in rec
