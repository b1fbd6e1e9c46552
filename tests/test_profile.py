"""Profiling over SSH on the asyncssh testbed: the CLI on 4 devices, the cache, invalidation.

Link rates against tc-shaped links are checked on the netns tier (test_netns.py).  No test
has a time limit (only a hang timeout); how long profiling takes is measured by
``bench/resource_timing.py``.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from app.devices.inventory import load_inventory
from app.devices.profile import CONTROLLER, DeviceProfile, LinkMatrix, ProfileCache, profile_devices
from app.devices.ssh import HostKeyError, KnownHosts
from app.testbed.daemon import start_testbed, stop_testbed

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tb4(tmp_path_factory):
    d = tmp_path_factory.mktemp("tb4")
    # address-space caps, no CPU quotas: a Nano's quota (0.15 of a core here) makes every
    # probe's torch import take ~20 s; profiles under cgroups are tested in test_cgroup_boards
    info = start_testbed(d / "testbed", n_devices=4, preset="heterogeneous", base_addr="127.0.12.11", port=0,
                         cgroups=False)
    try:
        yield info, d
    finally:
        stop_testbed(d / "testbed")


def _cli(args: list[str], home: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI as a user runs it; ``timeout`` only catches a hang."""
    env = {**os.environ, "EDGETRAIN_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=env, check=False,
                          capture_output=True, text=True, timeout=timeout)


