"""A live run's progress per device and its ETA, from telemetry records (Qt-free).

:class:`RunProgress` is fed the same telemetry records the charts are (``step``, ``eval``)
and the devices' status changes.  Per device it keeps the steps done out of the run's
total, the worker's own time for its last step, and, beside the plan's prediction, what
was measured: latency and energy per sample (medians of the recent steps, so one slow
step does not swing them) and the peak resident memory (RSS, the memory chart's quantity).

The ETA is the median of the recent step times times the steps left, per device, the
slowest device deciding.  A step time is wall-clock time between two step records of a
device divided by the steps between them (records may be sampled), measured on the
device's own clock: it includes communication waits, but the median leaves out the steps
that also held an evaluation, so the evaluations still to come are added at their own
measured duration.  Until a device has done :data:`ETA_MIN_STEPS` steps there is no
estimate, shown as "—".
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable

#: Steps a device must have done before the ETA is a number.
ETA_MIN_STEPS = 2
#: Recent step times the medians are taken over.
WINDOW = 20
#: Statuses after which a device does no more steps.
FINAL = frozenset({"done", "failed", "oom", "stopped", "lost"})
#: Shown for a figure not known yet.
NO_VALUE = "—"


@dataclass(frozen=True)
class Predicted:
    """The plan's prediction for one device, in the quantities the charts measure."""

    latency_per_sample_s: float | None = None
    energy_per_sample_j: float | None = None
    peak_rss_bytes: int | None = None

    @classmethod
    def from_plan(cls, plan: dict[str, Any] | None) -> dict[str, Predicted]:
        """Per device name, from a plan's JSON (``Plan.to_dict()``, the run record's ``plan``)."""
        out: dict[str, Predicted] = {}
        for p in (plan or {}).get("predictions") or []:
            out[p["name"]] = cls(p.get("latency_per_sample_s"), p.get("energy_per_sample_j"),
                                 p.get("peak_rss_bytes"))
        return out


@dataclass
class DeviceProgress:
    """One device of a live run: how far it is, and what it measures against the plan.

    Attributes
    ----------
    steps
        Steps completed (a ``step`` record's 0-based ``step`` plus one).
    total
        The run's steps.
    last_step_s
        The worker's own time for its last reported step (``latency_s``).
    peak_rss_bytes
        The highest resident memory its step records reported.
    """

    name: str
    rank: int
    total: int
    role: str = ""
    status: str = "pending"
    steps: int = 0
    last_step_s: float | None = None
    peak_rss_bytes: int | None = None
    predicted: Predicted = field(default_factory=Predicted)
    step_times: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    energies: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    eval_s: float | None = None          # the last evaluation's duration
    _last: tuple[float, int] | None = None   # (t, steps) of the previous step record

    @property
    def fraction(self) -> float:
        return min(1.0, self.steps / self.total) if self.total > 0 else 0.0

    @property
    def latency_per_sample_s(self) -> float | None:
        """Median latency per sample over the recent steps."""
        return statistics.median(self.latencies) if self.latencies else None

    @property
    def energy_per_sample_j(self) -> float | None:
        """Median energy per sample over the recent steps (this device's share, as charted)."""
        return statistics.median(self.energies) if self.energies else None

    @property
    def step_s(self) -> float | None:
        """Median wall-clock time per step over the recent steps."""
        return statistics.median(self.step_times) if self.step_times else None

    @property
    def finished(self) -> bool:
        return self.status in FINAL or (self.total > 0 and self.steps >= self.total)

    def eta_s(self, eval_every: int = 0) -> float | None:
        """Seconds until this device's last step, ``None`` before :data:`ETA_MIN_STEPS` steps."""
        if self.finished:
            return 0.0
        if self.steps < ETA_MIN_STEPS or self.step_s is None:
            return None
        left = max(0, self.total - self.steps)
        # the workers evaluate every eval_every steps and after the last step
        evals = self.total // eval_every - self.steps // eval_every if eval_every > 0 else 0
        if eval_every <= 0 or self.total % eval_every:
            evals += 1
        return left * self.step_s + evals * (self.eval_s or 0.0)

    def feed_step(self, rec: dict[str, Any]) -> None:
        steps = int(rec["step"]) + 1
        t = rec.get("t")
        if self._last is not None and t is not None and steps > self._last[1]:
            dt = (float(t) - self._last[0]) / (steps - self._last[1])
            if dt >= 0 and math.isfinite(dt):
                self.step_times.append(dt)
        if t is not None:
            self._last = (float(t), steps)
        self.steps = max(self.steps, steps)
        self.last_step_s = rec.get("latency_s", self.last_step_s)
        if rec.get("latency_per_sample_s") is not None:
            self.latencies.append(float(rec["latency_per_sample_s"]))
        samples = rec.get("samples") or 0
        if rec.get("energy_j") is not None and samples:
            self.energies.append(float(rec["energy_j"]) / samples)
        rss = rec.get("rss_bytes")
        if rss:
            self.peak_rss_bytes = max(self.peak_rss_bytes or 0, int(rss))
        if rec.get("role"):
            self.role = str(rec["role"])
        if self.status in ("pending", "connecting", "starting"):
            self.status = "running"


