"""Energy meters against fixture trees shaped like real sysfs, plus this machine's own."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workers import energy_meters as meters
from workers import energy_sensors as sensors
from workers.energy import GuardedMeter, describe_sensors, select_meter
from workers.energy_meters import EstimateMeter, estimate_meter
from workers.energy_sensors import RaplMeter

MAX_UJ = 262_143_328_850  # a real package's max_energy_range_uj


@pytest.fixture(autouse=True)
def _no_emulation_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(meters.ENV_P_IDLE, raising=False)
    monkeypatch.delenv(meters.ENV_P_MAX, raising=False)


def write(path: Path, value: object) -> None:
    """Replace a sysfs-like file atomically, so a sampling thread never sees it half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{value}\n")
    os.replace(tmp, path)


def make_rapl(root: Path, packages: list[int]) -> list[Path]:
    """Package domains at intel-rapl:0 and :2, with a psys domain and a core sub-domain
    that must both be ignored."""
    base = root / "class/powercap"
    dirs = []
    for i, uj in zip((0, 2), packages):
        d = base / f"intel-rapl:{i}"
        write(d / "name", f"package-{len(dirs)}")
        write(d / "energy_uj", uj)
        write(d / "max_energy_range_uj", MAX_UJ)
        write(base / f"intel-rapl:{i}:0" / "name", "core")
        write(base / f"intel-rapl:{i}:0" / "energy_uj", 123)
        dirs.append(d)
    write(base / "intel-rapl:1/name", "psys")
    write(base / "intel-rapl:1/energy_uj", 999_999_999)
    write(base / "intel-rapl:1/max_energy_range_uj", MAX_UJ)
    return dirs


# --------------------------------------------------------------------------- RAPL


def test_rapl_two_packages_with_wraparound(tmp_path: Path) -> None:
    d0, d1 = make_rapl(tmp_path, [MAX_UJ - 1000, 1_000_000])
    meter = RaplMeter(str(tmp_path), wrap_guard_s=0)
    assert [d.name for d in meter.domains] == ["package-0", "package-1"]
    meter.start()
    write(d0 / "energy_uj", 500)  # wrapped: (max - a) + b = 1500 uJ
    write(d1 / "energy_uj", 3_000_000)
    r = meter.read()
    assert r.source == "rapl" and r.method == "counter"
    assert r.joules == pytest.approx((1000 + 500 + 2_000_000) / 1e6)
    assert r.seconds > 0
    meter.close()


def test_rapl_guard_thread_sees_every_wrap(tmp_path: Path) -> None:
    (d0,) = make_rapl(tmp_path, [int(MAX_UJ * 0.9)])
    meter = RaplMeter(str(tmp_path), wrap_guard_s=0.01)
    meter.start()
    # two wraps between reads: only the guard's polling can account for both
    for value in (int(MAX_UJ * 0.1), int(MAX_UJ * 0.9), int(MAX_UJ * 0.1)):
        write(d0 / "energy_uj", value)
        time.sleep(0.15)
    r = meter.read()
    meter.close()
    assert r.joules == pytest.approx(1.2 * MAX_UJ / 1e6, rel=1e-6)


def test_select_meter_uses_readable_rapl(tmp_path: Path) -> None:
    make_rapl(tmp_path, [10, 20])
    assert describe_sensors(str(tmp_path))["rapl"] == "readable"
    meter = select_meter("cpu", sysfs_root=str(tmp_path))
    assert isinstance(meter, GuardedMeter) and meter.source == "rapl"
    meter.close()


def test_rapl_unreadable_directory_falls_back(tmp_path: Path) -> None:
    (d0,) = make_rapl(tmp_path, [10])
    (d0 / "energy_uj").unlink()
    (d0 / "energy_uj").mkdir()  # open() fails even for root, like a root-only file for a user
    info = describe_sensors(str(tmp_path))
    assert info["rapl"].startswith("unreadable:") and "package-0" in info["rapl"]
    meter = select_meter("cpu", sysfs_root=str(tmp_path))
    meter.start()
    time.sleep(0.05)
    r = meter.read()
    assert (r.source, r.method) == ("estimate", "estimated")
    assert r.joules > 0 and "rapl: unreadable" in r.detail