def fake_torch_version_venv(path: Path, version: str) -> Path:
    """A venv that sees the real site-packages but whose torch metadata says ``version``:
    what a device reports after its torch package was upgraded."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    py = path / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "_edgetrain_real.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    meta = site / f"torch-{version}.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
    return py


def test_cli_profile_four_devices_then_cache_survives_restart(tb4):
    info, d = tb4
    home = d / "home"
    res = _cli(["profile", "--inventory", str(info.inventory_path), "--refresh"], home)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "bandwidth (Mbit/s)" in out and "round-trip time (ms)" in out
    lines = out.splitlines()
    bw = lines[lines.index("bandwidth (Mbit/s), row -> column") + 2:][:5]
    for row in bw:
        cells = row.split()[1:]
        assert len(cells) == 5 and cells.count("-") == 1, row  # only the diagonal is missing
        assert all(float(c) > 10 for c in cells if c != "-"), row

    # a new controller process: everything comes from the cache, nothing is remeasured
    res2 = _cli(["profile", "--inventory", str(info.inventory_path), "--json"], home)
    assert res2.returncode == 0, res2.stderr
    data = json.loads(res2.stdout)
    cached = json.loads((home / "profiles" / "nano0.json").read_text())["profile"]
    assert data["profiles"][0]["collected_at"] == cached["collected_at"]
    assert "starting probes" not in res2.stderr, res2.stderr
    links = data["links"]
    assert links["names"] == [x.name for x in info.devices] + [CONTROLLER]

    # the fields the planner uses, checked against what the testbed emulates
    for prof, dev in zip(data["profiles"], info.devices):
        p = DeviceProfile.from_dict(prof)
        assert p.name == dev.name and p.threads == dev.threads
        assert p.mem_limit_bytes == dev.mem_bytes  # the emulated cap is the tightest limit
        assert p.labels["preset"] == dev.preset and p.power_source == "estimate"
        assert p.gflops_fp32 and p.gflops_fp32 > 1 and p.gflops_fp16 is None and p.gpu is None
        # the non-matmul probe: a few ms per pass on any CPU this runs on, not a default
        assert p.op_probe_s is not None and 1e-4 < p.op_probe_s < 1.0, p.op_probe_s
        assert p.versions["torch"] and p.versions["python"] and p.versions["workers"]
        assert p.p_max_w > p.p_idle_w > 0
        assert "rapl" in p.sensors and "ina3221" in p.sensors and "nvml" in p.sensors


def test_cache_invalidated_when_device_torch_changes(tb4, tmp_path):
    info, d = tb4
    inv = load_inventory(info.inventory_path)
    known = KnownHosts(info.known_hosts_path)
    devices = inv.devices[:2]
    cache = tmp_path / "profiles"

    first, m1 = asyncio.run(profile_devices(devices, known, cache, link_seconds=0.2))
    assert [p.from_cache for p in first] == [False, False]
    again, m2 = asyncio.run(profile_devices(devices, known, cache))
    assert [p.from_cache for p in again] == [True, True]
    assert m2.bandwidth(devices[0].name, devices[1].name) == m1.bandwidth(devices[0].name, devices[1].name)

    # the second device's torch is "upgraded": its cached profile (and its links) are remeasured
    devices[1].python = str(fake_torch_version_venv(tmp_path / "venv", "2.14.0"))
    third, m3 = asyncio.run(profile_devices(devices, known, cache, link_seconds=0.2))
    assert [p.from_cache for p in third] == [True, False]
    assert third[1].versions["torch"] == "2.14.0" and third[1].collected_at > first[1].collected_at
    assert ProfileCache(cache).load(devices[1].name).versions["torch"] == "2.14.0"
    assert m3.bandwidth(devices[0].name, devices[1].name) != m1.bandwidth(devices[0].name, devices[1].name)

    # --refresh remeasures even an unchanged device
    fourth, _ = asyncio.run(profile_devices(devices[:1], known, cache, refresh=True, pairs=False, link_seconds=0.1))
    assert not fourth[0].from_cache and fourth[0].collected_at > first[0].collected_at


def test_profile_refuses_untrusted_device(tb4, tmp_path):
    info, _ = tb4
    inv = load_inventory(info.inventory_path)
    with pytest.raises(HostKeyError) as exc:
        asyncio.run(profile_devices(inv.devices[:1], KnownHosts(tmp_path / "empty_known_hosts"), tmp_path))
    assert exc.value.kind == "unknown" and exc.value.fingerprint.startswith("SHA256:")
    assert not list(tmp_path.glob("*.json"))


def test_link_matrix_roundtrip():
    m = LinkMatrix.empty(["a", "b", CONTROLLER])
    m.set("a", "b", 100.0, 0.5)
    m.set(CONTROLLER, "a", 50.0, 1.0, symmetric=False)
    assert m.bandwidth("b", "a") == 100.0 and m.rtt("a", "b") == 0.5
    assert m.bandwidth(CONTROLLER, "a") == 50.0 and m.bandwidth("a", CONTROLLER) is None
    assert LinkMatrix(**json.loads(json.dumps(m.to_dict()))) == m


def test_a_testbed_profile_from_before_the_testbed_started_is_measured_again(tmp_path):
    """An emulated device computes with a share of this host, whose speed drifts: its profile
    holds for the testbed instance it was measured on.  A real device's stays valid until
    its address (or its software, see cache_valid) changes."""
    from app.devices.profile import is_stale

    inv_path = tmp_path / "inventory.yaml"
    inv_path.write_text("version: 1\ndevices:\n"
                        "  - {name: dev0, host: 127.0.0.5, port: 2222, labels: {testbed: local}}\n"
                        "  - {name: box, host: 10.0.0.9}\n")
    started = inv_path.stat().st_mtime
    dev, box = load_inventory(inv_path).devices

    def measured(device, at: float, **kw) -> DeviceProfile:
        fields = dict(name=device.name, collected_at=at, versions={}, os="Linux", arch="x86_64", cpu_model="cpu",
                      cores=2, threads=1, mem_total_bytes=None, mem_available_bytes=None, mem_limit_bytes=None,
                      gpu=None, sensors={}, gflops_fp32=100.0, gflops_fp16=None, p_idle_w=5.0, p_max_w=15.0,
                      power_source="estimate", labels=dict(device.labels), host=device.host, port=device.port)
        return DeviceProfile(**{**fields, **kw})

    assert not is_stale(measured(dev, started + 5), dev, inv_path)
    assert is_stale(measured(dev, started - 5), dev, inv_path)      # the testbed started since
    assert is_stale(measured(dev, started + 5, port=2223), dev, inv_path)  # another address
    assert not is_stale(measured(box, started - 3600), box, inv_path)  # a real board: still its speed
    assert not is_stale(measured(dev, started - 5), dev, None)        # no inventory file to date it by
    # the testbed writing its inventory again (a new start) makes the fresh profile stale
    os.utime(inv_path, (started + 10, started + 10))
    assert is_stale(measured(dev, started + 5), dev, inv_path)
