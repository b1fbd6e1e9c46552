"""A worker never outlives its controller (workers/lifeline.py).

The controller here is a real separate process running the launcher over real SSH to an
in-process testbed (the devices must outlive the controller, as real boards do).  Killing
it (``kill -9``: its SSH connection closes, the device closes the worker's stdin) or
freezing it (``SIGSTOP``: the connection stays open, the heartbeats stop) must end every
worker on every device.  Before the lifeline, both workers were still training 60 s later.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from app.testbed.local import Testbed
from app.workspace.loop import AsyncLoop
from tests.test_e2e_spine import base_addr
from workers.lifeline import EXIT_ORPHANED, watch

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
HANG_S = 90  # only catches a hang; the lifeline acts in seconds

CONTROLLER = """
import asyncio, sys
from pathlib import Path
from app.devices.inventory import load_inventory
from app.run.jobs import prepare_run
from workers.config import RunSettings

inv = load_inventory(sys.argv[1])
settings = RunSettings(model="tiny-gpt2", parallelism="dp", steps=100000, batch_size=32)
launcher, state = prepare_run(inv, None, settings, Path(sys.argv[2]))
launcher.lifeline_s = float(sys.argv[3])
asyncio.run(launcher.run())
"""


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    loop = AsyncLoop("lifeline-testbed").start()
    tb = Testbed(tmp_path_factory.mktemp("tb"), n_devices=2, port=0, base_addr=base_addr())
    loop.submit(tb.start()).result(30)
    yield tb
    loop.submit(tb.stop()).result(60)
    loop.stop()


def workers_of(tb: Testbed) -> list[psutil.Process]:
    """Live worker processes started on the testbed's devices."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "workers.train" in " ".join(p.info["cmdline"] or []) and p.cwd().startswith(str(tb.dir)) \
                    and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            continue
    return out


def ended(p: psutil.Process) -> bool:
    """``p`` has exited (a zombie waiting for its parent counts)."""
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(pred, what: str, timeout: float = HANG_S) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def start_controller(tb: Testbed, runs: Path, lifeline_s: float) -> subprocess.Popen:
    ctl = subprocess.Popen([sys.executable, "-c", CONTROLLER, str(tb.inventory_path), str(runs), str(lifeline_s)],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def training() -> bool:
        logs = list(runs.glob("*/telemetry.jsonl"))
        if not logs:
            return False
        steps = [json.loads(ln) for ln in logs[0].read_text().splitlines() if '"step"' in ln]
        return len({r.get("rank") for r in steps if r.get("type") == "step"}) == 2
    wait_for(lambda: training() or ctl.poll() is not None, "both workers training")
    assert ctl.poll() is None, ctl.stderr.read().decode()
    assert len(workers_of(tb)) == 2
    return ctl


def test_killed_controller_takes_its_workers_with_it(testbed, tmp_path):
    # a long lifeline: the workers must go because the connection closed, not by timeout
    ctl = start_controller(testbed, tmp_path / "runs", lifeline_s=600)
    ctl.kill()
    ctl.wait()
    wait_for(lambda: not workers_of(testbed), "the workers to end after the controller was killed")


def test_frozen_controller_is_noticed_by_its_silence(testbed, tmp_path):
    ctl = start_controller(testbed, tmp_path / "runs", lifeline_s=4)
    workers = workers_of(testbed)
    ctl.send_signal(signal.SIGSTOP)       # connection open, no heartbeats
    try:
        wait_for(lambda: not workers_of(testbed), "the workers to end after the controller fell silent")
        # workers_of() stops listing a process once /proc no longer shows its cwd, which
        # is while it exits: the same processes must then be gone within moments
        wait_for(lambda: all(ended(p) for p in workers), "the exiting workers to be gone", timeout=10)
    finally:
        ctl.kill()
        ctl.wait()


def test_heartbeats_keep_a_worker_alive_and_eof_ends_it(tmp_path):
    """The watcher itself: newlines keep it quiet past its timeout; end-of-file or silence
    end the process with EXIT_ORPHANED and a reason on stderr."""
    code = ("import sys, time; from workers.lifeline import watch\n"
            "watch(float(sys.argv[1]))\n"
            "time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code, "1.0"], cwd=ROOT, stdin=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3.0:    # three timeouts' worth of heartbeats
        p.stdin.write(b"\n")
        p.stdin.flush()
        time.sleep(0.2)
    assert p.poll() is None, "a worker that hears from its controller must keep going"
    p.stdin.close()                       # the controller's connection closes
    assert p.wait(HANG_S) == EXIT_ORPHANED
    assert b"connection closed" in p.stderr.read()
    silent = subprocess.Popen([sys.executable, "-c", code, "1.0"], cwd=ROOT, stdin=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    assert silent.wait(HANG_S) == EXIT_ORPHANED
    assert b"no word from the controller" in silent.stderr.read()
    silent.stdin.close()


def test_watch_reports_instead_of_exiting_when_asked(tmp_path):
    import os
    r, w = os.pipe()
    seen: list[str] = []
    t = watch(30.0, fd=r, on_lost=seen.append)
    os.write(w, b"\n")
    os.close(w)
    t.join(HANG_S)
    assert seen == ["the controller's connection closed"]
    os.close(r)
