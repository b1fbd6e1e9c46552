"""Fixed-size ring buffers of (x, value) points for live charts (x: time, or training step).

Telemetry arrives at whatever rate the workers report; the charts repaint at a fixed
rate from these buffers.  Memory is allocated once per series, so a long run never
grows the controller, and reading the newest ``capacity`` points is one copy.

:class:`SeriesStore` keys rings by ``(series, device)`` and keeps a per-key version so a
view repaints only the curves that changed since it last looked.
"""
from __future__ import annotations

import csv
import io
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, TextIO

import numpy as np

from app.paths import atomic_write_text

#: 60 s at 20 Hz with room to spare; older points fall off the front.
DEFAULT_CAPACITY = 4096


class Ring:
    """A preallocated ring of ``(x, y)`` float64 points.

    Each point is written twice (at ``i`` and ``i + capacity``) so the newest
    ``capacity`` points are always one contiguous slice; :meth:`arrays` copies that slice
    (callers may keep the arrays while the ring keeps filling).
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._x = np.zeros(2 * capacity)
        self._y = np.zeros(2 * capacity)
        self._next = 0      # slot of the next write
        self._n = 0         # points held (<= capacity)

    def __len__(self) -> int:
        return self._n

    def append(self, x: float, y: float) -> None:
        i, c = self._next, self.capacity
        self._x[i] = self._x[i + c] = x
        self._y[i] = self._y[i + c] = y
        self._next = (i + 1) % c
        self._n = min(self._n + 1, c)

    def extend(self, xs: Iterable[float], ys: Iterable[float]) -> None:
        for x, y in zip(xs, ys):
            self.append(x, y)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The points held, oldest first (copies)."""
        start = self._next - self._n + (self.capacity if self._next < self._n else 0)
        sl = slice(start, start + self._n)
        return self._x[sl].copy(), self._y[sl].copy()

    def last(self) -> tuple[float, float] | None:
        if not self._n:
            return None
        i = (self._next - 1) % self.capacity
        return float(self._x[i]), float(self._y[i])

    def clear(self) -> None:
        self._next = self._n = 0


@dataclass(frozen=True)
class SeriesKey:
    series: str
    device: str


