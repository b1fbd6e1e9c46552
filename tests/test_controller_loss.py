"""The controller is killed mid-run (``kill -9``): no worker survives it by more than 20 s,
each writes its part of an emergency checkpoint first, and ``resume`` continues from it.

Both device tiers: the asyncssh testbed, and real OpenSSH servers in network namespaces
(root only), where a dropped connection does not end the session's process by itself.
The controller is a separate process running the launcher exactly as ``edgetrain run``.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.devices.inventory import load_inventory
from app.devices.ssh import KnownHosts
from app.run.jobs import prepare_run
from app.run.resume import bring_home, load_past_run, resumed_settings
from app.testbed import netns
from app.testbed.local import Testbed
from app.workspace.loop import AsyncLoop
from tests.test_e2e_spine import base_addr, gone
from tests.test_lifeline import wait_for

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
HANG_S = 120       # only catches a hang
WITHIN_S = 20.0    # the promise: no worker alive this long after its controller died

CONTROLLER = """
import asyncio, sys
from pathlib import Path
from app.devices.inventory import load_inventory
from app.run.jobs import prepare_run
from workers.config import RunSettings

inv = load_inventory(sys.argv[1])
settings = RunSettings(model="tiny-gpt2", parallelism=sys.argv[3], steps=100000, batch_size=32, sync_every=1,
                       checkpoint_every=0, checkpoint_minutes=0, eval_every=0)
launcher, state = prepare_run(inv, None, settings, Path(sys.argv[2]))
asyncio.run(launcher.run())
"""


def _records(runs: Path) -> list[dict]:
    logs = list(runs.glob("*/telemetry.jsonl"))
    if not logs:
        return []
    out = []
    for line in logs[0].read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # the line being written
    return out


def _kill_controller_then_resume(inventory: Path, runs: Path, parallelism: str = "dp") -> None:
    ctl = subprocess.Popen([sys.executable, "-c", CONTROLLER, str(inventory), str(runs), parallelism],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def training() -> bool:
            ranks = {r["rank"] for r in _records(runs) if r.get("type") == "step" and r["step"] >= 2}
            return len(ranks) == 2 or ctl.poll() is not None
        wait_for(training, "both workers training")
        assert ctl.poll() is None, ctl.stderr.read().decode()
        pids = sorted({r["pid"] for r in _records(runs) if r.get("type") == "hello"})
        assert len(pids) == 2 and not any(gone(p) for p in pids)
    finally:
        ctl.kill()
        ctl.wait()
    t0 = time.monotonic()
    wait_for(lambda: all(gone(p) for p in pids), "the workers to end after the controller was killed")
    gone_after = time.monotonic() - t0
    assert gone_after <= WITHIN_S, f"workers outlived their controller by {gone_after:.1f} s"

    run_id = next(runs.glob("*/config.yaml")).parent.name
    run = load_past_run(runs, run_id)
    inv = load_inventory(inventory)

    async def resume():
        found = await bring_home(run, KnownHosts(inv.known_hosts_file()))
        s = resumed_settings(run, found, steps=found.manifest.step + 2)
        launcher, state = prepare_run(inv, None, s, runs, resume=found)
        return found, await launcher.run(), state
    found, outcome, state = asyncio.run(resume())
    assert found.manifest.kind == "emergency" and found.manifest.step >= 2, found.manifest
    assert outcome == "done", state.events
    assert all(d.steps == found.manifest.step + 2 for d in state.devices.values())


def test_asyncssh_tier(tmp_path):
    loop = AsyncLoop("controller-loss").start()
    tb = Testbed(tmp_path / "tb", n_devices=2, port=0, base_addr=base_addr())
    loop.submit(tb.start()).result(30)
    try:
        _kill_controller_then_resume(tb.inventory_path, tmp_path / "runs", "pp")
    finally:
        loop.submit(tb.stop()).result(60)
        loop.stop()


@pytest.mark.root
@pytest.mark.skipif(netns.unavailable_reason() is not None, reason=f"netns tier: {netns.unavailable_reason()}")
def test_openssh_tier(tmp_path):
    from dataclasses import asdict
    d = tmp_path / "tier"
    try:
        tb = netns.netns_up(d, n=2, timeout=HANG_S, rate_mbit=1000, **asdict(netns.NetnsNames.tagged()))
        _kill_controller_then_resume(tb.inventory_path, tmp_path / "runs", "dp")
    finally:
        netns.netns_down(d)
