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
from dataclasses import replace
from typing import Any

from .energy_meters import (
    ENV_P_IDLE,
    ENV_P_MAX,
    INPUT_RAILS,
    SOURCES,
    EnergyMeter,
    EnergyReading,
    PowerIntegrator,
    Reader,
    SensorUnavailable,
    estimate_meter,
    read_sysfs,
)
from .energy_sensors import RaplMeter, find_ina3221_rails, find_rapl_domains, ina3221_power, nvml_meter, rapl_unreadable

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
                out["rapl"] = rapl_unreadable(d.name, exc)
                break
    rails = find_ina3221_rails(sysfs_root, reader)
    out["ina3221"] = [r.name for r in rails]
    inputs = [r.name for r in rails if r.name.upper() in INPUT_RAILS]
    out["ina3221_input_rail"] = inputs[0] if inputs else None
    return out
