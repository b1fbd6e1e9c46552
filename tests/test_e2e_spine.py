"""The spine end to end: real SSH (the testbed's servers), real worker processes.

Each test starts its own in-process testbed on random loopback addresses, launches
through :class:`app.run.launcher.Launcher` exactly as ``edgetrain run`` does, and checks
what a user relies on: telemetry from every rank, identical replicas, clean failure.
"""
from __future__ import annotations

import asyncio
import random
import time

import psutil
import pytest

from app.devices.inventory import load_inventory
from app.run.jobs import prepare_run
from app.run.launcher import LaunchError
from app.testbed.local import Testbed
from workers.config import RunSettings

pytestmark = pytest.mark.slow


def base_addr() -> str:
    return f"127.{random.randint(40, 250)}.{random.randint(0, 250)}.1"


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def _until(pred, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.05)


async def _interrupt_run(tmp_path, settings: RunSettings, min_steps: int, act):
    """Start a long run on two testbed devices, wait until every rank has done
    ``min_steps``, call ``act(launcher, state)``; returns (outcome, seconds after the act,
    state, worker pids)."""
    async with Testbed(tmp_path / "tb", n_devices=2, port=0, base_addr=base_addr()) as tb:
        inv = load_inventory(tb.inventory_path)
        launcher, state = prepare_run(inv, None, settings, tmp_path / "runs")
        task = asyncio.ensure_future(launcher.run())
        await _until(lambda: all(d.steps >= min_steps for d in state.devices.values()), 60)
        pids = [d.pid for d in state.devices.values()]
        t0 = time.monotonic()
        act(launcher, state)
        outcome = await asyncio.wait_for(task, 60)
        return outcome, time.monotonic() - t0, state, pids


def test_dp_run_over_ssh_replicas_identical(tmp_path):
    async def main():
        async with Testbed(tmp_path / "tb", n_devices=2, port=0, base_addr=base_addr()) as tb:
            inv = load_inventory(tb.inventory_path)
            settings = RunSettings(model="tiny-gpt2", parallelism="dp", steps=4, batch_size=32, sync_every=2)
            launcher, state = prepare_run(inv, None, settings, tmp_path / "runs")
            outcome = await launcher.run()
            return outcome, state
    outcome, state = asyncio.run(main())
    assert outcome == "done", state.events
    devs = list(state.devices.values())
    assert [d.status for d in devs] == ["done", "done"]
    assert all(d.steps == 4 for d in devs)                     # step telemetry from every rank
    for d in devs:
        # each step's CPU time, and (after the first) its period end to end, which holds
        # the step itself and the loop's own costs
        assert len(d.cpu_times) == 4 and all(c > 0 for c in d.cpu_times)
        assert d.periods[0] is None and all(p >= lat * 32 for p, lat in zip(d.periods[1:], d.latencies[1:]))
    assert devs[0].param_digest and devs[0].param_digest == devs[1].param_digest
    rec = state.summary()
    assert rec["samples"] == 4 * 32 and rec["energy_per_sample_j"] > 0
    assert {d["energy_method"] for d in rec["devices"]} == {"estimated"}
    saved = (state.run_dir / "record.json").read_text()
    assert '"outcome": "done"' in saved
    lines = (state.run_dir / "telemetry.jsonl").read_text().splitlines()
    for rank in (0, 1):
        assert any(f'"rank":{rank}' in ln and '"type":"step"' in ln for ln in lines)
    # worker processes are gone once the run is over
    assert all(gone(d.pid) for d in devs)


def test_killing_one_worker_ends_run_naming_device(tmp_path):
    # a pipeline cannot go on without a stage in place (DP can: tests/test_recovery.py)
    settings = RunSettings(model="tiny-gpt2", parallelism="pp", steps=100000, batch_size=32)
    outcome, took, state, pids = asyncio.run(_interrupt_run(
        tmp_path, settings, 2, lambda launcher, state: psutil.Process(state.devices["dev1"].pid).kill()))
    assert outcome == "failed"
    assert took < 10
    failures = [e for e in state.events if e.kind == "failure"]
    assert failures and failures[0].device == "dev1" and "dev1" in failures[0].message
    assert "SIGKILL" in failures[0].message
    assert state.devices["dev0"].status in ("stopped", "failed")
    assert all(gone(p) for p in pids), "a worker process outlived the run"


