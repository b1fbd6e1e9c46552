"""A device leaves a data-parallel run and training goes on, over real SSH on the testbed.

A worker is killed (``kill -9``) or frozen (``SIGSTOP``) mid-run on one of 4 devices: the
launcher names the device, re-plans for the 3 survivors, and they re-form their process
group in place and finish every step, losing no optimizer step.  The result is exactly
that of a run that switched to the survivors at that step: 4 devices up to the step the
survivors continued from (checkpointed), then resumed on the same 3 survivors.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest

from app.devices.inventory import load_inventory
from app.devices.ssh import KnownHosts
from app.run.jobs import prepare_run
from app.run.resume import bring_home, load_past_run, resumed_settings
from app.testbed.local import Testbed
from tests.test_e2e_spine import base_addr
from workers.config import RunSettings, share_bounds

pytestmark = pytest.mark.slow
STEPS = 12
DETECT_S = 5.0   # the promise: a lost device is named within this long


#: uneven DP batch shares (DP only; PP ignores them): after a loss, survivors keep theirs
SHARES = [1.0, 2.0, 3.0, 2.0]


def settings(steps: int = STEPS, devices: int = 4) -> RunSettings:
    return RunSettings(model="tiny-gpt2", parallelism="dp", steps=steps, batch_size=48, sync_every=1,
                       checkpoint_every=0, checkpoint_minutes=0, eval_every=0, dp_shares=SHARES[:devices])


def _records(state) -> list[dict]:
    return [json.loads(ln) for ln in (state.run_dir / "telemetry.jsonl").read_text().splitlines()]


async def _lose_one(inv, runs, sig: int):
    launcher, state = prepare_run(inv, None, settings(), runs)
    task = asyncio.ensure_future(launcher.run())
    while min(d.steps for d in state.devices.values()) < 3:
        assert not task.done(), state.events
        await asyncio.sleep(0.01)
    os.kill(state.devices["dev2"].pid, sig)
    t0 = time.time()
    return await asyncio.wait_for(task, 240), state, t0


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_dp_survivors_regroup_in_place_and_match_a_switched_run(tmp_path, sig):
    async def main():
        async with Testbed(tmp_path / "tb", n_devices=4, port=0, base_addr=base_addr()) as tb:
            inv = load_inventory(tb.inventory_path)
            outcome, state, t0 = await _lose_one(inv, tmp_path / "runs", sig)
            regrouped = [r for r in _records(state) if r.get("name") == "regrouped"]
            assert regrouped, state.events
            if sig != signal.SIGKILL:
                return outcome, state, t0, regrouped, None  # the reference is the same for both
            at = regrouped[0]["step"]
            # the reference: 4 devices to `at`, then the 3 survivors from there
            s = settings(at)
            s.checkpoint_every = 0
            launcher, first = prepare_run(inv, None, s, tmp_path / "ref")
            assert await launcher.run() == "done", first.events
            run = load_past_run(tmp_path / "ref", first.run_id)
            found = await bring_home(run, KnownHosts(inv.known_hosts_file()))
            resumed = resumed_settings(run, found, steps=STEPS, n_devices=3)
            resumed.dp_shares = [SHARES[0], SHARES[1], SHARES[3]]   # what the survivors kept
            launcher, second = prepare_run(inv, ["dev0", "dev1", "dev3"], resumed, tmp_path / "ref", resume=found)
            assert await launcher.run() == "done", second.events
            return outcome, state, t0, regrouped, second
    outcome, state, t0, regrouped, ref = asyncio.run(main())
    assert outcome == "done", state.events
    devs = state.devices
    assert devs["dev2"].status == "lost"
    assert [devs[n].status for n in ("dev0", "dev1", "dev3")] == ["done"] * 3
    assert all(devs[n].steps == STEPS for n in ("dev0", "dev1", "dev3"))
    lost = next(e for e in state.events if e.kind == "lost")
    assert "dev2" in lost.message and lost.t - t0 <= DETECT_S, (lost, t0)
    replan = next(e.message for e in state.events if e.kind == "replan")
    # answered from the plan made at launch for "dev2 gone": latency and memory of the survivors
    assert "3 devices" in replan and "planned at launch" in replan and "ms/sample" in replan, replan
    assert {r["world_size"] for r in regrouped} == {3} and len(regrouped) == 3
    # no optimizer step lost: the survivors continued from the step they had all reached
    assert regrouped[0]["step"] >= 3
    # each survivor kept its planned share of the batch, renormalised over the survivors
    bounds = share_bounds(48, [SHARES[0], SHARES[1], SHARES[3]])
    after = [r for r in _records(state) if r.get("type") == "step" and r["step"] >= regrouped[0]["step"]
             and r.get("device") in ("dev0", "dev1", "dev3")]
    for rank, name in enumerate(("dev0", "dev1", "dev3")):
        rows = {r["local_samples"] for r in after if r["device"] == name}
        assert rows == {bounds[rank + 1] - bounds[rank]}, (name, rows, bounds)
    digests = {devs[n].param_digest for n in ("dev0", "dev1", "dev3")}
    assert len(digests) == 1 and all(digests)
    if ref is not None:
        assert digests == {d.param_digest for d in ref.devices.values()}


def test_pp_losing_a_stage_restarts_the_survivors_from_the_checkpoint(tmp_path):
    from app.run.fingerprint import differing
    from app.run.supervise import run_supervised

    s = RunSettings(model="tiny-gpt2", parallelism="pp", steps=10, batch_size=32, micro_batches=4,
                    checkpoint_every=2, checkpoint_minutes=0, eval_every=0)

    async def main():
        async with Testbed(tmp_path / "tb", n_devices=4, port=0, base_addr=base_addr()) as tb:
            inv = load_inventory(tb.inventory_path)
            launcher, ref = prepare_run(inv, None, s, tmp_path / "ref")
            assert await launcher.run() == "done", ref.events
            launcher, state = prepare_run(inv, None, s, tmp_path / "runs")
            first = state
            task = asyncio.ensure_future(run_supervised(launcher, state, inv, tmp_path / "runs"))
            while min(d.steps for d in first.devices.values()) < 5:
                assert not task.done(), first.events
                await asyncio.sleep(0.01)
            os.kill(first.devices["dev2"].pid, signal.SIGKILL)
            outcome, last = await asyncio.wait_for(task, 300)
            return ref, first, outcome, last
    ref, first, outcome, last = asyncio.run(main())
    assert first.outcome == "failed" and first.devices["dev2"].status == "lost"
    assert outcome == "done" and last is not first, last.events
    assert list(last.devices) == ["dev0", "dev1", "dev3"]
    assert all(d.steps == 10 for d in last.devices.values())
    assert last.config["resumed_from"]["run_id"] == first.run_id
    said = [e.message for e in last.events if e.kind == "replan"]
    assert said and "dev2" in said[0] and "restart from" in said[0]
    # the new run's record tells the whole incident, as the CLI and the GUI show it
    from app.run.timeline import recovery_timeline
    marks = recovery_timeline(last.events)
    assert [m.phase for m in marks] == ["detected", "re-planned", "resumed"] and marks[0].device == "dev2"
    # the pipeline's arithmetic does not depend on the stage split: the whole model after
    # the restart on 3 stages is the model of the uninterrupted 4-stage run
    got, want = last.summary()["param_moments"], ref.summary()["param_moments"]
    assert got and want and not differing(got, want)


@pytest.mark.root
def test_dp_cut_link_is_detected_and_the_others_continue(tmp_path):
    """netns tier: a device's link goes down (no process dies, nothing closes): its silence
    names it within 5 s, the others' bounded collectives give up, and they continue."""
    import subprocess
    from dataclasses import asdict

    from app.testbed import netns
    if netns.unavailable_reason():
        pytest.skip(f"netns tier: {netns.unavailable_reason()}")
    d = tmp_path / "tier"

    async def main(tb):
        inv = load_inventory(tb.inventory_path)
        s = settings(40, devices=3)
        launcher, state = prepare_run(inv, None, s, tmp_path / "runs")
        task = asyncio.ensure_future(launcher.run())
        while min(d.steps for d in state.devices.values()) < 3:
            assert not task.done(), state.events
            await asyncio.sleep(0.01)
        victim = tb.devices[2]
        subprocess.run(["ip", "link", "set", victim.veth, "down"], check=True)
        t0 = time.time()
        return await asyncio.wait_for(task, 240), state, t0, victim.name
    try:
        tb = netns.netns_up(d, n=3, timeout=120, rate_mbit=1000, **asdict(netns.NetnsNames.tagged()))
        outcome, state, t0, victim = asyncio.run(main(tb))
    finally:
        netns.netns_down(d)
    assert outcome == "done", state.events
    lost = next(e for e in state.events if e.kind == "lost")
    assert victim in lost.message and "unreachable" in lost.message and lost.t - t0 <= DETECT_S, (lost, t0)
    survivors = [dv for dv in state.devices.values() if dv.name != victim]
    assert all(dv.status == "done" and dv.steps == 40 for dv in survivors)
    assert len({dv.param_digest for dv in survivors}) == 1


