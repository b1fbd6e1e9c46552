"""Hardware energy sensors: RAPL powercap, Jetson INA3221 rails, NVIDIA NVML.

Split from :mod:`workers.energy`, which holds the meter interface, the labelled
estimate, the power integrator and the per-device selection.
"""
from __future__ import annotations

import glob
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from .energy_meters import (
    INPUT_RAILS,
    EnergyMeter,
    EnergyReading,
    PowerIntegrator,
    Reader,
    SensorUnavailable,
    Ticker,
    read_sysfs,
)

# --------------------------------------------------------------------------- RAPL


@dataclass
class RaplDomain:
    """One powercap package domain (``.../intel-rapl:N``)."""

    name: str
    path: str
    max_range_uj: int


def find_rapl_domains(sysfs_root: str = "/sys", reader: Reader = read_sysfs) -> list[RaplDomain]:
    """Package-level RAPL domains; sub-domains (core, uncore, dram) are inside them or
    not part of the package total, and ``psys`` overlaps the packages, so both are skipped."""
    domains = []
    for path in sorted(glob.glob(os.path.join(sysfs_root, "class/powercap/intel-rapl:*"))):
        if not re.fullmatch(r"intel-rapl:\d+", os.path.basename(path)):
            continue
        try:
            name = reader(os.path.join(path, "name"))
        except OSError:
            continue
        if not name.startswith("package"):
            continue
        try:
            max_uj = int(reader(os.path.join(path, "max_energy_range_uj")))
        except (OSError, ValueError):
            max_uj = 0  # checked by RaplMeter: without it a wrap cannot be undone
        domains.append(RaplDomain(name, path, max_uj))
    return domains


def rapl_unreadable(domain: str, exc: BaseException) -> str:
    hint = ""
    if isinstance(exc, PermissionError):
        hint = (" (Linux >= 5.10 makes energy_uj root-only; run the worker as root or "
                "grant read access, e.g. a udev rule chmod o+r)")
    return f"unreadable: {domain} energy_uj: {type(exc).__name__}: {exc}{hint}"