def test_rapl_permission_error_via_reader_hook(tmp_path: Path) -> None:
    make_rapl(tmp_path, [10, 20])

    def reader(path: str) -> str:
        if path.endswith("energy_uj"):
            raise PermissionError(13, "Permission denied", path)
        return meters.read_sysfs(path)

    info = describe_sensors(str(tmp_path), reader=reader)
    assert info["rapl"].startswith("unreadable:") and "root-only" in info["rapl"]
    meter = select_meter("cpu", sysfs_root=str(tmp_path), reader=reader)
    assert meter.source == "estimate"
    meter.start()
    assert meter.read().joules > 0


def test_stuck_counter_hands_over_to_estimate(tmp_path: Path) -> None:
    make_rapl(tmp_path, [10])
    meter = GuardedMeter(RaplMeter(str(tmp_path), wrap_guard_s=0), estimate_meter(), stuck_after_s=0.05)
    meter.start()
    time.sleep(0.1)
    r = meter.read()
    assert r.source == "estimate" and r.joules > 0 and "reported 0 J" in r.detail
    assert meter.source == "estimate"


def test_sensor_error_hands_over_to_estimate(tmp_path: Path) -> None:
    (d0,) = make_rapl(tmp_path, [10])
    meter = select_meter("cpu", sysfs_root=str(tmp_path))
    meter.start()
    (d0 / "energy_uj").unlink()
    r = meter.read()
    assert r.source == "estimate" and "rapl failed" in r.detail
    meter.close()


def test_emulated_device_prefers_estimate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_rapl(tmp_path, [10])
    monkeypatch.setenv(meters.ENV_P_IDLE, "3")
    monkeypatch.setenv(meters.ENV_P_MAX, "9")
    meter = select_meter("cpu", sysfs_root=str(tmp_path))
    assert isinstance(meter, EstimateMeter) and (meter.p_idle_w, meter.p_max_w) == (3, 9)
    assert meters.ENV_P_IDLE in meter.detail
    explicit = select_meter("cpu", sysfs_root=str(tmp_path), prefer="rapl")
    assert explicit.source == "rapl"
    explicit.close()
    with pytest.raises(ValueError):
        select_meter(prefer="zeus")


# --------------------------------------------------------------------------- INA3221


def make_hwmon(root: Path, rails: dict[str, tuple[int, int]]) -> Path:
    hw = root / "bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    for n, (label, (mv, ma)) in enumerate(rails.items(), start=1):
        write(hw / f"in{n}_label", label)
        write(hw / f"in{n}_input", mv)
        write(hw / f"curr{n}_input", ma)
    return hw


def test_ina3221_hwmon_integrates_changing_power(tmp_path: Path) -> None:
    hw = make_hwmon(tmp_path, {"VDD_IN": (5000, 1000), "VDD_CPU_GPU_CV": (5000, 400),
                               "VDD_SOC": (5000, 300)})
    write(hw / "in4_label", "NC")  # unconnected channel on Orin boards: ignored
    info = describe_sensors(str(tmp_path))
    assert info["ina3221"] == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]
    assert info["ina3221_input_rail"] == "VDD_IN"
    meter = select_meter("cpu", sysfs_root=str(tmp_path), hz=50)
    assert meter.source == "ina3221" and meter.method == "integrated-power"
    t0 = time.monotonic()
    meter.start()
    time.sleep(0.4)
    write(hw / "curr1_input", 2000)  # 5 W -> 10 W on the input rail
    t_switch = time.monotonic() - t0
    time.sleep(0.4)
    r = meter.read()
    meter.close()
    expected = 5.0 * t_switch + 10.0 * (r.seconds - t_switch)
    assert r.joules == pytest.approx(expected, rel=0.10)
    assert "VDD_IN" in r.detail


def test_ina3221_without_input_rail_sums_rails(tmp_path: Path) -> None:
    make_hwmon(tmp_path, {"VDD_GPU_SOC": (5000, 600), "VDD_CPU_CV": (5000, 200)})
    rails = sensors.find_ina3221_rails(str(tmp_path))
    power, what = sensors.ina3221_power(rails)
    assert power() == pytest.approx(4.0) and "sum of rails" in what


def test_ina3221x_iio_in_power(tmp_path: Path) -> None:
    dev = tmp_path / "bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    for n, (name, mw) in enumerate({"POM_5V_IN": 4000, "POM_5V_GPU": 1000, "POM_5V_CPU": 800}.items()):
        write(dev / f"rail_name_{n}", name)
        write(dev / f"in_power{n}_input", mw)
    assert describe_sensors(str(tmp_path))["ina3221_input_rail"] == "POM_5V_IN"
    meter = select_meter("cpu", sysfs_root=str(tmp_path), hz=20)
    meter.start()
    time.sleep(0.3)
    r = meter.read()
    meter.close()
    assert r.source == "ina3221"
    assert r.joules == pytest.approx(4.0 * r.seconds, rel=0.10)


