"""Energy readings, the meter protocol, the CPU-load estimate and the power integrator.

The pieces every meter is built from; :mod:`workers.energy_sensors` builds the hardware
meters (RAPL, INA3221, NVML) on them and :mod:`workers.energy` picks one.  Standard
library only.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

SOURCES = ("nvml", "ina3221", "rapl", "estimate")
#: Generic figures for a small edge board when no device profile gives real ones.
DEFAULT_P_IDLE_W = 5.0
DEFAULT_P_MAX_W = 15.0
#: Jetson rails that measure the whole module's input (Xavier NX/Orin: VDD_IN; Nano: POM_5V_IN).
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")
ENV_P_IDLE = "EDGETRAIN_EMU_P_IDLE_W"
ENV_P_MAX = "EDGETRAIN_EMU_P_MAX_W"

Reader = Callable[[str], str]


def read_sysfs(path: str) -> str:
    """Read one sysfs attribute, stripped (raises ``OSError`` as ``open`` does)."""
    with open(path) as f:
        return f.read().strip()


class SensorUnavailable(RuntimeError):
    """A sensor is absent or unreadable; the message says why."""


@dataclass
class EnergyReading:
    """Energy used since the meter started, with its provenance.

    Attributes
    ----------
    joules, seconds
        Cumulative energy and wall time since ``start()``.
    source
        ``nvml``, ``rapl``, ``ina3221`` or ``estimate``.
    method
        ``counter``, ``integrated-power`` or ``estimated``.
    baseline_subtracted
        True if idle power was removed (no meter here does that; kept for consumers).
    detail
        Free text: domains/rails used, model parameters, why a fallback happened.
    """

    joules: float
    seconds: float
    source: str
    method: str
    baseline_subtracted: bool = False
    detail: str = ""


class EnergyMeter(Protocol):
    """What every meter offers; ``read`` is cumulative since ``start``."""

    source: str
    method: str

    def start(self) -> None: ...

    def read(self) -> EnergyReading: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- estimate


def _allowed_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS has no affinity call
        return max(1, os.cpu_count() or 1)


class EstimateMeter:
    """CPU-load power model integrated over wall time (no sensor needed).

    Process CPU time only accumulates, so each ``read`` integrates the interval since
    the previous one exactly under the linear model; no sampling thread is needed.
    The idle term counts wall time, so the energy of a nonzero interval is never 0.
    """

    source = "estimate"
    method = "estimated"

    def __init__(self, p_idle_w: float, p_max_w: float, threads: int | None = None,
                 detail: str = "", clock: Callable[[], float] = time.monotonic,
                 cpu_clock: Callable[[], float] = time.process_time) -> None:
        if not (p_idle_w > 0 and p_max_w >= p_idle_w):
            raise ValueError(f"need 0 < P_idle <= P_max, got {p_idle_w} W / {p_max_w} W")
        self.p_idle_w, self.p_max_w = float(p_idle_w), float(p_max_w)
        self.threads = threads or _allowed_cpus()
        self.detail = detail
        self._clock, self._cpu_clock = clock, cpu_clock
        self._lock = threading.Lock()
        self.start()

    def start(self) -> None:
        with self._lock:
            self._t0 = self._t_last = self._clock()
            self._c_last = self._cpu_clock()
            self._joules = 0.0

    def read(self) -> EnergyReading:
        with self._lock:
            t, c = self._clock(), self._cpu_clock()
            dt = t - self._t_last
            if dt > 0:
                share = min(1.0, max(0.0, (c - self._c_last) / (dt * self.threads)))
                self._joules += (self.p_idle_w + (self.p_max_w - self.p_idle_w) * share) * dt
                self._t_last, self._c_last = t, c
            return EnergyReading(self._joules, t - self._t0, self.source, self.method,
                                 detail=self.detail)

    def close(self) -> None:
        pass


def _env_float(name: str) -> float | None:
    try:
        return float(os.environ[name])
    except (KeyError, ValueError):
        return None


def estimate_meter(p_idle_w: float | None = None, p_max_w: float | None = None,
                   threads: int | None = None) -> EstimateMeter:
    """Build the estimate meter, resolving its parameters and recording where they came from.

    Parameters
    ----------
    p_idle_w, p_max_w
        From the device profile; ``None`` falls back to the testbed environment
        (``EDGETRAIN_EMU_P_IDLE_W`` / ``EDGETRAIN_EMU_P_MAX_W``), then to
        :data:`DEFAULT_P_IDLE_W` / :data:`DEFAULT_P_MAX_W`.
    threads
        Cores this process may use (full load = all of them busy); default: its CPU affinity.

    Returns
    -------
    EstimateMeter
        With ``detail`` naming the model and the origin of each parameter.
    """
    parts = []
    values = []
    for given, env, default, name in ((p_idle_w, ENV_P_IDLE, DEFAULT_P_IDLE_W, "P_idle"),
                                      (p_max_w, ENV_P_MAX, DEFAULT_P_MAX_W, "P_max")):
        if given is not None:
            value, origin = float(given), "device profile"
        elif _env_float(env) is not None:
            value, origin = _env_float(env), env
        else:
            value, origin = default, "generic default, no device profile"
        values.append(value)
        parts.append(f"{name}={value:g} W ({origin})")
    meter = EstimateMeter(values[0], values[1], threads)
    meter.detail = (f"no sensor: P = P_idle + (P_max - P_idle) * cpu_share over "
                    f"{meter.threads} core(s); " + ", ".join(parts))
    return meter


# --------------------------------------------------------------------------- sampling


class Ticker:
    """Calls ``fn`` every ``period`` seconds from a daemon thread until stopped."""

    def __init__(self, fn: Callable[[], None], period: float, name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(fn, period), name=name, daemon=True)
        self._thread.start()

    def _loop(self, fn: Callable[[], None], period: float) -> None:
        while not self._stop.wait(period):
            fn()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)


class PowerIntegrator:
    """Integrates a power function (watts) with the trapezoid rule from a sampling thread.

    ``read`` takes a fresh sample too, so a reading covers the interval up to the call.
    """

    method = "integrated-power"

    def __init__(self, power_w: Callable[[], float], source: str, hz: float = 10.0,
                 detail: str = "", on_close: Callable[[], None] | None = None) -> None:
        self.source, self.detail = source, detail
        self._power_w, self._period = power_w, 1.0 / hz
        self._on_close = on_close
        self._lock = threading.Lock()
        self._ticker: Ticker | None = None
        self.samples = 0
        self.sample_errors = 0

    def _sample(self) -> None:
        # Power is read under the lock too: samples must be applied in time order.
        with self._lock:
            p = float(self._power_w())
            t = time.monotonic()
            self._joules += 0.5 * (p + self._p_last) * (t - self._t_last)
            self._t_last, self._p_last = t, p
            self.samples += 1

    def _tick(self) -> None:
        try:
            self._sample()
        except Exception:
            # a half-written attribute, a transient NVML error: skip this sample (an
            # exception escaping would end the thread); read() raises if it persists
            self.sample_errors += 1

    def start(self) -> None:
        self._stop_ticker()
        with self._lock:
            self._p_last = float(self._power_w())
            self._t0 = self._t_last = time.monotonic()
            self._joules = 0.0
        self._ticker = Ticker(self._tick, self._period, f"energy-{self.source}")

    def read(self) -> EnergyReading:
        self._sample()
        with self._lock:
            return EnergyReading(self._joules, self._t_last - self._t0, self.source,
                                 self.method, detail=self.detail)

    def _stop_ticker(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
            self._ticker = None

    def close(self) -> None:
        self._stop_ticker()
        if self._on_close is not None:
            self._on_close()
            self._on_close = None
