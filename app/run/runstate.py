"""Run state: what is known about a run, built only from telemetry and process exits.

One :class:`RunState` per run.  The launcher feeds it; the CLI and the GUI read it and
subscribe to its signals.  It also writes the run record (``runs/<run_id>/``).
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from app.paths import atomic_write_text
from app.run.fingerprint import Moments, combine
from app.signals import Signal

log = logging.getLogger("edgetrain.runstate")

STATUSES = ("pending", "connecting", "starting", "running", "done", "failed", "oom", "stopped", "lost")


def steady_energy_per_sample(devs: list[DeviceRun]) -> float | None:
    """Energy per sample after each device's first reported step, all devices together.

    What the planner predicts: the first step also builds the optimizer state and warms
    the allocator and kernels, and in a short run it holds most of the energy (a 2-step
    tiny-model run: ~10x the steady figure).  ``None`` until every device has reported a
    step after its first, each with an energy figure.
    """
    energy, samples = 0.0, 0
    for d in devs:
        later = d.step_energies[1:]
        if not later or any(e is None for e in later):
            return None
        energy += sum(later)
        samples = max(samples, sum(d.step_samples[1:]))  # every rank counts the global samples
    return energy / samples if samples and energy > 0 else None


@dataclass
class DeviceRun:
    """One rank's device during a run."""

    name: str
    rank: int
    status: str = "pending"
    role: str = ""
    pid: int | None = None
    steps: int = 0
    samples: int = 0
    local_samples: int = 0
    busy_s: float = 0.0
    energy_j: float = 0.0
    energy_source: str | None = None
    energy_method: str | None = None
    peak_mem_bytes: int = 0
    last_loss: float | None = None
    latencies: list[float] = field(default_factory=list)
    # per reported step: the worker's CPU seconds in it, and seconds since the previous
    # step ended (None where the worker did not say: an older worker, or the first step)
    cpu_times: list[float | None] = field(default_factory=list)
    periods: list[float | None] = field(default_factory=list)
    # per reported step: its samples and energy (None where not measured)
    step_samples: list[int] = field(default_factory=list)
    step_energies: list[float | None] = field(default_factory=list)
    exit: str | None = None
    message: str | None = None
    param_digest: str | None = None
    # per full parameter name: [local_count, full_count, sum, sum_of_squares] (``done``)
    param_moments: dict[str, list] | None = None
    done_at: float | None = None
    # what caps its memory (``hello``): cgroup (physical), address-space (RLIMIT_AS), ...
    mem_limit_bytes: int | None = None
    mem_limit_kind: str | None = None
    mem_cgroup: str | None = None      # "<version>:<dir>" of its memory cgroup, if one limits it
    oom_kills: int | None = None       # that cgroup's OOM-kill count when the worker started
    phase: str | None = None           # what it was doing at its last heartbeat
    rss_bytes: int | None = None       # its resident memory then


@dataclass
class RunEvent:
    t: float
    device: str | None
    kind: str          # info, oom, error, failure, drill, lost, replan, resumed, telemetry
    message: str


@dataclass
class EvalPoint:
    """One held-out evaluation (an ``eval`` record), after ``step`` completed steps."""

    step: int
    loss: float        # mean cross-entropy over the evaluated rows
    accuracy: float    # 0..1
    samples: int       # labelled rows evaluated