def test_stop_request_kills_every_worker(tmp_path):
    settings = RunSettings(model="tiny-gpt2", parallelism="dp", steps=100000, batch_size=32)
    outcome, _, state, pids = asyncio.run(_interrupt_run(
        tmp_path, settings, 1, lambda launcher, state: launcher.request_stop()))
    assert outcome == "stopped"
    assert all(gone(p) for p in pids)
    assert {d.status for d in state.devices.values()} == {"stopped"}


def test_wrong_host_key_is_refused_naming_device(tmp_path):
    async def main():
        async with Testbed(tmp_path / "tb", n_devices=2, port=0, base_addr=base_addr()) as tb:
            # swap dev1's trusted key for dev0's: dev1 now presents a key that differs
            lines = tb.known_hosts_path.read_text().splitlines()
            key0 = lines[0].split(None, 1)[1]
            lines[1] = lines[1].split()[0] + " " + key0
            tb.known_hosts_path.write_text("\n".join(lines) + "\n")
            inv = load_inventory(tb.inventory_path)
            launcher, state = prepare_run(inv, None, RunSettings(steps=1), tmp_path / "runs")
            with pytest.raises(LaunchError) as info:
                await launcher.run()
            return info.value, state
    err, state = asyncio.run(main())
    assert err.device == "dev1"
    assert "HOST KEY CHANGED" in str(err) and "dev1" in str(err) and "SHA256:" in str(err)
    assert state.outcome == "failed"


def test_unknown_host_key_is_refused_with_fingerprint(tmp_path):
    async def main():
        async with Testbed(tmp_path / "tb", n_devices=1, port=0, base_addr=base_addr()) as tb:
            tb.known_hosts_path.write_text("")
            inv = load_inventory(tb.inventory_path)
            launcher, _ = prepare_run(inv, None, RunSettings(steps=1), tmp_path / "runs")
            with pytest.raises(LaunchError) as info:
                await launcher.run()
            return info.value
    err = asyncio.run(main())
    assert err.device == "dev0"
    assert "unknown host key SHA256:" in str(err) and "edgetrain devices trust dev0" in str(err)


def test_stop_before_workers_start_leaves_nothing_running(tmp_path):
    async def main():
        async with Testbed(tmp_path / "tb", n_devices=2, port=0, base_addr=base_addr()) as tb:
            inv = load_inventory(tb.inventory_path)
            launcher, state = prepare_run(inv, None, RunSettings(steps=100000, batch_size=32), tmp_path / "runs")
            launcher.request_stop()          # e.g. Ctrl-C while connecting
            outcome = await launcher.run()
            return outcome, state
    outcome, state = asyncio.run(main())
    assert outcome == "stopped"
    assert all(d.pid is None for d in state.devices.values())
    leftovers = [p for p in psutil.process_iter(["cmdline"])
                 if state.run_id in " ".join(p.info["cmdline"] or [])]
    assert not leftovers


def test_known_hosts_writers_do_not_undo_each_other(tmp_path):
    import asyncssh

    from app.devices.ssh import KnownHosts
    k1, k2 = (asyncssh.generate_private_key("ssh-ed25519") for _ in range(2))
    path = tmp_path / "known_hosts"
    gui, cli = KnownHosts(path), KnownHosts(path)   # e.g. the GUI's and a CLI's view
    gui.trust("10.0.0.1", 22, k1)
    cli.trust("10.0.0.2", 22, k2)                  # must keep 10.0.0.1
    cli.trust("10.0.0.1", 22, k2, replace=True)    # the device was reinstalled
    gui.trust("10.0.0.3", 22, k1)                  # a stale view must not bring k1 back
    fresh = KnownHosts(path)
    assert fresh.lookup("10.0.0.1", 22) == [k2.convert_to_public()]
    assert fresh.lookup("10.0.0.2", 22) and fresh.lookup("10.0.0.3", 22)


def test_frozen_worker_is_named_and_everything_is_killed(tmp_path):
    """A SIGSTOPped worker closes no connection: its peers just wait.  The watchdog
    notices the silence, finds the stopped process and names its device."""
    settings = RunSettings(parallelism="pp", steps=100000, batch_size=32, stall_s=3.0, timeout_s=300)
    outcome, took, state, pids = asyncio.run(_interrupt_run(
        tmp_path, settings, 2, lambda launcher, state: psutil.Process(state.devices["dev1"].pid).suspend()))
    assert outcome == "failed"
    assert took < 20          # not the 300 s process-group timeout
    failures = [e for e in state.events if e.kind == "failure"]
    assert failures[0].device == "dev1" and "frozen" in failures[0].message
    assert all(gone(p) for p in pids)