class SeriesStore:
    """Rings per ``(series, device)``, created on first use, with change versions.

    Appends and reads may happen on different threads; a lock keeps a read from seeing
    half of an append.
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._rings: dict[SeriesKey, Ring] = {}
        self._versions: dict[SeriesKey, int] = {}
        self._lock = threading.Lock()
        self.version = 0

    def append(self, series: str, device: str, x: float, y: float) -> None:
        key = SeriesKey(series, device)
        with self._lock:
            ring = self._rings.get(key)
            if ring is None:
                ring = self._rings[key] = Ring(self.capacity)
            ring.append(x, y)
            self.version += 1
            self._versions[key] = self.version

    def keys(self) -> list[SeriesKey]:
        with self._lock:
            return list(self._rings)

    def devices(self, series: str | None = None) -> list[str]:
        """Devices with data (in first-seen order)."""
        with self._lock:
            seen = dict.fromkeys(k.device for k in self._rings if series is None or k.series == series)
        return list(seen)

    def arrays(self, series: str, device: str) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            ring = self._rings.get(SeriesKey(series, device))
            if ring is None:
                return np.zeros(0), np.zeros(0)
            return ring.arrays()

    def count(self, series: str, device: str | None = None) -> int:
        """Points held for ``series`` (of one device, or of all)."""
        with self._lock:
            return sum(len(r) for k, r in self._rings.items()
                       if k.series == series and (device is None or k.device == device))

    def changed_since(self, version: int) -> list[SeriesKey]:
        """Keys appended to after ``version`` (compare with :attr:`version`)."""
        with self._lock:
            return [k for k, v in self._versions.items() if v > version]

    def drop_device(self, device: str) -> None:
        with self._lock:
            for k in [k for k in self._rings if k.device == device]:
                del self._rings[k]
                self._versions.pop(k, None)
            self.version += 1

    def clear(self) -> None:
        with self._lock:
            self._rings.clear()
            self._versions.clear()
            self.version += 1

    def write_csv(self, out: TextIO | Path | str, series: Iterable[str] | None = None) -> int:
        """Write ``series,device,t,value`` rows; returns the number of data rows."""
        if isinstance(out, (str, Path)):
            buf = io.StringIO(newline="")
            rows = self.write_csv(buf, series)
            atomic_write_text(out, buf.getvalue())
            return rows
        wanted = set(series) if series is not None else None
        w = csv.writer(out)
        w.writerow(["series", "device", "t_s", "value"])
        rows = 0
        for key in sorted(self.keys(), key=lambda k: (k.series, k.device)):
            if wanted is not None and key.series not in wanted:
                continue
            xs, ys = self.arrays(key.series, key.device)
            for x, y in zip(xs.tolist(), ys.tolist()):
                w.writerow([key.series, key.device, f"{x:.6f}", repr(y)])
                rows += 1
        return rows


# ------------------------------------------------------------------ telemetry -> points

#: The one name of the memory quantity wherever it is shown (the memory chart, the plan
#: preview, the run progress): resident memory, i.e. physical memory in use, as the workers
#: measure it (``rss_bytes``) and the planner predicts its peak (``peak_rss_bytes``).  A
#: device capped by ``RLIMIT_AS`` is capped on its address space instead: a different
#: quantity, always labelled "address space".
MEMORY_LABEL = "Memory (RSS)"
#: The chart series over time (seconds since launch), with their unit as plotted.
SERIES: dict[str, str] = {
    "energy": "J/sample",
    "latency": "ms/sample",
    "throughput": "samples/s",
    "memory": "MiB",
}
#: The chart series over training steps (x = completed steps), with their unit: the
#: training loss of each step (``step`` records), the held-out loss and accuracy
#: (``eval`` records).
STEP_SERIES: dict[str, str] = {
    "train_loss": "cross-entropy",
    "eval_loss": "cross-entropy",
    "accuracy": "%",
}


def record_points(rec: dict, t0: float) -> list[tuple[str, str, float, float]]:
    """Chart points ``(series, device, x, value)`` of one telemetry record.

    For :data:`SERIES`, ``x`` is seconds since ``t0``: only ``step`` records carry rates;
    ``oom`` records carry the memory at the failure.  Energy per sample is this device's
    energy over the iteration's global samples, so the devices' values add up to the
    run's energy per sample.

    For :data:`STEP_SERIES`, ``x`` is the number of completed steps, so a training loss
    and the evaluation that followed the same step share an ``x`` (a ``step`` record's
    ``step`` is 0-based, an ``eval`` record's counts completed steps).  Accuracy is in
    percent.  A NaN or infinite loss (a diverged run) is not plotted: a curve cannot
    draw it, and the run summary still shows it.
    """
    kind = rec.get("type")
    dev = rec.get("device")
    if dev is None:
        return []
    if kind == "eval":
        out = [("accuracy", dev, float(rec["step"]), float(rec["accuracy"]) * 100.0)]
        if math.isfinite(rec["loss"]):
            out.insert(0, ("eval_loss", dev, float(rec["step"]), float(rec["loss"])))
        return out
    if kind not in ("step", "oom"):
        return []
    x = float(rec.get("t", t0)) - t0
    out: list[tuple[str, str, float, float]] = []
    mem = rec.get("rss_bytes") or rec.get("peak_mem_bytes")
    if kind == "step":
        out.append(("latency", dev, x, float(rec["latency_per_sample_s"]) * 1e3))
        samples = rec.get("samples") or 0
        if rec.get("energy_j") is not None and samples:
            out.append(("energy", dev, x, float(rec["energy_j"]) / samples))
        tput = rec.get("throughput_sps")
        if tput is None and rec.get("latency_s"):
            tput = (rec.get("local_samples") or samples) / rec["latency_s"]
        if tput is not None:
            out.append(("throughput", dev, x, float(tput)))
        loss = rec.get("loss")
        if loss is not None and math.isfinite(loss):
            out.append(("train_loss", dev, float(rec["step"] + 1), float(loss)))
    if mem:
        out.append(("memory", dev, x, float(mem) / 2**20))
    return out
