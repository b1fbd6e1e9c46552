"""Durable training over real SSH: a worker killed mid-run, the run resumed from its last
complete checkpoint, and the result exactly that of a run nobody interrupted.

Each scenario runs on an in-process testbed (real asyncssh servers, real worker
processes, every device with its own workdir) through the same calls as
``edgetrain run`` and ``edgetrain resume``.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from app.devices.inventory import load_inventory
from app.devices.ssh import KnownHosts
from app.run.checkpoints import device_dir, home_dir
from app.run.jobs import prepare_run
from app.run.resume import ResumeError, bring_home, load_past_run, resumed_settings
from app.testbed.local import Testbed
from tests.test_e2e_spine import base_addr
from workers.checkpoint_manifest import MANIFEST_NAME, step_dirname
from workers.config import RunSettings

pytestmark = pytest.mark.slow

STEPS = 10


def settings(parallelism: str, every: int) -> RunSettings:
    return RunSettings(model="tiny-gpt2", parallelism=parallelism, steps=STEPS, batch_size=32, seq_len=32,
                       sync_every=2, micro_batches=4, checkpoint_every=every, checkpoint_minutes=0,
                       eval_every=0)


def digests(state) -> list[str]:
    return [d.param_digest for d in sorted(state.devices.values(), key=lambda d: d.rank)]


async def _run(inv, s: RunSettings, runs, kill_at: int | None = None, resume=None):
    launcher, state = prepare_run(inv, None, s, runs, resume=resume)
    # the run must end at the kill (DP would otherwise go on in place: tests/test_recovery.py)
    launcher.recovery.in_place = False
    task = asyncio.ensure_future(launcher.run())
    if kill_at is not None:
        victim = state.devices["dev1"]
        end = time.monotonic() + 120
        while max(d.steps for d in state.devices.values()) < kill_at and not task.done():
            assert time.monotonic() < end, "the run did not reach the step to kill at"
            await asyncio.sleep(0.01)
        os.kill(victim.pid, signal.SIGKILL)
    outcome = await asyncio.wait_for(task, 180)
    return outcome, state


def on_disk(tb: Testbed, device: str, sftp_path: str) -> Path:
    """Where a device path lies on this machine (a testbed device's SFTP root is its home)."""
    return tb.dir / "devices" / device / "home" / sftp_path.lstrip("/")


def known(tb: Testbed) -> KnownHosts:
    return KnownHosts(load_inventory(tb.inventory_path).known_hosts_file())


@pytest.mark.parametrize("parallelism", ["dp", "pp"])
def test_killed_worker_resumes_to_the_uninterrupted_result(tmp_path, parallelism):
    async def main():
        async with Testbed(tmp_path / "tb", n_devices=2, port=0, base_addr=base_addr()) as tb:
            inv = load_inventory(tb.inventory_path)
            ok, ref = await _run(inv, settings(parallelism, 0), tmp_path / "ref")
            assert ok == "done", ref.events
            outcome, cut = await _run(inv, settings(parallelism, 2), tmp_path / "runs", kill_at=5)
            assert outcome == "failed", cut.events
            done = sorted(s for s, c in cut.checkpoints.items() if c["complete"])
            assert done and done[-1] < STEPS and all(s % 2 == 0 for s in done), cut.checkpoints
            # a newer checkpoint that was cut off mid-write (files, no manifest) on one device
            run = load_past_run(tmp_path / "runs", cut.run_id)
            partial = step_dirname(done[-1] + 1)
            for dev in inv.devices:
                src = on_disk(tb, dev.name, device_dir(dev, cut.run_id, done[-1]))
                dst = src.parent / partial
                shutil.copytree(src, dst)
                (dst / MANIFEST_NAME).unlink(missing_ok=True)
            found = await bring_home(run, known(tb))
            assert found.manifest.step == done[-1]
            assert any(partial in msg and "no manifest" in msg for msg in found.skipped), found.skipped
            assert (home_dir(run.run_dir, done[-1]) / MANIFEST_NAME).is_file()
            s = resumed_settings(run, found)
            outcome, resumed = await _run(inv, s, tmp_path / "runs", resume=found)
            assert outcome == "done", resumed.events
            assert resumed.config["resumed_from"]["step"] == done[-1]
            return ref, resumed
    ref, resumed = asyncio.run(main())
    assert all(digests(ref)) and digests(resumed) == digests(ref)
    assert [d.steps for d in resumed.devices.values()] == [STEPS, STEPS]


def test_finished_run_is_not_resumed_and_a_damaged_file_is_named(tmp_path):
    async def main():
        async with Testbed(tmp_path / "tb", n_devices=2, port=0, base_addr=base_addr()) as tb:
            inv = load_inventory(tb.inventory_path)
            s = settings("dp", 0)
            s.steps = 2
            outcome, state = await _run(inv, s, tmp_path / "runs")
            assert outcome == "done", state.events
            run = load_past_run(tmp_path / "runs", state.run_id)
            found = await bring_home(run, known(tb))
            # no home copy from here on: the devices' files are all there is
            shutil.rmtree(home_dir(run.run_dir))
            dev1 = next(d for d in inv.devices if d.name == "dev1")
            shard = next(on_disk(tb, "dev1", device_dir(dev1, state.run_id, 2)).glob("__1_*.distcp"))
            data = bytearray(shard.read_bytes())
            data[len(data) // 2] ^= 0xFF          # same size, different bytes
            shard.write_bytes(bytes(data))
            with pytest.raises(ResumeError) as err:
                await bring_home(run, known(tb))
            return run, found, str(err.value), shard.name
    run, found, msg, name = asyncio.run(main())
    assert name in msg and "dev1" in msg and "does not match" in msg
    assert found.manifest.kind == "final" and found.manifest.step == 2
    with pytest.raises(ResumeError, match="--steps"):
        resumed_settings(run, found)
    assert resumed_settings(run, found, steps=4).steps == 4
    with pytest.raises(ResumeError, match="no run"):
        load_past_run(tmp_path / "runs", "no-such-run")


def test_stop_writes_a_checkpoint_that_resume_continues_from(tmp_path):
    async def main():
        async with Testbed(tmp_path / "tb", n_devices=2, port=0, base_addr=base_addr()) as tb:
            inv = load_inventory(tb.inventory_path)
            s = settings("pp", 0)
            s.steps = 1000
            launcher, state = prepare_run(inv, None, s, tmp_path / "runs")
            task = asyncio.ensure_future(launcher.run())
            while max(d.steps for d in state.devices.values()) < 2:
                assert not task.done(), state.events
                await asyncio.sleep(0.02)
            launcher.request_stop()          # the Stop button and Ctrl-C: checkpoint, then end
            outcome = await asyncio.wait_for(task, 120)
            run = load_past_run(tmp_path / "runs", state.run_id)
            found = await bring_home(run, known(tb))
            r = resumed_settings(run, found, steps=found.manifest.step + 2)
            launcher, resumed = prepare_run(inv, None, r, tmp_path / "runs", resume=found)
            return outcome, state, found, await launcher.run(), resumed
    outcome, state, found, outcome2, resumed = asyncio.run(main())
    assert outcome == "stopped", state.events
    assert [d.status for d in state.devices.values()] == ["stopped", "stopped"]
    assert found.manifest.kind == "stop" and found.manifest.step >= 2
    assert outcome2 == "done", resumed.events
    assert all(d.steps == found.manifest.step + 2 for d in resumed.devices.values())


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_disk_is_named_and_training_goes_on(tmp_path):
    async def main():
        async with Testbed(tmp_path / "tb", n_devices=2, port=0, base_addr=base_addr()) as tb:
            inv = load_inventory(tb.inventory_path)
            s = settings("dp", 2)
            s.steps = 4
            launcher, state = prepare_run(inv, None, s, tmp_path / "runs")
            dev1 = next(d for d in inv.devices if d.name == "dev1")
            full = on_disk(tb, "dev1", device_dir(dev1, state.run_id))
            full.mkdir(parents=True)
            # a real full disk: a 64 KiB filesystem where the checkpoints of dev1 go
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)], check=True)
            try:
                return await launcher.run(), state
            finally:
                subprocess.run(["umount", "-l", str(full)], check=False)
    outcome, state = asyncio.run(main())
    assert outcome == "done", state.events
    failed = [e.message for e in state.events if "checkpoint at step" in e.message and "failed" in e.message]
    assert failed and all("dev1" in m and "No space left" in m and "Fix:" in m for m in failed), failed
    assert all(d.steps == 4 for d in state.devices.values())
    assert not any(c["complete"] for c in state.checkpoints.values())
