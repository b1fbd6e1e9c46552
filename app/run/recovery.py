"""A device leaves, training goes on: telling a lost worker from a slow one, and re-forming the run.

Detection.  Every worker answers each controller heartbeat (one per second) with a
``beat`` record from its lifeline thread, whatever its training thread is doing, so a
minutes-long step is not silence.  A worker killed or crashed ends its SSH channel at once.
One silent for :data:`SILENT_S` is looked at over SSH: stopped (``T``, frozen) means lost,
and it is killed so its peers' collectives fail now instead of at the process-group
timeout; a device that does not answer at all (link cut, powered off) is lost too.

Recovery.  Data-parallel replicas re-form in place: the launcher names the survivors
(``regroup <generation> <ranks>`` on their stdin) and they continue from memory
(:mod:`workers.loop`).  The rendezvous store lives in rank 0's worker, so losing rank 0,
or a parallelism whose lost part cannot be rebuilt from its peers, ends the run; the
caller then restarts the survivors from the last checkpoint (:func:`app.run.supervise`).
"""
from __future__ import annotations

import asyncio
import logging
import os
import shlex
import time
from typing import TYPE_CHECKING, Callable

import asyncssh

from app.devices.remote import kill_remote
from app.run.planning import Fallback
from workers.config import Parallelism

if TYPE_CHECKING:
    from app.run.launcher import Launcher, _Worker

log = logging.getLogger("edgetrain.recovery")

#: Seconds without an answer to the heartbeats before a worker is looked at.
SILENT_S = 2.0


def silent_bound() -> float:
    """:data:`SILENT_S`, stretched while this host is overloaded (load above twice its cores).

    On an overloaded controller host (a local testbed shares it with the workers) beats
    arrive late and an SSH round trip can take seconds, so an unstretched bound takes a
    slow device for a lost one.  A device that is really gone is still named, later; on a
    host that is merely busy (its own run's workers) nothing changes (a cut link is named
    within 5 s).
    """
    try:
        over = os.getloadavg()[0] / (2 * (os.cpu_count() or 1))
    except OSError:
        over = 1.0
    return SILENT_S * min(5.0, max(1.0, over))
#: Bounds of a DP collective's wait for a peer: at least this, else this many predicted steps.
COLLECTIVE_FLOOR_S, COLLECTIVE_STEPS = 5.0, 5.0
#: Seconds to wait, after a worker reports a failed collective, for a lost device to show.
PEER_LOST_GRACE_S = 2.0


def collective_timeout(plan: dict | None, batch_size: int, timeout_s: float) -> float:
    """How long a DP training collective may wait for a peer: a few predicted steps (a
    replica waits for the slowest one's compute), never under ``COLLECTIVE_FLOOR_S`` nor
    over ``timeout_s``.  Too short only costs a re-formed group (:meth:`Recovery.peer_lost`)."""
    per_sample = ((plan or {}).get("totals") or {}).get("median_latency_per_sample_s")
    if not per_sample:
        return timeout_s
    return min(timeout_s, max(COLLECTIVE_FLOOR_S, COLLECTIVE_STEPS * per_sample * batch_size))


