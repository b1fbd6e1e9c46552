"""Launch a run: connect, push the worker code, start one worker per device, stream
telemetry into a :class:`RunState`, and leave no worker behind.

Everything here is asyncio + asyncssh.  The CLI runs it with ``asyncio.run``; the GUI
runs it on its own event-loop thread (``app.workspace.loop``).

Stopping is explicit: each worker prints its PID first (``exec`` keeps the shell's PID),
and on any ending the launcher kills those PIDs over a fresh channel.  Closing a
channel is not enough: OpenSSH running as root ignores the client's signals.  Each run has
its own rendezvous secret, written on the workers' stdin (:mod:`app.run.rendezvous`).
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from app.devices.inventory import Device
from app.devices.remote import ASSET_FIELDS, asset_digest, kill_remote, push_asset, push_workers, workers_digest
from app.devices.ssh import KnownHosts, SSHError, connect
from app.run.checkpoints import Found, stage, worker_dir
from app.run.recovery import Recovery, attribute_oom, collective_timeout
from app.run.rendezvous import PID_TAG, new_secret, pick_port, worker_command
from app.run.resume import bring_model_home
from app.run.runstate import RunState
from app.run.telemetry import TelemetryParser
from workers.config import JobConfig
from workers.lifeline import EXIT_OOM, EXIT_ORPHANED, EXIT_STOPPED, HEARTBEATS_PER_TIMEOUT

log = logging.getLogger("edgetrain.launch")
#: How long a worker waits for a silent controller before it ends itself.  Generous: the launcher's
#: loop can be busy a moment, and a lost controller is noticed at once when its connection closes.
LIFELINE_S = 10.0  # silence for this long + EMERGENCY_GRACE_S: a worker is gone within 20 s
#: Seconds the workers get to checkpoint and end after a stop before they are killed.
STOP_GRACE_S = 60.0


class LaunchError(RuntimeError):
    """The run could not start or failed; ``device`` names the device at fault, if one."""

    def __init__(self, message: str, device: str | None = None) -> None:
        super().__init__(message)
        self.device = device


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


@dataclass
class _Worker:
    device: Device
    rank: int
    conn: asyncssh.SSHClientConnection
    remote_dir: str = ""
    proc: asyncssh.SSHClientProcess | None = None
    pid: int | None = None
    stderr_tail: list[str] = field(default_factory=list)
    exit_status: int | None = None
    exit_signal: str | None = None
    reaped_after_done: bool = False   # killed by us after it had reported `done`
    last_seen: float = 0.0            # monotonic time of its last record (beats included)
    lost_reason: str = ""             # why the recovery took it for lost (frozen, unreachable)


async def on_device(device: Device, what: str, fix: str, coro):
    """Await ``coro``; any SSH/SFTP/OS failure becomes a :class:`LaunchError` naming the device."""
    try:
        return await coro
    except (LaunchError, SSHError):
        raise
    except (asyncssh.Error, OSError, ValueError, asyncio.TimeoutError) as exc:
        why = str(exc) or type(exc).__name__
        raise LaunchError(f"device '{device.name}' ({device.address}): {what} failed: {why}. Fix: {fix}",
                          device.name) from None


def _raise_all(errors: list[BaseException]) -> None:
    """Raise one error naming every failing device (the user fixes them all at once)."""
    if not errors:
        return
    for e in errors:
        if not isinstance(e, Exception):
            raise e
    if len(errors) == 1:
        raise errors[0]
    first = errors[0]
    names = [getattr(e, "device", None) or "?" for e in errors]
    raise LaunchError(f"{len(errors)} devices failed ({', '.join(names)}):\n  " +
                      "\n  ".join(str(e) for e in errors), getattr(first, "device", None))


class Launcher:
    """Runs one job over the given devices (rank = position in ``devices``).

    Parameters
    ----------
    devices
        Participants in rank order (pipeline order for pp/hybrid).
    job
        The job; ``run_id``, ranks, addresses and the port are filled in here.
    known_hosts
        EdgeTrain's trusted-domain store.
    state
        Receives every record and status change.
    stall_s
        No telemetry for this long: look for a frozen device.
    lifeline_s
        A worker that hears nothing from this launcher for this long ends itself
        (:mod:`workers.lifeline`); the launcher writes a heartbeat several times as often.
    resume
        A checkpoint brought home (:func:`app.run.checkpoints.find_latest`): it is copied
        to the devices that lack it and training continues at its step.
    export
        After a finished run, bring the trained model home as a Hugging Face directory
        under the run's record (:func:`app.run.resume.bring_model_home`).
    """

    def __init__(self, devices: list[Device], job: JobConfig, known_hosts: KnownHosts, state: RunState,
                 stall_s: float = 30.0, lifeline_s: float = LIFELINE_S, resume: Found | None = None,
                 export: bool = False) -> None:
        if not devices:
            raise LaunchError("no devices selected. Fix: select at least one device")
        self.devices, self.job, self.known_hosts, self.state = devices, job, known_hosts, state
        self.stall_s = stall_s
        self.lifeline_s = lifeline_s
        self._last_record = time.monotonic()
        self.parser = TelemetryParser.for_run(state)  # knows each device's rank; counts go to the record
        self.workers: list[_Worker] = []
        self._stop = asyncio.Event()
        self._stopping = False
        self.resume, self.export = resume, export
        self.recovery = Recovery(self)
        self._secret = new_secret()  # this run's rendezvous secret: held here only, never recorded

    def request_stop(self, checkpoint: bool = True) -> None:
        """Ask the run to stop (thread-unsafe: call on the launcher's loop).

        With ``checkpoint`` and workers running, they are asked to write a checkpoint
        and end at the next step (``resume`` continues from it); they are killed if
        that takes over ``STOP_GRACE_S``, or at a second request.
        """
        running = [w for w in self.workers if w.proc is not None and w.exit_status is None and w.exit_signal is None]
        if checkpoint and running and not self._stopping and self.lifeline_s > 0:
            self._stopping = True
            self.state.add_event(None, "info", "stopping: the devices write a checkpoint at the end of this step")
            for w in running:
                try:
                    w.proc.stdin.write("stop\n")
                except (OSError, asyncssh.Error):
                    pass
            asyncio.get_running_loop().call_later(STOP_GRACE_S, self._stop.set)
            return
        self._stop.set()

    async def run(self) -> str:
        """Run to the end; returns the outcome (``done``, ``failed``, ``oom``, ``stopped``).

        Raises
        ------
        LaunchError
            When the run cannot start (unreachable device, host key, no python); the
            message names the device.  Failures during training end in an outcome instead.
        """
        outcome = "failed"
        self.recovery.plan_ahead()
        try:
            await self._connect_all()
            if not self._stop.is_set():
                await self._prepare()
            # a stop asked for while connecting or copying ends the run before any worker starts
            outcome = "stopped" if self._stop.is_set() else await self._run_workers()
        except (SSHError, LaunchError) as exc:
            dev = getattr(exc, "device", None)
            self.state.add_event(dev, "error", str(exc))
            if dev in self.state.devices:
                self.state.set_status(dev, "failed", str(exc))
            outcome = "failed"
            raise LaunchError(str(exc), dev) from None
        except asyncio.CancelledError:
            outcome = "stopped"
            raise
        finally:
            await asyncio.shield(self._cleanup())
            self.state.rejected_lines = self.parser.total_rejected
            if outcome == "done" and self.export:
                await bring_model_home(self.state, self.known_hosts)
            self.state.finish(outcome)
        return outcome

    async def _connect_all(self) -> None:
        for name in self.state.devices:
            self.state.set_status(name, "connecting")
        results = await asyncio.gather(*(connect(d, self.known_hosts) for d in self.devices),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        conns = [r for r in results if not isinstance(r, BaseException)]
        if errors:
            for c in conns:
                c.close()
            for e in errors:
                dev = getattr(e, "device", None)
                if dev in self.state.devices:
                    self.state.set_status(dev, "failed", str(e))
            _raise_all(errors)
        self.workers = [_Worker(d, rank, c) for rank, (d, c) in enumerate(zip(self.devices, conns))]

    async def _prepare(self) -> None:
        digest = await asyncio.to_thread(workers_digest)
        fix = "check free disk space and that the device's workdir is a writable directory"
        dirs = await asyncio.gather(*(on_device(w.device, "copying the worker code", fix,
                                                push_workers(w.conn, w.device, digest)) for w in self.workers),
                                    return_exceptions=True)
        _raise_all([d for d in dirs if isinstance(d, BaseException)])
        for w, d in zip(self.workers, dirs):
            w.remote_dir = d
        job = self.job
        # Replication: local datasets/weights/tokenizers go to every device; a path that
        # does not exist here is taken to be a path on the devices.
        for name in ASSET_FIELDS:
            value = getattr(job, name)
            if value and Path(value).expanduser().exists():
                local = Path(value).expanduser().resolve()
                digest = await asyncio.to_thread(asset_digest, local)  # once, off the loop
                remote = await asyncio.gather(*(on_device(w.device, f"copying {name} {local.name}", fix,
                                                          push_asset(w.conn, w.device, local, digest))
                                                for w in self.workers), return_exceptions=True)
                _raise_all([r for r in remote if isinstance(r, BaseException)])
                if len(set(remote)) != 1:
                    raise LaunchError(f"devices disagree on where {local.name} lives (different workdirs); "
                                      "give every device the same 'workdir' in the inventory")
                setattr(job, name, remote[0])
                self.state.add_event(None, "info", f"copied {name} {local.name} to {len(self.workers)} devices")
        job.world_size = len(self.workers)
        job.addrs = [w.device.host for w in self.workers]
        job.devices = [w.device.name for w in self.workers]
        job.master_addr = self.workers[0].device.host
        job.lifeline_s = self.lifeline_s
        job.checkpoint_dir = worker_dir(job.run_id)
        job.collective_timeout_s = collective_timeout(self.state.plan, job.batch_size, job.timeout_s)
        if self.resume is not None:
            man, home = self.resume.manifest, self.resume.home
            fix = "check free disk space on the device (a checkpoint is copied there)"
            staged = await asyncio.gather(*(on_device(w.device, f"copying checkpoint step {man.step}", fix,
                                                      stage(w.conn, w.device, man, home)) for w in self.workers),
                                          return_exceptions=True)
            _raise_all([r for r in staged if isinstance(r, BaseException)])
            job.resume_from = worker_dir(man.run_id, man.step)
            self.state.add_event(None, "info", f"resuming run {man.run_id} at step {man.step} "
                                               f"({man.kind} checkpoint, {man.total_bytes / 2**20:.1f} MiB)")
        w0 = self.workers[0]
        job.master_port = await on_device(w0.device, "choosing a rendezvous port", "set 'python:' for this "
                                          "device in the inventory to an interpreter that has torch",
                                          pick_port(w0.conn, w0.device))
        try:
            job.validate()
        except ValueError as exc:
            raise LaunchError(f"the run's settings are inconsistent: {exc}") from None

    async def _start(self, w: _Worker) -> None:
        """Start one worker and read its PID before anything else can go wrong."""
        # stdin stays open: it is the worker's lifeline (heartbeats in, end-of-file when we die)
        w.proc = await w.conn.create_process(worker_command(w.device, w.remote_dir, w.rank, self.job),
                                             encoding="utf-8", errors="replace")
        w.proc.stdin.write(self._secret + "\n")  # its shell reads this line into the environment
        self.state.set_status(w.device.name, "starting")
        line = await asyncio.wait_for(w.proc.stdout.readline(), 30)
        w.last_seen = time.monotonic()
        if line.startswith(PID_TAG):
            try:
                w.pid = int(line.split()[1])
            except (IndexError, ValueError):
                pass

    async def _run_workers(self) -> str:
        # all at once: with 64 devices, one after the other costs 64 round trips
        started = await asyncio.gather(*(on_device(w.device, "starting the worker",
                                                   "check the device's SSH server and workdir", self._start(w))
                                         for w in self.workers), return_exceptions=True)
        _raise_all([r for r in started if isinstance(r, BaseException)])
        if self._stop.is_set():
            return "stopped"
        tasks = {asyncio.ensure_future(self._watch(w)): w for w in self.workers}
        stop_task = asyncio.ensure_future(self._stop.wait())
        watchdog = asyncio.ensure_future(self._watchdog())
        heartbeats = asyncio.ensure_future(self._heartbeats())
        tasks[watchdog] = None
        pending = set(tasks)
        outcome = "done"
        try:
            while pending - {watchdog}:  # the watchdog never ends on its own
                done, _ = await asyncio.wait(pending | {stop_task}, return_when=asyncio.FIRST_COMPLETED)
                if stop_task in done:
                    self.state.add_event(None, "info", "run stopped by the user")
                    for w in self.workers:
                        if w.exit_status is None and w.exit_signal is None:
                            self.state.set_status(w.device.name, "stopped")
                    return "stopped"
                for t in done:
                    pending.discard(t)
                    w = tasks[t]
                    if w is None:  # the watchdog found a frozen device
                        return "failed"
                    if t.exception() is not None:
                        msg = f"lost the connection to device '{w.device.name}': {t.exception()}"
                        self.state.set_status(w.device.name, "failed", msg)
                        self.state.add_event(w.device.name, "failure", msg)
                    verdict = self._judge(w) if t.exception() is None else "failed"
                    if verdict == "failed" and self.recovery.can_regroup(w):
                        await self.recovery.regroup(w, w.lost_reason or self.state.devices[w.device.name].exit
                                                    or "its worker ended")
                        continue
                    if verdict == "stopped":
                        # the others are writing the same checkpoint's last files: let them finish
                        others, _ = await asyncio.wait(pending - {watchdog}, timeout=10)
                        for o in others:
                            if o.exception() is None:
                                self._judge(tasks[o])
                    if verdict != "done":
                        # one device failing ends the run (unless DP regrouped above): the
                        # others would block in their next collective until the timeout.
                        # A peer that failed because a device ran out of memory (its
                        # connection to it broke) is judged first at times: the out-of-
                        # memory is the run's outcome, not its consequence.
                        if verdict == "failed" and any(d.status == "oom" for d in self.state.devices.values()):
                            return "oom"
                        return verdict
            return outcome
        finally:
            stop_task.cancel()
            heartbeats.cancel()
            for t in tasks:
                if not t.done():
                    t.cancel()

    async def _heartbeats(self) -> None:
        """Keep every worker's lifeline alive: a newline on its stdin, several times per
        ``lifeline_s``.  A worker that has gone away is skipped (its end is judged elsewhere)."""
        if self.lifeline_s <= 0:
            return
        while True:
            for w in self.workers:
                if w.proc is not None and w.exit_status is None and w.exit_signal is None:
                    try:
                        w.proc.stdin.write("\n")
                    except (OSError, asyncssh.Error, BrokenPipeError):
                        pass
            await asyncio.sleep(self.lifeline_s / HEARTBEATS_PER_TIMEOUT)

    async def _watchdog(self) -> None:
        """Name a frozen device.  A stopped or hung worker closes nothing, so its peers
        just wait in their next collective (up to the process-group timeout) and the run
        goes quiet.  When no record has arrived for ``stall_s``, ask every device what
        state its worker is in; one that is stopped (``T``) is the culprit."""
        tick = 0
        while True:
            # silence is looked at 4x/s: a lost device is named within SILENT_S + this
            # cadence + the SSH probe's bound, under the 5 s promised; the rest once a second
            await asyncio.sleep(0.25)
            await self.recovery.check_silent()
            tick += 1
            if tick % 4:
                continue
            await self._reap_finished()
            quiet = time.monotonic() - self._last_record
            if quiet < self.stall_s:
                continue
            states = await asyncio.gather(*(self._proc_state(w) for w in self.workers))
            frozen = [w for w, st in zip(self.workers, states) if st in ("T", "t")]
            if frozen:
                names = ", ".join(w.device.name for w in frozen)
                for w in frozen:
                    msg = (f"worker on device '{w.device.name}' is frozen (stopped, no progress for "
                           f"{quiet:.0f} s); its peers are blocked waiting for it")
                    self.state.set_status(w.device.name, "failed", msg)
                    self.state.add_event(w.device.name, "failure", msg)
                log.warning("frozen devices: %s", names)
                return
            self._last_record = time.monotonic()  # all alive: a long step, look again later

    async def _reap_finished(self, grace_s: float = 10.0) -> None:
        """A worker that reported ``done`` but has not exited after ``grace_s`` is stuck in
        library teardown: its work is complete, so end the process rather than the run."""
        now = time.time()
        for w in self.workers:
            dev = self.state.devices[w.device.name]
            alive = w.proc is not None and w.proc.exit_status is None and w.proc.exit_signal is None
            if dev.status == "done" and alive and w.pid and now - (dev.done_at or now) > grace_s:
                w.reaped_after_done = True
                log.warning("worker on %s reported done but did not exit; ending it", w.device.name)
                await kill_remote(w.conn, w.pid)

    async def _proc_state(self, w: _Worker) -> str | None:
        if w.pid is None:
            return None
        try:
            res = await asyncio.wait_for(w.conn.run(f"cut -d' ' -f3 /proc/{w.pid}/stat", check=False,
                                                    encoding="utf-8", errors="replace"), 10)
            return str(res.stdout).strip() or None
        except (asyncssh.Error, OSError, asyncio.TimeoutError):
            return None

    def _judge(self, w: _Worker) -> str:
        """Outcome of a finished worker; records a failure event naming the device."""
        name = w.device.name
        dev = self.state.devices[name]
        if dev.status == "done" and (w.exit_status == 0 or w.reaped_after_done):
            return "done"
        if w.exit_status == EXIT_STOPPED:
            self.state.set_status(name, "stopped")
            return "stopped"
        if w.exit_signal:
            dev.exit = f"signal {w.exit_signal}"
        else:
            dev.exit = f"exit {w.exit_status}"
        if dev.status == "oom" or w.exit_status == EXIT_OOM:
            if dev.status != "oom":
                self.state.set_status(name, "oom", "out of memory")
                self.state.add_event(name, "oom", f"{name}: out of memory")
            return "oom"
        if w.exit_signal == "KILL" and dev.status not in ("failed",):
            # SIGKILL with no message of its own: the kernel's OOM killer or a person
            msg = (f"worker on device '{name}' was killed (SIGKILL) during {dev.status}; "
                   "if the device ran out of memory, its kernel log shows the OOM killer")
        elif w.exit_status == EXIT_ORPHANED:
            tail = " | ".join(w.stderr_tail[-1:])
            msg = f"worker on device '{name}' ended itself: it lost its controller ({tail or 'no heartbeat'})"
        elif dev.status == "failed" and dev.message:
            msg = f"worker on device '{name}' failed: {dev.message}"
        else:
            tail = " | ".join(w.stderr_tail[-3:])
            msg = f"worker on device '{name}' ended with {dev.exit} before finishing" + (f": {tail}" if tail else "")
        self.state.set_status(name, "failed", msg)
        self.state.add_event(name, "failure", msg)
        return "failed"

    async def _watch(self, w: _Worker) -> None:
        assert w.proc is not None
        name = w.device.name

        async def stderr() -> None:
            async for line in w.proc.stderr:
                if line.strip():
                    w.stderr_tail = (w.stderr_tail + [line.rstrip()])[-20:]

        err_task = asyncio.ensure_future(stderr())
        async for line in w.proc.stdout:
            rec = self.parser.feed(name, line)
            if rec is None:
                continue
            self._last_record = w.last_seen = time.monotonic()
            if rec["type"] == "event" and rec["name"] == "peer_lost":
                self.recovery.peer_lost(w, rec.get("generation"))
            try:
                self.state.feed(rec)
            except (TypeError, ValueError, KeyError) as exc:
                # a schema-valid record with a wrongly typed optional field: count it, go on
                self.parser.reject(name, "not applied", f"record not applied: {exc}")
                log.warning("telemetry record from %s not applied: %s", name, exc)
        await w.proc.wait()
        await asyncio.gather(err_task, return_exceptions=True)
        w.exit_status = w.proc.exit_status
        w.exit_signal = (w.proc.exit_signal or (None,))[0]
        if w.exit_signal == "KILL" and not w.lost_reason:  # the kernel's OOM killer, or a person?
            await attribute_oom(w, self.state)
    async def _cleanup(self) -> None:
        """Kill every worker still running, then close the connections."""
        kills = []
        for w in self.workers:
            alive = w.proc is not None and w.proc.exit_status is None and w.proc.exit_signal is None
            if alive and w.pid is not None:
                kills.append(kill_remote(w.conn, w.pid))
                if self.state.devices[w.device.name].status in ("pending", "connecting", "starting", "running"):
                    self.state.set_status(w.device.name, "stopped")
        if kills:
            await asyncio.gather(*kills, return_exceptions=True)
        async def close(w: _Worker) -> None:
            if w.proc is not None:
                try:
                    await asyncio.wait_for(w.proc.wait(), 3)
                except (asyncio.TimeoutError, asyncssh.Error, OSError):
                    w.proc.close()
            w.conn.close()
            try:
                await asyncio.wait_for(w.conn.wait_closed(), 2)
            except (asyncio.TimeoutError, OSError, asyncssh.Error):
                pass
        # concurrently: a few hung devices must not add up to minutes at 64 devices
        await asyncio.gather(*(close(w) for w in self.workers), return_exceptions=True)
