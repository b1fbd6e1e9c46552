"""Failure drills: make a device of a running run fail on purpose, and watch the run recover.

A drill does to one device what a home does to it: its worker is killed (a crash, an
unplugged board), frozen (a hung process), its network link is cut (Wi-Fi gone) or its
CPU is throttled (thermal limits, another user).  Kill, freeze and slow-down act over the
run's own SSH connection to the device, as the same user, so they work on any device the
run reaches; slowing down needs root there (a cgroup CPU quota).  Cutting a link acts on
the namespace testbed's virtual cable (``ip link set … down``) on this machine, so it is
offered only for devices of that tier.  Each drill is logged as a ``drill`` event, which
opens an incident of the recovery timeline (:mod:`app.run.timeline`).
"""
from __future__ import annotations

import asyncio
import enum
import shlex
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import asyncssh

from app.testbed.netns import netns_info

if TYPE_CHECKING:
    from app.run.launcher import Launcher

#: Share of one CPU a slowed-down worker keeps.
SLOW_SHARE = 0.25


class Fault(enum.Enum):
    KILL = "kill"
    FREEZE = "freeze"
    CUT_LINK = "cut-link"
    SLOW = "slow"

    @property
    def label(self) -> str:
        return {Fault.KILL: "Kill its worker (kill -9)", Fault.FREEZE: "Freeze its worker (SIGSTOP)",
                Fault.CUT_LINK: "Cut its network link",
                Fault.SLOW: f"Slow it down ({SLOW_SHARE:.0%} of a CPU)"}[self]


class DrillError(RuntimeError):
    """A drill that cannot be done; the message names the device and why."""


def link_of(host: str, tier_dirs: Sequence[Path]) -> str | None:
    """The namespace testbed's host-side cable (veth) of the device at ``host``, if any."""
    for d in tier_dirs:
        tb = netns_info(d) if Path(d).is_dir() else None
        for dev in (tb.devices if tb else []):
            if dev.host == host:
                return dev.veth
    return None


def _worker(launcher: Launcher, name: str):
    w = next((w for w in launcher.workers if w.device.name == name), None)
    if w is None or w.pid is None or w.proc is None or w.exit_status is not None or w.exit_signal is not None:
        raise DrillError(f"device '{name}' has no running worker in this run")
    return w


def unavailable(launcher: Launcher | None, name: str, fault: Fault, tier_dirs: Sequence[Path]) -> str | None:
    """Why ``fault`` cannot be drilled on ``name`` now (None: it can)."""
    if launcher is None:
        return "no run in progress"
    try:
        w = _worker(launcher, name)
    except DrillError as exc:
        return str(exc)
    if fault == Fault.CUT_LINK and link_of(w.device.host, tier_dirs) is None:
        return "only devices of the namespace testbed have a link this machine can cut"
    return None


def _slow_script(pid: int, share: float) -> str:
    """Shell that moves ``pid`` into a CPU-quota cgroup (v1 ``cpu`` or v2 ``cpu.max``)."""
    quota, period = int(share * 100_000), 100_000
    return f"""set -e
pid={pid}
if [ -d /sys/fs/cgroup/cpu ] && [ -w /sys/fs/cgroup/cpu ]; then
  base=/sys/fs/cgroup/cpu/edgetrain-drill
  for old in "$base"/*/; do rmdir "$old" 2>/dev/null || true; done
  mkdir -p "$base/$pid"
  echo {period} > "$base/$pid/cpu.cfs_period_us"
  echo {quota} > "$base/$pid/cpu.cfs_quota_us"
elif [ -w /sys/fs/cgroup/cgroup.subtree_control ]; then
  base=/sys/fs/cgroup/edgetrain-drill
  mkdir -p "$base"
  echo +cpu > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || true
  echo +cpu > "$base/cgroup.subtree_control" 2>/dev/null || true
  for old in "$base"/*/; do rmdir "$old" 2>/dev/null || true; done
  mkdir -p "$base/$pid"
  echo "{quota} {period}" > "$base/$pid/cpu.max"
else
  echo "no writable cgroup cpu controller (slowing a device down needs root on it)" >&2
  exit 3
fi
echo "$pid" > "$base/$pid/cgroup.procs"
"""


async def inject(launcher: Launcher, name: str, fault: Fault, tier_dirs: Sequence[Path] = ()) -> str:
    """Do ``fault`` to device ``name`` of the running run; returns what was done.

    Raises
    ------
    DrillError
        The device has no running worker, the link cannot be cut from here, or the device
        refused (the message says what it answered).
    """
    w = _worker(launcher, name)
    what = {Fault.KILL: f"kill the worker of device '{name}' (kill -9, pid {w.pid})",
            Fault.FREEZE: f"freeze the worker of device '{name}' (SIGSTOP, pid {w.pid})",
            Fault.CUT_LINK: f"cut the network link of device '{name}'",
            Fault.SLOW: f"slow device '{name}' down to {SLOW_SHARE:.0%} of a CPU (cgroup quota)"}[fault]
    veth = link_of(w.device.host, tier_dirs) if fault == Fault.CUT_LINK else None
    if fault == Fault.CUT_LINK and veth is None:
        raise DrillError(f"cannot cut the link of device '{name}': "
                         + (unavailable(launcher, name, fault, tier_dirs) or "no link found"))
    # logged before it is done: the run may notice the failure before the command returns.
    # A slowed-down device is a straggler, not a loss: no incident of the recovery timeline.
    state = launcher.state
    state.add_event(name, "info" if fault == Fault.SLOW else "drill", f"drill: {what}")
    try:
        if veth is not None:
            done = await asyncio.to_thread(subprocess.run, ["ip", "link", "set", veth, "down"],
                                           capture_output=True, text=True)
            if done.returncode:
                raise DrillError(f"cannot cut the link of device '{name}' ({veth}): {done.stderr.strip()}")
        else:
            cmd = {Fault.KILL: f"kill -KILL {w.pid}", Fault.FREEZE: f"kill -STOP {w.pid}",
                   Fault.SLOW: f"sh -c {shlex.quote(_slow_script(w.pid, SLOW_SHARE))}"}[fault]
            try:
                res = await asyncio.wait_for(w.conn.run(cmd, check=False, encoding="utf-8", errors="replace"), 15)
            except (asyncssh.Error, OSError, asyncio.TimeoutError) as exc:
                raise DrillError(f"device '{name}' did not take the drill: {exc}") from exc
            if res.exit_status:
                raise DrillError(f"device '{name}' refused to {fault.value} its worker (pid {w.pid}): "
                                 f"{str(res.stderr).strip() or f'exit {res.exit_status}'}")
    except DrillError as exc:
        state.add_event(name, "error", f"drill failed: {exc}")
        raise
    return what