class RunState:
    """Aggregates telemetry of one run.

    Signals
    -------
    record(dict)          every accepted telemetry record
    device_changed(str)   a device's status changed
    event(RunEvent)       something the user should see in the event log
    finished(str)         the run ended: ``done``, ``failed``, ``oom`` or ``stopped``
    """

    def __init__(self, run_id: str, devices: list[str], config: dict[str, Any], run_dir: Path | None = None,
                 plan: dict | None = None) -> None:
        self.run_id = run_id
        self.config = config
        self.plan = plan
        self.devices = {name: DeviceRun(name, rank) for rank, name in enumerate(devices)}
        self.events: list[RunEvent] = []
        self.evals: list[EvalPoint] = []   # by step, one per step
        self.started = time.time()
        self.ended: float | None = None
        self.outcome: str | None = None
        self.rejected_lines = 0
        # telemetry lines not believed (app.run.telemetry.Reject): device -> reason -> lines
        self.rejected: dict[str, dict[str, int]] = {}
        self.rejected_examples: list[str] = []   # the first message of each (device, reason)
        # step -> {"step", "kind", "complete", "ranks": {rank: {device, dir, bytes, files, seconds}}}
        self.checkpoints: dict[int, dict[str, Any]] = {}
        self.model_dir: str | None = None   # where the trained model was exported, if it was
        self.run_dir = run_dir
        self.record = Signal()
        self.device_changed = Signal()
        self.event = Signal()
        self.finished = Signal()
        self._log = None
        # after a re-plan: when it happened, and the devices that have re-formed since
        # (a step only they complete shows training resumed on the survivors)
        self._replanned: float | None = None
        self._rejoined: set[str] = set()
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._log = open(run_dir / "telemetry.jsonl", "a", buffering=1)

    # -- feeding ----------------------------------------------------------------------
    def set_status(self, device: str, status: str, message: str | None = None) -> None:
        dev = self.devices[device]
        if dev.status == status and message is None:
            return
        dev.status = status
        if message:
            dev.message = message
        self.device_changed.emit(device)

    def add_event(self, device: str | None, kind: str, message: str) -> None:
        ev = RunEvent(time.time(), device, kind, message)
        self.events.append(ev)
        if kind == "replan":
            self._replanned, self._rejoined = ev.t, set()
        self.event.emit(ev)

    def note_rejected(self, device: str, kind: str, message: str) -> None:
        """Count one telemetry line of ``device`` that was not believed, and why.

        The first of each reason per device is also a run event (the GUI's event log), so
        a device sending garbage is seen during the run, not only in the record.
        """
        per = self.rejected.setdefault(device, {})
        first = kind not in per
        per[kind] = per.get(kind, 0) + 1
        self.rejected_lines += 1
        if first:
            self.rejected_examples.append(f"{device}: {message[:300]}")
            self.add_event(device if device in self.devices else None, "telemetry",
                           f"{device}: telemetry line rejected ({kind}): {message[:300]}; "
                           "later ones are counted in the run summary")

    def feed(self, rec: dict) -> None:
        """Apply one validated telemetry record."""
        dev = self.devices.get(rec["device"])
        if dev is None:
            return
        if rec["type"] == "beat":  # not logged: kept only for telling a kernel OOM kill
            dev.phase, dev.rss_bytes = rec.get("phase") or dev.phase, rec.get("rss_bytes") or dev.rss_bytes
            return
        if self._log is not None:
            self._log.write(json.dumps(rec, separators=(",", ":")) + "\n")
        kind = rec["type"]
        if kind == "hello":
            dev.pid = rec.get("pid")
            dev.mem_limit_bytes, dev.mem_limit_kind = rec.get("mem_limit_bytes"), rec.get("mem_limit_kind")
            dev.mem_cgroup, dev.oom_kills = rec.get("mem_cgroup"), rec.get("oom_kills")
            self.set_status(dev.name, "starting")
        elif kind == "event":
            if rec.get("role"):
                dev.role = rec["role"]
            if rec["name"] == "ready":
                self.set_status(dev.name, "running")
            elif rec["name"] in ("regrouped", "resumed") and self._replanned is not None:
                self._rejoined.add(dev.name)
            self.add_event(dev.name, "info", rec["message"])
        elif kind == "step":
            dev.steps = rec["step"] + 1
            dev.samples += rec["samples"]
            dev.local_samples += rec.get("local_samples") or 0
            dev.busy_s += rec["latency_s"]
            dev.latencies.append(rec["latency_per_sample_s"])
            dev.cpu_times.append(rec.get("cpu_s"))
            dev.periods.append(rec.get("period_s"))
            dev.step_samples.append(rec["samples"])
            dev.step_energies.append(rec.get("energy_j"))
            if rec.get("energy_j") is not None:
                dev.energy_j += rec["energy_j"]
                dev.energy_source, dev.energy_method = rec.get("energy_source"), rec.get("energy_method")
            dev.peak_mem_bytes = max(dev.peak_mem_bytes, rec.get("peak_mem_bytes") or 0)
            if rec.get("loss") is not None:
                dev.last_loss = rec["loss"]
            if dev.status != "running":
                self.set_status(dev.name, "running")
            if self._replanned is not None and dev.name in self._rejoined:
                self._resumed(rec)
        elif kind == "eval":
            self._eval(rec)
        elif kind == "oom":
            dev.peak_mem_bytes = max(dev.peak_mem_bytes, rec.get("peak_mem_bytes") or 0)
            limit = rec.get("limit_bytes")
            lim = f" (limit {limit / 2**30:.2f} GiB)" if limit else ""
            self.set_status(dev.name, "oom", f"out of memory during {rec['phase']}{lim}")
            self.add_event(dev.name, "oom", f"{dev.name}: out of memory during {rec['phase']}{lim}: {rec['message']}")
        elif kind == "error":
            self.set_status(dev.name, "failed", rec["message"])
            self.add_event(dev.name, "error", f"{dev.name}: {rec['message']}")
        elif kind == "checkpoint":
            self._checkpoint(dev, rec)
        elif kind == "done":
            dev.param_digest = rec.get("param_digest")
            dev.param_moments = rec.get("param_moments")
            dev.done_at = time.time()
            dev.samples = max(dev.samples, rec["samples"])  # step records may be sampled
            if rec.get("energy_j") is not None:
                dev.energy_j = rec["energy_j"]
                dev.energy_source, dev.energy_method = rec.get("energy_source"), rec.get("energy_method")
            dev.peak_mem_bytes = max(dev.peak_mem_bytes, rec.get("peak_mem_bytes") or 0)
            self.set_status(dev.name, "done")
        self.record.emit(rec)

    def finish(self, outcome: str) -> None:
        if self.outcome is not None:
            return
        self.outcome, self.ended = outcome, time.time()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.run_dir is not None:
            try:
                self.save()
            except (OSError, TypeError, ValueError) as exc:
                log.error("could not write the run record of %s: %s", self.run_id, exc)
        self.finished.emit(outcome)

    def _resumed(self, rec: dict) -> None:
        """The first step completed by the survivors after a re-plan."""
        lost = [e.t for e in self.events if e.kind in ("drill", "lost", "failure") and e.t <= self._replanned]
        since = time.time() - (lost[-1] if lost else self._replanned)
        n = sum(1 for d in self.devices.values() if d.status not in ("lost", "failed", "oom"))
        self._replanned = None
        self.add_event(None, "resumed", f"training resumed: step {rec['step'] + 1} completed on the {n} "
                                        f"surviving devices, {since:.1f} s after the loss")

    def _checkpoint(self, dev: DeviceRun, rec: dict) -> None:
        """One rank's part of a checkpoint; complete when every rank has reported it."""
        cp = self.checkpoints.setdefault(rec["step"], {"step": rec["step"], "kind": rec["kind"], "ranks": {}})
        cp["ranks"][dev.rank] = {"device": dev.name, "dir": rec["dir"], "bytes": rec["bytes"],
                                 "files": rec["files"], "seconds": rec.get("seconds")}
        cp["complete"] = len(cp["ranks"]) == len(self.devices)
        if cp["complete"]:
            total = sum(r["bytes"] for r in cp["ranks"].values())
            secs = max((r["seconds"] or 0.0) for r in cp["ranks"].values())
            self.add_event(None, "info", f"checkpoint at step {rec['step']} ({rec['kind']}): "
                                         f"{total / 2**20:.1f} MiB on {len(cp['ranks'])} devices, {secs:.1f} s")

    def _eval(self, rec: dict) -> None:
        """Keep one evaluation per step: every rank that knows the result reports it.

        No run event: the views show evaluations themselves (the CLI's progress line, the
        GUI's loss and accuracy charts), and an event would print them twice.
        """
        if any(e.step == rec["step"] for e in self.evals):
            return
        ev = EvalPoint(rec["step"], float(rec["loss"]), float(rec["accuracy"]), rec["samples"])
        self.evals.append(ev)
        self.evals.sort(key=lambda e: e.step)

    # -- reading ----------------------------------------------------------------------
    def param_moments(self) -> tuple[dict[str, Moments] | None, list[str]]:
        """The trained model's fingerprint: per full parameter name, the whole tensor's
        (count, sum, sum of squares) assembled from every rank (``app.run.fingerprint``),
        and what did not add up.  ``(None, [])`` until every device has reported it."""
        reports = [d.param_moments for d in self.devices.values()]
        if not reports or any(r is None for r in reports):
            return None, []
        return combine(reports)

    def summary(self) -> dict[str, Any]:
        """Run totals: throughput, latency/energy per sample, per device."""
        devs = list(self.devices.values())
        steps = max((d.steps for d in devs), default=0)
        # every rank reports the global samples of each iteration: take one rank's count
        samples = max((d.samples for d in devs), default=0)
        busy = max((d.busy_s for d in devs), default=0.0)
        energy = sum(d.energy_j for d in devs)
        methods = sorted({d.energy_method for d in devs if d.energy_method})
        per_dev = []
        for d in devs:
            med = statistics.median(d.latencies[1:] or d.latencies) if d.latencies else None
            per_dev.append({
                "device": d.name, "rank": d.rank, "role": d.role, "status": d.status, "steps": d.steps,
                "latency_per_sample_s": med,
                "local_throughput_sps": d.local_samples / d.busy_s if d.busy_s else None,
                "energy_j": d.energy_j, "energy_source": d.energy_source, "energy_method": d.energy_method,
                "peak_mem_bytes": d.peak_mem_bytes, "exit": d.exit, "message": d.message,
                "param_digest": d.param_digest,
                # provenance of the cap: physical (cgroup) or address space (RLIMIT_AS)
                "mem_limit_bytes": d.mem_limit_bytes, "mem_limit_kind": d.mem_limit_kind,
                "rejected_telemetry_lines": sum(self.rejected.get(d.name, {}).values()),
            })
        lat = [p["latency_per_sample_s"] for p in per_dev if p["latency_per_sample_s"] is not None]
        self._attach_predictions(per_dev)
        moments, problems = self.param_moments()
        return {
            "run_id": self.run_id, "outcome": self.outcome, "steps": steps, "samples": samples,
            "wall_s": (self.ended or time.time()) - self.started,
            "throughput_sps": samples / busy if busy else None,
            "latency_per_sample_s": max(lat) if lat else None,
            "energy_per_sample_j": energy / samples if samples and energy else None,
            "steady_energy_per_sample_j": steady_energy_per_sample(devs),
            "energy_methods": methods, "rejected_telemetry_lines": self.rejected_lines,
            # per device and reason (app.run.telemetry.Reject), and the first message of each
            "rejected_telemetry": {d: dict(r) for d, r in self.rejected.items()},
            "rejected_telemetry_examples": list(self.rejected_examples),
            "devices": per_dev,
            # layout-independent: comparable with a one-device run of the same settings
            "param_moments": moments, "param_moments_problems": problems,
            # held-out evaluations; eval_*: the last one (the trained model's, once done)
            "evals": [asdict(e) for e in self.evals],
            "eval_step": self.evals[-1].step if self.evals else None,
            "eval_loss": self.evals[-1].loss if self.evals else None,
            "eval_accuracy": self.evals[-1].accuracy if self.evals else None,
            "checkpoints": [self.checkpoints[k] for k in sorted(self.checkpoints)],
            "model_dir": self.model_dir,
        }

    def _attach_predictions(self, per_dev: list[dict[str, Any]]) -> None:
        """Put the plan's prediction next to each measured value (with the error)."""
        preds = {p.get("name"): p for p in (self.plan or {}).get("predictions", [])}
        for d in per_dev:
            p = preds.get(d["device"])
            if not p:
                continue
            pairs = {"latency_per_sample_s": (p.get("latency_per_sample_s"), d["latency_per_sample_s"]),
                     "peak_mem_bytes": (p.get("peak_rss_bytes"), d["peak_mem_bytes"] or None)}
            d["predicted"] = {k: {"predicted": a, "measured": b,
                                  "error": (b - a) / a if a and b is not None else None}
                              for k, (a, b) in pairs.items()}
            d["predicted"]["oom"] = {"predicted": p.get("oom"), "measured": d["status"] == "oom"}

    def save(self) -> Path:
        """Write ``record.json`` atomically next to the telemetry log."""
        assert self.run_dir is not None
        rec = {"version": 1, "run_id": self.run_id, "started": self.started, "ended": self.ended,
               "outcome": self.outcome, "config": self.config, "plan": self.plan,
               "summary": self.summary(), "events": [asdict(e) for e in self.events]}
        path = self.run_dir / "record.json"
        atomic_write_text(path, json.dumps(rec, indent=1, default=str))
        return path