def test_no_plan_for_the_survivors_is_said_not_raised(tmp_path):
    """hybrid 2 x 2 loses a device: 3 survivors make no grid of replicas; the run ends
    saying so (and how to resume elsewhere) instead of crashing the controller."""
    from app.run.supervise import run_supervised

    s = RunSettings(model="tiny-gpt2", parallelism="hybrid", steps=1000, batch_size=32, micro_batches=4,
                    checkpoint_every=2, checkpoint_minutes=0, eval_every=0,
                    stages=[{"ranks": [0, 1], "layers": [0, 2]}, {"ranks": [2, 3], "layers": [2, 4]}])

    async def main():
        async with Testbed(tmp_path / "tb", n_devices=4, port=0, base_addr=base_addr()) as tb:
            inv = load_inventory(tb.inventory_path)
            launcher, state = prepare_run(inv, None, s, tmp_path / "runs")
            task = asyncio.ensure_future(run_supervised(launcher, state, inv, tmp_path / "runs"))
            while min(d.steps for d in state.devices.values()) < 3:
                assert not task.done(), state.events
                await asyncio.sleep(0.01)
            os.kill(state.devices["dev2"].pid, signal.SIGKILL)
            return await asyncio.wait_for(task, 240)
    outcome, state = asyncio.run(main())
    assert outcome == "failed"
    said = [e.message for e in state.events if e.kind == "error" and "no plan fits" in e.message]
    assert said and "dev2" in said[0] and "edgetrain resume" in said[0]
