"""The training loop of a worker: steps, evaluation, checkpoints, stop, and recovery.

:class:`TrainingLoop` runs iterations ``start .. cfg.steps`` of a built trainer.  After
each step every rank agrees, over the control group, whether to checkpoint or stop
(:class:`workers.checkpoint.Control`).  When a collective fails because a peer is gone, a
trainer that can re-form its group (DP: ``regroup``) waits for the controller to say who
survived, builds the next membership generation (:mod:`workers.membership`), makes the
survivors' state agree, and continues from the last step with no gradients in flight:
no optimizer step is lost.  Other parallelisms end with the error; the controller then
restarts the survivors from the last checkpoint.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from . import lifeline
from .checkpoint import Checkpointer, Control, state_dict
from .checkpoint_manifest import step_dirname
from .data import global_batch
from .evaluate import evaluate
from .lifeline import EXIT_ORPHANED, EXIT_STOPPED
from .membership import Links, Membership, Regroups, generation_group, sync_state
from .memory import is_oom_error, rss_bytes

#: Seconds a worker whose collective failed waits for the controller's ``regroup``.
REGROUP_WAIT_S = 30.0


class RunFlags:
    """What the lifeline thread tells the training loop: the controller is gone
    (``lapsed``), asked to stop (``stop``) or re-formed the group (``regroups``)."""

    def __init__(self) -> None:
        self.lapsed = threading.Event()
        self.stop = threading.Event()
        self.regroups = Regroups()
        self.links = Links()
        self.reason = ""
        self.phase = "import"   # the worker's phase before its trainer exists (then the trainer's)
        self.trainer = None

    def lost(self, reason: str) -> None:
        """The controller is gone: checkpoint at the next step boundary, but end within
        ``EMERGENCY_GRACE_S`` whatever happens (a step may take minutes)."""
        self.reason = reason
        self.lapsed.set()
        timer = threading.Timer(lifeline.EMERGENCY_GRACE_S, lifeline.leave,
                                args=(f"{reason}; no emergency checkpoint within "
                                      f"{lifeline.EMERGENCY_GRACE_S:.0f} s",))
        timer.daemon = True
        timer.start()

    def current_phase(self) -> str:
        """What the worker is doing now (heartbeats carry it: a kernel OOM kill leaves no
        word of its own, so the controller attributes it to the last phase heard)."""
        trainer = self.trainer
        return str(getattr(trainer, "phase", None) or self.phase)

    def command(self, command: str) -> None:
        if command == "stop":
            self.reason = "the controller asked to stop"
            self.stop.set()
        else:
            m = self.regroups.offer(command)
            if m is not None:
                # release this rank if it waits in a collective of the generation being
                # replaced (and, through it, the peers that wait on it): see Links
                self.links.sever(below=m.generation)


def _save_failure(ckpt: Checkpointer, step: int, exc: BaseException) -> str:
    """What went wrong with this device's part of a checkpoint, for the user.  A full disk
    surfaces from torch's writer as a position mismatch, so the free space is checked."""
    import shutil

    device = ckpt.cfg.devices[ckpt.rank]
    try:
        free = shutil.disk_usage(ckpt.root).free
        need = sum(t.numel() * t.element_size() for t in state_dict(ckpt.trainer).values())
    except OSError:
        free, need = None, 0
    if free is not None and free < need:
        why = f"No space left on device: {free / 2**20:.1f} MiB free, about {need / 2**20:.1f} MiB needed"
    else:
        text = str(exc).strip().splitlines()
        why = f"{type(exc).__name__}: {text[-1][:200] if text else ''}"
    return (f"checkpoint at step {step} failed on device {device} ({why}) under {ckpt.root}. "
            "Fix: free space on that device or lower keep_checkpoints")