class Recovery:
    """The launcher's view of who is lost, and the membership generations of its run."""

    def __init__(self, launcher: "Launcher", in_place: bool = True) -> None:
        self.launcher = launcher
        self.in_place = in_place
        self.generation = 0
        self.lost: list[str] = []
        self._checking: set[int] = set()
        #: computes the plan of the run less each device (:func:`app.run.planning.fallback_plans`)
        self.planner: Callable[[], dict[str, Fallback]] | None = None
        self.fallbacks: dict[str, Fallback] = {}
        self._planning: asyncio.Future | None = None

    def plan_ahead(self) -> None:
        """Plan "one device gone" for every device, on a thread, while the run starts."""
        if self.planner is not None and self._planning is None:
            self._planning = asyncio.ensure_future(asyncio.to_thread(self.planner))
            self._planning.add_done_callback(
                lambda f: self.fallbacks.update(f.result()) if not f.cancelled() and f.exception() is None
                else log.warning("no fallback plans: %s", f.exception() if not f.cancelled() else "cancelled"))

    def alive(self) -> list["_Worker"]:
        return [w for w in self.launcher.workers
                if w.proc is not None and w.exit_status is None and w.exit_signal is None
                and w.device.name not in self.lost]

    def can_regroup(self, w: "_Worker") -> bool:
        """Whether the run can go on without ``w``'s device, in place."""
        job = self.launcher.job
        others = [o for o in self.alive() if o is not w]
        return (self.in_place and job.parallelism == Parallelism.DP and w.rank != 0
                and self.launcher.lifeline_s > 0 and bool(others))

    async def regroup(self, w: "_Worker", why: str) -> None:
        """Drop ``w``'s device and tell the survivors to continue among themselves."""
        state = self.launcher.state
        name = w.device.name
        self.lost.append(name)
        self.generation += 1
        survivors = [o for o in self.alive() if o is not w]
        state.set_status(name, "lost", why)
        state.add_event(name, "lost", f"device '{name}' lost ({why}); detected "
                                      f"{time.monotonic() - w.last_seen:.1f} s after its last word")
        share = self.launcher.job.batch_size / len(survivors)
        fallback = self.fallbacks.get(name) if len(self.lost) == 1 else None
        planned = f"; {fallback.describe(state.plan)} (planned at launch)" if fallback is not None else ""
        state.add_event(None, "replan", f"re-planned for {len(survivors)} devices "
                                        f"({', '.join(o.device.name for o in survivors)}): each replica now "
                                        f"trains {share:.1f} of {self.launcher.job.batch_size} samples per step"
                                        f"{planned}; generation {self.generation}")
        self._send(survivors)

    def peer_lost(self, w: "_Worker", generation: int | None) -> None:
        """A worker's collective of ``generation`` failed.  Usually a device is lost and
        about to be named; if none is within ``PEER_LOST_GRACE_S`` (a collective outwaited
        its bound), the same members re-form the group.  A failure of a generation already
        replaced is old news."""
        if not self.in_place or self.launcher.job.parallelism != Parallelism.DP:
            return
        if generation is None or generation < self.generation:
            return
        generation = self.generation

        async def later() -> None:
            await asyncio.sleep(PEER_LOST_GRACE_S)
            # a member that has fallen silent is being looked at: wait for its verdict, or
            # the group would re-form with a lost device and wait for it in the store
            until = time.monotonic() + 6 * silent_bound()
            while (self.generation == generation and time.monotonic() < until
                   and any(o.last_seen and time.monotonic() - o.last_seen >= SILENT_S for o in self.alive())):
                await asyncio.sleep(0.1)
            if self.generation == generation and self.alive():
                self.generation += 1
                members = self.alive()
                self.launcher.state.add_event(None, "info", f"a collective outwaited its bound on device "
                                                            f"'{w.device.name}' with no device lost: re-forming the "
                                                            f"group (generation {self.generation})")
                self._send(members)
        asyncio.ensure_future(later())

    def _send(self, members: list["_Worker"]) -> None:
        line = f"regroup {self.generation} {','.join(str(o.rank) for o in members)}\n"
        for o in members:
            try:
                o.proc.stdin.write(line)
            except (OSError, asyncssh.Error):
                pass

    async def check_silent(self) -> None:
        """Look at every worker that has not answered the heartbeats for ``SILENT_S``."""
        now, bound = time.monotonic(), silent_bound()
        for w in self.alive():
            if w.pid is None or not w.last_seen or now - w.last_seen < bound or w.rank in self._checking:
                continue
            self._checking.add(w.rank)
            asyncio.ensure_future(self._look_at(w))

    async def _look_at(self, w: "_Worker") -> None:
        try:
            try:
                res = await asyncio.wait_for(w.conn.run(f"cut -d' ' -f3 /proc/{w.pid}/stat", check=False,
                                                        encoding="utf-8", errors="replace"), silent_bound())
                proc_state = str(res.stdout).strip()
            except (asyncssh.Error, OSError, asyncio.TimeoutError):
                proc_state = "unreachable"
            if time.monotonic() - w.last_seen < silent_bound():
                return  # it spoke meanwhile
            name = w.device.name
            if proc_state in ("T", "t"):
                w.lost_reason = "frozen: its worker is stopped and does not answer"
                self.launcher.state.add_event(name, "failure", f"worker on device '{name}' is frozen; ending it")
                await kill_remote(w.conn, w.pid, grace_s=0.1)
            elif proc_state == "unreachable":
                w.lost_reason = "unreachable: no answer over SSH"
                self.launcher.state.add_event(name, "failure", f"device '{name}' does not answer; taking it as lost")
                # no goodbye over a dead link: drop the connection, which ends its watch now
                w.conn.abort()
            else:
                log.info("%s silent for %.1f s but its worker is %s", name, time.monotonic() - w.last_seen,
                         proc_state or "gone")
        finally:
            self._checking.discard(w.rank)


async def attribute_oom(w: "_Worker", state) -> bool:
    """A worker ended by SIGKILL: was it the kernel's OOM killer?  Asks the device for
    the OOM-kill counter of the worker's memory cgroup (raised since the worker started)
    and, where readable, the kernel log; a real board reports an overrun the same way.
    On a yes, the device is marked ``oom`` with the phase and memory of its last
    heartbeat, so the run reports an out-of-memory naming the device, not a crash."""
    dev = state.devices[w.device.name]
    if not (dev.mem_cgroup or dev.mem_limit_bytes):
        # nothing caps its memory: no OOM to tell from a person's kill -9, and no round trip
        # to delay the verdict (its peers' failures would be reported first)
        return False
    version, _, cg = (dev.mem_cgroup or "").partition(":")
    name = "memory.oom_control" if version == "cgroup1" else "memory.events"
    cmd = (f"cat {shlex.quote(cg + '/' + name)} 2>/dev/null | grep '^oom_kill '; " if cg else "") + \
        f"dmesg 2>/dev/null | grep -E 'Killed process {w.pid}( |$)' | tail -n 1; true"
    try:
        res = await asyncio.wait_for(w.conn.run(cmd, check=False, encoding="utf-8", errors="replace"), 10)
        out = str(res.stdout)
    except (asyncssh.Error, OSError, asyncio.TimeoutError):
        return False
    kills = next((int(ln.split()[1]) for ln in out.splitlines() if ln.startswith("oom_kill ")), None)
    by_cgroup = kills is not None and dev.oom_kills is not None and kills > dev.oom_kills
    if not (by_cgroup or f"Killed process {w.pid}" in out):
        return False
    cap = (f"{dev.mem_limit_bytes / 2**30:.2f} GiB {dev.mem_limit_kind or ''} limit".replace("  ", " ")
           if dev.mem_limit_bytes else "no limit set")
    rss = f", {dev.rss_bytes / 2**30:.2f} GiB resident at its last heartbeat" if dev.rss_bytes else ""
    phase = dev.phase or "an unknown phase"
    msg = (f"{w.device.name}: out of memory during {phase}: the kernel's OOM killer ended the worker "
           f"({cap}{rss})")
    state.set_status(w.device.name, "oom", f"out of memory during {phase} (kernel OOM kill)")
    state.add_event(w.device.name, "oom", msg)
    return True