# --------------------------------------------------------------------------- estimate


ESTIMATE_PROBE = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from workers.energy_meters import EstimateMeter
mode, p_idle, p_max, threads, cpu_s = sys.argv[2], *map(float, sys.argv[3:6]), float(sys.argv[6])
meter = EstimateMeter(p_idle, p_max, threads=int(threads))
meter.start()
c0 = time.process_time()
if mode == "busy":          # burn cpu_s seconds of CPU, however long the shared cores take
    x = 0
    while time.process_time() - c0 < cpu_s:
        x += 1
else:                       # idle for the given wall time
    time.sleep(cpu_s)
r = meter.read()
print(json.dumps({"joules": r.joules, "seconds": r.seconds, "cpu_s": time.process_time() - c0,
                  "source": r.source, "method": r.method}))
"""


def run_estimate_probe(mode: str, seconds: float, p_idle: float, p_max: float, threads: int) -> dict:
    """One fresh process measuring itself with an EstimateMeter while busy or idle."""
    root = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", ESTIMATE_PROBE, root, mode, str(p_idle), str(p_max),
                          str(threads), str(seconds)], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)


def test_estimate_busy_process_uses_more_energy_than_idle_one() -> None:
    # The same meter settings in two processes: one burns 0.5 s of CPU, the other sleeps for
    # as long as the busy one took. Only the CPU share tells them apart.
    p_idle, p_max, threads = 5.0, 15.0, 1
    busy = run_estimate_probe("busy", 0.5, p_idle, p_max, threads)
    idle = run_estimate_probe("idle", busy["seconds"], p_idle, p_max, threads)
    assert (busy["source"], busy["method"]) == ("estimate", "estimated")
    # the idle process's energy over the busy one's wall time, at its own average power
    idle_same_wall = idle["joules"] / idle["seconds"] * busy["seconds"]
    assert busy["joules"] > idle_same_wall, (busy, idle)
    # clearly more: the extra energy is what the burnt CPU accounts for under the model
    # (P_max - P_idle) * cpu / threads, allowing for half of it lost to measurement noise
    extra_from_cpu = (p_max - p_idle) * busy["cpu_s"] / threads
    assert busy["joules"] - idle_same_wall >= 0.5 * extra_from_cpu, (busy, idle)


def test_estimate_defaults_say_so() -> None:
    meter = estimate_meter()
    assert (meter.p_idle_w, meter.p_max_w) == (meters.DEFAULT_P_IDLE_W, meters.DEFAULT_P_MAX_W)
    assert "generic default" in meter.detail
    with pytest.raises(ValueError):
        EstimateMeter(0.0, 10.0)  # would report 0 J while idle


# --------------------------------------------------------------------------- this machine


def test_select_meter_on_this_machine_is_labelled_honestly() -> None:
    info = describe_sensors()
    meter = select_meter("cpu")
    meter.start()
    time.sleep(0.1)
    r = meter.read()
    meter.close()
    assert r.joules > 0
    if info["ina3221"]:
        assert r.source in ("ina3221", "estimate")
    elif info["rapl"] == "readable":
        assert r.source in ("rapl", "estimate")
    else:
        assert (r.source, r.method) == ("estimate", "estimated")
        assert "generic default" in r.detail and "rapl" in r.detail
    if r.source == "estimate":
        assert r.method == "estimated"


def _nvml_status() -> tuple[bool, str]:
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount() > 0, "no NVIDIA GPU visible to NVML"
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # ImportError, or NVMLError_LibraryNotFound on CPU machines
        return False, f"NVML unavailable: {exc}"


_NVML_OK, _NVML_WHY = _nvml_status()


@pytest.mark.skipif(not _NVML_OK, reason=_NVML_WHY)
def test_nvml_meter_reads_gpu_energy() -> None:
    meter = select_meter("cuda", cuda_index=0)
    assert meter.source == "nvml" and meter.method in ("counter", "integrated-power")
    meter.start()
    time.sleep(0.5)
    r = meter.read()
    meter.close()
    assert r.source == "nvml" and r.joules > 0 and "GPU 0" in r.detail