class RaplMeter:
    """Sums package energy counters; a guard thread reads them often enough to see
    every wrap (some AMD parts wrap at 2**32 uJ, ~43 s at 100 W)."""

    source = "rapl"
    method = "counter"

    def __init__(self, sysfs_root: str = "/sys", reader: Reader = read_sysfs,
                 wrap_guard_s: float = 5.0) -> None:
        self._reader = reader
        self.domains = find_rapl_domains(sysfs_root, reader)
        if not self.domains:
            raise SensorUnavailable("no RAPL package domain under powercap")
        for d in self.domains:
            if d.max_range_uj <= 0:
                raise SensorUnavailable(f"{d.name}: max_energy_range_uj unreadable")
            try:
                int(reader(os.path.join(d.path, "energy_uj")))
            except (OSError, ValueError) as exc:
                raise SensorUnavailable(rapl_unreadable(d.name, exc)) from exc
        self.detail = "package domains " + ", ".join(d.name for d in self.domains) + " (CPU packages only, no DRAM)"
        self._guard_s = wrap_guard_s
        self._lock = threading.Lock()
        self._ticker: Ticker | None = None

    def _counters(self) -> list[int]:
        return [int(self._reader(os.path.join(d.path, "energy_uj"))) for d in self.domains]

    def _poll(self) -> None:
        with self._lock:
            now = self._counters()
            for d, a, b in zip(self.domains, self._last, now):
                # the counter runs 0..max_energy_range_uj and then restarts from 0
                self._uj += b - a if b >= a else (d.max_range_uj - a) + b
            self._last = now
            self._t_last = time.monotonic()

    def _tick(self) -> None:
        try:
            self._poll()
        except Exception:
            pass  # read() will raise it where the caller can fall back

    def start(self) -> None:
        self.close()
        with self._lock:
            self._last = self._counters()
            self._t0 = self._t_last = time.monotonic()
            self._uj = 0
        if self._guard_s > 0:
            self._ticker = Ticker(self._tick, self._guard_s, "energy-rapl")

    def read(self) -> EnergyReading:
        self._poll()
        with self._lock:
            return EnergyReading(self._uj / 1e6, self._t_last - self._t0, self.source,
                                 self.method, detail=self.detail)

    def close(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
            self._ticker = None


# --------------------------------------------------------------------------- INA3221


@dataclass
class Rail:
    """One INA3221 channel: either a power attribute (mW) or voltage (mV) and current (mA)."""

    name: str
    power_path: str = ""
    volt_path: str = ""
    curr_path: str = ""

    def watts(self, reader: Reader = read_sysfs) -> float:
        if self.power_path:
            return float(reader(self.power_path)) / 1e3
        return float(reader(self.volt_path)) * float(reader(self.curr_path)) / 1e6


def find_ina3221_rails(sysfs_root: str = "/sys", reader: Reader = read_sysfs) -> list[Rail]:
    """Readable rails of every INA3221 on the board (hwmon driver, then legacy ``ina3221x``)."""
    rails: list[Rail] = []
    drivers = os.path.join(sysfs_root, "bus/i2c/drivers")
    for hw in sorted(glob.glob(os.path.join(drivers, "ina3221/*/hwmon/hwmon*"))):
        for label in sorted(glob.glob(os.path.join(hw, "in*_label"))):
            n = re.fullmatch(r"in(\d+)_label", os.path.basename(label))
            if not n:
                continue
            rail = Rail(_safe(reader, label), volt_path=os.path.join(hw, f"in{n[1]}_input"),
                        curr_path=os.path.join(hw, f"curr{n[1]}_input"))
            rails.append(rail)
    for dev in sorted(glob.glob(os.path.join(drivers, "ina3221x/*/iio:device*"))):
        for power in sorted(glob.glob(os.path.join(dev, "in_power*_input"))):
            n = re.fullmatch(r"in_power(\d+)_input", os.path.basename(power))
            if n:
                name = _safe(reader, os.path.join(dev, f"rail_name_{n[1]}")) or f"rail{n[1]}"
                rails.append(Rail(name, power_path=power))
    good = []
    for rail in rails:
        # "NC" = channel not connected (Orin); unreadable channels are disabled ones
        if not rail.name or rail.name.upper() == "NC":
            continue
        try:
            rail.watts(reader)
        except (OSError, ValueError):
            continue
        good.append(rail)
    return good


def _safe(reader: Reader, path: str) -> str:
    try:
        return reader(path)
    except OSError:
        return ""


def ina3221_power(rails: list[Rail], reader: Reader = read_sysfs) -> tuple[Callable[[], float], str]:
    """The total-power function for ``rails`` and a sentence saying what it covers."""
    inputs = [r for r in rails if r.name.upper() in INPUT_RAILS]
    if inputs:
        chosen, what = inputs[:1], f"input rail {inputs[0].name} (whole module)"
    else:
        chosen = rails
        what = ("sum of rails " + ", ".join(r.name for r in rails)
                + " (no input rail: regulator losses and unmonitored loads are missing)")
    return (lambda: sum(r.watts(reader) for r in chosen)), what


# --------------------------------------------------------------------------- NVML


def _nvml_handle(pynvml: Any, cuda_index: int) -> Any:
    # CUDA numbers only the visible devices; NVML numbers all of them.
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if cuda_index < len(visible):
        entry = visible[cuda_index]
        if entry.isdigit():
            return pynvml.nvmlDeviceGetHandleByIndex(int(entry))
        return pynvml.nvmlDeviceGetHandleByUUID(entry)
    return pynvml.nvmlDeviceGetHandleByIndex(cuda_index)


class NvmlCounterMeter:
    """The GPU's total-energy counter (mJ since driver load, Volta+)."""

    source = "nvml"
    method = "counter"

    def __init__(self, pynvml: Any, handle: Any, detail: str) -> None:
        self._nvml, self._h, self.detail = pynvml, handle, detail
        self._e0 = 0
        self._t0 = 0.0

    def start(self) -> None:
        self._e0 = self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._h)
        self._t0 = time.monotonic()

    def read(self) -> EnergyReading:
        mj = self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._h) - self._e0
        return EnergyReading(mj / 1e3, time.monotonic() - self._t0, self.source, self.method,
                             detail=self.detail)

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:  # already shut down, or the library went away
            pass


def nvml_meter(cuda_index: int = 0, hz: float = 10.0) -> EnergyMeter:
    """An NVML meter for CUDA device ``cuda_index`` (raises :class:`SensorUnavailable`)."""
    try:
        import pynvml
    except ImportError as exc:
        raise SensorUnavailable("nvidia-ml-py (pynvml) not installed") from exc
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        raise SensorUnavailable(f"nvmlInit failed: {exc}") from exc
    try:
        handle = _nvml_handle(pynvml, cuda_index)
        name = pynvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else name
        detail = f"GPU {cuda_index} ({name}) board only, host CPU not included"
        try:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            return NvmlCounterMeter(pynvml, handle, detail)
        except pynvml.NVMLError:  # pre-Volta: no counter, integrate power instead
            pynvml.nvmlDeviceGetPowerUsage(handle)
            return PowerIntegrator(lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3, "nvml",
                                   hz, detail, on_close=pynvml.nvmlShutdown)
    except Exception as exc:
        pynvml.nvmlShutdown()
        raise SensorUnavailable(f"NVML device {cuda_index}: {exc}") from exc
