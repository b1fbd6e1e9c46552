"""Energy meters that say where their joules come from.

A worker picks one meter at start-up with :func:`select_meter` and reads it once per
telemetry step.  Every :class:`EnergyReading` names its ``source`` (``nvml``, ``rapl``,
``ina3221`` or ``estimate``) and its ``method`` (``counter``: a hardware energy counter;
``integrated-power``: power samples integrated over time; ``estimated``: a CPU-load
model), so the controller never shows an estimate as if it were measured.

Sources, in the order tried:

* **NVML** (``device='cuda'`` only; ``nvidia-ml-py``, imported lazily): the GPU's
  millijoule counter (Volta and newer), else a 10 Hz thread integrating board power.
  It covers the GPU board only, not the host CPU; the reading's ``detail`` says so.
* **INA3221** (Jetson): the on-board power monitor through hwmon or the older
  ``ina3221x`` IIO driver.  The input rail (``VDD_IN`` / ``POM_5V_IN``) is the whole
  module; without one the rails are summed (and ``detail`` says so).  No sudo, no
  tegrastats: plain sysfs reads in a sampling thread.
* **RAPL** (Intel, and AMD through the same powercap interface): package-domain
  microjoule counters, wraparound handled with ``max_energy_range_uj``.  Since Linux
  5.10 ``energy_uj`` is readable by root only; :func:`describe_sensors` says so and the
  selection falls back rather than report 0 J.
* **Estimate**: ``P = P_idle + (P_max - P_idle) * cpu_share`` integrated over wall time,
  with ``P_idle``/``P_max`` from the device profile, the testbed environment
  (``EDGETRAIN_EMU_P_IDLE_W`` / ``EDGETRAIN_EMU_P_MAX_W``) or generic defaults.

Zeus is deliberately not used: without a sensor its monitor silently reports 0 J, which
is exactly the failure this module exists to prevent.  A sensor meter returned by
:func:`select_meter` is wrapped so that a counter that fails or never advances hands
over to the estimate (labelled as such) instead of reporting 0 J.

Standard library only; ``pynvml`` is optional and imported only when NVML is tried.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Protocol

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


class _Ticker:
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
        self._ticker: _Ticker | None = None
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
        self._ticker = _Ticker(self._tick, self._period, f"energy-{self.source}")

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


# the sensor backends live in energy_sensors (imported here, after the base names they use)
from .energy_sensors import (  # noqa: E402,F401 (re-exported)
    NvmlCounterMeter, Rail, RaplDomain, RaplMeter, find_ina3221_rails, find_rapl_domains, ina3221_power,
    nvml_meter, _rapl_unreadable,
)


# --------------------------------------------------------------------------- guard + selection


class GuardedMeter:
    """A sensor meter with an estimate behind it.

    If the sensor raises, or reports 0 J after ``stuck_after_s`` (a counter that never
    moves: a VM's fake powercap, a dead rail), every later reading comes from the
    estimate, which was started at the same moment, with ``detail`` saying why.  The
    cumulative value can then step down once; the changed ``source`` marks it.
    """

    def __init__(self, primary: EnergyMeter, fallback: EnergyMeter, stuck_after_s: float = 1.0) -> None:
        self.primary, self.fallback = primary, fallback
        self.stuck_after_s = stuck_after_s
        self.failure = ""

    @property
    def source(self) -> str:
        return self.fallback.source if self.failure else self.primary.source

    @property
    def method(self) -> str:
        return self.fallback.method if self.failure else self.primary.method

    def start(self) -> None:
        self.failure = ""
        self.fallback.start()
        self.primary.start()

    def read(self) -> EnergyReading:
        if not self.failure:
            try:
                r = self.primary.read()
            except Exception as exc:
                self.failure = f"{self.primary.source} failed: {type(exc).__name__}: {exc}"
            else:
                if r.joules > 0 or r.seconds < self.stuck_after_s:
                    return r
                self.failure = f"{self.primary.source} reported 0 J over {r.seconds:.2f} s"
            self.primary.close()
        r = self.fallback.read()
        return replace(r, detail=f"{r.detail}; fell back: {self.failure}")

    def close(self) -> None:
        self.primary.close()
        self.fallback.close()


def _build(source: str, sysfs_root: str, reader: Reader, cuda_index: int, hz: float) -> EnergyMeter:
    if source == "nvml":
        return nvml_meter(cuda_index, hz)
    if source == "rapl":
        return RaplMeter(sysfs_root, reader)
    if source == "ina3221":
        rails = find_ina3221_rails(sysfs_root, reader)
        if not rails:
            raise SensorUnavailable("no readable INA3221 rail")
        power, what = ina3221_power(rails, reader)
        return PowerIntegrator(power, "ina3221", hz, what)
    raise ValueError(f"unknown energy source {source!r}")


def select_meter(device: str = "cpu", cuda_index: int = 0, p_idle_w: float | None = None,
                 p_max_w: float | None = None, sysfs_root: str = "/sys", prefer: str | None = None,
                 *, reader: Reader = read_sysfs, threads: int | None = None,
                 hz: float = 10.0) -> EnergyMeter:
    """Choose the best energy meter this device offers (not yet started).

    Parameters
    ----------
    device
        ``cpu`` or ``cuda[:N]``; NVML is tried only for CUDA (it would measure an idle GPU).
    cuda_index
        The CUDA device for NVML when ``device`` names none (``CUDA_VISIBLE_DEVICES``
        is honoured).
    p_idle_w, p_max_w
        Estimate parameters from the device profile (see :func:`estimate_meter`).
    sysfs_root
        Where sysfs is mounted; tests point it at a fixture tree.
    prefer
        One of :data:`SOURCES` to try first; when it is unavailable the usual order
        follows and ``detail`` records why.  Without it, an emulated device (either
        ``EDGETRAIN_EMU_P_*_W`` variable set) uses the estimate, because host sensors
        would measure the whole host rather than the emulated device.
    reader
        Reads one sysfs attribute (a test hook).
    threads
        Cores this process may use, for the estimate.
    hz
        Sampling rate of power-integrating meters.

    Returns
    -------
    EnergyMeter
        A sensor meter wrapped in :class:`GuardedMeter`, or an :class:`EstimateMeter`.
    """
    if prefer is not None and prefer not in SOURCES:
        raise ValueError(f"prefer={prefer!r} is not one of {', '.join(SOURCES)}")
    estimate = estimate_meter(p_idle_w, p_max_w, threads)
    if prefer is None and (os.environ.get(ENV_P_IDLE) or os.environ.get(ENV_P_MAX)):
        estimate.detail += "; emulated device: host sensors not attributable to it"
        return estimate
    order = ["ina3221", "rapl"]
    if device.startswith("cuda"):
        order.insert(0, "nvml")
        if device.startswith("cuda:"):
            cuda_index = int(device[5:])
    if prefer is not None:
        order = [prefer] + [s for s in order if s != prefer]
    notes = []
    for source in order:
        if source == "estimate":
            break
        try:
            return GuardedMeter(_build(source, sysfs_root, reader, cuda_index, hz), estimate)
        except SensorUnavailable as exc:
            notes.append(f"{source}: {exc}")
    if notes:
        estimate.detail += "; tried " + "; ".join(notes)
    return estimate


def describe_sensors(sysfs_root: str = "/sys", reader: Reader = read_sysfs) -> dict[str, Any]:
    """Which energy sensors this machine has and whether they can be read (for profiling).

    Returns
    -------
    dict
        ``nvml``: bool (``nvml_detail`` says why not); ``rapl``: ``'readable'``,
        ``'unreadable: <why>'`` or ``False`` when absent (``rapl_domains`` lists them);
        ``ina3221``: readable rail names (``ina3221_input_rail``: the whole-module rail
        or ``None``); ``estimate``: always ``True``.
    """
    out: dict[str, Any] = {"estimate": True}
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
        out["nvml"], out["nvml_detail"] = count > 0, f"{count} GPU(s)"
    except ImportError:
        out["nvml"], out["nvml_detail"] = False, "nvidia-ml-py not installed"
    except Exception as exc:
        out["nvml"], out["nvml_detail"] = False, f"nvmlInit failed: {exc}"
    domains = find_rapl_domains(sysfs_root, reader)
    out["rapl_domains"] = [d.name for d in domains]
    out["rapl"] = False
    if domains:
        out["rapl"] = "readable"
        for d in domains:
            try:
                int(reader(os.path.join(d.path, "energy_uj")))
            except (OSError, ValueError) as exc:
                out["rapl"] = _rapl_unreadable(d.name, exc)
                break
    rails = find_ina3221_rails(sysfs_root, reader)
    out["ina3221"] = [r.name for r in rails]
    inputs = [r.name for r in rails if r.name.upper() in INPUT_RAILS]
    out["ina3221_input_rail"] = inputs[0] if inputs else None
    return out
