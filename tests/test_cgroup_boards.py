"""Emulated boards with real limits (root): physical memory and relative CPU speed by cgroup.

* A device whose worker overruns its physical memory is OOM-killed by the kernel, as a
  real board would do, and the run reports an ``oom`` naming the device and the phase,
  not an anonymous crash; the record says the cap was a cgroup (physical) limit.
* Without cgroups (not root; forced here) the address-space fallback is used and labelled.
* The boards' CPU quotas keep their published relative speeds, and ``edgetrain profile``
  measures them.
"""
from __future__ import annotations

import asyncio
import json
import os

import pytest

from app.devices.inventory import load_inventory
from app.devices.profile import profile_devices
from app.devices.ssh import KnownHosts
from app.run.jobs import prepare_run
from app.testbed import cgroups
from app.testbed.local import Testbed
from tests.test_e2e_spine import base_addr
from workers.config import RunSettings

pytestmark = pytest.mark.slow
needs_cgroups = pytest.mark.skipif(cgroups.unavailable_reason() is not None,
                                   reason=f"cgroup limits: {cgroups.unavailable_reason()}")


@needs_cgroups
def test_physical_overrun_is_a_kernel_oom_kill_reported_with_device_and_phase(tmp_path):
    # torch and a gloo rank fit in 1 GiB of RAM; GPT-2 small's weights, gradients and
    # AdamW state (~2 GB) do not
    s = RunSettings(model="gpt2-s", parallelism="dp", steps=2, batch_size=4, checkpoint_every=0,
                    checkpoint_minutes=0, eval_every=0)

    async def main():
        async with Testbed(tmp_path / "tb", n_devices=1, port=0, base_addr=base_addr(),
                           mem_overrides={"dev0": "1G"}) as tb:
            assert tb.devices[0].mem_cap == "cgroup"
            inv = load_inventory(tb.inventory_path)
            launcher, state = prepare_run(inv, None, s, tmp_path / "runs")
            return await asyncio.wait_for(launcher.run(), 240), state
    outcome, state = asyncio.run(main())
    assert outcome == "oom", state.events
    dev0 = state.devices["dev0"]
    assert dev0.status == "oom" and dev0.exit == "signal KILL"
    ooms = [e for e in state.events if e.kind == "oom"]
    assert ooms and ooms[0].device == "dev0", state.events
    msg = ooms[0].message
    assert "OOM killer" in msg and "1.00 GiB cgroup limit" in msg
    assert dev0.phase and f"during {dev0.phase}" in msg and dev0.phase in ("load", "forward", "backward",
                                                                            "optimizer"), msg
    record = json.loads((state.run_dir / "record.json").read_text())
    devs = {d["device"]: d for d in record["summary"]["devices"]}
    assert devs["dev0"]["mem_limit_kind"] == "cgroup" and devs["dev0"]["mem_limit_bytes"] == 2**30
    assert not any(e.kind == "failure" and e.device == "dev0" for e in state.events)


def test_without_cgroups_the_address_space_fallback_is_used_and_labelled(tmp_path):
    s = RunSettings(model="tiny-gpt2", parallelism="dp", steps=2, batch_size=8, checkpoint_every=0,
                    checkpoint_minutes=0, eval_every=0)

    async def main():
        async with Testbed(tmp_path / "tb", n_devices=1, port=0, base_addr=base_addr(), preset="jetson-nano",
                           cgroups=False) as tb:
            assert tb.devices[0].mem_cap == "address-space" and tb.devices[0].cpu_share is None
            inv = load_inventory(tb.inventory_path)
            assert inv.devices[0].labels["mem_cap"] == "address-space"
            launcher, state = prepare_run(inv, None, s, tmp_path / "runs")
            return await asyncio.wait_for(launcher.run(), 120), state
    outcome, state = asyncio.run(main())
    assert outcome == "done", state.events
    summary = state.summary()["devices"][0]
    assert summary["mem_limit_kind"] == "address-space" and summary["mem_limit_bytes"] == 4 * 2**30
    # the planner compares the address-space figure (virtual size) with such a cap
    assert state.plan["predictions"][0]["limit_kind"] == "virtual"


@needs_cgroups
def test_cpu_quotas_keep_the_boards_relative_speeds_and_profile_measures_them(tmp_path):
    os.environ["EDGETRAIN_HOME"] = str(tmp_path / "home")  # profiles go to this test's cache

    async def main():
        async with Testbed(tmp_path / "tb", port=0, base_addr=base_addr(), n_devices=None,
                           device_presets=["jetson-nano", "jetson-nx"]) as tb:
            inv = load_inventory(tb.inventory_path)
            profiles, _ = await profile_devices(inv.devices, KnownHosts(inv.known_hosts_file()), pairs=False,
                                                bench_seconds=1.0, link_seconds=0.1)
            return tb, {p.name: p for p in profiles}, inv
    try:
        tb, profiles, inv = asyncio.run(main())
    finally:
        os.environ.pop("EDGETRAIN_HOME", None)
    nano, nx = tb.devices
    # published peak fp32 of the CPUs: NX 134 GFLOP/s, Nano 46 -> NX gets the fair share
    assert nx.cpu_share == pytest.approx(1.0) and nano.cpu_share == pytest.approx(1.0 * 45.76 / 134.4, rel=1e-3)
    assert inv.devices[0].labels["cpu_share"] == f"{nano.cpu_share:.4g}"
    # a quota caps, it does not guarantee: on a busy host either board may get less than
    # its share (measured 1.9-4.9 here), but the NX is always clearly the faster, in the
    # matmul rate and in the non-matmul op probe alike
    measured = profiles["nx0"].gflops_fp32 / profiles["nano0"].gflops_fp32
    assert 1.5 < measured < 6.0, (measured, profiles)
    ops = profiles["nano0"].op_probe_s / profiles["nx0"].op_probe_s
    assert 1.5 < ops < 6.0, (ops, profiles)


@needs_cgroups
def test_removing_a_testbed_kills_what_is_left_in_its_cgroups(tmp_path):
    """A process still in a device's cgroup (a command being reaped, a stray child) does not
    make the testbed leave its cgroups behind: remove() kills it and removes them all."""
    import subprocess
    import sys

    cg = cgroups.create(tmp_path, "dev0", 256 * 2**20, 0.5)
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], preexec_fn=cgroups.joiner(cg))
    try:
        for d in cg.dirs:
            with open(os.path.join(d, "cgroup.procs")) as f:
                assert str(stray.pid) in f.read().split()
        cgroups.remove(tmp_path)
        assert stray.wait(timeout=10) == -9                           # killed, not waited for
        assert not any(os.path.exists(d) for d in cg.dirs)            # and every cgroup gone
    finally:
        stray.kill()
        stray.wait()
        cgroups.remove(tmp_path)


@needs_cgroups
def test_a_testbed_that_fails_to_start_leaves_no_cgroup(tmp_path):
    """Its device's cgroup exists before the device listens; a port already taken ends the
    start, and the cgroup goes with it."""
    import socket

    from app.testbed.emulation import TestbedError

    addr = base_addr()
    taken = socket.socket()
    taken.bind((addr, 0))
    taken.listen()
    try:
        tb = Testbed(tmp_path / "tb", n_devices=1, port=taken.getsockname()[1], base_addr=addr, cgroups=True)
        with pytest.raises(TestbedError, match="address already in use"):
            asyncio.run(tb.start())
    finally:
        taken.close()
    tag = cgroups._tag(tmp_path / "tb")
    assert not any((cgroups._v1(c) / "edgetrain" / tag).exists() for c in ("memory", "cpu"))