class TrainingLoop:
    """Iterations of one rank; see the module docstring.  ``samples`` counts what it trained."""

    def __init__(self, cfg, rank: int, trainer, data, eval_data, emitter, meter, tracker, flags: RunFlags,
                 peak) -> None:
        self.cfg, self.rank, self.trainer = cfg, rank, trainer
        self.data, self.eval_data = data, eval_data
        self.emitter, self.meter, self.tracker, self.flags, self.peak = emitter, meter, tracker, flags, peak
        self.regroupable = hasattr(trainer, "regroup") and cfg.lifeline_s > 0
        self.ckpt = Checkpointer(cfg, rank, trainer, None)
        self.control = Control(cfg, rank, None, flags.lapsed, flags.stop)
        self.generation = -1
        self._join(Membership(0, tuple(range(cfg.world_size))))
        self.samples = 0
        self.clean = 0   # the last step after which no gradients were pending
        self._last_j = 0.0
        self._last_end: float | None = None   # when the previous step ended (perf_counter)

    def resume(self) -> int:
        """Load ``cfg.resume_from``; returns the step to continue at."""
        self.trainer.phase = "resume"
        t0 = time.perf_counter()
        man = self.ckpt.load(self.cfg.resume_from)
        self.emitter.emit("event", name="resumed", step=man.step, seconds=time.perf_counter() - t0,
                          message=f"resumed at step {man.step} from the {man.kind} checkpoint of run "
                                  f"{man.run_id} ({man.parallelism} on {man.world_size} devices)")
        self.tracker.sample()
        return man.step

    def run(self, start: int) -> int | None:
        """Train from ``start``; returns an exit code when the loop ends early, else None."""
        self.clean = it = start
        while it < self.cfg.steps:
            try:
                code = self._iteration(it)
            except Exception as exc:  # noqa: BLE001 - a lost peer is recovered from, the rest re-raised
                if not self._recover(exc):
                    raise
                it = self.clean
                self._last_end = None
                continue
            if code is not None:
                return code
            it += 1
        if self.ckpt.root is not None and self.cfg.steps > self.ckpt.last_step:
            self._checkpoint(self.cfg.steps, "final")
        return None

    # ------------------------------------------------------------------ one iteration

    def _iteration(self, it: int) -> int | None:
        cfg, trainer, em = self.cfg, self.trainer, self.emitter
        ids, labels = global_batch(self.data, it, cfg.batch_size, cfg.seed)
        t0, c0 = time.perf_counter(), time.process_time()
        res = trainer.train_step(it, ids, labels)
        if cfg.device == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        dt = t1 - t0
        # the CPU time the step used (all threads): its work without its waits (pipeline
        # bubbles, a slower peer), so the two can be told apart
        cpu_s = time.process_time() - c0
        # end to end since the previous step ended: the step plus this loop's own costs
        # (telemetry, sampling, the control all-reduce), what throughput is made of
        period = t1 - self._last_end if self._last_end is not None else None
        self._last_end = t1
        self.tracker.sample()
        reading = self.meter.read()
        # the running total drops once when a sensor falls back to the estimate
        # (workers/energy.py); a negative step would be rejected by the controller
        step_j, self._last_j = max(0.0, reading.joules - self._last_j), reading.joules
        self.samples += res.samples
        step = it + 1
        if res.synced:
            self.clean = step
        if step % cfg.telemetry_every == 0 or step == cfg.steps:
            em.emit("step", step=it, samples=res.samples, local_samples=res.local_samples,
                    latency_s=dt, latency_per_sample_s=dt / max(1, res.samples),
                    throughput_sps=res.samples / dt if dt > 0 else 0.0, loss=res.loss, synced=res.synced,
                    energy_j=step_j, energy_source=reading.source, energy_method=reading.method,
                    baseline_subtracted=reading.baseline_subtracted, rss_bytes=rss_bytes(),
                    peak_mem_bytes=self.peak(self.tracker), comm_s=res.comm_s, cpu_s=cpu_s, period_s=period,
                    role=trainer.role)
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            # every rank at the same step: the evaluation communicates
            trainer.phase = "eval"
            t_eval = time.perf_counter()
            ev = evaluate(trainer, self.eval_data, cfg)
            if ev is not None:
                em.emit("eval", step=step, loss=ev.loss, accuracy=ev.accuracy, samples=ev.samples,
                        seconds=time.perf_counter() - t_eval, role=trainer.role)
            self._last_j = self.meter.read().joules  # the evaluation's energy stays out of the next step's
            self._last_end = None                    # and its time out of the next step's period
        decision = self.control.after_step(step, self.clean == step)
        if decision.save and self.ckpt.root is not None and self.clean > self.ckpt.last_step:
            self._checkpoint(self.clean, decision.save)
            self._last_end = None   # a checkpoint is reported with its own seconds
        if decision.stop:
            why = self.flags.reason or "the controller asked to stop"
            em.emit("event", name="stopped", step=self.clean, message=f"stopped after step {step}: {why}")
            return EXIT_ORPHANED if self.flags.lapsed.is_set() else EXIT_STOPPED
        return None

    def _checkpoint(self, step: int, kind: str) -> None:
        """Write a checkpoint and report it; a failed save (full disk) is reported naming the
        device, and training goes on, safe up to the previous checkpoint."""
        ckpt = self.ckpt
        self.trainer.phase = "checkpoint"
        try:
            manifest, mine = ckpt.save(step, kind)
        except (Exception, CheckpointException) as exc:  # DCP raises the same on every rank
            self.control.saved()  # do not retry at every step
            failures = getattr(exc, "failures", None) or {ckpt.rank: (exc, None)}
            if ckpt.rank in failures:  # the device that failed says why; its peers stay quiet
                self.emitter.emit("event", name="checkpoint_failed", step=step,
                                  message=_save_failure(ckpt, step, failures[ckpt.rank][0]))
            return
        self.control.saved()
        self.emitter.emit("checkpoint", step=step, kind=kind, dir=str(ckpt.root / step_dirname(step)),
                          seconds=manifest.seconds, bytes=sum(f.bytes for f in mine),
                          total_bytes=manifest.total_bytes, files=[asdict(f) for f in mine],
                          layout=manifest.layout)

    # ------------------------------------------------------------------ recovery

    def _recover(self, exc: BaseException) -> bool:
        """After a failed collective: wait for the controller's new membership, form its
        groups, agree on the state, continue at the last clean step.  False: not recoverable
        here (the caller re-raises)."""
        if is_oom_error(exc) or not hasattr(self.trainer, "regroup") or self.cfg.lifeline_s <= 0:
            return False
        t0 = time.perf_counter()
        # peers that wait on this rank in the failed generation learn of it now, not at their bound
        self.flags.links.sever(below=self.generation + 1)
        text = str(exc).strip().splitlines()
        self.emitter.emit("event", name="peer_lost", step=self.clean, generation=self.generation,
                          message=f"a collective failed ({type(exc).__name__}: {text[0][:160] if text else ''}); "
                                  "waiting for the controller to name the survivors")
        m = self.flags.regroups.wait(self.generation, REGROUP_WAIT_S)
        if m is None or self.rank not in m.ranks:
            return False
        self._join(m)
        self.emitter.emit("event", name="regrouped", step=self.clean, generation=m.generation,
                          world_size=m.size, seconds=time.perf_counter() - t0, role=self.trainer.role,
                          message=f"continuing at step {self.clean} on {m.size} devices "
                                  f"(generation {m.generation}, {time.perf_counter() - t0:.2f} s)")
        return True

    def _join(self, m: Membership) -> None:
        """Form generation ``m``'s groups: training (DP), per-step control and checkpoints.

        Never the default group, and, where a device may be lost in place, training and
        control collectives wait at most ``collective_timeout_s`` for a peer: gloo cannot
        abort a collective, so a bounded wait is how survivors that are not next to the
        lost peer learn of it.  Checkpoints keep ``timeout_s``: a slow disk is not a loss.
        """
        cfg = self.cfg
        store = dist.distributed_c10d._get_default_store()
        bound = (cfg.collective_timeout_s or cfg.timeout_s) if self.regroupable else cfg.timeout_s
        join = max(cfg.timeout_s, 2 * bound)
        before = self.flags.links.snapshot()
        control_pg = generation_group(store, m, self.rank, bound, tag="c", join_timeout_s=join)
        ckpt_pg = generation_group(store, m, self.rank, cfg.timeout_s, tag="k", join_timeout_s=join)
        devices, addrs = list(cfg.devices), list(cfg.addrs)
        new_rank = m.rank_of(self.rank)
        cfg.world_size = m.size
        cfg.devices = [devices[r] for r in m.ranks]
        cfg.addrs = [addrs[r] for r in m.ranks]
        if self.regroupable:
            if m.generation > 0:  # a peer lost mid-all-reduce may leave survivors a step apart
                self.clean = sync_state(list(state_dict(self.trainer).values()), self.clean, control_pg)
            self.trainer.regroup(generation_group(store, m, self.rank, bound, join_timeout_s=join), new_rank, m.size,
                                 m.ranks)
        self.flags.links.record(m.generation, before)
        self.control.group, self.ckpt.group = control_pg, ckpt_pg
        self.ckpt.rank = self.control.rank = new_rank
        self.generation = m.generation