class RunProgress:
    """Progress of every device of one run, and the run's ETA.

    Parameters
    ----------
    devices
        Device names in rank order.
    total_steps
        The run's steps (``RunSettings.steps``).
    plan
        The plan the run was launched with (its JSON), for the predicted figures.
    eval_every
        Steps between held-out evaluations (0: none), for the evaluations still to come.
    """

    def __init__(self, devices: Iterable[str], total_steps: int, plan: dict[str, Any] | None = None,
                 eval_every: int = 0) -> None:
        pred = Predicted.from_plan(plan)
        self.total = int(total_steps)
        self.eval_every = int(eval_every or 0)
        self.devices: dict[str, DeviceProgress] = {
            name: DeviceProgress(name, rank, self.total, predicted=pred.get(name, Predicted()))
            for rank, name in enumerate(devices)}
        self.outcome: str | None = None

    @classmethod
    def of_run(cls, devices: Iterable[str], config: dict[str, Any], plan: dict[str, Any] | None) -> RunProgress:
        """From a run's device names, its config (``RunState.config``) and its plan."""
        settings = config.get("settings") or {}
        return cls(devices, int(settings.get("steps") or 0), plan, int(settings.get("eval_every") or 0))

    def feed(self, rec: dict[str, Any]) -> bool:
        """Take one telemetry record; returns whether anything shown changed."""
        dev = self.devices.get(rec.get("device") or "")
        if dev is None:
            return False
        kind = rec.get("type")
        if kind == "step":
            dev.feed_step(rec)
            return True
        if kind == "eval" and rec.get("seconds") is not None:
            dev.eval_s = float(rec["seconds"])
            return True
        if kind == "event" and rec.get("role") and rec["role"] != dev.role:
            dev.role = str(rec["role"])
            return True
        return False

    def set_status(self, name: str, status: str) -> bool:
        dev = self.devices.get(name)
        if dev is None or not status or dev.status == status:
            return False
        dev.status = status
        return True

    def finish(self, outcome: str) -> None:
        """The run ended (its ETA is over)."""
        self.outcome = outcome

    @property
    def steps(self) -> int:
        """Steps the whole run has done: those of its least advanced device still training."""
        live = [d.steps for d in self.devices.values() if d.status not in FINAL - {"done"}]
        return min(live) if live else max((d.steps for d in self.devices.values()), default=0)

    def eta_s(self) -> float | None:
        """Seconds until the run's last step (the slowest device's); ``None`` when not known yet."""
        if self.outcome is not None:
            return 0.0
        etas = [d.eta_s(self.eval_every) for d in self.devices.values() if d.status not in FINAL]
        if not etas:
            return 0.0 if self.devices else None
        if any(e is None for e in etas):
            return None
        return max(etas)

    def step_s(self) -> float | None:
        """The slowest training device's median step time."""
        times = [d.step_s for d in self.devices.values() if d.status not in FINAL and d.step_s is not None]
        return max(times) if times else None


def fmt_duration(seconds: float | None) -> str:
    """``"—"``, ``"45 s"``, ``"3 min 05 s"`` or ``"2 h 04 min"``."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return NO_VALUE
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"
